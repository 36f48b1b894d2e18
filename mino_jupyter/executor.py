"""The resident cell executor of a session: ``mino-exec`` (``mino-exec.c`` beside this file), and its client.

One executor per session container, started once by an engine exec as the cell user with stdin
attached. Each cell is one request on that open connection instead of a Podman exec (create,
start, conmon, ``runc exec``: ~50-100 ms): a warm cell costs about what ``%%bash`` costs. The
protocol and the security argument are in ``mino-exec.c`` and ``docs/executor-design.md``; in
short, the cell shares the executor's uid, so the executor is closed to it by the kernel's
"dumpable" rule (installed mode 0111 and ``PR_SET_DUMPABLE`` 0: no ``/proc/PID/fd``, ``mem``,
``environ``, ptrace or ``pidfd_getfd`` of it), requests (secrets included) travel on its stdin,
never in an argv, and everything a cell prints arrives inside frames the executor wrote, so no
output can end a cell or forge its exit code.

:class:`CellRun` is shaped like :class:`mino_jupyter.runtime.ExecStream` (``get``, ``idle``,
``exit_code``, ``close``), so :mod:`mino_jupyter.cell` follows either the same way. The per-cell
exec stays the path the engine can always take (no compiler, a remote engine, an executor that
cannot start): :func:`mino_jupyter.cell.run_script` without an executor.
"""

from __future__ import annotations

import hashlib
import os
import platform
import queue
import secrets
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Mapping

from . import policy
from .errors import MinoError
from .runtime import STDERR, STDOUT, Engine, frames

SOURCE = Path(__file__).with_name("mino-exec.c")
HELLO_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0  # an executor that does not read a request this long is stopped (by a cell?)
GRACE_MS = 50  # how long after the shell exits its pipes may stay open before the cell ends
NONCE = 16
COMPILER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # fixed: nothing of the kernel's steers the build
DISABLE_ENV = "MINO_EXECUTOR"  # "0": every cell is its own exec (the fallback path, for tests)


class ExecutorGone(MinoError):
    """The executor ended, broke the protocol or stopped answering; the session needs a new one."""


# ---------------------------------------------------------------------------- the binary

