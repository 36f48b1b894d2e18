"""Containment, tried as an attacker would, through a real kernel against real Podman.

Each test plays a cell that knows mino's source and tries one way out: code that runs on this
machine later, links that make mino mount or read host paths, project files that change the
policy, helpers a cell could stand in for, secrets left lying around, processes that outlive
their stop, a container stopped from inside, and limits that do not hold. Where a test could
pass for the wrong reason, a control shows the attack works when the defence is absent.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import give_to_cell
from tests.kernel import Kernel, isolated_env

pytestmark = pytest.mark.podman


def _tree(root: Path) -> dict:
    """Every entry under root (not following links) with its type, mode, owner and content."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            content = None
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            found[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                                  st.st_uid, content)
    return found


@pytest.fixture
def notebook(tmp_path):
    nb = tmp_path / "notebooks"
    nb.mkdir()
    give_to_cell(nb)  # the sandbox user could write here, were it shared read-write
    (nb / "data.csv").write_text("a,b\n1,2\n")
    return nb


def _kernel(directory: Path, home: Path) -> Kernel:
    k = Kernel(cwd=str(directory), env=isolated_env(home))
    k.ok("%load_ext mino_jupyter")
    return k


def _session_path(kernel, attribute, name="default") -> Path:
    r = kernel.ok(f"from mino_jupyter.magics import current_manager as _cm\n"
                  f"print(_cm().sessions[{name!r}].storage.paths.{attribute})")
    return Path(r.stdout.strip())


# ---------------------------------------------------------------- part 1: what a cell writes
PLANTED_MODULES = ("requests.py", "pandas.py", "ipykernel_launcher.py", "sitecustomize.py", "mino_jupyter.py")
PROTECTED = (".git/hooks/pre-commit", ".envrc", ".venv/bin/activate", ".ipython/profile_default/startup/00-x.py",
             ".jupyter/jupyter_server_config.py", ".vscode/tasks.json", "ipython_config.py", ".bashrc",
             ".mino.toml")


def _plant_script(marker: Path) -> str:
    code = f"import pathlib; pathlib.Path({str(marker)!r}).write_text('ran on the host')"
    lines = [f"printf '%s\\n' {code!r} > {name}" for name in PLANTED_MODULES]
    lines.append(f"printf '%s\\n' {code!r} > x.pth")
    for path in PROTECTED:
        lines.append(f"mkdir -p $(dirname {path}) && printf '%s\\n' {code!r} > {path}")
    lines.append("chmod +x .git/hooks/pre-commit; ls -A")
    return "\n".join(lines)


def _import_everything(directory: Path, home: Path) -> None:
    """What a user does next in that directory: a new kernel loads mino, imports, restarts."""
    try:
        k = Kernel(cwd=str(directory), env=isolated_env(home))
    except RuntimeError:
        return  # the kernel did not even start (a planted ipykernel_launcher.py ran instead)
    try:
        k.execute("%load_ext mino_jupyter")
        k.execute("import requests")
        k.execute("import pandas")
        k.km.restart_kernel(now=False)
        k.kc.wait_for_ready(timeout=60)
        k.execute("import requests")
    finally:
        k.shutdown()


def test_nothing_a_cell_writes_runs_on_this_machine(engine, base_image, notebook, tmp_path):
    marker = tmp_path / "marker"
    before = _tree(notebook)
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        r = k.ok("%%mino\n" + _plant_script(marker))
        assert "requests.py" in r.stdout and ".git" in r.stdout  # the cell wrote them, in its /workspace
    finally:
        k.shutdown()
    assert _tree(notebook) == before  # byte for byte: nothing landed
    _import_everything(notebook, tmp_path / "mino-home")
    assert not marker.exists(), "code a cell wrote ran on this machine"


def test_control_the_same_cell_with_a_read_write_workspace_runs_on_the_host(engine, base_image, tmp_path):
    """Shows the attack is real (and the test above able to fail): rw is the old default."""
    directory = tmp_path / "rw-notebooks"
    directory.mkdir()
    give_to_cell(directory)
    marker = tmp_path / "marker"
    k = _kernel(directory, tmp_path / "mino-home")
    try:
        k.ok("%%mino --workspace rw\n" + _plant_script(marker))
    finally:
        k.shutdown()
    _import_everything(directory, tmp_path / "mino-home")
    assert marker.read_text() == "ran on the host"


