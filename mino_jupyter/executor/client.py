"""A minimal client of ``mino-exec``, the resident cell executor (prototype).

One :class:`Executor` per session container: :meth:`Executor.start` makes one engine exec of
the executor with stdin attached (a hijacked ``POST /exec/{id}/start``), and each
:meth:`Executor.run` sends one run request on that connection and reads the cell's frames back.
The protocol is described in ``mino-exec.c`` and ``docs/executor-design.md``.

Not wired into mino yet: ``cell.run_script`` (one exec per cell) stays the path the engine can
always take; this is what it would fall back from.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .. import policy
from ..errors import MinoError
from ..runtime import STDERR, STDOUT, Attached, Engine, frames

SOURCE = Path(__file__).with_name("mino-exec.c")
MOUNT_DIR = "/usr/local/libexec/mino"  # inside the container, read-only
EXEC_PATH = f"{MOUNT_DIR}/mino-exec"
HELLO_TIMEOUT = 5.0
GRACE_MS = 50  # how long after the shell exits its pipes may stay open before the cell ends
ESCALATION = ((signal.SIGINT, 0.3), (signal.SIGTERM, 0.3), (signal.SIGKILL, 1.0))
NONCE = 16

Output = Callable[[int, bytes], None]  # (runtime.STDOUT | runtime.STDERR, bytes)


class ExecutorGone(MinoError):
    """The executor ended, broke the protocol or stopped answering; the session needs a new one."""


def build(directory: Path) -> Path:
    """Compile the executor (static) into `directory` as ``mino-exec``, mode 0111: executable but
    not readable by the cell user, so the kernel starts it non-dumpable (see the design doc).
    Returns the directory to bind-mount at :data:`MOUNT_DIR`."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)  # the cell user must reach the file (but not read it)
    tmp = directory / f".mino-exec.{os.getpid()}"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(tmp), str(SOURCE)], check=True,
                   capture_output=True)
    os.chmod(tmp, 0o111)
    os.replace(tmp, directory / "mino-exec")
    return directory


def mount(directory: Path | str) -> dict:
    """The bind mount of the executor's directory, read-only (SpecGenerator ``mounts`` entry)."""
    return {"type": "bind", "source": str(directory), "destination": MOUNT_DIR,
            "options": ["rbind", "ro", "nosuid", "nodev"]}


def request(kind: bytes, payload: bytes) -> bytes:
    return kind + struct.pack(">I", len(payload)) + payload


def run_request(nonce: bytes, script: str, env: Mapping[str, str], cwd: str, grace_ms: int) -> bytes:
    def field(tag: bytes, data: bytes) -> bytes:
        return tag + struct.pack(">I", len(data)) + data

    parts = [nonce, struct.pack(">I", grace_ms), field(b"C", cwd.encode()),
             field(b"S", script.encode("utf-8", "surrogateescape"))]
    parts += [field(b"V", f"{k}={v}".encode("utf-8", "surrogateescape")) for k, v in env.items()]
    return request(b"R", b"".join(parts))


@dataclass
class Result:
    exit_code: int  # as bash reports it: 128+N when the shell was killed by signal N
    signal: int | None
    stdout: bytes
    stderr: bytes
    duration: float
    pid: int | None = None  # the cell's shell, in the container's PID namespace
    late: bool = False  # something the cell left still held its output open at the end
    interrupted: str | None = None  # the strongest signal sent ("SIGINT", ...), None if none
    timed_out: bool = False
    log: list[str] = field(default_factory=list)


