"""A session's storage on this machine: its disk, its workspace and home overlays, its control files.

Everything a cell can write lands on the session's **disk**: a sparse file of the session's
disk limit, formatted ext4 and mounted by mino (``nosuid,nodev``) under mino's state directory,
never in the notebook's directory and never on a ``sys.path``. The container's own root
filesystem is read-only, so the disk limit is the limit of everything the cell writes:

* ``/workspace``: an overlay whose lower layer is the notebook's directory (opened by mino,
  never written) and whose upper layer is on the disk. The cell reads every file next to the
  notebook and writes, builds, clones and installs as usual; nothing reaches the notebook's
  directory until the user applies it (:mod:`mino_jupyter.changes`). ``ro`` shares the
  directory read-only, ``rw`` (an explicit opt-in) read-write.
* ``/home/developer``: an overlay of the image's home (extracted once per image into mino's
  state directory) and an upper layer on the disk: ``pip install``, ``npm install -g`` and dot
  files work, and stay inside the limit.
* ``/tmp`` and ``/var/tmp``: directories on the disk.
* ``/run/mino``: read-only inside; where mino puts files for its own execs (a large cell script).

The overlays are mounted with ``redirect_dir=off,metacopy=off,index=off``: what the cell
changed is plain files and whiteouts in the upper layer, which :mod:`mino_jupyter.changes`
reads without following anything the cell could have planted. The lower layers and the upper
and work directories are passed to the kernel as ``/proc/self/fd/N`` of directories mino opened
with ``O_NOFOLLOW``, so no path a cell could influence is resolved when mounting.

Where the mounts are made, and whose uid the cell's files carry here, is the
:mod:`mino_jupyter.mounts` mounter's: this machine as root (rootful Podman), or the rootless
engine's own namespace (then there is no loop disk: sessions' files are plain directories in the
state directory, without a size limit). Every helper program mino runs here is named by
absolute path, with a fixed environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import mounts, policy
from .mounts import Local, StorageError

HELPER_ENV = mounts.HELPER_ENV  # one fixed environment for every helper mino runs here
MOUNT = ("/usr/bin/mount", "/bin/mount")
MKFS = ("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4")


def _helper(names: tuple[str, ...]) -> str:
    for path in names:
        if os.access(path, os.X_OK):
            return path
    raise StorageError(f"{names[0]} is missing", "install util-linux and e2fsprogs (`make setup` does)")


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, env=HELPER_ENV, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace", cwd="/", timeout=120)
    if done.returncode != 0:
        raise StorageError(f"could not {what}: {(done.stderr or done.stdout).strip()[:300]}",
                           "`mino-jupyter doctor` checks what sessions need on this machine")


# ---------------------------------------------------------------------------- mounts (this machine's view)

def mountpoints() -> list[str]:
    """Mount points of this process's mount namespace (/proc/self/mountinfo)."""
    return mounts._mountpoints()


def is_mounted(path: Path) -> bool:
    return str(path) in mountpoints()


def mounts_under(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    return [m for m in mountpoints() if m == str(path) or m.startswith(prefix)]


def _open_dir(path: Path) -> int:
    """A directory mino made or was given, opened without following a final symlink."""
    return mounts._open_dir(path)


def unmount(path: Path) -> None:
    """Unmount here (rootful); a busy mount point is detached (it goes when its last user does)."""
    Local().unmount(path)


def make_disk(image: Path, size: int) -> None:
    """A sparse file of `size` bytes with an ext4 filesystem (no journal: scratch space)."""
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    _run([_helper(MKFS), "-q", "-F", "-O", "^has_journal", "-m", "0", "-E",
          "lazy_itable_init=1,root_owner=0:0", str(image)], f"make a {size // (1 << 20)} MiB disk")


def mount_disk(image: Path, target: Path) -> None:
    _run([_helper(MOUNT), "-t", "ext4", "-o", "loop,nosuid,nodev,noatime", str(image), str(target)],
         f"mount the disk {image}")


def remove_tree(path: Path) -> bool:
    """Delete a directory mino made, but never across a mount point (a leftover mount would
    let the deletion reach what is mounted there). False when something is still mounted."""
    if mounts_under(path):
        return False
    if os.geteuid() != 0 and os.path.isdir(path) and not os.path.islink(path):
        _make_traversable(path)
    shutil.rmtree(path, ignore_errors=True)
    return True


def _make_traversable(path: Path) -> None:
    """Without root, directories a cell (or overlayfs: its work directory is mode 000) left
    unreadable stop a deletion: give every directory back to its owner first. The tree is walked
    by descriptor and each directory opened with O_PATH and O_NOFOLLOW relative to its parent's,
    then changed through that descriptor: no link is ever followed, nothing outside the tree is
    ever changed."""
    for _parent, dirs, _files, parent_fd in os.fwalk(path, follow_symlinks=False):
        for name in dirs:
            try:
                fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd)
            except OSError:
                continue
            try:
                os.chmod(f"/proc/self/fd/{fd}", 0o700)
            except OSError:
                pass
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------- one session

