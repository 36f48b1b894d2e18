"""What a session changed in the notebook's directory, and applying those changes to it.

A session's ``/workspace`` is an overlay: the notebook's directory is its read-only LOWER layer
and everything a cell writes lands in an UPPER directory that mino owns. Nothing reaches the
notebook's directory until the user applies it, and this module is the only code that writes it.

Threat model: every name and every byte in UPPER was written by hostile code that knows this
module and may still be running while we read it. So no symlink is ever followed on either side
(every path is walked one component at a time with ``O_NOFOLLOW``), what is copied is checked on
the open file descriptor and not on the path, a FIFO or device is never opened, only regular files
are written (0644, or 0755 for an executable named on its own; never setuid), and anything that
could run code on the host by itself (Python the kernel imports from this directory, dotfiles that
tools run, executables) is applied only when the user names it. Names are shown escaped, so a
file name cannot forge lines of a listing or terminal output.
"""

from __future__ import annotations

import difflib
import errno
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import MinoError, UsageError

OPAQUE_XATTR = "trusted.overlay.opaque"  # readable only with CAP_SYS_ADMIN: unseen otherwise
CHUNK = 1 << 16
MAX_DEPTH = 100  # deeper directories are listed as one directory (never applied), not walked
STATUSES = ("added", "modified", "deleted")
KINDS = ("file", "dir", "symlink", "fifo", "socket", "device")
NOUNS = {"file": "a file", "dir": "a directory", "symlink": "a symlink", "fifo": "a FIFO",
         "socket": "a socket", "device": "a device"}

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Change:
    path: str  # relative POSIX path inside the workspace, e.g. "data/out.csv"
    status: str  # "added" | "modified" | "deleted"
    kind: str  # "file" | "dir" | "symlink" | "fifo" | "socket" | "device"
    size: int  # bytes of the new content (0 for non-files and deletions)
    executable: bool  # any x bit on the new file
    risk: str | None  # why this could run code on the host by itself (None = plain data)


@dataclass(frozen=True)
class Outcome:
    path: str
    applied: bool
    message: str  # one line: what happened or why not


class _Refused(Exception):
    """One path is not applied; the message says why (one line, for the user)."""


# ---------------------------------------------------------------------------- risk

DOTFILE = "a dotfile or dot-directory: tools run these by themselves (git hooks, direnv, shell start-up)"
PYTHON = "Python the kernel can import from this directory"
JUPYTER = "Jupyter or IPython configuration: some versions load it from the working directory"
EXECUTABLE = "an executable: it runs with your rights when anything starts it"
TOOLING = "a file tools run or read as code (make, shell scripts, package manifests, notebooks you would run)"
OPTION = "a name that starts with '-': commands given it (rm *, tar *) read it as an option"

TOOLING_NAMES = {"makefile", "gnumakefile", "justfile", "package.json", "pyproject.toml", "setup.cfg",
                 "tox.ini", "dockerfile", "containerfile", "procfile", "cmakelists.txt"}
TOOLING_SUFFIXES = (".sh", ".bash", ".zsh", ".mk", ".ipynb", ".bat", ".ps1", ".cmd")

PYTHON_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".pth", ".pyz", ".egg", ".whl")
PYTHON_METADATA = (".dist-info", ".egg-info")  # entry points importlib.metadata finds on sys.path
PYTHON_HOOKS = ("sitecustomize", "usercustomize")
_JUPYTER_CONFIG = re.compile(r"(ipython|jupyter)\w*_config(\..*)?")


def _is_python(parts: list[str]) -> bool:
    name = parts[-1].lower()
    return (name.endswith(PYTHON_SUFFIXES)
            or any(p == "__pycache__" or p.lower().endswith(PYTHON_METADATA) for p in parts)
            or any(p.split(".", 1)[0].lower() in PYTHON_HOOKS for p in parts))


def risk_of(path: str, kind: str, executable: bool) -> str | None:
    """Why this path could run code on the host by itself once applied; None for plain data."""
    parts = path.split("/")
    if any(p.startswith(".") for p in parts):
        return DOTFILE
    if _is_python(parts):
        return PYTHON
    if _JUPYTER_CONFIG.fullmatch(parts[-1].lower()):
        return JUPYTER
    name = parts[-1].lower()
    if name in TOOLING_NAMES or name.endswith(TOOLING_SUFFIXES) or name.startswith("requirements"):
        return TOOLING
    if any(p.startswith("-") for p in parts):
        return OPTION
    if kind == "file" and executable:
        return EXECUTABLE
    return None


