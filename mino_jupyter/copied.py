"""A session's files on an engine elsewhere, whose processes are not this machine's (another
machine over ssh or tcp, ``podman machine``, a service in another mount namespace): copied in
and read back through the engine's archive API, never bound by path.

* The workspace: a tar of the notebook's directory, made here (files, directories and symlinks,
  never following one; nothing of mino's own state or configuration), unpacked by the engine in
  the container's own volume before the container starts. It must fit in the session's disk.
* Changes: ``%mino changes``/``apply`` read the workspace back as a tar (streamed, never held
  whole in memory, at most the session's disk) into a private snapshot here that keeps only
  what differs from what was copied in (an upper layer, plus the paths deleted), which
  :mod:`mino_jupyter.changes` lists and applies from with an overlay's guarantees. A snapshot
  is taken before the container goes, so a stopped session's changes can still be applied.
* Support files: the cell executor and mino's seccomp profile live in a volume of mino's on the
  engine (:func:`support_volume`, named by their hash, written by a container that never starts
  and runs as root, mounted read-only in sessions); the engine reads the profile from that
  volume's path on its own machine.
* The CA bundle: copied into the container's read-only root filesystem before it starts.
* What this machine cannot read of the engine's: its limits (:func:`probe_limits`), its own
  addresses (:func:`engine_addresses`) and its answers for an allowlist's names
  (:func:`engine_resolver`), each asked through a short-lived container of mino's image.

Threat model for the way back: every name and byte of the tar was written by the cell. The
unpacking never follows a link (every directory is entered with ``O_NOFOLLOW`` below a
descriptor of the snapshot's root), writes only regular files (no setuid bits), directories and
symlinks (which are never followed afterwards either), skips devices and FIFOs, refuses an
extended header larger than a name needs, never holds the tar's members, and stops at the disk
budget (every entry costs) and an entry count.
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
import urllib.parse
from pathlib import Path
from typing import Callable, Mapping, Sequence

from . import changes, executor, host, policy, storage
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

def pack(notebook_dir: Path, *, limit: int,
         protected: Sequence[Path] = ()) -> tuple[io.IOBase, int, int, dict[str, tuple]]:
    """A tar of the notebook's directory (a file object at its start), its entry count and
    bytes, and what it holds: path -> ("file", SHA-256, executable) | ("symlink", target) |
    ("dir",), the base a read-back is compared with. Files, directories and symlinks (as
    links), walked by descriptor without following any; mino's `protected` directories and
    anything else (FIFOs, sockets, devices) are left out. More than `limit` bytes of files:
    :class:`CopyError`, nothing sent."""
    skip = changes._identities(protected)
    out = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller
    counts = [0, 0]
    manifest: dict[str, tuple] = {}
    try:
        root = os.open(notebook_dir, _DIR)
    except OSError as exc:
        raise CopyError(f"cannot read the notebook's directory {notebook_dir}: {exc.strerror}") from None
    try:
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                          errors="surrogateescape") as tar:
            _pack_dir(tar, root, "", 0, skip, limit, counts, notebook_dir, manifest)
    except BaseException:
        out.close()
        raise
    finally:
        os.close(root)
    out.seek(0)
    return out, counts[0], counts[1], manifest


def _info(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = stat.S_IMODE(st.st_mode) & 0o777  # never setuid, setgid or sticky
    info.mtime = int(st.st_mtime)
    info.uid = info.gid = policy.CELL_UID  # the engine makes them the container user's anyway
    return info


def _pack_dir(tar: tarfile.TarFile, fd: int, rel: str, depth: int, skip: frozenset, limit: int,
              counts: list[int], top: Path, manifest: dict[str, tuple]) -> None:
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
                manifest[path] = ("dir",)
                _pack_dir(tar, child, path, depth + 1, skip, limit, counts, top, manifest)
            finally:
                os.close(child)
        elif stat.S_ISLNK(st.st_mode):
            info = _info(path, st, tarfile.SYMTYPE)
            try:
                info.linkname = os.readlink(name, dir_fd=fd)
            except OSError:
                continue
            tar.addfile(info)
            manifest[path] = ("symlink", info.linkname)
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
                    exactly = _Exactly(f, fst.st_size)
                    tar.addfile(info, exactly)
                manifest[path] = ("file", exactly.digest.hexdigest(), bool(info.mode & 0o111))
            finally:
                os.close(file_fd)


class _Exactly(io.RawIOBase):
    """A file read as exactly `size` bytes (zeros if it shrank meanwhile, the rest cut if it grew):
    the tar header already holds the size."""

    def __init__(self, f, size: int):
        self.f, self.left, self.digest = f, size, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        data = data + b"\0" * (n - len(data))
        self.left -= len(data)
        self.digest.update(data)
        return data


# ---------------------------------------------------------------------------- back: a snapshot

MAX_HEADER = 1 << 20  # a tar's extended header (long names, xattrs) larger than this ends the read
ENTRY_COST = 512  # what every entry costs against the disk budget, empty or not


class _CheckedInfo(tarfile.TarInfo):
    """Refuses an extended header (PAX, GNU long name) too large to be a name: tarfile reads
    one whole into memory, and the engine writes every xattr of a file into its header."""

    def _proc_member(self, tar):
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > MAX_HEADER:
            raise CopyError(f"an entry of the workspace has a header of {_size(self.size)} (names and "
                            "attributes): nothing was read back", "remove extended attributes in a cell first")
        return super()._proc_member(tar)


class _Counted(io.RawIOBase):
    """The engine's stream, every byte counted: more than `limit` ends the read."""

    def __init__(self, raw, limit: int):
        self.raw, self.left = raw, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(min(len(buffer), 1 << 16))
        self.left -= len(data)
        if self.left < 0:
            raise CopyError("the workspace is larger than the session's disk allows: nothing was read back",
                            "remove large files in a cell first, or raise the limit (--disk)")
        buffer[:len(data)] = data
        return len(data)


