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
* Where the session has a resident executor (:mod:`mino_jupyter.executor`), the cell is a
  request to it instead of an exec of its own: the same bash, argv, environment and working
  directory, its output read the same way, its end and exit code from the executor's end record.
  Interrupt and timeout stop it from this machine as above (the shell's pid in the container,
  from the executor's start record, mapped to this machine's); the executor is where the cell's
  processes descend from. A cell whose executor ends or stops answering says so and did not
  complete; the next cell starts a new executor.
"""

from __future__ import annotations

import codecs
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from . import executor as executors, policy, procs
from .errors import MinoError, UsageError
from .executor import CellRun, Executor
from .runtime import STDERR, STDOUT, Engine, ExecStream

MAX_ARGV_SCRIPT = 100_000  # bytes; larger scripts are handed over as a file (argv limit is 128 KiB)
FLUSH_BYTES = 1 << 20  # per stream message at most; ZMQ queues up to 1000 of them for a slow client
# A flush waits for the kernel's output thread to send. Output that stops shows at once; output
# that keeps coming is flushed at most this often (each pause in a fast stream would be a flush).
FLUSH_GAP = 0.01
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
    lost: str | None = None  # the executor ended while the cell ran: the cell did not complete


def run_script(engine: Engine, container: str, script: str, *, env: Mapping[str, str],
               sink: Sink, timeout: float | None = None, control: ControlFiles | None = None,
               namespace: str | None = None, cgroup: str | None = None,
               cell_uid: int = policy.CELL_UID, cancel: threading.Event | None = None,
               executor: Executor | None = None) -> CellResult:
    """Run `script` with bash in `container`; stream output to `sink` as it arrives.
    `namespace`, `cgroup`, `cell_uid`: the container's PID namespace, its own cgroup and the
    cell's uid as seen from here (for stopping). `cancel`: set from another thread, it stops the
    cell as an interrupt does (`%mino kill` of a background cell). `executor`: the session's
    resident executor, which runs the cell instead of an exec of its own (ExecutorGone when it
    cannot take it: then nothing ran)."""
    if executor is not None:
        clock = procs.boottime_ticks()
        started = time.monotonic()
        try:
            run = executor.begin(script, env={**env, "BASH_ENV": ""},
                                 within=min(timeout, executors.SEND_TIMEOUT) if timeout else executors.SEND_TIMEOUT)
        except KeyboardInterrupt:  # the request was not written whole: nothing ran (the executor is gone)
            return CellResult(exit_code=130, duration=time.monotonic() - started, interrupted="interrupted")
        stop = _executor_stopper(run, engine, container, namespace, cgroup, clock, cell_uid)
        try:
            result = _follow(run, stop, sink, timeout, cancel, started)
        finally:
            run.close()
        if run.refused:  # it ran nothing: the session runs the cell another way
            raise executors.ExecutorGone(run.refused, "the next cell starts a new executor")
        if not run.ended.is_set():  # no end record even after the stop: stopped by a cell, or stuck
            executor.kill()
            run.lost = run.lost or "the session's cell executor did not report the cell's end (stopped by a cell?)"
        result.lost = run.lost
        return result
    data = script.encode("utf-8", "surrogateescape")
    file_name = None
    if len(data) > MAX_ARGV_SCRIPT and control is None:
        raise UsageError(f"this cell is {len(data) // 1000} kB, more than a command line holds "
                         f"({MAX_ARGV_SCRIPT // 1000} kB), and its session has no place for mino's files (an "
                         "engine elsewhere without the cell executor): nothing ran",
                         "split the cell, or run it where the executor runs (`mino-jupyter doctor` says why not)")
    if len(data) > MAX_ARGV_SCRIPT:
        file_name = f"cell-{uuid.uuid4().hex[:12]}.sh"
        body = policy.cell_exec(control.write_control(file_name, data), env=env, from_file=True)
    else:
        body = policy.cell_exec(script, env=env)
    try:
        return _run(engine, container, body, sink, timeout, namespace, cgroup, cell_uid, cancel)
    finally:
        if file_name:
            control.remove_control(file_name)


class Lines:
    """Keeps lines whole and in the order they were begun, across stdout and stderr.

    The engine delivers each stream as it reads it, in chunks: a line written in two pieces to
    stderr can arrive split around a whole line of stdout (`ls /nonexistent || echo after` showed
    `ls:`, `after`, `cannot access ...`). Here a line is shown once it is complete, and a complete
    line waits while a line of the other stream that began before it is still incomplete. A
    piece without its end (a prompt, a progress bar) is shown after HOLD seconds without more, so
    nothing waits for long. Pure: the caller passes the time.
    """

    HOLD = 0.1
    LONGEST = 64 * 1024

    def __init__(self):
        self.partial: dict[int, tuple[float, float, str]] = {}  # stream -> (began, last byte, text)
        self.complete: list[tuple[float, int, int, str]] = []  # (began, order, stream, text)
        self.order = 0

    def feed(self, stream: int, text: str, now: float) -> list[tuple[int, str]]:
        began, _last, buffered = self.partial.pop(stream, (now, now, ""))
        text = buffered + text
        cut = max(text.rfind("\n"), text.rfind("\r"))  # \r ends a progress bar's line
        if cut >= 0:  # whole lines, up to the last end: one piece (output can be large)
            self.complete.append((began, self.order, stream, text[:cut + 1]))
            self.order += 1
            text, began = text[cut + 1:], now
        if len(text) >= self.LONGEST:  # a line that never ends is shown in pieces, not kept
            self.complete.append((began, self.order, stream, text))
            self.order += 1
        elif text:
            self.partial[stream] = (began, now, text)
        return self._release()

    def due(self, now: float) -> list[tuple[int, str]]:
        """Pieces that waited HOLD seconds for their end: shown as they are."""
        for stream, (began, last, text) in list(self.partial.items()):
            if now - last >= self.HOLD:
                del self.partial[stream]
                self.complete.append((began, self.order, stream, text))
                self.order += 1
        return self._release()

    def wait(self, now: float) -> float | None:
        """Seconds until `due` has something to show (None: nothing is held)."""
        if not self.partial:
            return None
        return max(0.0, min(last for _b, last, _t in self.partial.values()) + self.HOLD - now)

    def flush(self) -> list[tuple[int, str]]:
        for stream, (began, _last, text) in list(self.partial.items()):
            self.complete.append((began, self.order, stream, text))
            self.order += 1
        self.partial.clear()
        return self._release()

    def _release(self) -> list[tuple[int, str]]:
        self.complete.sort()
        blocker = min((began for began, _l, _t in self.partial.values()), default=None)
        out, keep = [], []
        for item in self.complete:
            if blocker is None or item[0] < blocker:
                out.append((item[2], item[3]))
            else:
                keep.append(item)
        self.complete = keep
        merged: list[tuple[int, str]] = []
        for stream, text in out:  # one write per run of the same stream
            if merged and merged[-1][0] == stream:
                merged[-1] = (stream, merged[-1][1] + text)
            else:
                merged.append((stream, text))
        return merged


def _run(engine: Engine, container: str, body: dict, sink: Sink, timeout: float | None,
         namespace: str | None, cgroup: str | None, cell_uid: int,
         cancel: threading.Event | None = None) -> CellResult:
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
    return _follow(stream, stop, sink, timeout, cancel, started)


def _follow(stream: ExecStream | CellRun, stop: Callable[[], procs.Stopped], sink: Sink,
            timeout: float | None, cancel: threading.Event | None, started: float) -> CellResult:
    """Show a running cell's output until it ends; stop it on interrupt, cancel or deadline."""
    decoders = {STDOUT: codecs.getincrementaldecoder("utf-8")("replace"),
                STDERR: codecs.getincrementaldecoder("utf-8")("replace")}
    deadline = started + timeout if timeout else None
    result = CellResult(exit_code=-1, duration=0.0, timeout=timeout)
    pending = 0
    flushed = time.monotonic()
    lines = Lines()

    def flush(wait: bool = True) -> None:
        """`wait`: until the frontend's message is sent (a full message: the kernel holds no more
        than FLUSH_BYTES); else the send is only asked for (a pause in the output: shown soon,
        and the cell's output does not wait for a round trip to the kernel's I/O thread)."""
        nonlocal pending, flushed
        (sink.flush if wait else getattr(sink, "flush_soon", sink.flush))()
        pending, flushed = 0, time.monotonic()

    def show(parts: list[tuple[int, str]]) -> None:
        nonlocal pending
        for kind, text in parts:
            sink.write(kind, text)
            pending += len(text)
            if pending >= FLUSH_BYTES:
                flush()

    def emit(kind: int, payload: bytes) -> None:
        text = decoders[kind].decode(payload)
        if text:
            show(lines.feed(kind, text, time.monotonic()))

    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise KeyboardInterrupt  # `%mino kill`: stopped as an interrupt stops a cell
            now = time.monotonic()
            held = lines.wait(now)
            wait = 0.25 if held is None else min(0.25, held)
            if pending:  # shown within FLUSH_GAP even if nothing more comes
                wait = max(0.0, min(wait, flushed + FLUSH_GAP - now))
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - now))
            try:
                item = stream.get(timeout=wait)
            except queue.Empty:
                show(lines.due(time.monotonic()))
                if pending:
                    flush(wait=False)
                if deadline is not None and time.monotonic() >= deadline:
                    result.timed_out = True
                    stopped = _guarded(stop)
                    result.survivors, result.stopped_everything = stopped.survivors, stopped.everything
                    break
                continue
            if item is None:
                break
            emit(*item)
            show(lines.due(time.monotonic()))
            if pending and stream.idle() and time.monotonic() - flushed >= FLUSH_GAP:
                flush(wait=False)  # nothing more right now: show it (the wait above flushes the rest soon)
    except KeyboardInterrupt:
        stopped = _guarded(stop)
        result.interrupted, result.survivors = stopped.how, stopped.survivors
        result.stopped_everything = stopped.everything
    # Whatever was printed before the group died still belongs to this cell.
    _drain(stream, emit)
    for kind, decoder in decoders.items():
        tail = decoder.decode(b"", final=True)
        if tail:
            show(lines.feed(kind, tail, time.monotonic()))
    show(lines.flush())
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
        if not namespace:  # the engine's processes are not this machine's: its pids name others here
            return _stop_inside(engine, container, lambda: not engine.exec_inspect(exec_id).get("Running"))
        info = engine.exec_inspect(exec_id)
        pid = int(info.get("Pid") or 0) if info.get("Running") else 0
        stopped = procs.stop(pid, ns=namespace, started=clock, cgroup=cgroup, uid=cell_uid)
        return _last_resort(stopped, engine, container, namespace, cgroup, clock, cell_uid, None)
    return stop