@dataclass(frozen=True)
class SessionPaths:
    """Where a session's pieces live on this machine (pure)."""

    root: Path

    @property
    def image(self) -> Path:
        return self.root / "disk.img"

    @property
    def disk(self) -> Path:
        return self.root / "disk"

    @property
    def workspace_upper(self) -> Path:
        return self.disk / "workspace" / "upper"

    @property
    def workspace_work(self) -> Path:
        return self.disk / "workspace" / "work"

    @property
    def home_upper(self) -> Path:
        return self.disk / "home" / "upper"

    @property
    def home_work(self) -> Path:
        return self.disk / "home" / "work"

    @property
    def tmp(self) -> Path:
        return self.disk / "tmp"

    @property
    def var_tmp(self) -> Path:
        return self.disk / "var-tmp"

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def control(self) -> Path:
        return self.root / "control"


def _mkdir(path: Path, mode: int, uid: int = 0) -> None:
    path.mkdir(mode=mode)
    os.chown(path, uid, uid)
    os.chmod(path, mode)  # umask-free


class SessionStorage:
    """A session's disk and mounts. :meth:`create` sets everything up or leaves nothing behind."""

    control_files = True  # /run/mino: files for mino's own execs (a script too long for argv)

    def __init__(self, paths: SessionPaths, notebook_dir: Path, mode: str, mounter: Local):
        self.paths = paths
        self.notebook_dir = notebook_dir
        self.mode = mode  # overlay | ro | rw
        self.mounter = mounter

    @classmethod
    def create(cls, root: Path, *, notebook_dir: Path, mode: str, home_lower: Path, disk_bytes: int,
               mounter: Local) -> "SessionStorage":
        if mode not in policy.WORKSPACE_MODES:
            raise ValueError(f"workspace mode must be one of {policy.WORKSPACE_MODES}, not {mode!r}")
        storage = cls(SessionPaths(root), notebook_dir, mode, mounter)
        try:
            storage._create(home_lower, disk_bytes)
        except BaseException:
            storage.teardown()
            raise
        return storage

    def _create(self, home_lower: Path, disk_bytes: int) -> None:
        p = self.paths
        p.root.mkdir(mode=0o700, parents=True)
        for directory in (p.disk, p.workspace, p.home):
            directory.mkdir(mode=0o700)
        _mkdir(p.control, 0o755, os.geteuid())
        if self.mounter.loop_disks:
            make_disk(p.image, disk_bytes)
            mount_disk(p.image, p.disk)
        os.chmod(p.disk, 0o711)
        cell, me = self.mounter.cell_uid, os.geteuid()
        for parent in (p.disk / "workspace", p.disk / "home"):
            _mkdir(parent, 0o711, me)
        _mkdir(p.workspace_upper, 0o755, cell)
        _mkdir(p.home_upper, 0o755, cell)
        _mkdir(p.workspace_work, 0o700, me)
        _mkdir(p.home_work, 0o700, me)
        _mkdir(p.tmp, 0o1777, me)
        _mkdir(p.var_tmp, 0o1777, me)
        if self.mode == "overlay":
            self.mounter.mount_overlay(p.workspace, self.notebook_dir, p.workspace_upper, p.workspace_work)
        self.mounter.mount_overlay(p.home, home_lower, p.home_upper, p.home_work)

    # ------------------------------------------------------------------ what the container gets
    def mounts(self) -> policy.StorageMounts:
        p = self.paths
        workspace = str(p.workspace) if self.mode == "overlay" else str(self.notebook_dir)
        return policy.StorageMounts(workspace=workspace, workspace_mode=self.mode, home=str(p.home),
                                    tmp=str(p.tmp), var_tmp=str(p.var_tmp), control=str(p.control))

    def write_control(self, name: str, data: bytes) -> str:
        """A file for one of mino's execs, read-only inside at /run/mino/NAME. Returns that path."""
        directory = _open_dir(self.paths.control)
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=directory)
        finally:
            os.close(directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return f"{policy.CONTROL_DIR}/{name}"

    def remove_control(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.control / name)

    # ------------------------------------------------------------------ changes
    @property
    def upper(self) -> Path | None:
        """The workspace's upper layer (what the cell changed), while it exists (on the
        session's disk, while that is mounted)."""
        upper = self.paths.workspace_upper
        if self.mode != "overlay" or not upper.is_dir() or upper.is_symlink():
            return None
        return upper

    @property
    def opaque_xattr(self) -> str:
        """The xattr overlayfs marks a replaced directory with in this upper layer."""
        return self.mounter.opaque_xattr

    # ------------------------------------------------------------------ going away
    def release(self) -> None:
        """The container is gone: unmount the overlays, keep the disk (its changes can still be
        listed and applied until the session is forgotten or the kernel ends)."""
        for mount in (self.paths.workspace, self.paths.home):
            self.mounter.unmount(mount)

    def teardown(self) -> bool:
        """Unmount everything and delete the session's files. False when a mount stayed."""
        ok = True
        for mount in (self.paths.workspace, self.paths.home):
            try:
                self.mounter.unmount(mount)
            except StorageError:
                ok = False
        if self.mounter.loop_disks:
            try:
                unmount(self.paths.disk)
            except StorageError:
                ok = False
        return remove_tree(self.paths.root) and ok


def prepare(storage_dir: Path, name: str, owner_labels: dict, *, notebook_dir: Path, mode: str,
            home_lower: Path, disk_bytes: int, mounter: Local) -> SessionStorage:
    """A new session's storage in its kernel's directory (claimed for the reaper); what a stopped
    session of the same name left there goes first."""
    claim(storage_dir, owner_labels)
    root = storage_dir / name
    if os.path.lexists(root):
        SessionStorage(SessionPaths(root), notebook_dir, "ro", mounter).teardown()
    return SessionStorage.create(root, notebook_dir=notebook_dir, mode=mode, home_lower=home_lower,
                                 disk_bytes=disk_bytes, mounter=mounter)


# ---------------------------------------------------------------------------- image homes

def image_home(engine, image: str, image_id: str, cache: Path, owner_labels: dict,
               cell_uid: int = policy.CELL_UID) -> Path:
    """The image's /home/developer on this machine (the lower layer of every session's home),
    extracted once per image id through the engine's archive API; nothing runs to get it."""
    target = cache / image_id[:24]
    home = target / "developer"
    if home.is_dir():
        return home
    cache.mkdir(mode=0o700, parents=True, exist_ok=True)
    cid = engine.create(policy.inspection_spec(  # from the id: the home stored under it is that image's
        name=f"mino-home-{os.getpid()}-{int(time.time() * 1000) % 100000}", image=image_id,
        labels=policy.labels("verify", owner_labels), limits=engine.host_limits(), engine=engine.facts()))
    try:
        data = engine.get_archive(cid, policy.HOME)
    finally:
        engine.remove(cid)
    tmp = cache / f".{target.name}.{os.getpid()}.{threading.get_ident()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o755)
    if data is None:  # an image without the sandbox user's home: an empty one
        _mkdir(tmp / "developer", 0o755, cell_uid)
    else:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            if hasattr(tarfile, "tar_filter"):
                tar.extractall(tmp, numeric_owner=True, filter=_home_filter)
            else:  # Python < 3.11.4 (e.g. Debian 12's 3.11.2): the same checks, by hand
                for member in tar.getmembers():
                    kept = _home_filter_fallback(member, str(tmp))
                    if kept is not None:
                        tar.extract(kept, tmp, numeric_owner=True)
        if not (tmp / "developer").is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"image {image}: {policy.HOME} is not a directory")
    try:
        os.rename(tmp, target)
    except OSError:  # another kernel extracted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return home