def unpack(stream, dest: Path, *, limit: int, base: Mapping[str, tuple] | None = None) -> list[str]:
    """Unpack a tar the engine made of a directory's contents (``DIR/.``: members named
    relative to it, with or without a leading ``/`` or ``./``) into `dest`, a new empty
    directory of ours, as an upper layer over `base` (what :func:`pack` copied in): what is
    the same as there is left out, and the paths of `base` the tar no longer has are returned
    (deleted; the topmost of each tree). See the module's threat model."""
    base = base or {}
    root = os.open(dest, _DIR)
    total, count, seen, unchanged = 0, 0, set(), set()
    try:
        with tarfile.open(fileobj=io.BufferedReader(_Counted(stream, limit + MAX_ENTRIES * ENTRY_COST)), mode="r|",
                          encoding="utf-8", errors="surrogateescape", tarinfo=_CheckedInfo) as tar:
            while (member := tar.next()) is not None:
                tar.members.clear()  # a stream's members are not needed again: never held
                count += 1
                if count > MAX_ENTRIES:
                    raise CopyError(f"the workspace holds more than {MAX_ENTRIES} entries: too many to read back")
                parts = _parts(member.name)
                if not parts:
                    continue
                path = "/".join(parts)
                seen.add(path)
                unchanged.discard(path)  # a later member of the same name replaces it
                size = member.size if member.isfile() else _linked_size(root, member.linkname) if member.islnk() else 0
                total += size + ENTRY_COST
                if total > limit:
                    raise CopyError(f"the workspace holds more than {_size(limit)} (the session's disk): "
                                    "nothing was read back",
                                    "remove large files in a cell first, or raise the limit (--disk)")
                parent = _enter(root, parts[:-1])
                if parent is None:
                    continue
                try:
                    name = parts[-1]
                    if member.isdir():
                        _replace_with_dir(parent, name)
                    elif member.issym():
                        if base.get(path) != ("symlink", member.linkname):
                            _clear(parent, name)
                            os.symlink(member.linkname, name, dir_fd=parent)
                    elif member.isfile() or member.islnk():
                        _clear(parent, name)
                        source = tar.extractfile(member) if member.isfile() else _linked(root, member.linkname)
                        try:
                            digest = _write(parent, name, source, member.mode)
                        finally:
                            source.close()
                        if base.get(path) == ("file", digest, bool(member.mode & 0o111)):
                            unchanged.add(path)  # kept until the end: a later hard link may copy it
                finally:
                    os.close(parent)
        for path in unchanged:
            _unlink(root, path.split("/"))
        _prune(root, "", base)
    except tarfile.TarError as exc:
        raise CopyError(f"the engine's copy of the workspace is not a readable tar: {exc}") from None
    finally:
        os.close(root)
    gone = {p for p in base if p not in seen}
    return sorted(p for p in gone if not any("/".join(p.split("/")[:i]) in gone for i in range(1, p.count("/") + 1)))


def _unlink(root: int, parts: list[str]) -> None:
    parent = _enter(root, parts[:-1], make=False)
    if parent is not None:
        try:
            os.unlink(parts[-1], dir_fd=parent)
        except OSError:
            pass
        finally:
            os.close(parent)


def _prune(fd: int, rel: str, base: Mapping[str, tuple], depth: int = 0) -> bool:
    """Directories of `base` that hold nothing new go (bottom up); True if `rel` is now empty."""
    names = os.listdir(fd)
    left = len(names)
    for name in names:
        path = f"{rel}/{name}" if rel else name
        try:
            child = os.open(name, _DIR, dir_fd=fd)
        except OSError:
            continue  # not a directory (or a link): it stays
        try:
            empty = depth < changes.MAX_DEPTH and _prune(child, path, base, depth + 1)
        finally:
            os.close(child)
        if empty and base.get(path) == ("dir",):
            os.rmdir(name, dir_fd=fd)
            left -= 1
    return left == 0


