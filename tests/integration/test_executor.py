"""The resident cell executor (mino_jupyter/executor.py, mino-exec.c) against real Podman, written
as the attacker: every cell here runs as the session's cell user, next to the executor, with the
same uid. Nothing is timed; "quickly" means well before the command the cell started would end.
(Through a kernel, tests/integration/test_magic.py and test_containment.py run every cell through
it; `MINO_EXECUTOR=0` runs them as one exec per cell.)"""

from __future__ import annotations

import os
import queue
import signal
import struct
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass

import pytest

from mino_jupyter import executor as client, host, policy
from mino_jupyter.executor import Executor, ExecutorGone
from mino_jupyter.owner import current_owner

pytestmark = pytest.mark.podman

# perl is in every Debian image (perl-base is essential): raw syscalls from a cell.
PTRACE = ("perl -e '$p=0+shift; for ([16,\"ATTACH\"],[0x4206,\"SEIZE\"]) {$!=0; $r=syscall(101,$_->[0],$p,0,0); "
          "print \"ptrace $_->[1] $r $!\\n\"} $!=0; $fd=syscall(434,$p,0); $!=0; $r=syscall(438,$fd,0,0); "
          "print \"pidfd_getfd $r $!\\n\"; $b=\"\\0\"x8; $l=pack(\"PQ\",$b,8); $m=pack(\"QQ\",0x400000,8); $!=0; $r=syscall(310,$p,$l,1,$m,1,0); "
          "print \"vm_readv $r $!\\n\"' ")


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    os.chmod(state, 0o755)
    return client.ensure_binary(state)


@pytest.fixture(scope="module")
def session(engine, base_image, binary, tmp_path_factory):
    """A session container hardened as mino's (policy.session_spec, mino's seccomp profile),
    with the executor bind-mounted read-only, mode 0111."""
    profile = host.seccomp_profile(tmp_path_factory.mktemp("state"))
    spec = policy.session_spec(policy.SessionRequest(
        name=f"mino-test-exec-{uuid.uuid4().hex[:8]}", image=base_image, network="none",
        labels=policy.labels("test", current_owner().labels()), limits=engine.host_limits(),
        seccomp_profile=profile, engine=engine.facts(), executor=str(binary)))
    spec["work_dir"] = "/"  # no storage mounts here: /workspace does not exist
    spec["mounts"].append({"type": "tmpfs", "source": "tmpfs", "destination": "/tmp",  # the one writable place
                           "options": ["rw", "nosuid", "nodev", "size=64m", "mode=1777"]})
    cid = engine.run(spec)
    yield cid
    engine.remove(cid)
    assert engine.inspect(cid) is None


@pytest.fixture
def ex(engine, session):
    executor = Executor.start(engine, session)
    yield executor
    executor.close()


@dataclass
class Result:
    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    duration: float
    pid: int | None
    late: bool
    interrupted: str | None = None
    timed_out: bool = False


def sh(ex: Executor, script: str, *, env=None, cwd: str = "/tmp", timeout: float | None = None,
       on_output=None) -> Result:
    """One cell through the executor, read as mino reads it; `timeout`: INT, TERM, KILL to its
    group through the executor (0.3 s apart), then the executor is killed from outside."""
    started = time.monotonic()
    run = ex.begin(script, env=env, cwd=cwd)
    out, err, interrupted = bytearray(), bytearray(), None
    escalation = iter(("INT", "TERM", "KILL", None))
    deadline = started + timeout if timeout else None
    while True:
        try:
            item = run.get(0.05)
        except queue.Empty:
            if deadline is not None and time.monotonic() >= deadline:
                name = next(escalation)
                if name is None:
                    ex.kill()
                    raise ExecutorGone("the session's cell executor did not end the cell after SIGKILL")
                run.signal(getattr(signal, f"SIG{name}"))
                interrupted, deadline = f"SIG{name}", time.monotonic() + 0.3
            continue
        if item is None:
            break
        (out if item[0] == 1 else err).extend(item[1])
        if on_output:
            on_output(*item)
    if run.lost:
        raise ExecutorGone(run.lost)
    code = run.code
    return Result(code, code - 128 if code is not None and code > 128 else None, bytes(out), bytes(err),
                  time.monotonic() - started, run.pid, run.late, interrupted, interrupted is not None)


# ------------------------------------------------------------------ what a cell gets