def test_apply_takes_data_and_refuses_what_could_run(engine, base_image, notebook, tmp_path):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        k.ok("%%mino\necho 1,2 > results.csv; ln -s /etc/passwd link; mkfifo fifo\n"
             "cp /bin/true suid && chmod 4755 suid; mkdir -p .git/hooks && echo evil > .git/hooks/post-checkout\n"
             "echo 'print(42)' > analysis.py")
        r = k.ok("%mino changes")
        for name in ("results.csv", "link", "fifo", "suid", ".git/hooks/post-checkout", "analysis.py"):
            assert name in r.stdout, (name, r.stdout)
        r = k.ok("%mino apply")
        lines = dict(line.split(": ", 1) for line in r.stdout.strip().splitlines())
        assert lines["results.csv"] == "applied"
        for name in ("link", "fifo", "suid", ".git/hooks/post-checkout", "analysis.py"):
            assert lines[name].startswith("not applied"), (name, lines[name])
        assert (notebook / "results.csv").read_text() == "1,2\n"
        assert (notebook / "results.csv").stat().st_uid == os.geteuid()
        for name in ("link", "fifo", "suid", ".git", "analysis.py"):
            assert not os.path.lexists(notebook / name), name
        r = k.ok("%mino apply link fifo")
        assert "link: not applied: a symlink is never applied" in r.stdout
        assert "fifo: not applied" in r.stdout and not os.path.lexists(notebook / "link")
        r = k.ok("%mino apply analysis.py suid")
        assert "analysis.py: applied with a warning" in r.stdout
        st = (notebook / "analysis.py").lstat()
        assert stat.S_ISREG(st.st_mode) and (notebook / "analysis.py").read_text() == "print(42)\n"
        suid = (notebook / "suid").lstat()
        assert stat.S_ISREG(suid.st_mode) and not suid.st_mode & (stat.S_ISUID | stat.S_ISGID)
        r = k.execute("%mino apply no-such-file")
        assert r.error and "no-such-file" in r.error_text and "Traceback" not in r.error_text
    finally:
        k.shutdown()


def test_links_in_the_notebook_directory_are_never_mounted_or_followed(engine, base_image, notebook, tmp_path):
    secret = tmp_path / "secret-dir"
    secret.mkdir()
    (secret / "key.txt").write_text("host secret\n")
    # The directory came with links (a cloned repository, an earlier rw session): every name
    # mino used to guard, pointing at this machine's files and sockets.
    links = {".ssh": str(secret), ".envrc": "/run/podman/podman.sock", ".venv": "/", ".git": str(secret),
             ".mino.toml": str(secret / "key.txt"), ".ipython": str(secret), ".config": "/root"}
    for name, target in links.items():
        os.symlink(target, notebook / name)
    before = _tree(notebook)
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        r = k.ok("%%mino\ncat .ssh/key.txt .git/key.txt 2>&1; test -S .envrc && echo socket-visible\n"
                 "ls .venv/ | head -3 >/dev/null && echo venv-is-the-container-root\n"
                 "rm .ssh && echo removed-link-inside")
        assert "host secret" not in r.stdout and "socket-visible" not in r.stdout
        assert "removed-link-inside" in r.stdout
        token = k.owner_token()
        (container,) = [c for c in engine.list({"io.mino.owner": token}) if c["Labels"]["io.mino.role"] == "session"]
        mounts = engine.inspect(container["Id"])["Mounts"]
        sources = [m["Source"] for m in mounts]
        assert not any(s.startswith(str(notebook) + "/") or s.startswith(str(secret)) for s in sources), sources
        assert {m["Destination"] for m in mounts} <= {"/workspace", "/home/developer", "/tmp", "/var/tmp",
                                                        "/run/mino", "/etc/ssl/certs/ca-certificates.crt",
                                                        "/usr/local/libexec/mino"}  # the cell executor, read-only
    finally:
        k.shutdown()
    assert _tree(notebook) == before and (secret / "key.txt").read_text() == "host secret\n"


def _trusted(home: Path, path: Path, text: str) -> None:
    from mino_jupyter import config

    path.write_text(text)
    config.record_trust(path, env=isolated_env(home))