def enabled(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return env.get(DISABLE_ENV, "1") != "0"


def binary_dir(state: Path) -> Path:
    """Where this source's executor lives: named by the source's hash and the machine."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    return state / "executor" / f"{digest}-{platform.machine()}"


def ensure_binary(state: Path) -> Path:
    """The directory holding a usable ``mino-exec`` (to bind-mount read-only at
    :data:`policy.EXECUTOR_DIR`): built on first use with the system C compiler, static, mode
    0111 (executable, not readable: the kernel then starts it non-dumpable from its first
    instruction, before its own ``prctl``). A file found there is used only if it is what mino
    made: a regular file of this user's, mode 0111, in a directory of this user's, mode 0755."""
    directory = binary_dir(state)
    if _made_by_us(directory):
        return directory
    compiler = _compiler()
    directory.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        pass
    found = os.lstat(directory)
    if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.geteuid():
        raise MinoError(f"{directory} is not a directory mino made (a link, or another user's)", "remove it")
    os.chmod(directory, 0o755)  # the cell user reaches the file through the mount (it cannot read it)
    tmp = directory / f".mino-exec.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        _compile(compiler, tmp)
        os.chmod(tmp, 0o111)
        os.replace(tmp, directory / "mino-exec")
    except OSError as exc:
        raise MinoError(f"building mino's cell executor failed: {exc}", "every cell is its own exec meanwhile") from exc
    finally:
        tmp.unlink(missing_ok=True)
    if not _made_by_us(directory):
        raise MinoError(f"mino's cell executor in {directory} is not as it was made", "remove that directory")
    return directory


_UPLOAD: dict[str, bytes] = {}


def upload_copy(state: Path) -> bytes:
    """The executor's bytes, for an engine elsewhere (:mod:`mino_jupyter.copied` writes them into
    its support volume): built again into a private directory, since the copy mounted here is
    not readable (mode 0111) and must never be made readable, even for a moment. Once per process."""
    key = binary_dir(state).name
    if key in _UPLOAD:
        return _UPLOAD[key]
    compiler = _compiler()
    with tempfile.TemporaryDirectory(prefix="mino-exec-") as scratch:  # mode 0700
        out = Path(scratch) / "mino-exec"
        _compile(compiler, out)
        _UPLOAD[key] = out.read_bytes()
    return _UPLOAD[key]


def _compiler() -> str:
    compiler = shutil.which("gcc", path=COMPILER_ENV["PATH"])
    if compiler is None:
        raise MinoError("no C compiler for mino's cell executor, so every cell is its own exec (slower)",
                        "install gcc and libc6-dev (scripts/setup-host.sh does)")
    return compiler


def _compile(compiler: str, out: Path) -> None:
    """A static executor at `out`, built with a fixed environment: nothing of the kernel's steers it."""
    try:
        done = subprocess.run([compiler, "-O2", "-static", "-o", str(out), str(SOURCE)], env=COMPILER_ENV,
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MinoError(f"building mino's cell executor failed: {exc}", "every cell is its own exec meanwhile") from exc
    if done.returncode != 0:
        raise MinoError(f"building mino's cell executor failed: {(done.stderr or done.stdout).strip()[-300:]}",
                        "install gcc and libc6-dev (a static libc); meanwhile every cell is its own exec")


def _made_by_us(directory: Path) -> bool:
    me = os.geteuid()
    try:
        d = os.lstat(directory)
        f = os.lstat(directory / "mino-exec")
    except OSError:
        return False
    return (stat.S_ISDIR(d.st_mode) and d.st_uid == me and stat.S_IMODE(d.st_mode) == 0o755
            and stat.S_ISREG(f.st_mode) and f.st_uid == me and stat.S_IMODE(f.st_mode) == 0o111
            and f.st_nlink == 1)


# ---------------------------------------------------------------------------- the protocol

def request(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def run_request(nonce: bytes, script: str, env: Mapping[str, str], cwd: str, grace_ms: int) -> bytes:
    def field(tag: bytes, data: bytes) -> bytes:
        return tag + struct.pack(">I", len(data)) + data

    parts = [nonce, struct.pack(">I", grace_ms), field(b"C", cwd.encode()),
             field(b"S", script.encode("utf-8", "surrogateescape"))]
    parts += [field(b"V", f"{k}={v}".encode("utf-8", "surrogateescape")) for k, v in env.items()]
    return request(b"R", b"".join(parts))


class CellRun:
    """One cell in the executor, read like an exec's stream: ``(STDOUT|STDERR, bytes)`` frames,
    then None once the cell has ended (or the executor was lost: :attr:`lost` says why)."""

    def __init__(self, executor: "Executor", nonce: bytes):
        self.executor = executor
        self.nonce = nonce
        self._queue: queue.Queue = queue.Queue(maxsize=256)  # frames from the reader: backpressure
        self._held: deque = deque()  # output read while waiting for the end (a stop)
        self.pid: int | None = None  # the cell's shell, in the container
        self.code: int | None = None  # as bash reports it: 128+N when killed by signal N
        self.late = False  # something the cell left still held its output at the end
        self.lost: str | None = None
        self.refused: str | None = None  # the executor would not start it (it ends): nothing ran
        self.ended = threading.Event()

    def _take(self, timeout: float | None):
        item = self._queue.get(timeout=timeout)
        if item is None:
            self.ended.set()
            self._queue.put(None)  # stay at the end for later callers
            return None
        kind, payload = item
        if kind in (b"O", b"E"):
            return STDOUT if kind == b"O" else STDERR, payload
        if kind == b"S":
            self.pid = int(payload[NONCE:].split(b"=", 1)[1])
        return self._take(timeout)  # a start record: nothing to show

    def get(self, timeout: float | None) -> tuple[int, bytes] | None:
        """Next output; None at the end. Raises queue.Empty on timeout."""
        if self._held:
            return self._held.popleft()
        return self._take(timeout)

    def idle(self) -> bool:
        return not self._held and self._queue.empty()

    def wait_end(self, timeout: float) -> bool:
        """Wait for the cell's end, keeping its output for :meth:`get` meanwhile."""
        deadline = time.monotonic() + timeout
        while not self.ended.is_set():
            try:
                item = self._take(max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if item is None:
                return True
            self._held.append(item)
        return True

    def exit_code(self, wait: float = 5.0) -> int | None:
        self.wait_end(wait)
        return self.code

    def signal(self, sig: int) -> bool:
        """Signal the cell's process group (through the executor). False when it has ended."""
        if self.ended.is_set() or self.executor.dead:
            return False
        try:
            self.executor._send(request(b"K", self.nonce + struct.pack(">I", int(sig))), within=1.0)
        except ExecutorGone:
            return False
        return True

    def close(self) -> None:
        """The cell is over for its reader: what still comes for it is dropped, and the reader
        thread is never left blocked on this run's full queue."""
        if self.executor._current is self:
            self.executor._current = None
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return


class Executor:
    """One running ``mino-exec`` in a container; one cell at a time."""

    def __init__(self, engine: Engine, container: str, exec_id: str, conn):
        self.engine = engine
        self.container = container
        self.exec_id = exec_id
        self._conn = conn
        self._hello: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        self._diagnostics = bytearray()  # the executor's own stderr
        self._current: CellRun | None = None
        self.dead: str | None = None  # why it cannot be used any more
        self.pid: int | None = None  # in the container
        self.host_pid: int | None = None  # as this machine sees it (local engines)
        self.base_env: dict[str, str] = {}
        self._reader = threading.Thread(target=self._pump, name=f"mino-executor-{exec_id[:8]}", daemon=True)
        self._reader.start()

    @classmethod
    def start(cls, engine: Engine, container: str) -> "Executor":
        exec_id = engine.exec_create(container, policy.executor_exec())
        ex = cls(engine, container, exec_id, engine.exec_hijack(exec_id))
        try:
            kind, payload = ex._hello.get(timeout=HELLO_TIMEOUT)
        except queue.Empty:
            ex._fail(f"the cell executor did not answer within {HELLO_TIMEOUT:.0f} s")
        if kind != b"H" or not payload.startswith(b"mino-exec 1 "):
            ex._fail(f"the cell executor answered {kind!r} {payload[:60]!r} instead of its hello"
                     + ex._why_ended())
        ex.pid = int(payload.rsplit(b"pid=", 1)[1])
        info = engine.exec_inspect(exec_id)
        ex.host_pid = int(info.get("Pid") or 0) or None
        # The executor clears its own environment; a cell gets what an exec would have given it
        # (the container's: the image's PATH, HOME, LANG, the CA variables) under its own.
        config = (engine.inspect(container) or {}).get("Config") or {}
        ex.base_env = dict(item.split("=", 1) for item in config.get("Env") or () if "=" in item)
        return ex

    # ------------------------------------------------------------------ the stream
    def _pump(self) -> None:
        buf = bytearray()
        try:
            for kind, payload in frames(self._conn._read):
                if kind == STDERR:
                    self._diagnostics.extend(payload[-4096:])
                    continue
                buf.extend(payload)
                while len(buf) >= 5:
                    size = struct.unpack(">I", buf[1:5])[0]
                    if len(buf) < 5 + size:
                        break
                    self._dispatch(bytes(buf[:1]), bytes(buf[5:5 + size]))
                    del buf[:5 + size]
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            self.dead = self.dead or "the cell executor ended"
            self._hello.put((b"", b""))
            run = self._current
            if run is not None and not run.ended.is_set():
                run.lost = "the session's cell executor ended while the cell ran" + self._why_ended()
                run._queue.put(None)

    def _dispatch(self, kind: bytes, payload: bytes) -> None:
        run = self._current
        if kind == b"H":
            self._hello.put((kind, payload))
        elif run is None or kind == b"L":
            return  # nothing is running (a refused request's line: the end record follows)
        elif kind == b"X" and payload[:NONCE] == run.nonce and payload[NONCE:NONCE + 1] == b"t":
            run.refused = ("a process changed the executor's limits, priority or CPUs, which later cells "
                           "would inherit; a new executor runs the cell")
            self.dead = run.refused
            run._queue.put(None)
        elif kind == b"X":
            if payload[:NONCE] != run.nonce or payload[NONCE:NONCE + 1] in (b"b", b""):
                self.dead = "the cell executor answered out of turn (protocol error); it was stopped"
                self._conn.close()
                return
            how = payload[NONCE:NONCE + 1]
            value, flags = struct.unpack(">II", payload[NONCE + 1:NONCE + 9])
            run.code = 128 + value if how == b"s" else value
            run.late = bool(flags & 1)
            run._queue.put(None)
        elif kind in (b"O", b"E") or (kind == b"S" and payload[:NONCE] == run.nonce):
            run._queue.put((kind, payload))

    def _why_ended(self) -> str:
        info: dict = {}
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # the engine records the exit a moment after the stream ends
            try:
                info = self.engine.exec_inspect(self.exec_id)
            except MinoError:
                return ""
            if not info.get("Running"):
                break
            time.sleep(0.02)
        code = info.get("ExitCode")
        text = ""
        if code is not None and not info.get("Running"):
            text = f" (exit code {code}" + (f": killed by signal {code - 128}" if code > 128 else "") + ")"
        diag = self._diagnostics.decode(errors="replace").strip()
        return text + (f": {diag.splitlines()[-1]}" if diag else "")

    def _fail(self, why: str):
        self.dead = why
        self.kill()
        raise ExecutorGone(why, "the next cell starts a new one")

    def _send(self, data: bytes, within: float = SEND_TIMEOUT) -> None:
        """Write to the executor's stdin within `within` seconds. An executor that does not read
        (stopped by a cell), a broken connection or an interruption midway leave a request half
        written: the executor is killed, never used again (ExecutorGone; KeyboardInterrupt goes on)."""
        deadline = time.monotonic() + within
        view = memoryview(data)
        sock = self._conn.sock
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        with self._send_lock:
            try:
                while view:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"it read no request for {within:g} s (stopped by a cell?)")
                    if not poller.poll(left * 1000):
                        continue
                    try:
                        view = view[sock.send(view, socket.MSG_DONTWAIT):]
                    except BlockingIOError:
                        continue
            except BaseException as exc:
                self.dead = f"the session's cell executor was stopped: {exc}"
                self.kill()
                if isinstance(exc, OSError):
                    raise ExecutorGone(f"cannot reach the session's cell executor: {exc}",
                                       "the next cell starts a new one") from None
                raise

    # ------------------------------------------------------------------ cells
    def begin(self, script: str, *, env: Mapping[str, str] | None = None, cwd: str = policy.WORKDIR,
              grace_ms: int = GRACE_MS, within: float = SEND_TIMEOUT) -> CellRun:
        """Send one cell; its output and end come through the returned :class:`CellRun`. The
        request is written within `within` seconds or not at all (ExecutorGone: nothing ran)."""
        if self.dead:
            raise ExecutorGone(self.dead, "the next cell starts a new one")
        run = CellRun(self, secrets.token_bytes(NONCE))
        self._current = run
        self._send(run_request(run.nonce, script, {**self.base_env, **(env or {})}, cwd, grace_ms), within)
        return run

    # ------------------------------------------------------------------ ending
    def close(self, wait: float = 2.0) -> None:
        """End the executor: close its stdin (it kills what it started and exits)."""
        try:
            self._conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._reader.join(wait)
        if self._reader.is_alive():
            self.kill()
        self.disconnect()
        self.dead = self.dead or "the session's cell executor was closed"

    def kill(self) -> None:
        """From outside: the executor's host process (a local engine), then the connection."""
        try:
            info = self.engine.exec_inspect(self.exec_id)
        except MinoError:
            info = {}
        pid = int(info.get("Pid") or 0) if info.get("Running") else 0
        if pid and self.engine.processes_here():  # elsewhere, that pid is another process here
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.disconnect()

    def disconnect(self) -> None:
        """Drop the connection (shutdown wakes the reader thread; close alone would not)."""
        try:
            self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()
