"""Running one cell's script in a container: streamed, interruptible, with a deadline.

IPython's ``%%script``/``%%bash`` habits, and where mino differs:

* The script runs with ``/bin/bash -c SCRIPT`` (by absolute path, ``--noprofile --norc``, no
  ``BASH_ENV``: nothing the cell planted in its home or ``PATH`` stands in for it), as the cell
  user in ``/workspace``. Scripts larger than the argument limit are handed over as a file under
  ``/run/mino``, read-only inside.
* Output streams as it arrives, decoded incrementally (a UTF-8 character split across reads stays
  whole; bad bytes become U+FFFD instead of failing the cell), stdout and stderr apart.
* Interrupting the kernel (``KeyboardInterrupt``) and ``--timeout`` stop the cell from this
  machine (:mod:`mino_jupyter.procs`): INT, TERM, KILL to the shell's process group, then every
  other process the cell started, ``setsid`` or not. ``%%bash`` only signals its own process;
  a sandbox cannot leave the cell's background work running unseen. What survives is reported.
* The exit code comes from the engine once the stream ends.
"""

from __future__ import annotations

import codecs
import queue
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from . import policy, procs
from .errors import MinoError
from .runtime import STDERR, STDOUT, Engine, ExecStream

MAX_ARGV_SCRIPT = 100_000  # bytes; larger scripts are handed over as a file (argv limit is 128 KiB)
FLUSH_BYTES = 64 * 1024  # per stream message; ZMQ queues up to 1000 of them for a slow client
DRAIN_AFTER_KILL = 1.0


class Sink(Protocol):
    def write(self, stream: int, text: str) -> None: ...
    def flush(self) -> None: ...


class ControlFiles(Protocol):
    """Where a large script goes: read-only inside the container (see storage.SessionStorage)."""

    def write_control(self, name: str, data: bytes) -> str: ...
    def remove_control(self, name: str) -> None: ...


@dataclass
class CellResult:
    exit_code: int
    duration: float
    interrupted: str | None = None  # "interrupted" | "terminated" | "killed"
    timed_out: bool = False
    timeout: float | None = None
    survivors: tuple[procs.Proc, ...] = ()  # what could not be stopped (normally nothing)
    stopped_everything: bool = False  # the last resort ended earlier cells' processes too


def run_script(engine: Engine, container: str, script: str, *, env: Mapping[str, str],
               sink: Sink, timeout: float | None = None, control: ControlFiles | None = None,
               namespace: str | None = None, cgroup: str | None = None,
               cell_uid: int = policy.CELL_UID) -> CellResult:
    """Run `script` with bash in `container`; stream output to `sink` as it arrives.
    `namespace`, `cgroup`, `cell_uid`: the container's PID namespace, its own cgroup and the
    cell's uid as seen from here (for stopping)."""
    data = script.encode("utf-8", "surrogateescape")
    file_name = None
    if len(data) > MAX_ARGV_SCRIPT and control is not None:
        file_name = f"cell-{uuid.uuid4().hex[:12]}.sh"
        body = policy.cell_exec(control.write_control(file_name, data), env=env, from_file=True)
    else:
        body = policy.cell_exec(script, env=env)
    try:
        return _run(engine, container, body, sink, timeout, namespace, cgroup, cell_uid)
    finally:
        if file_name:
            control.remove_control(file_name)


def _run(engine: Engine, container: str, body: dict, sink: Sink, timeout: float | None,
         namespace: str | None, cgroup: str | None, cell_uid: int) -> CellResult:
    started = time.monotonic()
    clock = procs.boottime_ticks()
    exec_id = engine.exec_create(container, body)
    stop = _stopper(engine, container, exec_id, namespace, cgroup, clock, cell_uid)
    try:
        stream = engine.exec_attach(exec_id)
    except KeyboardInterrupt:  # the process may have started before we saw its stream
        stopped = _guarded(stop)
        return CellResult(exit_code=130, duration=time.monotonic() - started, interrupted=stopped.how,
                          survivors=stopped.survivors, stopped_everything=stopped.everything)
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
                    stopped = _guarded(stop)
                    result.survivors, result.stopped_everything = stopped.survivors, stopped.everything
                    break
                continue
            if item is None:
                break
            emit(*item)
            if pending and stream.idle():  # nothing more right now: show it
                sink.flush()
                pending = 0
    except KeyboardInterrupt:
        stopped = _guarded(stop)
        result.interrupted, result.survivors = stopped.how, stopped.survivors
        result.stopped_everything = stopped.everything
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


def _stopper(engine: Engine, container: str, exec_id: str, namespace: str | None, cgroup: str | None,
             clock: int, cell_uid: int) -> Callable[[], procs.Stopped]:
    def stop() -> procs.Stopped:
        info = engine.exec_inspect(exec_id)
        pid = int(info.get("Pid") or 0) if info.get("Running") else 0
        stopped = procs.stop(pid, ns=namespace, started=clock, cgroup=cgroup, uid=cell_uid)
        if cgroup is None and namespace and (stopped.survivors or procs.still_running(namespace, clock, uid=cell_uid)):
            # No freezer (rootless on cgroup v1) and something escaped the sweep: the kernel's
            # all-at-once kill of the cell's uid, from inside (policy.kill_all_exec).
            try:
                engine.exec_run(container, policy.kill_all_exec())
            except MinoError:
                return stopped
            end = time.monotonic() + 2.0
            left = procs.cell_processes(namespace, clock, uid=cell_uid)
            while left and time.monotonic() < end:
                time.sleep(0.02)
                left = procs.cell_processes(namespace, clock, uid=cell_uid)
            return procs.Stopped(stopped.signal, tuple(left.values()), everything=not left)
        return stopped
    return stop


def _guarded(stop: Callable[[], procs.Stopped]) -> procs.Stopped:
    """Stop the cell even if the user presses interrupt again meanwhile."""
    while True:
        try:
            return stop()
        except KeyboardInterrupt:
            continue


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