def test_project_files_a_cell_could_plant_change_nothing(engine, base_image, tmp_path):
    home = tmp_path / "mino-home"
    project = tmp_path / "project"
    notebooks = project / "notebooks"
    notebooks.mkdir(parents=True)
    give_to_cell(notebooks)
    env = isolated_env(home, network=None)  # no global network choice: the project decides
    _trusted(home, project / ".mino.toml", '[container]\nnetwork = "none"\n')
    other = tmp_path / "other"
    other.mkdir()
    _trusted(home, other / ".mino.toml", '[container]\nnetwork = "host"\n')
    interfaces = "ls /sys/class/net | tr '\\n' ' '"
    k = Kernel(cwd=str(notebooks), env=env)
    try:
        k.ok("%load_ext mino_jupyter")
        r = k.ok(f"%%mino\n{interfaces}; printf '[container]\\nnetwork = \"bridge\"\\n' > .mino.toml")
        assert r.stdout.split() == ["lo"]  # none, from the trusted parent
        assert not (notebooks / ".mino.toml").exists()  # the cell's file did not land
        # Had it landed (applied by name, or written by someone else): no effect, and named.
        (notebooks / ".mino.toml").write_text('[container]\nnetwork = "bridge"\npids_limit = 1\n')
        k.ok("%mino stop --all")
        r = k.ok(f"%%mino\n{interfaces}")
        assert r.stdout.split() == ["lo"]
        assert f"{notebooks / '.mino.toml'} is not trusted, so it has no effect" in r.stderr
        # A link to another project's trusted file: still none, and named.
        (notebooks / ".mino.toml").unlink()
        (notebooks / ".mino.toml").symlink_to(other / ".mino.toml")
        k.ok("%mino stop --all")
        r = k.ok(f"%%mino\n{interfaces}; readlink /proc/self/ns/net")
        assert r.stdout.split()[:-1] == ["lo"] and r.stdout.split()[-1] != os.readlink("/proc/self/ns/net")
        assert f"{notebooks / '.mino.toml'} is a symlink, so it has no effect" in r.stderr
    finally:
        k.shutdown()


# ---------------------------------------------------------------- part 2: inside the session
HELPERS = ("sh", "bash", "env", "kill", "cat", "ps", "setsid", "nft", "perl", "printf")


def test_planted_helpers_never_run_for_mino(engine, base_image, notebook, tmp_path, gateway):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        plant = "mkdir -p ~/.local/bin\n" + "\n".join(
            f"printf '#!/bin/sh\\necho \"$(id -u) {name}\" >> /tmp/planted-ran\\n' > ~/.local/bin/{name}; "
            f"chmod +x ~/.local/bin/{name}" for name in HELPERS)
        k.ok(f"%%mino --network-allow {gateway}:9\n{plant}")
        tmp = _session_path(k, "tmp")
        # every path where mino acts on the session: allowlist changes by flag, by the panel's
        # "apply to this kernel", a re-resolution, an interrupt, a timeout, a stop.
        k.ok(f"%%mino --network-allow {gateway}:10\n/bin/true")
        k.ok("import mino_jupyter.session_firewall as _f; _f.RESOLVE_REFRESH = 0.0")
        k.ok("%%mino\n/bin/true")

        def on_stream(name, text, reply):
            if "started" in reply.stdout and not getattr(on_stream, "sent", False):
                on_stream.sent = True
                k.km.interrupt_kernel()

        k.execute("%%mino\necho started; /bin/sleep 100", on_stream=on_stream, timeout=60)
        k.execute("%%mino --timeout 1\n/bin/sleep 100")
        assert not (tmp / "planted-ran").exists(), (tmp / "planted-ran").read_text()
        k.ok("from mino_jupyter.magics import current_manager as _cm\n"
             "print(_cm().remember_network('allowlist', 'registries', 'session'))")
        k.ok("%%mino\n/bin/true")
        tmp = _session_path(k, "tmp")
        k.ok(f"%%mino\nmkdir -p ~/.local/bin && cp /bin/true ~/.local/bin/x\n{plant}")
        k.ok("%mino stop default")
        assert not (tmp / "planted-ran").exists(), (tmp / "planted-ran").read_text()
        r = k.ok("%%mino\nid -u; which sh")  # the cell's own commands still use its PATH
        assert r.stdout.split() == ["1000", "/usr/bin/sh"] or r.stdout.split()[0] == "1000"
    finally:
        k.shutdown()


