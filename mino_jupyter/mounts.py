"""Where mino mounts a session's overlays, and as whom the cell's files exist on this machine.

* :class:`Local` (rootful Podman, the kernel runs as root): mounts are made by this process, in
  this machine's mount namespace, where the rootful engine makes its containers. The cell's uid
  (1000) is uid 1000 here too. Sessions get a size-limited loop disk.
* :class:`Namespaced` (rootless Podman): the engine makes containers inside the user's rootless
  user and mount namespaces, so a mount made out here would never reach them (and the files it
  keeps for a container, such as its /etc/hosts, belong to the container's subordinate uids). A short helper
  process (``python -I -m mino_jupyter.mounts``) joins the namespaces of the engine's own API
  service (found through its socket's peer credentials, never through a path a cell could
  write) and mounts there. The cell's uid is the kernel user's own (``keep-id``). There is no
  loop disk without root, so no disk limit (:func:`mino_jupyter.policy.unenforced` says so).

Both hand the kernel only ``/proc/self/fd/N`` of directories opened with ``O_NOFOLLOW`` when
mounting, and unmount with ``UMOUNT_NOFOLLOW``.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from . import policy
from .errors import MinoError
from .runtime import runtime_dir

OVERLAY_OPTIONS = "redirect_dir=off,metacopy=off,index=off"
# Inside a user namespace overlayfs keeps its marks in user.* xattrs (`userxattr`) and refuses
# redirect_dir=off with them; `nofollow` neither creates nor follows redirects.
USERNS_OVERLAY_OPTIONS = "redirect_dir=nofollow,metacopy=off,index=off,userxattr"
MS_NOSUID, MS_NODEV = 0x2, 0x4
MNT_DETACH, UMOUNT_NOFOLLOW = 0x2, 0x8
CLONE_NEWUSER, CLONE_NEWNS = 0x10000000, 0x00020000
HELPER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

_libc = ctypes.CDLL(None, use_errno=True)


class StorageError(MinoError):
    """A session's disk or overlays could not be set up; nothing was started."""


def _unescape(field: str) -> str:
    return field.encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")


def _mountpoints() -> list[str]:
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    return [_unescape(line.split()[4]) for line in text.splitlines() if len(line.split()) > 4]


