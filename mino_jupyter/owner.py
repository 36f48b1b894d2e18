"""Who owns a container: a process identity that survives PID reuse and reboots.

Every container mino starts carries its owner's pid, the pid's start time (clock ticks since
boot, from /proc/<pid>/stat), the boot id, the host name and the machine id (``/etc/machine-id``).
A container whose owner no longer matches a live process of this machine is an orphan and may be
reaped by anyone here. Another machine's containers (an engine shared by several machines) are
not judged, even when that machine has the same host name: its boot id differs from ours, which
on this machine would mean "rebooted, so dead".
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
    machine: str = "unknown"

    def labels(self) -> dict[str, str]:
        return {
            "io.mino.owner": self.token,
            "io.mino.owner-pid": str(self.pid),
            "io.mino.owner-start": str(self.start_ticks),
            "io.mino.boot-id": self.boot_id,
            "io.mino.host": self.host,
            "io.mino.machine-id": self.machine,
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


MACHINE_ID_FILES = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))


def machine_id(files: tuple[Path, ...] = MACHINE_ID_FILES) -> str:
    """This machine's id (systemd's /etc/machine-id, else D-Bus's copy), or "unknown"."""
    for path in files:
        try:
            value = path.read_text().strip()
        except OSError:
            continue
        if value:
            return value
    return "unknown"


def current_owner() -> Owner:
    pid = os.getpid()
    return Owner(
        token=uuid.uuid4().hex[:16],
        pid=pid,
        start_ticks=process_start_ticks(pid) or 0,
        boot_id=boot_id(),
        host=socket.gethostname(),
        machine=machine_id(),
    )


def owner_alive(labels: dict[str, str], proc: Path = Path("/proc"), machine: str | None = None) -> bool:
    """True when the process named by a container's owner labels is still running.

    Containers without owner labels, or owned from another machine (a shared remote engine;
    another host name, or the same host name and another machine id), are not ours to judge:
    they count as alive.
    """
    if labels.get("io.mino.host") != socket.gethostname():
        return True
    theirs = labels.get("io.mino.machine-id")
    if theirs is not None and theirs != (machine or machine_id()):
        return True
    try:
        pid = int(labels["io.mino.owner-pid"])
        start = int(labels["io.mino.owner-start"])
    except (KeyError, ValueError):
        return True
    if labels.get("io.mino.boot-id", boot_id(proc)) != boot_id(proc):
        return False
    return process_start_ticks(pid, proc) == start
