"""Running one cell's script in a container: streamed, interruptible, with a deadline.

The script runs as ``bash -c SCRIPT`` in its own process group inside the container (a small
wrapper with job control starts it and records the group id). Podman does not forward signals to
exec'd processes, so interrupting and timing out happen from a second exec as the same user that
signals the whole group: INT, then TERM, then KILL, a fraction of a second apart. Background
children of the cell are in the group too. The container itself is left alone and stays usable.
"""

from __future__ import annotations

import codecs
import io
import queue
import tarfile
import time
import uuid
from dataclasses import dataclass
from typing import Mapping, Protocol

from . import policy
from .runtime import STDERR, STDOUT, Engine, ExecStream

MAX_ARGV_SCRIPT = 100_000  # bytes; larger scripts are copied in as a file (argv limit is 128 KiB)
FLUSH_BYTES = 64 * 1024  # per stream message; ZMQ queues up to 1000 of them for a slow client
DRAIN_AFTER_KILL = 1.0

HOW = {"INT": "interrupted", "TERM": "terminated", "KILL": "killed", "none": "interrupted"}


class Sink(Protocol):
    def write(self, stream: int, text: str) -> None: ...
    def flush(self) -> None: ...


@dataclass
class CellResult:
    exit_code: int
    duration: float
    interrupted: str | None = None  # "interrupted" | "terminated" | "killed"
    timed_out: bool = False
    timeout: float | None = None


def run_script(engine: Engine, container: str, script: str, *, env: Mapping[str, str],
               sink: Sink, timeout: float | None = None) -> CellResult:
    """Run `script` with bash in `container`; stream output to `sink` as it arrives."""
    token = uuid.uuid4().hex[:12]
    pgid_file = f"/tmp/.mino-cell-{token}"
    data = script.encode("utf-8", "surrogateescape")
    if len(data) > MAX_ARGV_SCRIPT:
        path = f"/tmp/.mino-cell-{token}.sh"
        _upload(engine, container, path, data)
        body = policy.cell_exec(path, pgid_file=pgid_file, env=env, from_file=True)
    else:
        body = policy.cell_exec(script, pgid_file=pgid_file, env=env)
    started = time.monotonic()
    try:
        stream = engine.exec_start(container, body)
    except KeyboardInterrupt:  # the process may have started before we saw its stream
        how = _stop_group_guarded(engine, container, pgid_file)
        return CellResult(exit_code=130, duration=time.monotonic() - started, interrupted=how)
    decoders = {STDOUT: codecs.getincrementaldecoder("utf-8")("replace"),
                STDERR: codecs.getincrementaldecoder("utf-8")("replace")}
    deadline = started + timeout if timeout else None
    result = CellResult(exit_code=-1, duration=0.0, timeout=timeout)
    pending = 0

    def emit(kind: int, payload: bytes) -> None:
        nonlocal pending
        text = decoders[kind].decode(payload)
        if text:
            sink.write(kind, text)
            pending += len(text)
            if pending >= FLUSH_BYTES:
                sink.flush()
                pending = 0

    try:
        while True:
            wait = 0.25 if deadline is None else max(0.0, min(0.25, deadline - time.monotonic()))
            try:
                item = stream.get(timeout=wait)
            except queue.Empty:
                if pending:
                    sink.flush()
                    pending = 0
                if deadline is not None and time.monotonic() >= deadline:
                    result.timed_out = True
                    _stop_group(engine, container, pgid_file)
                    break
                continue
            if item is None:
                break
            emit(*item)
            if pending and stream.idle():  # nothing more right now: show it
                sink.flush()
                pending = 0
    except KeyboardInterrupt:
        result.interrupted = _stop_group_guarded(engine, container, pgid_file)
    # Whatever was printed before the group died still belongs to this cell.
    _drain(stream, emit)
    for kind, decoder in decoders.items():
        tail = decoder.decode(b"", final=True)
        if tail:
            sink.write(kind, tail)
    sink.flush()
    code = stream.exit_code(wait=2.0)
    stream.close()
    result.duration = time.monotonic() - started
    if result.timed_out:
        result.exit_code = 124
    else:
        result.exit_code = -1 if code is None else code
    return result


def _drain(stream: ExecStream, emit) -> None:
    end = time.monotonic() + DRAIN_AFTER_KILL
    while True:
        try:
            item = stream.get(timeout=max(0.0, end - time.monotonic()))
        except queue.Empty:
            return
        except KeyboardInterrupt:
            continue
        if item is None:
            return
        emit(*item)


def _stop_group(engine: Engine, container: str, pgid_file: str) -> str:
    code, out, _ = engine.exec_run(container, policy.stop_exec(pgid_file))
    signal_used = out.decode(errors="replace").strip().splitlines()[-1:] or ["none"]
    return HOW.get(signal_used[0], "interrupted")


def _stop_group_guarded(engine: Engine, container: str, pgid_file: str) -> str:
    """Stop the group even if the user presses interrupt again meanwhile."""
    while True:
        try:
            return _stop_group(engine, container, pgid_file)
        except KeyboardInterrupt:
            continue


def _upload(engine: Engine, container: str, path: str, data: bytes) -> None:
    buf = io.BytesIO()
    directory, _, name = path.rpartition("/")
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o600
        info.uid = info.gid = policy.CELL_UID
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
    engine.put_archive(container, directory, buf.getvalue(), what="copy the cell script into the container")
