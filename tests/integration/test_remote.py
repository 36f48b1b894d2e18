"""Engines elsewhere: over ssh (mino's own forward to an sshd on loopback that the test starts
with a throwaway key), and engines elsewhere that get a copy of the workspace (a second API
service over tcp, most in a mount namespace of its own where the test's directories are an
empty tmpfs, with names and limits of its own).

Traffic goes only to loopback and the Podman bridge gateway.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mino_jupyter import policy
from mino_jupyter.errors import PodmanUnavailable
from mino_jupyter.runtime import Engine
from tests.conftest import ROOTLESS, give_to_cell
from tests.kernel import Kernel, isolated_env
from tests.listeners import TcpListener, wait_port

pytestmark = pytest.mark.podman
SSHD = "/usr/sbin/sshd"
ROOTFUL_ONLY = pytest.mark.skipif(ROOTLESS, reason="an sshd and a second API service need root; the rootful run tests them")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float = 10.0) -> None:
    assert wait_port(port, timeout), f"nothing listens on 127.0.0.1:{port}"


@pytest.fixture
def sshd(tmp_path):
    """An sshd of the test's own on loopback: root may log in with a throwaway key only; the
    client's config (MINO_SSH_CONFIG) names that key and the host key it must see."""
    if not os.access(SSHD, os.X_OK):
        pytest.fail(f"{SSHD} is missing: `scripts/setup-host.sh --ssh` installs openssh-server", pytrace=False)
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowStreamLocalForwarding yes
X11Forwarding no
PermitTTY no
""")
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host_key.pub').read_text()}")
    (d / "client_config").write_text(f"""Host 127.0.0.1
  User root
  Port {port}
  IdentityFile {d / 'client_key'}
  IdentitiesOnly yes
  UserKnownHostsFile {d / 'known_hosts'}
  StrictHostKeyChecking yes
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "wb"))
    try:
        _wait_port(port)
        yield {"port": port, "config": str(d / "client_config")}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _ssh_env(home: Path, sshd: dict, socket_path: str = "/run/podman/podman.sock") -> dict:
    return {**isolated_env(home), "CONTAINER_HOST": f"ssh://root@127.0.0.1:{sshd['port']}{socket_path}",
            "MINO_SSH_CONFIG": sshd["config"]}


def _forwards() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "^/usr/bin/ssh -N .*mino-ssh-"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_a_closed_ssh_port_fails_fast_in_one_line(tmp_path):
    port = _free_port()  # nothing listens there
    env = {**os.environ, "CONTAINER_HOST": f"ssh://root@127.0.0.1:{port}/run/podman/podman.sock",
           "MINO_SSH_CONFIG": "/dev/null"}
    started = time.monotonic()
    with pytest.raises(PodmanUnavailable) as e:
        Engine.connect(env)
    assert time.monotonic() - started < 5
    assert e.value.message.startswith(f"cannot reach the Podman API at ssh://root@127.0.0.1:{port}/run/podman/podman.sock:")
    assert "Connection refused" in e.value.message and "\n" not in e.value.message and e.value.hint


@ROOTFUL_ONLY
def test_a_remote_socket_that_does_not_answer_fails_fast(sshd, tmp_path):
    env = {**os.environ, **_ssh_env(tmp_path / "home", sshd, "/run/nothing-here/podman.sock")}
    started = time.monotonic()
    with pytest.raises(PodmanUnavailable) as e:
        Engine.connect(env)
    assert time.monotonic() - started < 7
    assert "no answer from its Podman API socket /run/nothing-here/podman.sock" in e.value.message
    assert _forwards() == []  # the failed forward's ssh is gone