# ---------------------------------------------------------------------------- showing names

def display_path(path: str) -> str:
    """`path` as one safe line: plain when printable, else quoted with backslash escapes.

    Injective: a quoted form always starts with '"', which a plain form never contains, and a
    byte that was not UTF-8 (\\xNN) never looks like a character (\\u00NN)."""
    if all(ch.isprintable() and ch not in '\\"' for ch in path):
        return path
    return '"' + "".join(_escape(ch) for ch in path) + '"'


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in '\\"':
        return "\\" + ch
    if ch.isprintable():
        return ch
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x80:
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(ch, f"\\x{code:02x}")
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _visible(text: str) -> str:
    """Hostile text for a terminal: everything but tabs and newlines that is not printable
    (escape sequences, carriage returns, bidi overrides) becomes an escape."""
    return "".join(ch if ch in "\t\n" or ch.isprintable() else _escape(ch) for ch in text)


# ---------------------------------------------------------------------------- safe file system

def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "device"


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _open_root(path: Path, what: str) -> int:
    try:
        return os.open(path, _DIR)
    except OSError as exc:
        raise MinoError(f"cannot open {what} {path}: {exc.strerror}") from None


def _lstat(dir_fd: int | None, name: str) -> os.stat_result | None:
    if dir_fd is None:
        return None
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _walk_dirs(root: int, parts: Sequence[str], where: str, made: list | None = None,
               protected: frozenset = frozenset()) -> int | None:
    """A new fd for the directory `parts` under `root`, one component at a time, never following
    a symlink. A missing component: created when `made` is a list (and recorded), else None.
    `protected`: (device, inode) of directories that are never entered (mino's own)."""
    fd = os.dup(root)
    try:
        _refuse_protected(fd, protected, [], where)
        for i, name in enumerate(parts):
            try:
                step = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if made is None:
                    os.close(fd)
                    return None
                os.mkdir(name, 0o755, dir_fd=fd)
                made.append(parts[:i + 1])
                step = os.open(name, _DIR, dir_fd=fd)
            except OSError as exc:
                st = _lstat(fd, name)
                shown = display_path("/".join(parts[:i + 1]))
                what = f"is {NOUNS[_kind(st.st_mode)]}" if st else f"cannot be opened: {exc.strerror}"
                raise _Refused(f"{shown} {where} {what}") from None
            os.close(fd)
            fd = step
            _refuse_protected(fd, protected, parts[:i + 1], where)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _refuse_protected(fd: int, protected: frozenset, parts: Sequence[str], where: str) -> None:
    if protected:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) in protected:
            raise _Refused(f"{display_path('/'.join(parts)) if parts else 'the directory'} {where} is mino's own "
                           "state or configuration: nothing a cell wrote is ever applied there")