def _home_filter_fallback(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    """`tarfile.tar_filter`'s refusals for Pythons that lack it: no absolute or escaping names,
    no hard links to files outside the tree, no device files, no setuid or setgid bits. Symbolic
    links are kept as they are, as tar_filter keeps them (a venv's `bin/python ->
    /usr/bin/python3`): they are resolved only inside the container, and mino never follows a
    link in this tree here."""
    if member.ischr() or member.isblk() or member.isfifo():
        return None
    root = os.path.realpath(dest)

    def inside(name: str) -> bool:
        return os.path.commonpath([root, os.path.realpath(os.path.join(root, name))]) == root

    if os.path.isabs(member.name) or not inside(member.name):
        return None
    if member.islnk() and (os.path.isabs(member.linkname) or not inside(member.linkname)):
        return None
    member.mode &= ~(stat.S_ISUID | stat.S_ISGID)
    return member


def _home_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
    """The image's files as they are (owners kept), minus what could never belong in a home:
    device files, setuid/setgid bits, links that leave the tree (tarfile's "tar" filter)."""
    if member.ischr() or member.isblk():
        return None
    member = tarfile.tar_filter(member, path)
    return member.replace(mode=member.mode & ~(stat.S_ISUID | stat.S_ISGID), deep=False) if member.mode else member


# ---------------------------------------------------------------------------- owners and leftovers

OWNER_FILE = "owner.json"


def claim(directory: Path, owner_labels: dict) -> None:
    """Mark a kernel's sessions directory with its owner, so a later reap can judge it."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    (directory / OWNER_FILE).write_text(json.dumps(owner_labels, sort_keys=True))


def teardown_owner(directory: Path, mounter: Local) -> bool:
    """Unmount and delete every session of one kernel (its sessions directory)."""
    ok = True
    if directory.is_dir():
        for child in directory.iterdir():
            if child.is_dir() and not child.is_symlink():
                ok = SessionStorage(SessionPaths(child), Path("/"), "ro", mounter).teardown() and ok
    return remove_tree(directory) and ok


def reap(sessions_root: Path, alive: Callable[[dict], bool], mounter: Local) -> list[Path]:
    """Storage of kernels that died (their owner is gone): unmounted and deleted."""
    removed = []
    try:
        owners = [d for d in sessions_root.iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return removed
    for directory in owners:
        try:
            labels = json.loads((directory / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not alive(labels) and teardown_owner(directory, mounter):
            removed.append(directory)
    return removed


# ---------------------------------------------------------------------------- project caches

@dataclass(frozen=True)
class CachePaths:
    """One project's package caches (pip, npm): a disk of their own, shared by the sessions of
    that project only (named by a hash of the notebook directory's real path)."""

    root: Path

    @property
    def image(self) -> Path:
        return self.root / "cache.img"

    @property
    def mount(self) -> Path:
        return self.root / "mnt"

    def cache(self, name: str) -> Path:
        return self.mount / name


def path_key(path: Path) -> str:
    """A short, stable name for a directory: a hash of its real path. Names a project's caches
    and a mino installation's state directory (what a kernel may reap)."""
    return hashlib.sha256(os.fsencode(os.path.realpath(path))).hexdigest()[:16]


def project_key(notebook_dir: Path) -> str:
    return path_key(notebook_dir)


LEGACY_CACHE_USERNS = f"cell-uid={policy.CELL_UID} disk=1"  # caches made before the mode was recorded
USERS = "users"  # a project's caches: held (shared) by each session start that binds them


def project_caches(caches_root: Path, notebook_dir: Path, names: tuple[str, ...], size: int,
                   mounter: Local) -> dict[str, str]:
    """The project's cache directories, on its cache disk (made and mounted when needed; with a
    rootless engine, plain directories).

    The directories exist only inside the mounted disk: were it ever unmounted, binding them
    would fail instead of writing to this machine's disk without a limit. The caches record the
    user-namespace mode they were made for (whose uid owns their files): made for another, they
    are made again, since the cell could not write them."""
    if not names:
        return {}
    paths = CachePaths(caches_root / project_key(notebook_dir))
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    userns = f"cell-uid={mounter.cell_uid} disk={int(mounter.loop_disks)}"
    with open(paths.root / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = paths.root / "userns"
        made_for = marker.read_text() if marker.is_file() else LEGACY_CACHE_USERNS
        if made_for != userns and paths.mount.exists():
            _drop_caches(paths)
        if mounter.loop_disks and not is_mounted(paths.mount):
            if not paths.mount.is_dir():
                paths.mount.mkdir(mode=0o000)
            if not paths.image.exists():
                make_disk(paths.image, size)
            mount_disk(paths.image, paths.mount)
            os.chmod(paths.mount, 0o711)
        elif not mounter.loop_disks and not paths.mount.is_dir():
            paths.mount.mkdir(mode=0o711)
        marker.write_text(userns)
        for name in names:
            if not paths.cache(name).is_dir():
                _mkdir(paths.cache(name), 0o755, mounter.cell_uid)
    return {name: str(paths.cache(name)) for name in names}


def _drop_caches(paths: CachePaths) -> None:
    """A project's caches made for another user-namespace mode: gone (they are only caches)."""
    if is_mounted(paths.mount):
        with contextlib.suppress(StorageError):
            unmount(paths.mount)
    if remove_tree(paths.mount):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.image)


@contextlib.contextmanager
def caches_in_use(caches_root: Path, notebook_dir: Path) -> Iterator[None]:
    """Held by a session's start from before its project's caches are mounted until its container
    runs (their bind mounts made): :func:`release_caches`, which judges from the containers that
    exist, leaves them mounted meanwhile."""
    root = caches_root / project_key(notebook_dir)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(root / USERS, "a") as users:
        fcntl.flock(users, fcntl.LOCK_SH)
        yield


def release_caches(caches_root: Path, in_use: set[str]) -> None:
    """Unmount project cache disks that no container uses (`in_use`: project keys) and no
    session is starting with (:func:`caches_in_use`)."""
    try:
        roots = [d for d in caches_root.iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return
    for root in roots:
        paths = CachePaths(root)
        if root.name in in_use or not is_mounted(paths.mount):
            continue
        with open(root / USERS, "a") as users, open(root / "lock", "a") as lock:
            try:
                fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a session is starting with them
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(StorageError):
                unmount(paths.mount)
