"""Who owns a container: a process identity that survives PID reuse and reboots.

Every container mino starts carries its owner's pid, the pid's start time (clock ticks since
boot, from /proc/<pid>/stat) and the boot id. A container whose owner no longer matches a live
process is an orphan and may be reaped by anyone.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Owner:
    token: str  # unique per owning process; the label the watchdog and reaper select on
    pid: int
    start_ticks: int
    boot_id: str
    host: str

    def labels(self) -> dict[str, str]:
        return {
            "io.mino.owner": self.token,
            "io.mino.owner-pid": str(self.pid),
            "io.mino.owner-start": str(self.start_ticks),
            "io.mino.boot-id": self.boot_id,
            "io.mino.host": self.host,
        }


def process_start_ticks(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Field 22 of /proc/<pid>/stat, or None when the process does not exist or has ended: a
    zombie (state Z, e.g. a SIGKILLed kernel whose parent has not reaped it yet) is dead, though
    its entry keeps the old start time until the parent waits for it."""
    try:
        raw = (proc / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def boot_id(proc: Path = Path("/proc")) -> str:
    try:
        return (proc / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def current_owner() -> Owner:
    pid = os.getpid()
    return Owner(
        token=uuid.uuid4().hex[:16],
        pid=pid,
        start_ticks=process_start_ticks(pid) or 0,
        boot_id=boot_id(),
        host=socket.gethostname(),
    )


def owner_alive(labels: dict[str, str], proc: Path = Path("/proc")) -> bool:
    """True when the process named by a container's owner labels is still running.

    Containers without owner labels, or owned from another host (a shared remote engine), are
    not ours to judge: they count as alive.
    """
    if labels.get("io.mino.host") != socket.gethostname():
        return True
    try:
        pid = int(labels["io.mino.owner-pid"])
        start = int(labels["io.mino.owner-start"])
    except (KeyError, ValueError):
        return True
    if labels.get("io.mino.boot-id", boot_id(proc)) != boot_id(proc):
        return False
    return process_start_ticks(pid, proc) == start