def _open_file(dir_fd: int, name: str) -> tuple[int, os.stat_result] | None:
    """An fd of the regular file `name` (checked on the fd), or None. A FIFO, device or symlink
    is never opened: lstat first, then O_NOFOLLOW|O_NONBLOCK, then fstat."""
    st = _lstat(dir_fd, name)
    if st is None or not stat.S_ISREG(st.st_mode):
        return None
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def _read_exact(fd: int, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, min(CHUNK, size - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


# ---------------------------------------------------------------------------- listing

def list_changes(upper: Path, lower: Path, opaque_xattr: str | None = OPAQUE_XATTR,
                 deleted: Sequence[str] = ()) -> list[Change]:
    """Every change the session made to the notebook's directory, sorted by path. `opaque_xattr`:
    the xattr overlayfs marks a replaced directory with (``user.overlay.opaque`` when the overlay
    was mounted in a user namespace, rootless).

    A workspace read back from an engine elsewhere (:mod:`mino_jupyter.copied`) is an upper
    layer without overlayfs's marks (`opaque_xattr` None): what the cell changed or added, and
    `deleted`, the paths it removed (each still in the notebook's directory is listed)."""
    up = _open_root(upper, "the workspace's upper layer")
    try:
        low = _open_root(lower, "the notebook's directory")
        try:
            out: list[Change] = []
            _walk(up, low, "", False, 0, out, opaque_xattr)
            listed = {c.path for c in out}
            for path in deleted:
                below = _lstat_path(low, path)
                if below is not None and path not in listed:
                    out.append(_deleted(path, below))
        finally:
            os.close(low)
    finally:
        os.close(up)
    return sorted(out, key=lambda c: c.path)


def _join(rel: str, name: str) -> str:
    return f"{rel}/{name}" if rel else name


def _walk(up: int, low: int | None, rel: str, hidden: bool, depth: int, out: list[Change],
          opaque: str | None) -> bool:
    """The changes in one upper directory (`hidden`: below an opaque one). True if any listed."""
    before = len(out)
    names = sorted(os.listdir(up))
    for name in names:
        _entry(up, low, name, _join(rel, name), hidden, depth, out, opaque)
    if hidden and low is not None:
        present = set(names)
        for name in sorted(os.listdir(low)):
            below = _lstat(low, name)
            if name not in present and below is not None:
                out.append(_deleted(_join(rel, name), below))
    return len(out) > before


def _deleted(rel: str, below: os.stat_result) -> Change:
    kind = _kind(below.st_mode)
    return Change(rel, "deleted", kind, 0, False, risk_of(rel, kind, False))


def _entry(up: int, low: int | None, name: str, rel: str, hidden: bool, depth: int, out: list[Change],
           opaque: str | None) -> None:
    st = _lstat(up, name)
    if st is None:  # gone since the listing
        return
    below = _lstat(low, name)
    if _is_whiteout(st):
        if below is not None:
            out.append(_deleted(rel, below))
        return
    if stat.S_ISDIR(st.st_mode):
        _directory(up, low, name, rel, hidden, depth, below, out, opaque)
        return
    kind = _kind(st.st_mode)
    same_kind = below is not None and _kind(below.st_mode) == kind
    if kind == "file":
        if same_kind and _same_bytes(up, low, name, st, below):
            return
        executable = bool(st.st_mode & 0o111)
        status = "modified" if same_kind else "added"
        # Replacing an executable the notebook's directory has is as risky as adding one.
        was_executable = same_kind and bool(below.st_mode & 0o111)
        out.append(Change(rel, status, kind, st.st_size, executable,
                          risk_of(rel, kind, executable or was_executable)))
        return
    if kind == "symlink" and same_kind and _same_link(up, low, name):
        return
    out.append(Change(rel, "modified" if same_kind else "added", kind, 0, False, risk_of(rel, kind, False)))


def _directory(up: int, low: int | None, name: str, rel: str, hidden: bool, depth: int,
               below: os.stat_result | None, out: list[Change], opaque: str | None) -> None:
    """An upper directory: its listed descendants, else itself when it is new (or unreadable)."""
    lower_dir = below is not None and stat.S_ISDIR(below.st_mode)
    before, walked = len(out), False
    try:
        fd = os.open(name, _DIR, dir_fd=up)
    except OSError:  # swapped or unreadable: listed as a directory, which is never applied
        fd = None
    if fd is not None and depth < MAX_DEPTH:
        child = _open_child(low, name) if lower_dir else None
        try:
            _walk(fd, child, rel, hidden or (child is not None and opaque is not None and _opaque(fd, opaque)),
                  depth + 1, out, opaque)
            walked = True
        except OSError:
            pass
        finally:
            if child is not None:
                os.close(child)
    if fd is not None:
        os.close(fd)
    if len(out) == before and (not lower_dir or not walked):
        out.append(Change(rel, "modified" if lower_dir else "added", "dir", 0, False, risk_of(rel, "dir", False)))


def _lstat_path(low: int, path: str) -> os.stat_result | None:
    """A path's lstat below `low`, walked without following a link (None: not there)."""
    parts = path.split("/")
    try:
        parent = _walk_dirs(low, parts[:-1], "in the notebook's directory")
    except (_Refused, OSError):
        return None
    if parent is None:
        return None
    try:
        return _lstat(parent, parts[-1])
    finally:
        os.close(parent)


def _open_child(low: int, name: str) -> int | None:
    try:
        return os.open(name, _DIR, dir_fd=low)
    except OSError:
        return None


def _opaque(fd: int, name: str) -> bool:
    try:
        return os.getxattr(fd, name) == b"y"
    except OSError:
        return False


def _same_link(up: int, low: int, name: str) -> bool:
    try:
        return os.readlink(name, dir_fd=up) == os.readlink(name, dir_fd=low)
    except OSError:
        return False


def _same_bytes(up: int, low: int, name: str, st: os.stat_result, below: os.stat_result) -> bool:
    """Identical content (size first, then chunk by chunk): an already-applied file."""
    if st.st_size != below.st_size:
        return False
    a = _open_file(up, name)
    b = _open_file(low, name) if a else None
    try:
        if a is None or b is None or a[1].st_size != b[1].st_size:
            return False
        while True:
            x, y = _read_exact(a[0], CHUNK), _read_exact(b[0], CHUNK)
            if x != y:
                return False
            if not x:
                return True
    except OSError:
        return False
    finally:
        for opened in (a, b):
            if opened:
                os.close(opened[0])


# ---------------------------------------------------------------------------- diff

def diff(change: Change, upper: Path, lower: Path, limit: int = 64 * 1024) -> str | None:
    """A unified diff of an added or modified text file (both sides up to `limit` bytes), with
    unprintable characters escaped; None for binary, larger or non-regular ones."""
    if change.kind != "file" or change.status not in ("added", "modified"):
        return None
    new = _read_text(upper, change.path, limit)
    old = "" if change.status == "added" else _read_text(lower, change.path, limit)
    if new is None or old is None:
        return None
    shown = display_path(change.path)
    lines = difflib.unified_diff(_lines(old), _lines(new), f"a/{shown}", f"b/{shown}")
    return "".join(_visible(line) if line.endswith("\n") else _visible(line) + "\n\\ No newline at end of file\n"
                   for line in lines)


def _lines(text: str) -> list[str]:
    parts = text.split("\n")  # not splitlines(): a hostile \r or \x0c must not start a line
    return [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _read_text(root: Path, path: str, limit: int) -> str | None:
    parts = path.split("/")
    try:
        top = os.open(root, _DIR)
    except OSError:
        return None
    try:
        parent = _walk_dirs(top, parts[:-1], "")
        opened = _open_file(parent, parts[-1]) if parent is not None else None
        if parent is not None:
            os.close(parent)
        if opened is None:
            return None
        fd, st = opened
        try:
            data = _read_exact(fd, limit + 1) if st.st_size <= limit else b""
        finally:
            os.close(fd)
        if st.st_size > limit or len(data) > limit or b"\0" in data:
            return None
        return data.decode("utf-8")
    except (OSError, _Refused, UnicodeDecodeError):
        return None
    finally:
        os.close(top)


# ---------------------------------------------------------------------------- applying

def apply(upper: Path, lower: Path, paths: Sequence[str] | None = None, *,
          budget: int | None = None, opaque_xattr: str | None = OPAQUE_XATTR, protected: Sequence[Path] = (),
          deleted: Sequence[str] = ()) -> list[Outcome]:
    """Apply changes to the notebook's directory: by default every plain added or modified file;
    with `paths`, the named changes (a directory name: the plain ones under it). Every change
    considered gets one Outcome; one path failing never stops the others.

    `budget`: at most this many bytes of disk written in the notebook's directory by this call
    (holes in sparse files cost nothing, and stay holes); a file that would go over it is not
    applied, so a cell cannot turn its disk limit into a full disk here (sparse files, hard
    links to one big file).

    `protected`: directories nothing is ever written or deleted in, wherever they sit under the
    notebook's directory (mino's state and configuration: a notebook opened from the home
    directory has them below it)."""
    found = list_changes(upper, lower, opaque_xattr, deleted)
    chosen = {c.path: "default" for c in found} if paths is None else _select(found, paths)
    spend = _Budget(budget, _identities(protected))
    up = _open_root(upper, "the workspace's upper layer")
    try:
        low = _open_root(lower, "the notebook's directory")
        try:
            return [_apply_one(up, low, c, chosen[c.path], spend) for c in found if c.path in chosen]
        finally:
            os.close(low)
    finally:
        os.close(up)


def _identities(paths: Sequence[Path]) -> frozenset:
    found = set()
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return frozenset(found)


class _Budget:
    def __init__(self, limit: int | None, protected: frozenset = frozenset()):
        self.limit = limit
        self.spent = 0
        self.protected = protected  # what apply never enters (see `apply`)

    def take(self, size: int, path: str) -> None:
        if self.limit is not None and self.spent + size > self.limit:
            raise _Refused(f"{display_path(path)} would take this apply past {self.limit >> 20} MiB of disk "
                           f"(already {self.spent >> 20} MiB); apply it on its own if you want it")
        self.spent += size


def _select(changes: list[Change], paths: Sequence[str]) -> dict[str, str]:
    """path -> "exact" (named) or "dir" (under a named directory). Every name is checked first."""
    chosen: dict[str, str] = {}
    unknown = []
    for name in paths:
        key = name[2:] if name.startswith("./") else name
        key = key.rstrip("/") or key
        exact = [c for c in changes if key in (c.path, display_path(c.path))]
        if len(exact) > 1:
            raise UsageError(f"{display_path(name)} names more than one change",
                             "name it as `%mino changes` shows it")
        under = [c for c in changes if key and c.path.startswith(key + "/")]
        if not exact and not under:
            unknown.append(display_path(name))
        for c in under:
            chosen.setdefault(c.path, "dir")
        for c in exact:
            chosen[c.path] = "exact"
    if unknown:
        raise UsageError(f"not a change in this workspace: {', '.join(unknown)}; nothing was applied",
                         "`%mino changes` lists them")
    return chosen


def _refusal(change: Change, how: str) -> str | None:
    """Why `change` is not applied when chosen `how` ("default", "dir", "exact"); None: go ahead.
    Only a file named on its own is applied despite its risk: naming its directory is not enough."""
    shown = display_path(change.path)
    if change.status == "deleted":
        return None if how == "exact" else f"a deletion is applied only when named on its own: %mino apply {shown}"
    if change.kind == "dir":
        return "a directory is never applied, only the files in it"
    if change.kind != "file":
        return f"{NOUNS[change.kind]} is never applied"
    if how != "exact" and change.risk:
        return f"{change.risk}; name it to apply it: %mino apply {shown}"
    return None


def _apply_one(up: int, low: int, change: Change, how: str, spend: _Budget) -> Outcome:
    reason = _refusal(change, how)
    if reason:
        return Outcome(change.path, False, f"not applied: {reason}")
    try:
        if change.status == "deleted":
            return Outcome(change.path, True, _delete(low, change.path, spend.protected))
        return Outcome(change.path, True, _write(up, low, change, how, spend))
    except _Refused as exc:
        return Outcome(change.path, False, f"not applied: {exc}")
    except OSError as exc:
        return Outcome(change.path, False, f"not applied: {exc.strerror or exc}")


def _delete(low: int, path: str, protected: frozenset) -> str:
    parts = path.split("/")
    parent = _walk_dirs(low, parts[:-1], "in the notebook's directory", protected=protected)
    if parent is None:
        return "already gone from the notebook's directory"
    try:
        st = _lstat(parent, parts[-1])
        if st is None:
            return "already gone from the notebook's directory"
        if stat.S_ISDIR(st.st_mode):
            try:
                os.rmdir(parts[-1], dir_fd=parent)
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    raise _Refused(f"{display_path(path)} in the notebook's directory is not empty; "
                                   "delete it yourself if you mean it") from None
                raise
        else:
            os.unlink(parts[-1], dir_fd=parent)  # a symlink itself, never what it points to
        return "deleted from the notebook's directory"
    finally:
        os.close(parent)


def _write(up: int, low: int, change: Change, how: str, spend: _Budget) -> str:
    """Copy one regular file from UPPER into LOWER: checked first, then a temporary file in the
    target directory, fsync, rename over the old one. Nothing is left behind on failure."""
    parts = change.path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise _Refused(f"{display_path(change.path)} is not a plain relative path")
    src, st = _open_source(up, parts)
    executable = bool(st.st_mode & 0o111)  # on the fd now, not as listed
    risk = risk_of(change.path, "file", executable)
    if risk and how != "exact":
        os.close(src)
        raise _Refused(f"{risk}; name it to apply it: %mino apply {display_path(change.path)}")
    try:
        spend.take(min(st.st_size, st.st_blocks * 512), change.path)
        _check_target(low, parts, spend.protected)
        keep_x = how == "exact" and executable
        made: list = []
        try:
            parent = _walk_dirs(low, parts[:-1], "in the notebook's directory", made, spend.protected)
            try:
                _replace(parent, parts[-1], src, st.st_size, 0o755 if keep_x else 0o644)
            finally:
                os.close(parent)
        except BaseException:
            _unmake(low, made)
            raise
    finally:
        os.close(src)
    return _applied_message(risk, how, dropped=executable and not keep_x)


def _applied_message(risk: str | None, how: str, dropped: bool) -> str:
    if how == "default" or (risk is None and not dropped):
        return "applied"
    if risk == EXECUTABLE and dropped:
        return "applied without its x bit: name the file itself to keep it"
    text = f"applied with a warning: {risk}" if risk else "applied"
    return text + ("; without its x bit: name the file itself to keep it" if dropped else "")


def _open_source(up: int, parts: list[str]) -> tuple[int, os.stat_result]:
    shown = display_path("/".join(parts))
    parent = _walk_dirs(up, parts[:-1], "in the workspace")
    if parent is None:
        raise _Refused(f"{shown} is gone from the workspace")
    try:
        opened = _open_file(parent, parts[-1])
    finally:
        os.close(parent)
    if opened is None:
        raise _Refused(f"{shown} is no longer a regular file in the workspace")
    return opened


def _check_target(low: int, parts: list[str], protected: frozenset = frozenset()) -> None:
    """Refuse before writing anything: a parent that is a symlink or not a directory (or mino's
    own), or a target that exists and is not a regular file."""
    parent = _walk_dirs(low, parts[:-1], "in the notebook's directory", protected=protected)
    if parent is None:
        return
    try:
        st = _lstat(parent, parts[-1])
    finally:
        os.close(parent)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise _Refused(f"{display_path('/'.join(parts))} in the notebook's directory is "
                       f"{NOUNS[_kind(st.st_mode)]}; it was left as it is")


def _replace(parent: int, name: str, src: int, size: int, mode: int) -> None:
    tmp = f".mino-apply-{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, _NEW, 0o600, dir_fd=parent)
    try:
        try:
            _copy(src, fd, size)
            os.fchmod(fd, mode)  # exactly 0644 or 0755: never setuid, setgid or sticky
            os.fsync(fd)
        finally:
            os.close(fd)
        st = _lstat(parent, name)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{name} in the notebook's directory is {NOUNS[_kind(st.st_mode)]}; it was left as it is")
        os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=parent)
        except OSError:
            pass
        raise
    os.fsync(parent)


def _copy(src: int, dst: int, size: int) -> None:
    """At most `size` bytes (the size when opened): a file the cell keeps growing ends there.
    Only the data is copied; holes stay holes (a sparse file costs here what it cost there)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        os.lseek(src, start, os.SEEK_SET)
        os.lseek(dst, start, os.SEEK_SET)
        left = end - start
        while left > 0:
            chunk = os.read(src, min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(dst, view):]
        offset = end
    os.ftruncate(dst, size)


def _unmake(low: int, made: list) -> None:
    """Remove the directories a failed apply created (only if still empty), deepest first."""
    for parts in reversed(made):
        try:
            parent = _walk_dirs(low, parts[:-1], "")
            if parent is not None:
                try:
                    os.rmdir(parts[-1], dir_fd=parent)
                finally:
                    os.close(parent)
        except (OSError, _Refused):
            pass


# ---------------------------------------------------------------------------- showing changes

LETTERS = {"added": "A", "modified": "M", "deleted": "D"}


def _size(change: Change) -> str:
    if change.status == "deleted" or change.kind != "file":
        return "-"
    size, unit = float(change.size), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{change.size} B" if unit == "B" else f"{size:.1f} {unit}"


def _note(change: Change) -> str:
    if change.status == "deleted":
        return f"  [{NOUNS[change.kind]}; name it to delete it]"
    if change.kind != "file":
        return f"  [{NOUNS[change.kind]}: never applied]"
    if change.risk:
        return f"  [risky: {change.risk}]"
    return ""


def render(changes: list[Change]) -> str:
    """A git-status-like table for `%mino changes`: status letter, size, path, and a note."""
    if not changes:
        return "no changes"
    return "\n".join(f"{LETTERS[c.status]} {_size(c):>10}  {display_path(c.path)}{_note(c)}" for c in changes)