def test_a_secret_is_masked_in_every_later_output_of_its_session(engine, base_image, notebook, tmp_path):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        k.ok("%%mino\nnohup bash -c 'while true; do cat /proc/[0-9]*/environ 2>/dev/null | tr \"\\0\" \"\\n\" "
             "| grep ^API_TOKEN= >> /tmp/captured; sleep 0.1; done' >/dev/null 2>&1 &")
        k.ok("API_TOKEN = 'tok-5e3c7e7-value'")
        r = k.ok("%%mino --secret API_TOKEN\nsleep 1; echo used")
        assert "has run cells before" in r.stderr and "--fresh" in r.stderr
        r = k.ok("%%mino\nsort -u /tmp/captured")
        assert "API_TOKEN=" in r.stdout, "the leftover process did not capture anything: the test proves nothing"
        assert "tok-5e3c7e7-value" not in r.stdout and "API_TOKEN=********" in r.stdout
        logs = k.ok("%mino logs").stdout
        assert "tok-5e3c7e7-value" not in logs and "API_TOKEN=********" in logs
    finally:
        k.shutdown()


CELL_THAT_HIDES = ("(setsid /bin/sleep 300 &); nohup bash -c 'while true; do /bin/sleep 1; done' >/dev/null 2>&1 &\n"
                   "setsid bash -c '/bin/sleep 301' & echo started; /bin/sleep 60")
LEFT = "ps -eo args | grep -E '^(/bin/)?sleep 30[01]|while true' | grep -v grep || echo none-left"


def test_timeout_and_interrupt_stop_everything_the_cell_started(engine, base_image, notebook, tmp_path):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        k.ok("%%mino\nnohup /bin/sleep 1000 >/dev/null 2>&1 &")  # an earlier cell's server: not the next cell's
        r = k.execute("%%mino --timeout 2\n" + CELL_THAT_HIDES)
        assert "timed out after 2 s" in r.stderr and r.error is not None
        assert k.ok(f"%%mino\n{LEFT}").stdout == "none-left\n"

        def on_stream(name, text, reply):
            if "started" in reply.stdout and not getattr(on_stream, "sent", False):
                on_stream.sent = True
                k.km.interrupt_kernel()

        r = k.execute("%%mino\n" + CELL_THAT_HIDES, on_stream=on_stream, timeout=60)
        assert r.error is not None and "Process was" in r.stdout
        assert k.ok(f"%%mino\n{LEFT}").stdout == "none-left\n"
        assert "sleep 1000" in k.ok("%%mino\nps -eo args").stdout  # what earlier cells left runs on
    finally:
        k.shutdown()


def test_a_cell_cannot_stop_its_container_and_a_stopped_one_is_replaced(engine, base_image, notebook, tmp_path):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        r = k.ok("%%mino --no-raise-error\nkill -TERM 1; echo rc=$?")
        assert "rc=1" in r.stdout and "Operation not permitted" in r.stderr
        # Everything of the cell's uid, the session's executor too (it costs this cell's output
        # and a line saying so; the next cell starts a new executor), but never the container.
        k.ok("%%mino --no-raise-error\nkill -KILL -1; echo still-here > /tmp/state")
        r = k.ok("%%mino\ncat /tmp/state")
        assert r.stdout == "still-here\n"
        token = k.owner_token()
        (container,) = [c for c in engine.list({"io.mino.owner": token}) if c["Labels"]["io.mino.role"] == "session"]
        engine.request("post", f"/containers/{container['Id']}/stop", params={"timeout": "0"},
                       what="stop the session from outside")
        r = k.execute("%%mino\necho hello")
        assert r.error is not None and "session 'default' stopped" in r.error_text
        assert "Traceback" not in r.error_text and "run the cell again" in r.error_text
        r = k.ok("%%mino\ncat /tmp/state 2>/dev/null || echo fresh-container")
        assert r.stdout == "fresh-container\n"
    finally:
        k.shutdown()


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemAvailable")


def _said_it_cannot(k, flags: str, gap: str) -> bool:
    """Where this engine cannot apply a limit (rootless Podman: a host limit mino cannot work
    around), the promise is that mino says so, once per kernel, before the first cell's output."""
    r = k.ok(f"%%mino {flags}\necho ran")
    assert f"mino: on this engine, {gap}" in r.stderr and r.stdout == "ran\n", r.stderr
    return True