@ROOTFUL_ONLY
def test_cells_run_hardened_through_an_ssh_engine_and_its_forward_comes_back(sshd, engine, base_image, gateway,
                                                                             tmp_path):
    """Everything over mino's forward: the session, its firewall container, the executor's raw
    connection. The forward's ssh killed (the network dropped): the next cell says its executor
    ended and runs. The kernel gone: its containers and its ssh are gone."""
    notebook = tmp_path / "nb"
    notebook.mkdir()
    give_to_cell(notebook)
    k = Kernel(cwd=str(notebook), env=_ssh_env(tmp_path / "home", sshd))
    listener = TcpListener(gateway)
    try:
        k.ok("%load_ext mino_jupyter")
        r = k.ok("%%mino\ngrep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status; id -u\n"
                 f"curl -sS -m 5 -o /dev/null http://{gateway}:{listener.port}/ 2>/dev/null; echo exit=$?")
        assert r.stdout.splitlines() == ["CapEff:\t0000000000000000", "CapBnd:\t0000000000000000", "NoNewPrivs:\t1",
                                         "1000", "exit=7"]
        assert listener.hits == 0
        token = k.owner_token()
        assert engine.list({"io.mino.owner": token, "io.mino.role": "firewall"})  # not local: the container does it
        forwards = _forwards()
        assert len(forwards) == 1
        os.kill(forwards[0], signal.SIGKILL)
        r = k.ok("%%mino\necho again")
        assert r.stdout == "again\n"
        assert len(_forwards()) == 1 and _forwards() != forwards
    finally:
        listener.close()
        k.shutdown()
    deadline = time.monotonic() + 15
    while (engine.list({"io.mino.owner": token}) or _forwards()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.list({"io.mino.owner": token}) == [] and _forwards() == []


@pytest.fixture
def second_service(tmp_path):
    """Another API service over tcp on loopback, on the same storage as the main one. `hide`:
    in a mount namespace of its own where this test's directory is an empty tmpfs."""
    started = []

    def start(hide: bool, nofile: int | None = None, hosts: str = "") -> str:
        port = _free_port()
        url = f"tcp://127.0.0.1:{port}"
        serve = ["podman", "system", "service", "--time=0", url]
        if nofile:  # a machine with lower hard limits than this one
            serve = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *serve]
        etc_hosts = tmp_path.parent / f"{tmp_path.name}-hosts-{port}"  # outside the hidden directory
        etc_hosts.write_text(Path("/etc/hosts").read_text() + hosts)  # names only that machine knows
        cmd = (["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                'mount --bind "$1" /etc/hosts && mount -t tmpfs -o size=1m mino-test "$0" && shift && exec "$@"',
                str(tmp_path), str(etc_hosts), *serve] if hide else serve)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
        started.append(proc)
        _wait_port(port, 20)
        return url

    before = {c["Id"] for c in Engine.connect().list({})}
    urls = []

    def start_and_remember(hide: bool, nofile: int | None = None, hosts: str = "") -> str:
        urls.append(start(hide, nofile, hosts))
        return urls[-1]

    yield start_and_remember
    # A container the other service made (and a failed test left) would break every listing of
    # the main service: its network namespace file exists only in the other mount namespace.
    for url in urls:
        try:
            other = Engine.connect({"CONTAINER_HOST": url}, autostart=False)
            for c in other.list({}):
                if c["Id"] not in before:
                    other.remove(c["Id"])
        except Exception:  # noqa: BLE001 - best effort; the assertions above have spoken
            pass
    for proc in started:
        proc.terminate()
        proc.wait(timeout=15)


def _volumes(engine) -> set[str]:
    return {v["Name"] for v in engine.request("get", "/volumes/json", what="list volumes").json()}


