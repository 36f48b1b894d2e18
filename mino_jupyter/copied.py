"""A session's files on an engine that does not see this machine's (another machine over ssh or
tcp, ``podman machine``, a service in another mount namespace): copied in and read back through
the engine's archive API, never bound by path.

* The workspace: a tar of the notebook's directory, made here (files, directories and symlinks,
  never following one; nothing of mino's own state or configuration), unpacked by the engine in
  the container's own volume before the container starts. It must fit in the session's disk.
* Changes: ``%mino changes``/``apply`` read the workspace back as a tar (streamed, never held
  whole in memory, at most the session's disk) into a private snapshot here, which
  :mod:`mino_jupyter.changes` compares with the notebook's directory as a *complete copy* and
  applies from with the same guarantees as an overlay's upper layer. A snapshot is taken before
  the container goes, so a stopped session's changes can still be applied.
* Support files: the cell executor and mino's seccomp profile live in a volume of mino's on the
  engine (:func:`support_volume`, named by their hash, written by a container that never starts
  and runs as root, mounted read-only in sessions); the engine reads the profile from that
  volume's path on its own machine.
* The CA bundle: copied into the container's read-only root filesystem before it starts.

Threat model for the way back: every name and byte of the tar was written by the cell. The
unpacking never follows a link (every directory is entered with ``O_NOFOLLOW`` below a
descriptor of the snapshot's root), writes only regular files (no setuid bits), directories and
symlinks (which are never followed afterwards either), skips devices and FIFOs, and stops at the
disk budget and an entry count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import platform
import re
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Sequence

from . import changes, executor, policy, storage
from .errors import MinoError, UsageError
from .policy import HostLimits
from .runtime import Engine

MAX_ENTRIES = 500_000  # in one copy either way
PROGRESS_BYTES = 32 << 20  # copies larger than this are announced
SNAPSHOT = "snapshot"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}


class CopyError(MinoError):
    """The workspace could not be copied in or read back; nothing was changed here."""


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MB" if n >= 1 << 20 else f"{n} bytes"


# ---------------------------------------------------------------------------- in: the notebook's directory

def pack(notebook_dir: Path, *, limit: int, protected: Sequence[Path] = ()) -> tuple[io.IOBase, int, int]:
    """A tar of the notebook's directory (a file object at its start), its file count and bytes.
    Files, directories and symlinks (as links), walked by descriptor without following any;
    mino's `protected` directories and anything else (FIFOs, sockets, devices) are left out.
    More than `limit` bytes of files: :class:`CopyError`, nothing sent."""
    skip = changes._identities(protected)
    out = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller
    counts = [0, 0]
    try:
        root = os.open(notebook_dir, _DIR)
    except OSError as exc:
        raise CopyError(f"cannot read the notebook's directory {notebook_dir}: {exc.strerror}") from None
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                          errors="surrogateescape") as tar:
            _pack_dir(tar, root, "", 0, skip, limit, counts, notebook_dir)
    except BaseException:
        out.close()
        raise
    finally:
        os.close(root)
    out.seek(0)
    return out, counts[0], counts[1]


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode) & 0o777  # never setuid, setgid or sticky
    info.mtime = int(st.st_mtime)
    info.uid = info.gid = policy.CELL_UID  # the engine makes them the container user's anyway
    return info


def _pack_dir(tar: tarfile.TarFile, fd: int, rel: str, depth: int, skip: frozenset, limit: int,
              counts: list[int], top: Path) -> None:
    if depth > changes.MAX_DEPTH:
        return
    for name in sorted(os.listdir(fd)):
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError:
            continue
        path = f"{rel}/{name}" if rel else name
        counts[0] += 1
        if counts[0] > MAX_ENTRIES:
            raise CopyError(f"the notebook's directory {top} holds more than {MAX_ENTRIES} entries: too many "
                            "to copy to the engine", "open the notebook from a folder of its own")
        if stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in skip:
                continue
            try:
                child = os.open(name, _DIR, dir_fd=fd)
            except OSError:
                continue
            try:
                tar.addfile(_info(path, os.fstat(child), tarfile.DIRTYPE))
                _pack_dir(tar, child, path, depth + 1, skip, limit, counts, top)
            finally:
                os.close(child)
        elif stat.S_ISLNK(st.st_mode):
            info = _info(path, st, tarfile.SYMTYPE)
            try:
                info.linkname = os.readlink(name, dir_fd=fd)
            except OSError:
                continue
            tar.addfile(info)
        elif stat.S_ISREG(st.st_mode):
            opened = changes._open_file(fd, name)
            if opened is None:
                continue
            file_fd, fst = opened
            try:
                counts[1] += fst.st_size
                if counts[1] > limit:
                    raise CopyError(f"the notebook's directory {top} holds more than the session's disk "
                                    f"({_size(limit)}) in files: too much to copy to the engine",
                                    "raise the limit (--disk), or open the notebook from a smaller folder")
                info = _info(path, fst, tarfile.REGTYPE)
                info.size = fst.st_size
                with os.fdopen(os.dup(file_fd), "rb") as f:
                    tar.addfile(info, _Exactly(f, fst.st_size))
            finally:
                os.close(file_fd)


class _Exactly(io.RawIOBase):
    """A file read as exactly `size` bytes (zeros if it shrank meanwhile, the rest cut if it grew):
    the tar header already holds the size."""

    def __init__(self, f, size: int):
        self.f, self.left = f, size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        data = data + b"\0" * (n - len(data))
        self.left -= len(data)
        return data


# ---------------------------------------------------------------------------- back: a snapshot

def unpack(stream, dest: Path, *, limit: int) -> None:
    """Unpack a tar the engine made of a directory's contents (``DIR/.``: members named
    relative to it, with or without a leading ``/`` or ``./``) into `dest`, a new empty
    directory of ours. See the module's threat model."""
    root = os.open(dest, _DIR)
    total, count = 0, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape") as tar:
            for member in tar:
                count += 1
                if count > MAX_ENTRIES:
                    raise CopyError(f"the workspace holds more than {MAX_ENTRIES} entries: too many to read back")
                parts = _parts(member.name)
                if not parts:
                    continue
                parent = _enter(root, parts[:-1])
                if parent is None:
                    continue
                try:
                    name = parts[-1]
                    if member.isdir():
                        _replace_with_dir(parent, name)
                    elif member.issym():
                        _clear(parent, name)
                        os.symlink(member.linkname, name, dir_fd=parent)
                    elif member.isfile() or member.islnk():
                        source = tar.extractfile(member) if member.isfile() else None
                        size = member.size if member.isfile() else _linked_size(root, member.linkname)
                        total += size
                        if total > limit:
                            raise CopyError(f"the workspace holds more than {_size(limit)} (the session's disk): "
                                            "nothing was read back",
                                            "remove large files in a cell first, or raise the limit (--disk)")
                        _clear(parent, name)
                        _write(parent, name, source if source is not None else _linked(root, member.linkname),
                               member.mode)
                finally:
                    os.close(parent)
    except tarfile.TarError as exc:
        raise CopyError(f"the engine's copy of the workspace is not a readable tar: {exc}") from None
    finally:
        os.close(root)