def _executor_stopper(run: CellRun, engine: Engine, container: str, namespace: str | None, cgroup: str | None,
                      clock: int, cell_uid: int) -> Callable[[], procs.Stopped]:
    """As for an exec, from this machine: the cell's shell (its container pid mapped to this
    machine's) and its group, then whatever it started outside the group; the executor is
    where the cell's processes descend from, as the container's init is for an exec. A cell
    whose start has not been reported yet is signalled through the executor first."""
    def stop() -> procs.Stopped:
        boundary = run.executor.host_pid
        leader = procs.host_pid(namespace, run.pid) if namespace and run.pid else None
        if leader:
            stopped = procs.stop(leader, ns=namespace, started=clock, cgroup=cgroup, uid=cell_uid, boundary=boundary)
        else:
            used = None
            for name, wait in (("INT", procs.GRACE), ("TERM", procs.GRACE), ("KILL", 1.0)):
                if run.ended.is_set() or not run.signal(getattr(signal, f"SIG{name}")):
                    break
                used = name
                if run.wait_end(wait):
                    break
            if not namespace:  # what left the group is not visible from here: everything goes
                return _stop_inside(engine, container, run.ended.is_set, first=used)
            stopped = procs.stop(0, ns=namespace, started=clock, cgroup=cgroup, uid=cell_uid, boundary=boundary)
            stopped = procs.Stopped(used or stopped.signal, stopped.survivors, stopped.everything)
        return _last_resort(stopped, engine, container, namespace, cgroup, clock, cell_uid, boundary)
    return stop


