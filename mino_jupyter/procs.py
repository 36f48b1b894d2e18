"""A cell's processes, seen and signalled from this machine: outside the container.

Podman does not forward signals to exec'd processes, and any helper mino ran *inside* the
container would share the cell's uid: a cell could stop it, trace it or answer in its place.
So mino looks at the container's processes from the host's ``/proc`` and signals them from
here, where nothing the cell runs can reach.

A cell's processes are the processes of the cell's uid in the container's PID namespace that
started no earlier than the cell's own shell (the exec's process, whose host pid the engine
reports) and do not descend from an older process of that uid: a server an earlier cell left
running, and what it starts, are not this cell's. ``setsid``, ``nohup`` and double forks do not
hide a process from this: it is judged by namespace, uid and start time, not by group. Where a
resident executor (:mod:`mino_jupyter.executor`) starts cells, it is the boundary instead: older
than every cell and of the cell's uid, it is where the cell's processes descend from, as the
container's init is for an exec.

Stopping (interrupt or timeout): INT, then TERM, then KILL to the shell's process group (what a
terminal does; bash's foreground job and its background jobs are in it), a fraction of a second
apart; then the container's cgroup is frozen (nothing in it can run, fork or exit), everything
else the cell started is killed, and the cgroup thawed. Freezing is what makes this hold against
a cell that keeps forking and exiting so that its live pid is never the one looked at. Where no
freezer is at hand, SIGSTOP is repeated until nothing new appears. What is still alive afterwards
is reported by pid and command, never called stopped.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .policy import CELL_UID

PROC = Path("/proc")
GRACE = 0.3  # seconds a signal to the group gets before the next, stronger one
SWEEP_ROUNDS = 200


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    start: int  # clock ticks after boot
    uid: int  # real uid
    state: str
    command: str


def read(pid: int, proc: Path = PROC) -> Proc | None:
    try:
        raw = (proc / str(pid) / "stat").read_text()
        status = (proc / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    name = raw[raw.index("(") + 1:raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2:].split()
    uid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:")), -1)
    try:
        args = (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        args = ""
    return Proc(pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), start=int(fields[19]), uid=uid,
                state=fields[0], command=(args or name)[:120])


def namespace(pid: int, proc: Path = PROC) -> str | None:
    try:
        return os.readlink(proc / str(pid) / "ns" / "pid")
    except OSError:
        return None


def in_namespace(ns: str, proc: Path = PROC) -> dict[int, Proc]:
    found = {}
    for entry in os.scandir(proc):
        if entry.name.isdigit() and namespace(int(entry.name), proc) == ns:
            p = read(int(entry.name), proc)
            if p is not None:
                found[p.pid] = p
    return found


def host_pid(ns: str, inner: int, proc: Path = PROC) -> int | None:
    """The pid on this machine of the process that is `inner` in PID namespace `ns`."""
    for pid in in_namespace(ns, proc):
        try:
            status = (proc / str(pid) / "status").read_text()
        except OSError:
            continue
        line = next((l for l in status.splitlines() if l.startswith("NSpid:")), "")
        if line.split()[-1:] == [str(inner)]:
            return pid
    return None


def cell_processes(ns: str, leader_start: int, proc: Path = PROC, uid: int = CELL_UID,
                   boundary: int | None = None, leader: int | None = None) -> dict[int, Proc]:
    """The live processes a cell started (see the module doc). `uid`: the cell's uid as this
    machine sees it (1000, or the kernel user's own under rootless ``keep-id``); `boundary`: the
    host pid of the executor that started the cell, if one did; `leader`: the cell's shell, if
    it still runs. Only that shell may have its parent outside the container: another process
    whose line of parents leaves the container is another exec's (a cell running beside it)."""
    everyone = in_namespace(ns, proc)

    def ours(p: Proc) -> bool:
        seen = 0
        while seen < 4096:
            if p.uid != uid or p.pid == boundary:
                return True  # reached the container's init (or the executor): nothing older above
            if p.start < leader_start:
                return False  # an older process of the cell's uid: an earlier cell's
            parent = everyone.get(p.ppid)
            if parent is None:
                return p.pid == leader  # started from outside: this cell's shell, or another exec
            p, seen = parent, seen + 1
        return True

    return {pid: p for pid, p in everyone.items()
            if p.uid == uid and p.start >= leader_start and p.state != "Z" and ours(p)}


@dataclass(frozen=True)
class Stopped:
    signal: str | None  # the strongest signal the group needed: INT, TERM, KILL (None: it was gone)
    survivors: tuple[Proc, ...] = ()
    everything: bool = False  # every process of the cell's uid was killed (earlier cells' too)

    @property
    def how(self) -> str:
        return {"INT": "interrupted", "TERM": "terminated", "KILL": "killed"}.get(self.signal or "", "interrupted")


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def boottime_ticks() -> int:
    """Now, in the unit of /proc/PID/stat's start time (clock ticks since boot)."""
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * os.sysconf("SC_CLK_TCK"))