def _parts(name: str) -> list[str]:
    """The path components of a member's name; [] for the directory itself and for a name
    that would leave it."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." or "\0" in p for p in parts) or len(parts) > changes.MAX_DEPTH:
        return []
    return parts


def _enter(root: int, parts: Sequence[str]) -> int | None:
    """A new fd of the directory `parts` below `root`, made where missing; None when a component
    is not a directory (a symlink is never followed)."""
    fd = os.dup(root)
    for name in parts:
        try:
            step = os.open(name, _DIR, dir_fd=fd)
        except FileNotFoundError:
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
                step = os.open(name, _DIR, dir_fd=fd)
            except OSError:
                os.close(fd)
                return None
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = step
    return fd


def _clear(parent: int, name: str) -> None:
    """Whatever an earlier member put at `name` goes (a later member wins, as in tar)."""
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        _remove_dir(parent, name)
    else:
        os.unlink(name, dir_fd=parent)


def _remove_dir(parent: int, name: str) -> None:
    fd = os.open(name, _DIR, dir_fd=parent)
    try:
        for child in os.listdir(fd):
            _clear(fd, child)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent)


def _replace_with_dir(parent: int, name: str) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        os.mkdir(name, 0o755, dir_fd=parent)
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=parent)
        os.mkdir(name, 0o755, dir_fd=parent)


def _write(parent: int, name: str, source, mode: int) -> None:
    fd = os.open(name, _NEW, 0o600, dir_fd=parent)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(changes.CHUNK):
            out.write(chunk)
        os.fchmod(out.fileno(), (mode & 0o755) | 0o600)


def _linked_file(root: int, linkname: str) -> tuple[int, os.stat_result] | None:
    parts = _parts(linkname)
    if not parts:
        return None
    parent = _walk_existing(root, parts[:-1])
    if parent is None:
        return None
    try:
        return changes._open_file(parent, parts[-1])
    finally:
        os.close(parent)


def _walk_existing(root: int, parts: Sequence[str]) -> int | None:
    fd = os.dup(root)
    for name in parts:
        try:
            step = os.open(name, _DIR, dir_fd=fd)
        except OSError:
            os.close(fd)
            return None
        os.close(fd)
        fd = step
    return fd


def _linked_size(root: int, linkname: str) -> int:
    opened = _linked_file(root, linkname)
    if opened is None:
        return 0
    os.close(opened[0])
    return opened[1].st_size


def _linked(root: int, linkname: str):
    """A hard link in the tar: a copy of the file it names, already unpacked (empty if none)."""
    opened = _linked_file(root, linkname)
    if opened is None:
        return io.BytesIO(b"")
    data = io.BytesIO()
    try:
        while chunk := os.read(opened[0], changes.CHUNK):
            data.write(chunk)
    finally:
        os.close(opened[0])
    data.seek(0)
    return data


# ---------------------------------------------------------------------------- one session's files

class CopiedFiles:
    """A copied session's files on this machine: the latest snapshot of its workspace (the
    "upper" that :mod:`mino_jupyter.changes` reads, a complete copy). Same shape as
    :class:`mino_jupyter.storage.SessionStorage` where the sessions use it."""

    control_files = False  # no /run/mino: cells' requests go through the executor or argv
    opaque_xattr = None  # the snapshot is a complete copy, not an overlay's layer

    def __init__(self, root: Path, notebook_dir: Path, mode: str, disk: int):
        self.root = root
        self.notebook_dir = notebook_dir
        self.mode = mode  # overlay (changes wait for apply) | ro
        self.disk = disk
        self._generation = 0
        root.mkdir(mode=0o700, parents=True)

    @property
    def upper(self) -> Path | None:
        path = self.root / SNAPSHOT
        return path if self.mode == "overlay" and path.is_dir() and not path.is_symlink() else None

    def refresh(self, engine: Engine, container: str | None) -> None:
        """Read the container's workspace back into a new snapshot (the old one goes once the
        new one is complete). Nothing to do for a read-only copy or a container that is gone."""
        if self.mode != "overlay" or not container:
            return
        self._generation += 1
        fresh = self.root / f".{SNAPSHOT}-{self._generation}"
        _remove(fresh)
        fresh.mkdir(mode=0o700)
        try:
            with engine.archive_stream(container, f"{policy.WORKDIR}/.") as stream:
                if stream is None:  # the container is gone: keep what was read last
                    _remove(fresh)
                    return
                unpack(stream, fresh, limit=self.disk)
        except BaseException:
            _remove(fresh)
            raise
        old = self.root / f".{SNAPSHOT}-old"
        _remove(old)
        if (self.root / SNAPSHOT).exists():
            os.rename(self.root / SNAPSHOT, old)
        os.rename(fresh, self.root / SNAPSHOT)
        _remove(old)

    def before_removal(self, engine: Engine, container: str | None, notice: Callable[[str], None]) -> None:
        """The container goes next: keep its changes (said, never raised, when they cannot be read)."""
        try:
            self.refresh(engine, container)
        except MinoError as exc:
            notice(f"mino: the workspace's changes could not be read back before its container went: {exc.message}")

    def mounts(self) -> None:  # nothing of this machine is bound in
        return None

    def release(self) -> None:
        pass

    def teardown(self) -> bool:
        _remove(self.root)
        return True


def _remove(path: Path) -> None:
    if path.exists() or path.is_symlink():
        storage.remove_tree(path)  # a deletion that never crosses a mount


def prepare(storage_dir: Path, name: str, owner_labels: dict, *, notebook_dir: Path, mode: str,
            disk: int) -> CopiedFiles:
    """A new copied session's files in its kernel's directory (claimed for the reaper, as
    :func:`mino_jupyter.storage.prepare`); what a stopped session of the same name left goes."""
    storage.claim(storage_dir, owner_labels)
    root = storage_dir / name
    _remove(root)
    return CopiedFiles(root, notebook_dir, mode, disk)


def copy_in(engine: Engine, container: str, notebook_dir: Path, *, image: str, labels: dict, limit: int,
            protected: Sequence[Path], notice: Callable[[str], None]) -> None:
    """The notebook's directory into the created (not yet started) container's workspace,
    through a loader that shares its volumes and runs as the cell user (the files are the
    cell's, as the notebook's directory is under an overlay)."""
    data, files, size = pack(notebook_dir, limit=limit, protected=protected)
    with data:
        if size > PROGRESS_BYTES:
            notice(f"mino: copying {files} entries ({_size(size)}) of {notebook_dir} to the engine at "
                   f"{engine.endpoint.url}")
        loader = engine.create(policy.loader_spec(
            name=f"mino-copy-{os.getpid()}-{container[:12]}", image=image, labels=policy.labels("verify", labels),
            limits=engine.host_limits(), engine=engine.facts(), volumes_from=container))
        try:
            engine.put_archive(loader, policy.WORKDIR, data)
        finally:
            engine.remove(loader)  # its volumes are the session's: they stay


def copy_ca(engine: Engine, container: str, bundle: str) -> None:
    """The CA bundle into the created container's read-only root filesystem (opened without
    following a link; :func:`mino_jupyter.host.ca_bundle` checked who may write it)."""
    try:
        fd = os.open(bundle, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CopyError(f"cannot read the CA bundle {bundle}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        data = f.read()
    engine.put_archive(container, "/", _tar({policy.CONTAINER_CA_BUNDLE.lstrip("/"): (data, 0o644)}))


def _tar(files: dict[str, tuple[bytes, int]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode, 0, 0
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


# ---------------------------------------------------------------------------- the engine's limits

RLIMITS = {6: "nproc", 7: "nofile"}  # the types the OCI runtime names when it cannot set one
FLOOR = 1024


def probe_limits(engine: Engine, *, image: str, labels: dict) -> HostLimits:
    """The hard limits an engine elsewhere lets containers ask for: its machine's are not
    readable here, and asking for more than it allows fails every start ("error setting rlimit
    type 7"). Once per connection, a container that runs ``true`` (hardened, no network) is
    started with the limits mino would ask for; each one the engine refuses is halved (not below
    1024) until it starts. From then on :meth:`Engine.host_limits` gives the result."""
    limits = engine.host_limits()
    if engine.limits_probed:
        return limits
    for attempt in range(16):
        spec = policy.inspection_spec(name=f"mino-limits-{os.getpid()}-{attempt}", image=image,
                                      labels=policy.labels("verify", labels), limits=limits, engine=engine.facts())
        spec["command"] = ["true"]
        cid = engine.create(spec)
        try:
            engine.start(cid)
            break
        except MinoError as exc:
            found = re.search(r"rlimit type (\d+)", exc.message)
            which = RLIMITS.get(int(found.group(1))) if found else None
            asked = policy.container_ulimits(limits)[0 if which == "nofile" else 1]["hard"] if which else 0
            if which is None or asked <= FLOOR:
                raise
            limits = dataclasses.replace(limits, **{which: max(FLOOR, asked // 2)})
        finally:
            engine.remove(cid)
    engine.learn_limits(limits)
    return limits


# ---------------------------------------------------------------------------- the support volume

def engine_arch(engine: Engine) -> str:
    return str((engine.info().get("host") or {}).get("arch", ""))


def support_volume(engine: Engine, *, image: str, seccomp_profile: str | None, state: Path,
                   labels: dict, notice: Callable[[str], None], with_executor: bool = True) -> tuple[str, str | None, bool]:
    """mino's support volume on the engine: (its name, the seccomp profile's path on the engine's
    machine or None, whether it holds the executor). Named by the hash of what it holds, made
    and written once per engine, checked once per connection: a container that never starts
    (running as root, so the files are root's) mounts it, mino writes the files through the
    archive API and reads them back."""
    cached = engine.support.get((image, seccomp_profile, with_executor))
    if cached:
        return cached
    files: dict[str, tuple[bytes, int]] = {}
    if seccomp_profile:
        files["seccomp.json"] = (Path(seccomp_profile).read_bytes(), 0o644)
    exe = None
    if not with_executor:
        pass
    elif ARCHES.get(platform.machine()) == engine_arch(engine):
        try:
            exe = executor.upload_copy(state)
        except MinoError as exc:
            notice(f"mino: {exc.message}")
    else:
        notice(f"mino: the engine's machine is {engine_arch(engine) or 'of an unknown architecture'}, this one "
               f"{platform.machine()}: mino's cell executor is built here, so every cell is its own exec there (slower)")
    if exe is not None:
        files["mino-exec"] = (exe, 0o111)
    digest = hashlib.sha256(b"".join(n.encode() + b"\0" + d for n, (d, _) in sorted(files.items()))).hexdigest()[:16]
    name = policy.SUPPORT_VOLUME_PREFIX + digest
    engine.create_volume(name, {**labels, "io.mino.support": digest})
    loader = engine.create(policy.loader_spec(
        name=f"mino-support-{os.getpid()}-{digest[:8]}", image=image, labels=policy.labels("verify", labels),
        limits=engine.host_limits(), engine=engine.facts(), support_volume=name))
    try:
        if _read_tar(engine, loader, policy.SUPPORT_DIR) != {n: d for n, (d, _) in files.items()}:
            engine.put_archive(loader, policy.SUPPORT_DIR, _tar(files))
            if _read_tar(engine, loader, policy.SUPPORT_DIR) != {n: d for n, (d, _) in files.items()}:
                raise CopyError(f"mino's support volume {name} on the engine does not hold what mino wrote")
    finally:
        engine.remove(loader)
    mountpoint = (engine.volume(name) or {}).get("Mountpoint")
    if seccomp_profile and not mountpoint:
        raise CopyError(f"the engine did not say where its volume {name} is")
    found = (name, f"{mountpoint}/seccomp.json" if seccomp_profile else None, exe is not None)
    engine.support[(image, seccomp_profile, with_executor)] = found
    return found


def read_file(engine: Engine, container: str, path: str, limit: int = 1 << 20) -> bytes:
    """A small file of a container, through the engine (b"" when missing or not a file)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(engine.get_archive(container, path) or b"")) as tar:
            member = next((m for m in tar.getmembers() if m.isfile()), None)
            return tar.extractfile(member).read(limit) if member is not None else b""
    except (tarfile.TarError, OSError):
        return b""


def _read_tar(engine: Engine, container: str, path: str) -> dict[str, bytes]:
    data = engine.get_archive(container, f"{path}/.") or b""
    found = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    found["/".join(_parts(member.name))] = tar.extractfile(member).read()
    except tarfile.TarError:
        return {}
    return found


def workspace_mode(requested: str) -> str:
    """The mode of a copied workspace: the overlay's (changes wait for apply) or read-only."""
    if requested == "rw":
        raise UsageError("the engine does not see this machine's files, so --workspace rw cannot share the "
                         "notebook's directory with it: nothing was started",
                         "use --workspace overlay (the default: cells' changes come back with `%mino apply`) or ro")
    return requested