def test_memory_limit_holds_and_names_itself(engine, base_image, notebook, tmp_path):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        if not engine.facts().cgroup_limits and _said_it_cannot(k, "--memory 128m", "memory and CPU limits are not applied"):
            return
        r = k.ok("%%mino --memory 128m\ncat /sys/fs/cgroup/memory/memory.limit_in_bytes "
                 "/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max")
        assert set(r.stdout.split()) == {str(128 << 20)}
        before, lowest = _mem_available(), [None]
        done = threading.Event()

        def sample():
            while not done.is_set():
                value = _mem_available()
                lowest[0] = value if lowest[0] is None else min(lowest[0], value)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            r = k.execute("%%mino\nx=$(head -c 600000000 /dev/zero | tr '\\0' a); echo ${#x}")
        finally:
            done.set()
            sampler.join()
        assert r.error is not None
        assert "mino: killed: out of memory (limit 128 MiB); raise it with `%mino config set memory" in r.stderr
        assert before - lowest[0] < (128 << 20) + (96 << 20), (before, lowest[0])  # the limit, plus noise
        assert k.ok("%%mino\necho usable").stdout == "usable\n"
    finally:
        k.shutdown()


def test_disk_limit_holds_for_everything_the_cell_writes(engine, base_image, notebook, tmp_path):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        if engine.facts().rootless and _said_it_cannot(k, "--disk 128m", "the disk limit is not applied"):
            return
        st = os.statvfs(tmp_path)
        before = st.f_bavail * st.f_frsize
        r = k.execute("%%mino --disk 128m\ndd if=/dev/zero of=/workspace/big bs=1M count=300 2>&1 | grep -m1 'No space'\n"
                      "dd if=/dev/zero of=/tmp/more bs=1M count=10 2>&1 | grep -c 'No space' ;"
                      "touch ~/x 2>&1; touch /opt/x 2>&1")
        assert "No space left on device" in r.stdout
        assert "cannot touch '/opt/x': Read-only file system" in r.stdout  # the image itself takes nothing
        st = os.statvfs(tmp_path)
        assert before - st.f_bavail * st.f_frsize < 160 << 20  # the disk limit, plus metadata
    finally:
        k.shutdown()


def test_cpu_limit_holds(engine, base_image, notebook, tmp_path):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        if not engine.facts().cgroup_limits and _said_it_cannot(k, "--cpus 0.5", "memory and CPU limits are not applied"):
            return
        cg = "/sys/fs/cgroup/cpuacct/cpuacct.usage"
        r = k.ok(f"%%mino --cpus 0.5\ncat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu/cpu.cfs_period_us\n"
                 f"a=$(cat {cg}); s=$(date +%s%N)\n"
                 "for i in 1 2; do (end=$((SECONDS+3)); while [ $SECONDS -lt $end ]; do :; done) & done; wait\n"
                 f"b=$(cat {cg}); e=$(date +%s%N); echo $((b-a)) $((e-s))")
        quota, period, used, wall = (int(x) for x in r.stdout.split())
        assert (quota, period) == (50_000, 100_000)
        assert used / wall <= 0.5 * 1.15, (used, wall)  # two busy processes, half a core
        assert used / wall >= 0.3  # and they did run
    finally:
        k.shutdown()


@pytest.mark.parametrize("flags", ["--network bridge", "--network none", "--network host", "--network-allow {gateway}:9"])
def test_no_user_namespaces_in_any_mode(engine, base_image, notebook, tmp_path, gateway, flags):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        r = k.ok(f"%%mino {flags.format(gateway=gateway)}\nunshare -r true; echo r=$?; unshare -rn true; echo rn=$?\n"
                 "grep Seccomp: /proc/self/status")
        assert "r=1" in r.stdout and "rn=1" in r.stdout and "Seccomp:\t2" in r.stdout
        assert "Operation not permitted" in r.stderr
    finally:
        k.shutdown()


TRACER = r"""cat > /tmp/tracer.pl <<'PERL'
for (1 .. 200) {
  my $p = `pgrep -n -f victim-cell`; chomp $p;
  if ($p) {
    $! = 0; my $r = syscall(101, 16, 0 + $p, 0, 0); my $e = "$!";
    $! = 0; my $b = "\0" x 8; my $l = pack("PQ", $b, 8); my $m = pack("QQ", 0x400000, 8);
    my $v = syscall(310, 0 + $p, $l, 1, $m, 1, 0); my $f = "$!";
    open(my $o, ">", "/tmp/traced"); print $o "attach $r $e\nvm_readv $v $f\n"; close $o; exit 0;
  }
  select(undef, undef, undef, 0.05);
}
PERL
perl /tmp/tracer.pl >/dev/null 2>&1 &"""