def stop(leader: int, *, ns: str | None, started: int, cgroup: str | None = None, proc: Path = PROC,
         grace: float = GRACE, uid: int = CELL_UID, boundary: int | None = None) -> Stopped:
    """Stop everything a cell started. `leader`: the host pid of the cell's shell (0: unknown or
    gone); `ns`: the container's PID namespace; `started`: :func:`boottime_ticks` taken before
    the cell started, used when the shell has already exited (its background processes are still
    the cell's); `cgroup`: the container's own cgroup path (its freezer), None when it has none;
    `uid`: the cell's uid as seen here; `boundary`: the executor that started the cell, if any."""
    me = read(leader, proc) if leader else None
    if me is not None and (me.state == "Z" or (ns is not None and namespace(leader, proc) != ns)):
        me = None  # gone, or the pid now names something else: never signal it
    if me is not None:
        ns = ns or namespace(leader, proc)
        started = me.start
    if ns is None:
        return Stopped(None)
    used = None
    for name in ("INT", "TERM", "KILL"):
        if me is None:
            break
        group = [p for p in cell_processes(ns, started, proc, uid, boundary, leader).values() if p.pgid == leader]
        if not group:
            break
        try:
            os.killpg(leader, getattr(signal, f"SIG{name}"))
        except (ProcessLookupError, PermissionError):
            break
        used = name
        end = time.monotonic() + grace
        while time.monotonic() < end and any(p.pgid == leader for p in
                                             cell_processes(ns, started, proc, uid, boundary, leader).values()):
            time.sleep(0.02)
    freezer = Freezer.of(cgroup)
    shell = leader if me is not None else None
    return Stopped(used, freezer.sweep(ns, started, proc, uid, boundary, shell) if freezer else
                   sweep(ns, started, proc, uid, boundary, shell))


def still_running(ns: str, leader_start: int, proc: Path = PROC, uid: int = CELL_UID, *, looks: int = 12,
                  interval: float = 0.03, boundary: int | None = None, leader: int | None = None) -> tuple[Proc, ...]:
    """What of the cell a few looks over a third of a second see. Without a freezer one empty
    look proves nothing: a process that forks and exits at once lives for microseconds and is
    missed by about one look in four; twelve misses in a row are one chance in sixteen million."""
    for _ in range(looks):
        seen = cell_processes(ns, leader_start, proc, uid, boundary, leader)
        if seen:
            return tuple(seen.values())
        time.sleep(interval)
    return ()


class Freezer:
    """A container's cgroup freezer (cgroup v1 `freezer.state`, v2 `cgroup.freeze`)."""

    def __init__(self, path: Path, v2: bool):
        self.path = path
        self.v2 = v2

    @classmethod
    def of(cls, cgroup: str | None) -> "Freezer | None":
        if not cgroup:
            return None
        rel = cgroup.lstrip("/")
        v1 = Path("/sys/fs/cgroup/freezer") / rel / "freezer.state"
        v2 = Path("/sys/fs/cgroup") / rel / "cgroup.freeze"
        if v1.exists():
            return cls(v1, False)
        if v2.exists():
            return cls(v2, True)
        return None

    def _set(self, frozen: bool) -> None:
        self.path.write_text(("1" if frozen else "0") if self.v2 else ("FROZEN" if frozen else "THAWED"))

    def _frozen(self) -> bool:
        if self.v2:
            events = (self.path.parent / "cgroup.events").read_text()
            return "frozen 1" in events
        return self.path.read_text().strip() == "FROZEN"

    def sweep(self, ns: str, leader_start: int, proc: Path = PROC, uid: int = CELL_UID,
              boundary: int | None = None, leader: int | None = None) -> tuple[Proc, ...]:
        """Freeze, kill what the cell started, thaw; then what is still alive."""
        try:
            self._set(True)
            end = time.monotonic() + 2.0
            while not self._frozen() and time.monotonic() < end:
                time.sleep(0.005)
            for pid in cell_processes(ns, leader_start, proc, uid, boundary, leader):
                _kill(pid, signal.SIGKILL)
        except OSError:
            return sweep(ns, leader_start, proc, uid, boundary, leader)  # no freezer after all: the SIGSTOP way
        finally:
            try:
                self._set(False)
            except OSError:
                pass
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            left = cell_processes(ns, leader_start, proc, uid, boundary, leader)
            if not left:
                return ()
            time.sleep(0.02)
        return sweep(ns, leader_start, proc, uid, boundary, leader)


def sweep(ns: str, leader_start: int, proc: Path = PROC, uid: int = CELL_UID,
          boundary: int | None = None, leader: int | None = None) -> tuple[Proc, ...]:
    """Freeze every process the cell started (until no new one appears), then kill them all."""
    frozen: dict[int, Proc] = {}
    for _ in range(SWEEP_ROUNDS):
        fresh = {pid: p for pid, p in cell_processes(ns, leader_start, proc, uid, boundary, leader).items()
                 if pid not in frozen or p.state not in ("T", "t")}
        if not fresh:
            break
        for pid in fresh:
            _kill(pid, signal.SIGSTOP)
        frozen.update(fresh)
    for pid in frozen:
        _kill(pid, signal.SIGKILL)
    end = time.monotonic() + 2.0
    while time.monotonic() < end:
        left = cell_processes(ns, leader_start, proc, uid, boundary, leader)
        if not left:
            return ()
        for pid in left:
            _kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    return tuple(cell_processes(ns, leader_start, proc, uid, boundary, leader).values())