def test_exit_codes_streams_and_environment(ex):
    assert sh(ex, "true").exit_code == 0
    r = sh(ex, "echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.signal) == (3, b"out\n", b"err\n", None)
    r = sh(ex, "kill -KILL $$")
    assert (r.exit_code, r.signal) == (137, 9)
    r = sh(ex, 'echo "$0|[$BASH_ENV]|$FOO|$(pwd)|$(id -u)"; cat; echo "[$-]"',
           env={"FOO": "bar baz", "BASH_ENV": "/tmp/evil"}, cwd="/tmp")
    assert r.stdout.decode().splitlines() == ["mino-cell|[]|bar baz|/tmp|1000", "[hBc]"]
    r = sh(ex, "echo $PATH", env={"PATH": "/bin"})
    assert r.stdout == b"/bin\n"


def test_a_cell_gets_the_environment_an_exec_would_give_it(engine, session, ex):
    probe = "env | sort; umask; ulimit -n"
    _code, by_exec, _ = engine.exec_run(session, policy.cell_exec(probe, env={"FOO": "1"}) | {"WorkingDir": "/tmp"})
    assert sh(ex, probe, env={"FOO": "1"}).stdout == by_exec
    ex.base_env = {}  # nothing from the container: the executor's fixed PATH, and nothing else
    assert sh(ex, "env | sort").stdout.decode().splitlines() == [
        "BASH_ENV=", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "PWD=/tmp", "SHLVL=1",
        "_=/usr/bin/env"]
    r = sh(ex, "true", cwd="/nonexistent")
    assert r.exit_code == 126 and b"cannot enter /nonexistent" in r.stderr


def test_the_executor_and_its_cells_hold_nothing_more_than_an_exec(ex):
    r = sh(ex, "for p in $PPID $$; do grep -E '^(CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/$p/status; done")
    fields = [line.split(":")[0] + "=" + line.split()[1] for line in r.stdout.decode().splitlines()]
    assert fields == ["CapPrm=0000000000000000", "CapEff=0000000000000000", "CapBnd=0000000000000000",
                      "CapAmb=0000000000000000", "NoNewPrivs=1", "Seccomp=2"] * 2


def test_each_cell_is_its_own_session_and_group(ex):
    r = sh(ex, "ps -o pid=,pgid=,sid= -p $$")
    pid, pgid, sid = map(int, r.stdout.split())
    assert pid == pgid == sid == r.pid


def test_output_streams_as_it_is_printed(ex):
    seen = []
    sh(ex, "echo a; sleep 0.5; echo b >&2", on_output=lambda kind, data: seen.append((kind, data, time.monotonic())))
    assert [(k, d) for k, d, _ in seen] == [(1, b"a\n"), (2, b"b\n")]
    assert seen[1][2] - seen[0][2] > 0.3


def test_a_large_script_goes_through_a_memfd(ex):
    script = ": '" + "x" * 300_000 + "'\necho \"$0 ok\"; ls /proc/$$/fd | wc -l"
    r = sh(ex, script)
    assert r.exit_code == 0
    assert r.stdout.decode().split()[:2] == ["/dev/fd/3", "ok"]


# ------------------------------------------------------------------ the executor is closed to the cell

def test_the_executor_is_closed_to_a_cell_of_the_same_uid(ex):
    r = sh(ex, f"""P=$PPID
        echo "parent $(cat /proc/$P/comm) uid $(awk '/^Uid/{{print $2}}' /proc/$P/status) me $(id -u)"
        echo "fd-owner $(stat -c %U /proc/$P/fd)"
        for f in fd/0 fd/1 environ mem maps auxv syscall io; do cat /proc/$P/$f >/dev/null 2>&1 </dev/null && echo "OPEN $f"; done
        ls /proc/$P/fd >/dev/null 2>&1 && echo "OPEN fd-dir"
        readlink /proc/$P/exe /proc/$P/cwd && echo "OPEN links"
        cat {policy.EXECUTOR} >/dev/null 2>&1 && echo "OPEN binary"
        echo "mode $(stat -c %a {policy.EXECUTOR})"
        {PTRACE} $P""")
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "parent mino-exec uid 1000 me 1000", r.stdout  # same uid: only the kernel's rule holds
    assert "fd-owner root" in lines
    assert not [line for line in lines if line.startswith("OPEN")], lines
    assert "mode 111" in lines
    for call in ("ptrace ATTACH", "ptrace SEIZE", "pidfd_getfd", "vm_readv"):
        assert f"{call} -1 Operation not permitted" in lines, lines


def test_the_cell_itself_is_an_ordinary_process(ex):
    """Non-dumpable must not reach the child: execve of a readable /bin/bash resets it."""
    r = sh(ex, "stat -c %U /proc/$$/fd; tr '\\0' '\\n' < /proc/$$/environ | grep ^MARK=; "
               "sleep 5 & p=$!; " + PTRACE + "$p; kill $p", env={"MARK": "x"})
    lines = r.stdout.decode().splitlines()
    assert lines[:2] == ["developer", "MARK=x"], lines
    assert "ptrace ATTACH -1 Operation not permitted" in lines  # mino's seccomp profile refuses it to every cell


def test_a_secret_is_in_no_command_line(ex):
    secret = f"S3CRET-{uuid.uuid4().hex}"
    # An earlier cell leaves a watcher behind that reads every command line, many times a second.
    sh(ex, "(for i in $(seq 150); do cat /proc/[0-9]*/cmdline 2>/dev/null; sleep 0.01; done > /tmp/seen) &")
    # (The check itself never puts the value in an argv: bash's own [[ ]] compares.)
    r = sh(ex, 'sleep 0.5; for f in /proc/[0-9]*/cmdline; do c=$(tr "\\0" " " < $f); '
               '[[ $c == *"$TOKEN"* ]] && echo "FOUND $f"; done; '
               'tr "\\0" "\\n" < /proc/$$/environ | grep -c ^TOKEN=', env={"TOKEN": secret})
    assert r.stdout == b"1\n", r.stdout  # the cell has it in its environment, and nobody's argv
    time.sleep(1.5)
    seen = sh(ex, "cat /tmp/seen").stdout
    assert b"mino-cell" in seen and b"sleep\x000.5" in seen  # it did see the other cell's command line
    assert secret.encode() not in seen


# ------------------------------------------------------------------ the protocol cannot be forged

def test_a_forged_end_record_changes_nothing(ex):
    fake = b"X" + struct.pack(">I", 25) + b"\0" * 16 + b"e" + struct.pack(">II", 0, 0)
    esc = "".join(f"\\x{b:02x}" for b in fake)
    r = sh(ex, f"printf '{esc}'; printf '{esc}' >&2; echo; exit 7")
    assert (r.exit_code, r.stdout, r.stderr) == (7, fake + b"\n", fake)
    assert sh(ex, "echo next").stdout == b"next\n"


def test_late_output_of_a_background_job_stays_out_of_the_next_cell(ex):
    r = sh(ex, "rm -f /tmp/alive; (sleep 0.5; echo LATE; echo LATE >&2; echo yes > /tmp/alive) & echo first")
    assert (r.exit_code, r.stdout, r.late) == (0, b"first\n", True)  # it held the pipes: the grace ended it
    r = sh(ex, "sleep 1; cat /tmp/alive")
    assert (r.stdout, r.stderr) == (b"yes\n", b"")  # not in this cell, and the job was not killed by SIGPIPE
    assert sh(ex, "echo a; echo b &").stdout == b"a\nb\n"  # output of a job that ends at once is waited for


# ------------------------------------------------------------------ interrupt, timeout, loss

def test_interrupt_stops_the_cell_and_the_next_one_works(ex):
    threading.Timer(0.3, lambda: ex._current.signal(signal.SIGINT)).start()
    r = sh(ex, "sleep 30")
    assert (r.exit_code, r.signal) == (130, 2) and r.duration < 10
    r = sh(ex, "trap '' INT; sleep 30", timeout=0.3)  # ignores SIGINT: TERM follows
    assert r.timed_out and r.interrupted == "SIGTERM" and r.signal == 15 and r.duration < 10
    assert sh(ex, "echo still here").stdout == b"still here\n"


def test_a_killed_executor_is_reported_in_one_error(engine, session):
    ex = Executor.start(engine, session)
    started = time.monotonic()
    with pytest.raises(ExecutorGone) as caught:
        sh(ex, "kill -KILL $PPID; sleep 20")
    assert time.monotonic() - started < 10
    assert "executor ended" in caught.value.message and "killed by signal 9" in caught.value.message
    with pytest.raises(ExecutorGone):
        sh(ex, "true")
    ex.close()
    fresh = Executor.start(engine, session)
    assert sh(fresh, "echo ok").stdout == b"ok\n"
    sh(fresh, "pkill -x sleep || true")
    fresh.close()


def test_an_executor_stopped_by_a_cell_does_not_hang_the_host(engine, session):
    ex = Executor.start(engine, session)
    started = time.monotonic()
    with pytest.raises(ExecutorGone) as caught:
        sh(ex, "kill -STOP $PPID; echo stopped", timeout=0.5)
    assert time.monotonic() - started < 10
    assert "did not end the cell" in caught.value.message
    ex.close()
    code, out, _ = engine.exec_run(session, policy.exec_body(["pgrep", "-x", "mino-exec"]))
    assert code == 1, out  # killed from outside


def _gone(engine, session, pattern: str) -> None:
    """Within 5 s no process in the session matches `pattern` (pgrep -f)."""
    for _ in range(50):
        code, out, _ = engine.exec_run(session, policy.exec_body(["pgrep", "-f", pattern]))
        if code == 1:
            return
        time.sleep(0.1)
    assert code == 1, out


def test_closing_stdin_kills_what_the_executor_started(engine, session):
    ex = Executor.start(engine, session)
    sh(ex, "sleep 1001 & sleep 1002 >/dev/null 2>&1 &")
    ex.close()
    _gone(engine, session, "sleep 100[12]|mino-exec")


def test_a_lost_connection_ends_the_executor_and_its_cells(engine, session):
    """Dropping the API connection closes the executor's stdin (the engine passes the EOF on):
    it kills what it started and exits; the cell ends in one error."""
    ex = Executor.start(engine, session)
    threading.Timer(0.3, ex.disconnect).start()
    started = time.monotonic()
    with pytest.raises(ExecutorGone) as caught:
        sh(ex, "sleep 1003")
    assert time.monotonic() - started < 10 and "executor ended" in caught.value.message
    _gone(engine, session, "sleep 1003|mino-exec")


# ------------------------------------------------------------------ the protocol, with the executor on this machine

class Local:
    """mino-exec as a child process here (no engine): requests written to its stdin as the
    engine would, frames read back from its stdout."""

    def __init__(self, binary):
        self.proc = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.read()[0] == b"H"

    def send(self, data: bytes, *, bytewise: bool = False) -> None:
        for piece in ([data[i:i + 1] for i in range(len(data))] if bytewise else [data]):
            self.proc.stdin.write(piece)
            self.proc.stdin.flush()

    def read(self) -> tuple[bytes, bytes]:
        head = self.proc.stdout.read(5)
        return head[:1], self.proc.stdout.read(struct.unpack(">I", head[1:])[0])

    def until_end(self) -> list[tuple[bytes, bytes]]:
        seen = [self.read()]
        while seen[-1][0] != b"X":
            seen.append(self.read())
        return seen


@pytest.fixture
def local(tmp_path):
    copy = tmp_path / "mino-exec"  # a build of its own, readable (inside a container it is 0111)
    subprocess.run(["gcc", "-O2", "-static", "-o", str(copy), str(client.SOURCE)], check=True,
                   env=client.COMPILER_ENV, capture_output=True)
    runner = Local(copy)
    yield runner
    runner.proc.kill()
    runner.proc.wait()


def test_protocol_requests_split_anywhere_busy_and_wrong_nonces(local):
    one, two = b"1" * 16, b"2" * 16
    local.send(client.run_request(one, "echo hi; sleep 0.5; echo done", {}, "/", 50), bytewise=True)
    assert local.read()[0] == b"S"
    local.send(client.run_request(two, "echo never", {}, "/", 50))  # while one runs: refused
    frames = local.until_end()
    assert frames[-2:] == [(b"L", b"a cell is still running"), (b"X", two + b"b" + bytes(8))]
    local.send(client.request(b"K", two + struct.pack(">I", 9)))  # not the running cell's nonce: ignored
    frames += local.until_end()
    assert (b"O", b"hi\n") in frames and (b"O", b"done\n") in frames
    assert frames[-1] == (b"X", one + b"e" + struct.pack(">II", 0, 0))
    local.send(client.request(b"R", one + struct.pack(">I", 50) + b"C\0\0\0\1/"))  # no script
    assert local.read() == (b"L", b"refused a run request: no script")
    assert local.read()[1][16:17] == b"f"
    local.send(client.run_request(one, "echo still", {}, "/", 50))
    assert (b"O", b"still\n") in local.until_end()
    local.proc.stdin.close()
    assert local.proc.wait(5) == 0


# ------------------------------------------------------------------ through a kernel

@pytest.fixture
def kernel(engine, base_image, tmp_path):
    from tests.conftest import give_to_cell
    from tests.kernel import Kernel, isolated_env

    ws = tmp_path / "notebook-dir"
    ws.mkdir()
    give_to_cell(ws)
    k = Kernel(cwd=str(ws), env=isolated_env(tmp_path / "mino-home"))
    k.ok("%load_ext mino_jupyter")
    yield k
    k.shutdown()


def test_cells_go_through_the_closed_executor_and_forged_ends_change_nothing(kernel):
    if os.environ.get("MINO_EXECUTOR") == "0":
        r = kernel.ok("%%mino\necho $PPID")
        assert r.stdout == "0\n"  # the fallback: one exec per cell, started from outside the container
        return
    r = kernel.ok("%%mino\ncat /proc/$PPID/comm; cat /proc/$PPID/fd/0 </dev/null 2>&1 | head -c 60; echo")
    assert r.stdout.startswith("mino-exec\ncat: /proc/"), r.stdout
    assert "Permission denied" in r.stdout
    fake = b"X" + struct.pack(">I", 25) + b"\0" * 16 + b"e" + struct.pack(">II", 0, 0)
    esc = "".join(f"\\x{b:02x}" for b in fake)
    r = kernel.execute(f"%%mino\nprintf '{esc}'; printf '{esc}' >&2; echo; exit 7")
    assert r.error and r.error["ename"] == "CalledProcessError" and "7" in r.error["evalue"]


def test_late_output_stays_out_of_the_next_cell(kernel):
    kernel.ok("%%mino\n(sleep 1; echo LATE-OUT; echo LATE-ERR >&2) & echo first")
    r = kernel.ok("%%mino\nsleep 2; echo second")
    assert r.stdout == "second\n" and "LATE" not in r.cell_stderr


def test_a_killed_or_stopped_executor_costs_one_cell_and_one_line(kernel):
    if os.environ.get("MINO_EXECUTOR") == "0":
        pytest.skip("no executor on the fallback path (MINO_EXECUTOR=0)")
    r = kernel.execute("%%mino\necho before; kill -KILL $PPID; sleep 20; echo never")
    assert "never" not in r.stdout
    assert "cell executor ended while the cell ran" in r.cell_stderr and "killed by signal 9" in r.cell_stderr
    assert kernel.ok("%%mino\necho next; cat /proc/$PPID/comm").stdout == "next\nmino-exec\n"  # a new one
    r = kernel.execute("%%mino --timeout 2\nkill -STOP $PPID; sleep 30; echo never", timeout=60)
    assert "never" not in r.stdout and "did not report the cell's end" in r.cell_stderr
    assert kernel.ok("%%mino\necho again").stdout == "again\n"


def test_an_executor_stopped_by_a_leftover_costs_no_more_than_the_timeout(kernel):
    """A process an earlier cell left stops the executor; a later cell too large for the
    connection's buffers must still end within its --timeout (it runs as an exec of its own: the
    request could not be written, so nothing had run), and the cells after it work (outside review)."""
    if os.environ.get("MINO_EXECUTOR") == "0":
        pytest.skip("no executor on the fallback path (MINO_EXECUTOR=0)")
    kernel.ok('%%mino\nE=$PPID; setsid bash -c "sleep 1; kill -STOP $E" </dev/null >/dev/null 2>&1 &')
    time.sleep(2)
    filler = "# " + "x" * 998 + "\n"
    started = time.monotonic()
    r = kernel.execute("%%mino --timeout 3\n" + filler * 3000 + "echo big-ran", timeout=120)
    assert time.monotonic() - started < 60
    assert r.stdout == "big-ran\n", (r.stdout, r.cell_stderr)
    started = time.monotonic()
    assert kernel.ok("%%mino --timeout 5\necho small-after").stdout == "small-after\n"
    assert time.monotonic() - started < 30


def test_a_cell_cannot_set_later_cells_limits_priority_or_cpus_through_the_executor(kernel):
    """prlimit, renice, taskset and ionice work on any process of one's own uid, dumpable or not:
    a cell changing them on the executor would change every later cell's (outside review). A
    later cell starts from what the session gave, and mino says why a new executor runs it."""
    probe = "%%mino\nulimit -n; ulimit -f; nice; taskset -p $$ | awk '{print $NF}'; ionice -p $$"
    before = kernel.ok(probe).stdout
    kernel.ok("%%mino\nprlimit --pid $PPID --nofile=40:40 --fsize=1:1; renice -n 15 -p $PPID >/dev/null; "
              "taskset -p 1 $PPID >/dev/null; ionice -c3 -p $PPID; true")
    r = kernel.ok(probe)
    assert r.stdout == before, (before, r.stdout)
    if os.environ.get("MINO_EXECUTOR") != "0":
        assert "changed the executor's limits, priority or CPUs" in r.cell_stderr
    assert kernel.ok("%%mino\necho fine > /tmp/x && cat /tmp/x").stdout == "fine\n"