def _stop_inside(engine: Engine, container: str, ended: Callable[[], bool], first: str | None = None) -> procs.Stopped:
    """Where the engine's processes are not this machine's (an engine elsewhere), a cell is
    stopped from inside its container: every process of the cell's uid (INT unless the executor
    already signalled the cell, then KILL: nothing it started outside its group is visible from
    here), the session's executor too (the next cell starts a new one). Earlier cells'
    background processes go with it; mino says so."""
    how = first
    try:
        if not first:
            engine.exec_run(container, policy.kill_all_exec("INT"))
            end = time.monotonic() + procs.GRACE
            while not ended() and time.monotonic() < end:
                time.sleep(0.02)
            how = "INT" if ended() else None
        engine.exec_run(container, policy.kill_all_exec("KILL"))  # exit 1: nothing was left to kill
        killed = True
    except MinoError:
        killed = False
    if not killed:  # no process could start there (the process limit used up?): the container goes
        try:
            engine.kill(container)
        except MinoError:
            pass  # gone already
    return procs.Stopped(how or "KILL", (), everything=True)


def _last_resort(stopped: procs.Stopped, engine: Engine, container: str, namespace: str | None, cgroup: str | None,
                 clock: int, cell_uid: int, boundary: int | None) -> procs.Stopped:
    """No freezer (rootless on cgroup v1) and something escaped the sweep: the kernel's
    all-at-once kill of the cell's uid, from inside (policy.kill_all_exec; it ends the session's
    executor too, which the next cell replaces)."""
    if cgroup is not None or not namespace or not (
            stopped.survivors or procs.still_running(namespace, clock, uid=cell_uid, boundary=boundary)):
        return stopped
    try:
        engine.exec_run(container, policy.kill_all_exec())
    except MinoError:
        return stopped
    end = time.monotonic() + 2.0
    left = procs.cell_processes(namespace, clock, uid=cell_uid, boundary=boundary)
    while left and time.monotonic() < end:
        time.sleep(0.02)
        left = procs.cell_processes(namespace, clock, uid=cell_uid, boundary=boundary)
    return procs.Stopped(stopped.signal, tuple(left.values()), everything=not left)


def _guarded(stop: Callable[[], procs.Stopped]) -> procs.Stopped:
    """Stop the cell even if the user presses interrupt again meanwhile."""
    while True:
        try:
            return stop()
        except KeyboardInterrupt:
            continue


def _drain(stream: ExecStream | CellRun, emit) -> None:
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