class Executor:
    """One running ``mino-exec`` in a container; one cell at a time."""

    def __init__(self, engine: Engine, container: str, exec_id: str, sock: socket.socket, leftover: bytes):
        self.engine = engine
        self.container = container
        self.exec_id = exec_id
        self._sock = sock
        self._conn = Attached(sock, leftover)
        self._frames: queue.Queue = queue.Queue(maxsize=256)
        self._send_lock = threading.Lock()
        self._diagnostics = bytearray()  # the executor's own stderr
        self._current: bytes | None = None  # nonce of the running cell
        self.dead: str | None = None  # why it cannot be used any more
        self.pid: int | None = None  # in the container
        self.base_env: dict[str, str] = {}
        self._reader = threading.Thread(target=self._pump, name=f"mino-executor-{exec_id[:8]}", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ starting
    @classmethod
    def start(cls, engine: Engine, container: str, path: str = EXEC_PATH, user: str = policy.CELL_USER) -> "Executor":
        body = policy.exec_body([path], env={}, workdir="/", user=user)
        body["AttachStdin"] = True
        exec_id = engine.exec_create(container, body)
        sock, leftover = _hijack(engine, f"exec/{exec_id}/start", {"Detach": False, "Tty": False})
        ex = cls(engine, container, exec_id, sock, leftover)
        try:
            kind, payload = ex._next(HELLO_TIMEOUT, "say hello")
        except queue.Empty:
            ex._fail(f"the executor did not answer within {HELLO_TIMEOUT:.0f} s")
        if kind != b"H" or not payload.startswith(b"mino-exec 1 "):
            ex._fail(f"the executor answered {kind!r} {payload[:60]!r} instead of its hello")
        ex.pid = int(payload.rsplit(b"pid=", 1)[1])
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
                    self._frames.put((bytes(buf[:1]), bytes(buf[5:5 + size])))
                    del buf[:5 + size]
        except (ConnectionError, OSError):
            pass
        finally:
            self._frames.put(None)

    def _next(self, timeout: float | None, doing: str) -> tuple[bytes, bytes]:
        if self.dead:
            raise ExecutorGone(self.dead, "run the cell again: a new executor is started")
        item = self._frames.get(timeout=timeout)  # queue.Empty on timeout
        if item is None:
            self._frames.put(None)
            self._fail(f"the session's executor ended while trying to {doing}{self._why_ended()}")
        return item

    def _why_ended(self) -> str:
        info = {}
        end = time.monotonic() + 1.0
        while time.monotonic() < end:  # the engine records the exit a moment after the stream ends
            try:
                info = self.engine.exec_inspect(self.exec_id)
            except MinoError:
                return " (the engine does not answer; the executor ends by itself when its connection goes)"
            if not info.get("Running"):
                break
            time.sleep(0.02)
        code = info.get("ExitCode")
        text = ""
        if info.get("Running"):
            text = " (the connection to it was lost while it still ran; it is killed now)"
        elif code is not None:
            text = f" (exit code {code}" + (f": killed by signal {code - 128}" if code > 128 else "") + ")"
        diag = self._diagnostics.decode(errors="replace").strip()
        return text + (f": {diag.splitlines()[-1]}" if diag else "")

    def _fail(self, why: str):
        self.dead = why
        self.kill()
        raise ExecutorGone(why, "run the cell again: a new executor is started")

    def _send(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError as exc:
                self._fail(f"cannot reach the session's executor: {exc}")

    # ------------------------------------------------------------------ cells
    def run(self, script: str, *, env: Mapping[str, str] | None = None, cwd: str = policy.WORKDIR,
            on_output: Output | None = None, timeout: float | None = None, grace_ms: int = GRACE_MS) -> Result:
        """Run one cell; stream its output to `on_output` as it arrives; return when it ended
        (the output is also kept whole in the result: a prototype's convenience).
        `timeout`: seconds, then INT, TERM, KILL to its process group (through the executor)."""
        if self.dead:
            raise ExecutorGone(self.dead, "run the cell again: a new executor is started")
        nonce = secrets.token_bytes(NONCE)
        started = time.monotonic()
        out, err = bytearray(), bytearray()
        result = Result(-1, None, b"", b"", 0.0)
        self._current = nonce
        self._send(run_request(nonce, script, {**self.base_env, **(env or {})}, cwd, grace_ms))
        deadline = started + timeout if timeout else None
        escalation = iter(ESCALATION)
        timing_out = timeout is not None  # False once the user interrupts instead
        try:
            while True:
                wait = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
                try:
                    kind, payload = self._next(wait, "run a cell")
                except queue.Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        step = next(escalation, None)
                        if step is None:
                            self._fail("the session's executor did not end the cell after SIGKILL "
                                       "(stopped by a cell?); it was killed")
                        sig, grace = step
                        if result.interrupted is None:
                            result.timed_out = timing_out
                        result.interrupted = sig.name
                        self._send(request(b"K", nonce + struct.pack(">I", sig)))
                        deadline = time.monotonic() + grace
                    continue
                except KeyboardInterrupt:
                    if result.interrupted is None:
                        deadline = time.monotonic()  # escalate from now, starting with SIGINT
                        timing_out = False
                    continue
                if kind in (b"O", b"E"):
                    (out if kind == b"O" else err).extend(payload)
                    if on_output:
                        on_output(STDOUT if kind == b"O" else STDERR, payload)
                elif kind == b"S" and payload[:NONCE] == nonce:
                    result.pid = int(payload[NONCE:].split(b"=", 1)[1])
                elif kind == b"L":
                    result.log.append(payload.decode(errors="replace"))
                elif kind == b"X":
                    if payload[:NONCE] != nonce:
                        self._fail("the session's executor ended a cell it was not running (protocol error)")
                    how, value, flags = payload[NONCE:NONCE + 1], *struct.unpack(">II", payload[NONCE + 1:NONCE + 9])
                    if how == b"b":
                        self._fail("the session's executor was still running an earlier cell")
                    result.signal = value if how == b"s" else None
                    result.exit_code = 128 + value if how == b"s" else value
                    result.late = bool(flags & 1)
                    break
                else:
                    self._fail(f"unexpected frame {kind!r} from the session's executor")
        finally:
            self._current = None
        result.stdout, result.stderr = bytes(out), bytes(err)
        result.duration = time.monotonic() - started
        return result

    def interrupt(self, sig: int = signal.SIGINT) -> bool:
        """Signal the running cell's process group (from any thread). False if none runs."""
        nonce = self._current
        if nonce is None or self.dead:
            return False
        self._send(request(b"K", nonce + struct.pack(">I", int(sig))))
        return True

    # ------------------------------------------------------------------ ending
    def close(self, wait: float = 2.0) -> None:
        """End the executor: close its stdin (it kills what it started and exits)."""
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._reader.join(wait)
        if self._reader.is_alive():
            self.kill()
        self.disconnect()
        self.dead = self.dead or "the session's executor was closed"

    def kill(self) -> None:
        """From outside: the executor's host process (a local engine), then the connection."""
        try:
            info = self.engine.exec_inspect(self.exec_id)
        except MinoError:
            info = {}
        pid = int(info.get("Pid") or 0) if info.get("Running") else 0
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.disconnect()

    def disconnect(self) -> None:
        """Drop the connection (shutdown wakes the reader thread; close alone would not). The
        executor does NOT notice: the engine keeps its stdin open (see the design doc)."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()


def _hijack(engine: Engine, path: str, body: dict, timeout: float = 10.0) -> tuple[socket.socket, bytes]:
    """POST `body` to an API path that upgrades to a raw two-way stream (exec start with stdin)."""
    url = urllib.parse.urlparse(engine.endpoint.url)
    try:
        if url.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(url.path)
        elif url.scheme == "tcp":
            sock = socket.create_connection((url.hostname, url.port or 80), timeout=timeout)
        else:
            raise MinoError(f"the executor needs a unix:// or tcp:// engine, not {url.scheme}://")
        data = json.dumps(body).encode()
        sock.sendall(f"POST {engine.api.path_prefix}{path} HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\n"
                     f"Upgrade: tcp\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                     .encode() + data)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise MinoError("the engine closed the connection to the executor")
            head += chunk
    except OSError as exc:
        raise MinoError(f"cannot start the executor: {exc}") from exc
    header, _, leftover = head.partition(b"\r\n\r\n")
    status = header.split(b"\r\n", 1)[0]
    if b" 101 " not in status and b" 200 " not in status:
        sock.close()
        raise MinoError(f"cannot start the executor: {status.decode(errors='replace')}")
    sock.settimeout(None)
    return sock, leftover