def _parts(name: str) -> list[str]:
    """The path components of a member's name; [] for the directory itself and for a name
    that would leave it."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." or "\0" in p for p in parts) or len(parts) > changes.MAX_DEPTH:
        return []
    return parts


def _enter(root: int, parts: Sequence[str], make: bool = True) -> int | None:
    """A new fd of the directory `parts` below `root` (made where missing, with `make`); None
    when a component is not a directory (a symlink is never followed)."""
    try:
        return changes._walk_dirs(root, parts, "in the read-back", made=[] if make else None)
    except (changes._Refused, OSError):
        return None


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


def _write(parent: int, name: str, source, mode: int) -> str:
    """A new regular file (never setuid); the SHA-256 of what was written."""
    digest = hashlib.sha256()
    fd = os.open(name, _NEW, 0o600, dir_fd=parent)
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(changes.CHUNK):
            digest.update(chunk)
            out.write(chunk)
        os.fchmod(out.fileno(), (mode & 0o755) | 0o600)
    return digest.hexdigest()


def _linked_file(root: int, linkname: str) -> tuple[int, os.stat_result] | None:
    parts = _parts(linkname)
    if not parts:
        return None
    parent = _enter(root, parts[:-1], make=False)
    if parent is None:
        return None
    try:
        return changes._open_file(parent, parts[-1])
    finally:
        os.close(parent)


def _linked_size(root: int, linkname: str) -> int:
    opened = _linked_file(root, linkname)
    if opened is None:
        return 0
    os.close(opened[0])
    return opened[1].st_size


def _linked(root: int, linkname: str):
    """A hard link in the tar: the file it names, already unpacked, to copy (empty if none)."""
    opened = _linked_file(root, linkname)
    return io.BytesIO(b"") if opened is None else os.fdopen(opened[0], "rb")


# ---------------------------------------------------------------------------- one session's files

class CopiedFiles:
    """A copied session's files on this machine: what was copied in (:attr:`base`), and the
    latest read-back of its workspace as an upper layer over it (:attr:`upper`: what the cells
    changed or added) with the paths they deleted (:attr:`deleted`), which
    :mod:`mino_jupyter.changes` lists and applies as it does an overlay's. Compared with what was
    copied in, never with the notebook's directory as it is now: a file edited here since stays
    yours unless a cell changed it too. Same shape as :class:`mino_jupyter.storage.SessionStorage`
    where the sessions use it."""

    control_files = False  # no /run/mino: cells' requests go through the executor or argv
    opaque_xattr = None  # an upper layer without overlayfs's marks

    def __init__(self, root: Path, notebook_dir: Path, mode: str, disk: int):
        self.root = root
        self.notebook_dir = notebook_dir
        self.mode = mode  # overlay (changes wait for apply) | ro
        self.disk = disk
        self.base: dict[str, tuple] = {}
        self.deleted: list[str] = []
        self._generation = 0
        root.mkdir(mode=0o700, parents=True)

    @property
    def upper(self) -> Path | None:
        path = self.root / SNAPSHOT
        return path if self.mode == "overlay" and path.is_dir() and not path.is_symlink() else None

    def holds_changes(self) -> bool:
        return self.upper is not None and (bool(self.deleted) or any(os.scandir(self.upper)))

    def refresh(self, engine: Engine, container: str | None) -> None:
        """Read the container's workspace back into a new snapshot (the old one goes once the
        new one is complete), at most the session's disk and half the free space here. Nothing
        to do for a read-only copy or a container that is gone."""
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
                deleted = unpack(stream, fresh, limit=min(self.disk, host.disk_free(self.root) // 2),
                                 base=self.base)
        except OSError as exc:  # this machine's disk, or the connection
            _remove(fresh)
            raise CopyError(f"the workspace could not be read back: {exc.strerror or exc}") from None
        except BaseException:
            _remove(fresh)
            raise
        old = self.root / f".{SNAPSHOT}-old"
        _remove(old)
        if (self.root / SNAPSHOT).exists():
            os.rename(self.root / SNAPSHOT, old)
        os.rename(fresh, self.root / SNAPSHOT)
        self.deleted = deleted
        _remove(old)

    def before_removal(self, engine: Engine, container: str | None, notice: Callable[[str], None]) -> None:
        """The container goes next: keep its changes (said, never raised: the removal goes on)."""
        try:
            self.refresh(engine, container)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the container still goes
            notice("mino: the workspace's changes could not be read back before its container went: "
                   f"{getattr(exc, 'message', None) or exc}")

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
            protected: Sequence[Path], notice: Callable[[str], None]) -> dict[str, tuple]:
    """The notebook's directory into the created (not yet started) container's workspace,
    through a loader that shares its volumes and runs as the cell user (the files are the
    cell's, as the notebook's directory is under an overlay)."""
    data, files, size, manifest = pack(notebook_dir, limit=limit, protected=protected)
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
    return manifest


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
        spec = policy.inspection_spec(name=f"mino-limits-{os.getpid()}-{os.urandom(4).hex()}", image=image,
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


# ---------------------------------------------------------------------------- names, as the engine sees them

def engine_resolver(engine: Engine, names: Sequence[str], *, image: str, labels: dict,
                    lease: int | None = None) -> Callable[[str], list[str]]:
    """An allowlist's names resolved where its session runs: the engine's machine may see other
    addresses (another network, a split-horizon DNS) or names this one does not know. One
    container of mino's image on the engine's bridge runs ``getent`` for them all, and goes."""
    import ipaddress

    answers: dict[str, list[str]] = {}
    if not names:
        return lambda _name: []
    spec = policy.session_spec(policy.SessionRequest(
        name=f"mino-resolve-{os.getpid()}-{os.urandom(4).hex()}", image=image, lease=lease,
        network="bridge", labels=policy.labels("verify", labels), limits=engine.host_limits(), engine=engine.facts()))
    cid = engine.run(spec)
    try:
        _code, out, _err = engine.exec_run(cid, policy.resolve_exec(names))
    finally:
        engine.remove(cid)
    current = None
    for line in out.decode("utf-8", "replace").splitlines():
        if line.startswith("@@mino-name "):
            current = line.split(" ", 1)[1]
            answers.setdefault(current, [])
            continue
        fields = line.split()
        if current in names and fields:
            try:
                address = str(ipaddress.ip_address(fields[0]))
            except ValueError:
                continue
            if address not in answers[current]:
                answers[current].append(address)
    return lambda name: list(answers.get(name, []))


# ---------------------------------------------------------------------------- the engine's machine's addresses

def engine_addresses(engine: Engine, *, image: str, labels: dict, lease: int | None) -> list[tuple[str, int]]:
    """The engine's machine's own addresses (as (address, full prefix)), which its bridge
    sessions must not reach (its services, an API socket on tcp://) and this machine cannot
    list: one container of mino's image on the engine's host network reads the kernel's
    address tables, and goes. Plus the addresses the endpoint's host name has here. Once per
    connection."""
    import ipaddress
    import socket

    if engine.addresses is not None:
        return engine.addresses
    cid = engine.run(policy.session_spec(policy.SessionRequest(
        name=f"mino-addresses-{os.getpid()}-{os.urandom(4).hex()}", image=image, network="host",
        labels=policy.labels("verify", labels), limits=engine.host_limits(), engine=engine.facts(), lease=lease)))
    try:
        _code, out, _err = engine.exec_run(cid, policy.addresses_exec())
    finally:
        engine.remove(cid)
    found = parse_addresses(out.decode("ascii", "replace"))
    host = urllib.parse.urlparse(engine.endpoint.url).hostname if not engine.endpoint.ssh else \
        engine.endpoint.ssh.destination.rsplit("@", 1)[-1]
    try:
        for info in socket.getaddrinfo(host, None) if host else ():
            ip = ipaddress.ip_address(info[4][0].split("%")[0])
            found.append((str(ip), ip.max_prefixlen))
    except (OSError, UnicodeError):
        pass  # an ssh alias: the engine's own list above is what counts
    engine.addresses = sorted(set(found))
    return engine.addresses


def parse_addresses(text: str) -> list[tuple[str, int]]:
    """Local addresses in /proc/net/fib_trie ("|-- ADDR" then "/32 host LOCAL") and
    /proc/net/if_inet6 (32 hex digits first), as (address, full prefix)."""
    import ipaddress

    found, last = [], None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "|--":
            last = fields[1]
        elif last and line.strip() == "/32 host LOCAL":
            found.append((last, 32))
        elif len(fields) >= 6 and len(fields[0]) == 32:
            try:
                found.append((str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))), 128))
            except ValueError:
                continue
    valid = []
    for address, prefix in found:
        try:
            valid.append((str(ipaddress.ip_address(address)), prefix))
        except ValueError:
            continue
    return sorted(set(valid))


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
        name=f"mino-support-{os.getpid()}-{os.urandom(4).hex()}", image=image, labels=policy.labels("verify", labels),
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
        raise UsageError("the engine is not on this machine, so --workspace rw cannot share the "
                         "notebook's directory with it: nothing was started",
                         "use --workspace overlay (the default: cells' changes come back with `%mino apply`) or ro")
    return requested