def _open_dir(path: str | Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _mount_overlay(target: str, lower: str, upper: str, work: str, options: str) -> str | None:
    """None on success, else the reason."""
    try:
        fds = [_open_dir(lower), _open_dir(upper), _open_dir(work)]
    except OSError as exc:
        return f"{exc.filename}: {exc.strerror}"
    try:
        data = (f"lowerdir=/proc/self/fd/{fds[0]},upperdir=/proc/self/fd/{fds[1]},"
                f"workdir=/proc/self/fd/{fds[2]},{options}")
        if _libc.mount(b"overlay", os.fsencode(target), b"overlay", MS_NOSUID | MS_NODEV, data.encode()) != 0:
            return os.strerror(ctypes.get_errno())
        return None
    finally:
        for fd in fds:
            os.close(fd)


def _write_in_place(path: str, text: str) -> str | None:
    """Replace a file's content without replacing the file (a bind mount follows the inode);
    never through a link. None on success, else the reason."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.truncate()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    return None


def _unmount(path: str) -> str | None:
    """None when unmounted (or not mounted); a busy mount is detached."""
    if _libc.umount2(os.fsencode(path), UMOUNT_NOFOLLOW) == 0:
        return None
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return None
    if err == errno.EBUSY and _libc.umount2(os.fsencode(path), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        return None
    return os.strerror(err)


class Local:
    """Mounts in this process's namespace (root)."""

    loop_disks = True
    opaque_xattr = "trusted.overlay.opaque"  # readable only with CAP_SYS_ADMIN: a cell cannot set it
    overlay_options = OVERLAY_OPTIONS
    cell_uid = policy.CELL_UID
    where = "this machine"

    def mount_overlay(self, target: Path, lower: Path, upper: Path, work: Path) -> None:
        problem = _mount_overlay(str(target), str(lower), str(upper), str(work), self.overlay_options)
        if problem:
            raise StorageError(f"could not mount the overlay at {target}: {problem}",
                               "mino needs root and a kernel with overlayfs; `mino-jupyter doctor` checks")

    def unmount(self, path: Path) -> None:
        problem = _unmount(str(path))
        if problem:
            raise StorageError(f"could not unmount {path}: {problem}")

    def mountpoints(self) -> list[str]:
        """Mount points where the engine makes containers."""
        return _mountpoints()

    def write_in_place(self, path: str, text: str) -> None:
        """Rewrite one of the engine's files for a container (its /etc/hosts)."""
        problem = _write_in_place(path, text)
        if problem:
            raise StorageError(f"could not write {problem}")


class Namespaced(Local):
    """Mounts in the rootless engine's user and mount namespaces. `find_pid` names a process in
    them (asked at every operation: the API service may have restarted since)."""

    loop_disks = False
    opaque_xattr = "user.overlay.opaque"  # overlayfs refuses to let anyone set it through the overlay
    overlay_options = USERNS_OVERLAY_OPTIONS
    where = "the rootless engine's namespace"

    def __init__(self, find_pid: Callable[[], int | None]):
        self.find_pid = find_pid
        self.cell_uid = os.geteuid()  # keep-id: the cell's uid 1000 is the kernel's user here

    def _call(self, *op: str) -> dict:
        pid = self.find_pid()
        if pid is None:
            return {"error": "no process of the rootless engine found (is its API service running?)"}
        try:
            done = subprocess.run([sys.executable, "-I", "-m", "mino_jupyter.mounts", str(pid)],
                                  input=json.dumps(list(op)), env=HELPER_ENV, capture_output=True, text=True,
                                  cwd="/", timeout=60)
            return json.loads(done.stdout or "{}") or {"error": (done.stderr or "no answer").strip()[-300:]}
        except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
            return {"error": str(exc)}

    def mount_overlay(self, target: Path, lower: Path, upper: Path, work: Path) -> None:
        reply = self._call("overlay", str(target), str(lower), str(upper), str(work))
        if reply.get("error"):
            raise StorageError(f"could not mount the overlay at {target} in {self.where}: {reply['error']}",
                               "`mino-jupyter doctor` checks what rootless sessions need (kernel 5.11+ for "
                               "overlayfs in a user namespace)")

    def unmount(self, path: Path) -> None:
        reply = self._call("unmount", str(path))
        if reply.get("error"):
            raise StorageError(f"could not unmount {path} in {self.where}: {reply['error']}")

    def mountpoints(self) -> list[str]:
        return list(self._call("mountpoints").get("mountpoints") or [])

    def write_in_place(self, path: str, text: str) -> None:
        """The engine's files for a container belong to the container's uids (subordinate ones):
        written from its user namespace, as the engine itself writes them."""
        reply = self._call("write", path, text)
        if reply.get("error"):
            raise StorageError(f"could not write {reply['error']} in {self.where}")


def for_engine(engine) -> Local:
    """The mounter for this engine's containers."""
    if not engine.facts().rootless:
        if os.geteuid() != 0:
            raise StorageError("this is a rootful Podman engine, but the kernel does not run as root: mino "
                               "mounts each session's disk and workspace overlay where the engine makes containers",
                               "run the kernel as root, or use your own rootless Podman: unset CONTAINER_HOST "
                               "(the README's rootless section)")
        return Local()
    if engine.service_pid() is None:
        raise StorageError(f"the rootless engine at {engine.endpoint.url} is not a local socket: mino mounts "
                           "each session's workspace in the engine's own namespace",
                           "use the local rootless socket (unset CONTAINER_HOST)")
    return Namespaced(lambda: engine_namespace_pid(engine))


def engine_namespace_pid(engine) -> int | None:
    """A process in the rootless engine's user and mount namespaces: its API service (the
    socket's peer), or, when a socket-activating service manager holds the socket, Podman's
    pause process (its pid file in the runtime directory, which only this user can write)."""
    pid = engine.service_pid()
    if pid is not None and _in_child_userns(pid):
        return pid
    directory, _problem = runtime_dir(os.environ, os.geteuid())
    try:
        pause = int(Path(directory, "libpod", "tmp", "pause.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pause if _in_child_userns(pause) else None


NS_GET_PARENT, NS_GET_OWNER_UID = 0xB702, 0xB704


def _userns_problem(fd: int) -> str | None:
    """None when the user namespace behind `fd` is the rootless engine's: a child of this
    machine's initial namespace (ours), owned by us. A container's (keep-id) namespace is a
    grandchild, so a cell's process can never stand in for the engine."""
    import array
    import fcntl as _fcntl

    owner = array.array("I", [0])
    try:
        _fcntl.ioctl(fd, NS_GET_OWNER_UID, owner, True)
        parent = _fcntl.ioctl(fd, NS_GET_PARENT)
    except OSError as exc:
        return f"cannot inspect its user namespace: {exc.strerror}"
    try:
        if os.fstat(parent).st_ino != os.stat("/proc/self/ns/user").st_ino:
            return "its user namespace is not a child of this machine's"
    finally:
        os.close(parent)
    if owner[0] != os.getuid():
        return f"its user namespace belongs to uid {owner[0]}"
    return None


def _in_child_userns(pid: int) -> bool:
    try:
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _userns_problem(fd) is None
    finally:
        os.close(fd)


def for_cleanup(engine) -> Local:
    """The mounter that undoes what sessions on this engine mounted (never raises: a kernel
    that could not mount has nothing mounted)."""
    try:
        return for_engine(engine)
    except MinoError:
        return Local()


# ---------------------------------------------------------------------------- the helper

def _join(pid: int) -> None:
    fds = {name: os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name in ("user", "mnt")}
    try:
        problem = _userns_problem(fds["user"])  # checked on the descriptor that is joined
        if problem:
            raise OSError(0, f"process {pid} is not the rootless engine's: {problem}")
        for name, flag in (("user", CLONE_NEWUSER), ("mnt", CLONE_NEWNS)):
            if _libc.setns(fds[name], flag) != 0:
                raise OSError(ctypes.get_errno(), f"cannot join the engine's {name} namespace: "
                                                  f"{os.strerror(ctypes.get_errno())}")
    finally:
        for fd in fds.values():
            os.close(fd)


def _serve(pid: int, op: list[str]) -> dict:
    try:
        _join(pid)
    except OSError as exc:
        return {"error": exc.strerror or str(exc)}
    kind, args = op[0], op[1:]
    if kind == "overlay":
        return {"error": _mount_overlay(*args, USERNS_OVERLAY_OPTIONS)}
    if kind == "unmount":
        return {"error": _unmount(args[0])}
    if kind == "mountpoints":
        return {"mountpoints": _mountpoints()}
    if kind == "write":
        return {"error": _write_in_place(args[0], args[1])}
    return {"error": f"unknown operation {kind!r}"}


if __name__ == "__main__":  # the helper: one operation as JSON on stdin, the answer on stdout
    try:
        answer = _serve(int(sys.argv[1]), json.loads(sys.stdin.read()))
    except Exception as exc:  # noqa: BLE001 - every failure is an answer, never a traceback
        answer = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(answer))