@ROOTFUL_ONLY
def test_an_engine_that_does_not_see_this_machine_s_files_gets_a_copy_and_changes_come_back(
        second_service, engine, base_image, gateway, tmp_path):
    """The engine would resolve the notebook's path on its side (here an empty tmpfs): mino asks
    it first, and copies the notebook's directory in instead of binding it. Cells run hardened
    (mino's seccomp profile, read by the engine from mino's volume; the executor from there,
    closed to the cell), with this machine's CA bundle; what they change stays in the engine
    until `%mino apply`, which takes plain files only. A timeout stops what the cell started
    without using a pid of the engine's here. The kernel gone, so are its containers and their
    volumes."""
    from mino_jupyter import host

    notebook = tmp_path / "nb"
    (notebook / "sub").mkdir(parents=True)
    give_to_cell(notebook)
    (notebook / "data.txt").write_text("mine\n")
    (notebook / "gone.txt").write_text("delete me\n")
    (notebook / "sub" / "nested.txt").write_text("deep\n")
    (notebook / "link").symlink_to("data.txt")
    bundle = host.ca_bundle("auto")
    url = second_service(hide=True)
    # Asked through the same service: the main one cannot list containers whose network
    # namespace files exist only in the other mount namespace.
    engine = Engine.connect({"CONTAINER_HOST": url}, autostart=False)
    listener = TcpListener(gateway)
    k = Kernel(cwd=str(notebook), env={**isolated_env(tmp_path / "home"), "CONTAINER_HOST": url})
    try:
        k.ok("%load_ext mino_jupyter")
        r = k.ok("%%mino\ncat data.txt sub/nested.txt link; grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status\n"
                 "id -u; unshare -r true 2>/dev/null; echo userns=$?\n"
                 "cat /usr/local/libexec/mino/mino-exec >/dev/null 2>&1; echo read=$?\n"
                 "touch /usr/local/libexec/mino/x 2>/dev/null; echo write=$?\n"
                 "stat -c '%u %a' /usr/local/libexec/mino/mino-exec\n"
                 f"curl -sS -m 5 -o /dev/null http://{gateway}:{listener.port}/ 2>/dev/null; echo bridge=$?\n"
                 "sha256sum < /etc/ssl/certs/ca-certificates.crt | cut -c1-64")
        said = r.stderr
        assert "is not on this machine" in said and "gets a copy" in said, said
        import hashlib
        assert r.stdout.splitlines() == ["mine", "deep", "mine", "CapEff:\t0000000000000000", "NoNewPrivs:\t1",
                                         "Seccomp:\t2", "1000", "userns=1", "read=1", "write=1", "0 111", "bridge=7",
                                         hashlib.sha256(Path(bundle).read_bytes()).hexdigest()]
        assert listener.hits == 0
        assert "no changes" not in k.ok("%mino sessions").stdout
        # what a cell writes stays in the engine
        k.ok("%%mino\necho changed > data.txt; echo new > new.txt; rm gone.txt\n"
             "ln -s /etc/passwd evil; mkdir -p d && echo x > d/f; ln -sfn /etc sub2")
        assert (notebook / "data.txt").read_text() == "mine\n" and not (notebook / "new.txt").exists()
        listed = k.ok("%mino changes").stdout
        for line in ("new.txt", "data.txt", "gone.txt", "evil", "d/f"):
            assert line in listed, listed
        k.ok("%mino apply")
        assert (notebook / "data.txt").read_text() == "changed\n" and (notebook / "new.txt").read_text() == "new\n"
        assert (notebook / "d" / "f").read_text() == "x\n"
        assert not os.path.lexists(notebook / "evil") and not os.path.lexists(notebook / "sub2")
        assert (notebook / "gone.txt").exists()  # a deletion is applied only when named
        k.ok("%mino apply gone.txt")
        assert not (notebook / "gone.txt").exists()
        # a timeout stops the cell and what it left behind, from inside the container
        r = k.execute("%%mino --timeout 2\n(setsid sleep 300 &); sleep 60")
        assert r.error is not None
        r = k.ok("%%mino\npgrep -u 1000 -x sleep; echo left=$?")
        assert r.stdout.strip().endswith("left=1"), r.stdout
        token = k.owner_token()
        containers = engine.list({"io.mino.owner": token})
        used = {m["Name"] for c in containers for m in (engine.inspect(c["Id"]) or {}).get("Mounts", [])
                if m.get("Type") == "volume"}
        assert any(v.startswith("mino-support-") for v in used) and len(used) >= 3
    finally:
        listener.close()
        k.shutdown()
    deadline = time.monotonic() + 15
    while engine.list({"io.mino.owner": token}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.list({"io.mino.owner": token}) == []
    assert {v for v in used if not v.startswith("mino-support-")} & _volumes(engine) == set()
    support = {v for v in used if v.startswith("mino-support-")}
    assert support <= set(engine.remove_unused_volumes({"io.mino.support": None}))  # `prune --all`
    assert support & _volumes(engine) == set()


@ROOTFUL_ONLY
def test_a_fresh_cell_s_changes_on_an_engine_elsewhere_outlive_its_container(second_service, engine, base_image,
                                                                             tmp_path):
    """The workspace is read back before the container goes (it takes its volume with it)."""
    notebook = tmp_path / "nb"
    notebook.mkdir()
    give_to_cell(notebook)
    url = second_service(hide=True)
    engine = Engine.connect({"CONTAINER_HOST": url}, autostart=False)  # as above
    k = Kernel(cwd=str(notebook), env={**isolated_env(tmp_path / "home"), "CONTAINER_HOST": url})
    try:
        k.ok("%load_ext mino_jupyter")
        k.ok("%%mino --fresh\necho kept > out.csv")
        deadline = time.monotonic() + 15  # its container goes in the background
        while engine.list({"io.mino.owner": k.owner_token(), "io.mino.role": "fresh"}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "out.csv" in k.ok("%mino changes fresh-1").stdout
        k.ok("%mino apply --session fresh-1")
        assert (notebook / "out.csv").read_text() == "kept\n"
    finally:
        k.shutdown()


@ROOTFUL_ONLY
def test_an_allowlist_session_on_an_engine_elsewhere(second_service, base_image, gateway, tmp_path):
    """Its names are resolved on the engine's machine (here a name only it knows), its firewall
    container installs the same rules: the allowed port answers, another is refused at once and
    reported, and its names stay as they were made (a new entry needs a new session, said in one
    line)."""
    notebook = tmp_path / "nb"
    notebook.mkdir()
    give_to_cell(notebook)
    allowed, other = TcpListener(gateway), TcpListener(gateway)
    name = "mino-only-there.test"
    k = Kernel(cwd=str(notebook), env={**isolated_env(tmp_path / "home"),
                                       "CONTAINER_HOST": second_service(hide=True, hosts=f"{gateway} {name}\n")})
    try:
        k.ok("%load_ext mino_jupyter")
        r = k.ok(f"%%mino --network-allow {name}:{allowed.port}\n"
                 f"curl -sS -m 5 -o /dev/null -w '%{{http_code}}\\n' http://{name}:{allowed.port}/\n"
                 f"curl -sS -m 5 -o /dev/null http://{gateway}:{other.port}/ 2>/dev/null; echo refused=$?")
        assert r.stdout == "200\nrefused=7\n" and allowed.hits == 1 and other.hits == 0
        assert f"refused 1 connection attempt(s) to {name} ({gateway}):{other.port}/tcp" in r.stderr
        r = k.execute(f"%%mino --network-allow {name}:{allowed.port} --network-allow {gateway}:{other.port}\ntrue")
        assert "its allowlist is fixed while it runs; nothing was changed" in r.error_text + r.stderr
        r = k.ok(f"%%mino --network-allow {name}:{allowed.port}\n"
                 f"curl -sS -m 5 -o /dev/null http://{gateway}:{other.port}/ 2>/dev/null; echo refused=$?")
        assert r.stdout == "refused=7\n" and other.hits == 0  # the same session, the same rules
    finally:
        allowed.close(), other.close()
        k.shutdown()


@ROOTFUL_ONLY
def test_an_engine_elsewhere_with_lower_limits_gets_what_it_allows(second_service, base_image, tmp_path):
    """Its machine's hard limits cannot be read here; asking for more than they allow fails every
    start ("error setting rlimit type 7" on this machine kind). mino asks the engine itself."""
    import resource

    lower = resource.getrlimit(resource.RLIMIT_NOFILE)[1] // 2
    notebook = tmp_path / "nb"
    notebook.mkdir()
    give_to_cell(notebook)
    k = Kernel(cwd=str(notebook), env={**isolated_env(tmp_path / "home"),
                                       "CONTAINER_HOST": second_service(hide=True, nofile=lower)})
    try:
        k.ok("%load_ext mino_jupyter")
        hard = int(k.ok("%%mino\nulimit -Hn").stdout)
        assert 1024 <= hard <= max(lower, policy.NOFILE_CEILING)
    finally:
        k.shutdown()


@ROOTFUL_ONLY
def test_an_engine_over_tcp_gets_a_copy_even_where_it_shares_this_machine_s_files(second_service, engine,
                                                                                  base_image, tmp_path):
    """Over tcp mino cannot know that mounts it makes here reach the engine (here they would: it
    is this machine's, in this mount namespace), so it never relies on them."""
    notebook = tmp_path / "nb"
    notebook.mkdir()
    give_to_cell(notebook)
    (notebook / "data.txt").write_text("mine\n")
    k = Kernel(cwd=str(notebook), env={**isolated_env(tmp_path / "home2"), "CONTAINER_HOST": second_service(hide=False)})
    try:
        k.ok("%load_ext mino_jupyter")
        r = k.ok("%%mino\ncat data.txt; touch /workspace/ran")
        assert r.stdout == "mine\n" and "gets a copy" in r.stderr
        assert not (notebook / "ran").exists() and k.ok("%mino changes").stdout.count("ran") == 1
    finally:
        token = k.owner_token()
        k.shutdown()
    assert engine.list({"io.mino.owner": token}) == []


@ROOTFUL_ONLY
def test_a_killed_kernel_s_containers_go_over_ssh_too(sshd, engine, base_image, tmp_path):
    """The watchdog (this machine) reaches the engine through a forward of its own. The engine
    is named as a `podman machine` or `podman system connection add` names it:
    CONTAINER_CONNECTION and an entry in the user's containers.conf."""
    notebook = tmp_path / "nb"
    notebook.mkdir()
    give_to_cell(notebook)
    env = {**_ssh_env(tmp_path / "home", sshd), "CONTAINER_CONNECTION": "mino-test"}
    uri = env.pop("CONTAINER_HOST")
    conf = Path(env["XDG_CONFIG_HOME"]) / "containers" / "containers.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text(f'[engine.service_destinations.mino-test]\nuri = "{uri}"\n')
    k = Kernel(cwd=str(notebook), env=env)
    try:
        k.ok("%load_ext mino_jupyter")
        k.ok("%%mino\ntrue")
        token = k.owner_token()
        assert engine.list({"io.mino.owner": token})
        os.kill(k.pid, signal.SIGKILL)
    finally:
        k.shutdown(now=True)
    deadline = time.monotonic() + 30
    while (engine.list({"io.mino.owner": token}) or _forwards()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine.list({"io.mino.owner": token}) == [] and _forwards() == []
    log = tmp_path / "home" / "state" / "mino" / "watchdog.log"
    assert f"kernel {token}" in log.read_text()


def _watchdogs(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mino_jupyter.cleanup" in argv and token.encode() in argv:
            found.append(int(entry.name))
    return found


@ROOTFUL_ONLY
def test_containers_on_an_engine_elsewhere_end_themselves_when_the_kernel_is_lost(second_service, base_image,
                                                                                  tmp_path):
    """The kernel and its watchdog both SIGKILLed (as when this machine loses the engine): no
    one removes the containers, and no one renews their lease; they end themselves within it,
    with their volumes. A cell cannot renew it (the lease's directory is not the cell's)."""
    notebook = tmp_path / "nb"
    notebook.mkdir()
    give_to_cell(notebook)
    url = second_service(hide=True)
    engine = Engine.connect({"CONTAINER_HOST": url}, autostart=False)
    lease = 10
    k = Kernel(cwd=str(notebook), env={**isolated_env(tmp_path / "home"), "CONTAINER_HOST": url,
                                       "MINO_LEASE": str(lease)})
    try:
        k.ok("%load_ext mino_jupyter")
        r = k.ok("%%mino\necho 999999 > /run/mino-lease/seq 2>/dev/null; echo wrote=$?; sleep 12; echo alive")
        assert r.stdout == "wrote=1\nalive\n"  # renewed meanwhile, by the kernel only
        token = k.owner_token()
        containers = engine.list({"io.mino.owner": token})
        assert {c["Labels"]["io.mino.role"] for c in containers} == {"session", "firewall"}
        used = {m["Name"] for c in containers for m in (engine.inspect(c["Id"]) or {}).get("Mounts", [])
                if m.get("Type") == "volume" and not m["Name"].startswith("mino-support-")}
        assert len(used) == 2  # the workspace and the home
        watchdogs = _watchdogs(token)
        assert len(watchdogs) == 1
        os.kill(watchdogs[0], signal.SIGKILL)
        os.kill(k.pid, signal.SIGKILL)
        killed = time.monotonic()
    finally:
        k.shutdown(now=True)
    while engine.list({"io.mino.owner": token}) and time.monotonic() < killed + lease + 20:
        time.sleep(0.5)
    assert engine.list({"io.mino.owner": token}) == []
    assert used & _volumes(engine) == set()