def test_a_process_an_earlier_cell_left_cannot_reach_into_a_later_cell(engine, base_image, notebook, tmp_path):
    """Every process of a session runs as one uid: without the seccomp refusal, a tracer left by
    cell 1 could attach to cell 2 and change what it does, or read its memory."""
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        k.ok("%%mino\n" + TRACER)
        k.ok("%%mino\nbash -c 'exec -a victim-cell sleep 3'")
        r = k.ok("%%mino\ncat /tmp/traced")
        assert r.stdout == "attach -1 Operation not permitted\nvm_readv -1 Operation not permitted\n", r.stdout
    finally:
        k.shutdown()


# ---------------------------------------------------------------- what an outside review found
HOPPER = ("cat > /tmp/hop.pl <<'PERL'\n"
          "use POSIX; POSIX::setsid(); my $t = time;\n"
          "while (time - $t < 60) { exit 0 if fork; }\n"
          "open F, \">/tmp/alive.$$\"; close F; sleep 300;\n"
          "PERL\n"
          "for i in $(seq 64); do perl /tmp/hop.pl & done; echo started; sleep 100")


def test_processes_that_keep_changing_pid_do_not_outlive_a_timeout(engine, base_image, notebook, tmp_path):
    """Each process forks and exits at once, so its live pid is never the one looked at: only
    freezing the container's cgroup catches every one (without a freezer, rootless on cgroup v1:
    repeated looks, then kill(-1) from inside, which can take tens of seconds on a loaded machine;
    a chain that outlives the stop leaves an `alive` file after 60 s)."""
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        for _ in range(4):  # without the freezer, about one run in four leaves a chain running
            r = k.execute("%%mino --timeout 2\n" + HOPPER)
            assert "timed out after 2 s" in r.stderr and "could not be stopped" not in r.stderr
            time.sleep(1)
            r = k.ok("%%mino\nls /tmp | grep -c '^alive' || true; ps -eo args | grep -c '[h]op.pl' || true")
            assert r.stdout.split() == ["0", "0"], r.stdout
    finally:
        k.shutdown()


def test_a_crafted_name_lookup_breaks_nothing_and_a_fresh_container_still_goes(engine, base_image, notebook,
                                                                                tmp_path, gateway):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        query = ("perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(PeerAddr => \"127.0.0.1:53\", Proto => \"udp\");"
                 " $q = pack(\"n6\", 7, 0x100, 1, 0, 0, 0) . chr(4) . \"abc\\n\" . chr(0) . pack(\"n2\", 1, 1);"
                 " $s->send($q); print \"sent\\n\"'")
        r = k.ok(f"%%mino --fresh --network-allow {gateway}:9\n{query}")
        assert r.stdout == "sent\n" and "Traceback" not in r.stderr
        token, used = k.owner_token(), k.container_of("fresh-1")

        def gone() -> bool:
            return used not in {c["Id"] for c in engine.list({"io.mino.owner": token, "io.mino.role": "fresh"})}
        deadline = time.monotonic() + 10
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone()
    finally:
        k.shutdown()


def test_a_secret_spelled_into_a_name_is_masked_in_mino_s_own_lines(engine, base_image, notebook, tmp_path, gateway):
    k = _kernel(notebook, tmp_path / "mino-home")
    try:
        k.ok("TOKEN = 's3cr3tvalue123'")
        r = k.ok(f"%%mino --fresh --secret TOKEN --network-allow {gateway}:9\n"
                 "getent hosts \"$TOKEN.x.example\" || echo unresolved")
        assert "unresolved" in r.stdout
        assert "s3cr3tvalue123" not in r.stderr and "********.x.example" in r.stderr
    finally:
        k.shutdown()


def test_a_large_script_runs_in_a_session_started_again(engine, base_image, notebook, tmp_path):
    k = _kernel(notebook, tmp_path / "mino-home")
    big = "# " + "x" * 998 + "\n"
    try:
        assert k.ok("%%mino\n" + big * 150 + "echo one").stdout == "one\n"
        k.ok("%mino stop default")
        assert k.ok("%%mino\n" + big * 150 + "echo two").stdout == "two\n"
    finally:
        k.shutdown()
