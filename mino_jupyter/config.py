"""Configuration files: where they are, what keys they hold, how they merge.

Global: ``$MINO_CONFIG``, else ``$XDG_CONFIG_HOME/mino/config.toml``, else
``~/.config/mino/config.toml``. Project: the nearest *trusted* ``.mino.toml`` walking up from the
notebook's directory. Keys live under ``[container]``. A file that applies but cannot be used as
written (it does not parse, a key or section is unknown, a value is not valid) is an error that
names the file and line and what is valid, and no cell runs until it is fixed: running on
defaults instead would quietly give a cell more than the user wrote down. Such a file is never
overwritten by mino (values can be fixed with ``config set``; a file that does not parse, by hand).

Edits go through tomlkit and touch only the edited key (comments and formatting elsewhere stay
byte for byte), under an exclusive lock, written to a temporary file and renamed into place.

Trust: a project file arrives with whatever repository was cloned (or whatever a cell managed to
put there). It has effect only when its real path *and* its current content are trusted (the
SHA-256 of the content recorded for that path in the user's state directory). A file that is
untrusted, a symlink or not a regular file has **no effect at all**, not even values that look
stricter (a ``pids_limit = 1`` would make every session unusable): one notice names it and says
how to trust it, and it does not hide a trusted file further up. A symlinked file is never
trusted, so a link to another project's trusted file gains nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import tomlkit
from tomlkit.exceptions import ParseError

from .errors import UsageError
from .network import MODES, AllowEntry, NetworkChoice, parse_allow_list
from .paths import config_dir, state_dir
from .policy import PIDS_LIMIT, WORKSPACE_MODES

PROJECT_FILE = ".mino.toml"
SECTION = "container"
NETWORK_KEYS = {"network", "network_preset", "network_allow"}


@dataclass(frozen=True)
class Key:
    name: str
    kind: type
    help: str


KEYS: dict[str, Key] = {k.name: k for k in (
    Key("image", str, "image for new sessions: a short name (base) or a full reference"),
    Key("network", str, f"network mode: {', '.join(MODES)}"),
    Key("network_preset", str, "allowlist preset name (see `%mino presets`)"),
    Key("network_allow", list, 'extra allowlist entries, e.g. ["pypi.org:443"]'),
    Key("pids_limit", int, f"process limit per container, 1-{PIDS_LIMIT} (can only tighten the default)"),
    Key("workspace", str, "how /workspace shares the notebook's directory: overlay (default: cells' writes "
                          "wait for `%mino apply`), ro, or rw (cells write your files directly)"),
    Key("workdir_readonly", bool, "true: the same as workspace = \"ro\" (older name)"),
    Key("memory", str, 'memory limit per session, e.g. "4g" or "512m" (default: half of this machine\'s)'),
    Key("cpus", str, 'CPU limit per session in cores, e.g. "2" or "0.5" (default: half of this machine\'s)'),
    Key("disk", str, 'disk limit per session (workspace changes, home, /tmp), e.g. "10g"'),
    Key("auto_apply", bool, "apply plain data files (not code, dotfiles or executables) after every cell"),
    Key("ca_bundle", str, 'CA bundle to trust inside: "auto" (the host\'s), "none", or a path'),
    Key("package_cache", bool, "share a pip/npm cache volume between this user's python/node sessions"),
)}


def parse_error_text(exc: ParseError) -> str:
    """tomlkit's reason without its own position suffix; end of file said in words."""
    reason = str(exc).split(" at line")[0]
    if "\\x00" in reason or "\x00" in reason:
        reason = "unexpected end of file (an unclosed bracket or quote?)"
    return reason


def global_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("MINO_CONFIG"):
        return Path(env["MINO_CONFIG"])
    return config_dir(env) / "config.toml"


@dataclass(frozen=True)
class ProjectFile:
    """A ``.mino.toml`` found walking up from the notebook's directory."""

    path: Path  # the directory's real path / .mino.toml
    text: str | None  # read through a descriptor that follows no link; None when unusable
    problem: str | None  # why it is unusable: "a symlink", "not a regular file", "unreadable (...)"


def _read_regular(path: Path) -> tuple[str | None, str | None]:
    """(text, problem): a file's content, only when it is a regular file and not a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, "missing"
    except OSError as exc:
        if os.path.islink(path):
            return None, "a symlink"
        return None, f"unreadable ({exc.strerror})"
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None, "not a regular file"
        data = f.read(1 << 20)
    return data.decode("utf-8", "replace"), None


def project_files(start: Path) -> list[ProjectFile]:
    """Every ``.mino.toml`` from `start` upwards, nearest first."""
    found = []
    start = start.resolve()
    for directory in (start, *start.parents):
        candidate = directory / PROJECT_FILE
        if not os.path.lexists(candidate):
            continue
        text, problem = _read_regular(candidate)
        if problem != "missing":
            found.append(ProjectFile(candidate, text, problem))
    return found


def find_project(start: Path) -> Path | None:
    """The nearest project file that is a regular file (what `--local` edits)."""
    return next((pf.path for pf in project_files(start) if pf.problem is None), None)


def validate_value(key: str, value: Any, *, where: str = "") -> Any:
    """Check one value; returns it normalised. Raises UsageError quoting what is wrong."""
    place = f" ({where})" if where else ""
    spec = KEYS.get(key)
    if spec is None:
        raise UsageError(f'unknown config key "{key}"{place}',
                         f"valid keys: {', '.join(f'{SECTION}.{k}' for k in KEYS)}")
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{SECTION}.{key} must be true or false, not {value!r}{place}", spec.help)
        return value
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{SECTION}.{key} must be an integer, not {value!r}{place}", spec.help)
        if key == "pids_limit" and not 1 <= value <= PIDS_LIMIT:
            raise UsageError(f"{SECTION}.pids_limit must be between 1 and {PIDS_LIMIT}, not {value}{place}", spec.help)
        return value
    if spec.kind is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{SECTION}.{key} must be a list of strings{place}", spec.help)
        parse_allow_list(value, where=where or f"{SECTION}.{key}")
        return value
    if key in ("memory", "disk", "cpus") and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{SECTION}.{key} must be a non-empty string, not {value!r}{place}", spec.help)
    if key == "network" and value not in MODES:
        raise UsageError(f'unknown network mode "{value}"{place}', f"valid modes: {', '.join(MODES)}")
    if key == "workspace" and value not in WORKSPACE_MODES:
        raise UsageError(f'unknown workspace mode "{value}"{place}', f"valid modes: {', '.join(WORKSPACE_MODES)}")
    if key in ("memory", "disk"):
        parse_size(value, key, place)
    if key == "cpus":
        parse_cpus(value, place)
    return value


SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
MIN_SIZE = {"memory": 64 << 20, "disk": 64 << 20}


def parse_size(text: str, key: str = "memory", place: str = "") -> int:
    """ "4g", "512m", "1.5G", "2GiB", a number of bytes: bytes. One clear error otherwise."""
    raw = str(text).strip().lower().replace("ib", "").replace(" ", "")
    number, unit = raw.rstrip("bkmgt"), raw[len(raw.rstrip("bkmgt")):]
    unit = unit[:-1] if len(unit) == 2 and unit.endswith("b") else unit
    try:
        value = float(number)
        size = int(value * SIZE_UNITS[unit])
        if not value > 0:
            raise ValueError(number)
    except (ValueError, KeyError):
        raise UsageError(f'{SECTION}.{key} must be a size like "4g" or "512m", not "{text}"{place}',
                         "units: k, m, g, t (powers of 1024)") from None
    if size < MIN_SIZE.get(key, 1):
        raise UsageError(f'{SECTION}.{key} must be at least {MIN_SIZE[key] >> 20}m, not "{text}"{place}',
                         f'e.g. {SECTION}.{key} = "4g"')
    return size


def parse_cpus(text: str, place: str = "") -> float:
    try:
        cpus = float(str(text).strip())
    except ValueError:
        cpus = -1.0
    if not 0.01 <= cpus <= 1024:
        raise UsageError(f'{SECTION}.cpus must be a number of cores like "2" or "0.5", not "{text}"{place}',
                         "fractions are fine: 0.5 is half a core")
    return cpus


@dataclass(frozen=True)
class FileConfig:
    path: Path
    values: dict  # validated [container] values
    text: str = ""


@dataclass(frozen=True)
class Loaded:
    global_: FileConfig | None
    project: FileConfig | None  # the nearest trusted project file (None: none applies)
    warnings: tuple[str, ...] = field(default_factory=tuple)
    untrusted: tuple[Path, ...] = ()  # project files found that have no effect until trusted
    errors: tuple[UsageError, ...] = ()  # what a file that applies says but cannot mean: nothing runs

    def require_usable(self) -> None:
        """Raise the first error (naming how many more there are): no cell runs on a config file
        that cannot be used as written."""
        if self.errors:
            first = self.errors[0]
            more = len(self.errors) - 1
            raise UsageError(first.message + (f" (and {more} more problem(s): `%mino config show` lists them)"
                                               if more else ""), first.hint)

    def explicit_network(self) -> bool:
        """Has the user chosen a network in a file that applies (whatever the value)?"""
        return any(fc is not None and set(fc.values) & NETWORK_KEYS for fc in (self.global_, self.project))


def read_file(path: Path) -> tuple[FileConfig | None, list[str], list[UsageError]]:
    """Parse and validate one file: (the file, warnings, errors)."""
    text, problem = _read_regular(path)
    if problem == "missing":
        return None, [], []
    if problem:
        return None, [f"mino: {path} is {problem}; using defaults for it"], []
    return parse_text(path, text)


def parse_text(path: Path, text: str) -> tuple[FileConfig | None, list[str], list[UsageError]]:
    fc, warnings, errors = _parse_cached(str(path), text)  # every cell reads the files: parse once
    return fc, list(warnings), list(errors)


@functools.lru_cache(maxsize=64)
def _parse_cached(path_text: str, text: str) -> tuple[FileConfig | None, tuple[str, ...]]:
    fc, warnings, errors = _parse(Path(path_text), text)
    return fc, tuple(warnings), tuple(errors)


SET_HINT = "fix it with `%mino config set KEY VALUE` or `%mino config unset KEY` (--local for the project file)"


def _line_of(text: str, key: str, section: str | None) -> int:
    """The line a key (or, with section None, a table header) is written on; 0 when unsure."""
    current = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("["):
            current = stripped.strip("[] ").strip('"')
            if section is None and current == key:
                return number
            continue
        name = stripped.split("=", 1)[0].strip().strip('"').strip("'")
        if "=" in stripped and name == key and current == section:
            return number
    return 0


def _parse(path: Path, text: str) -> tuple[FileConfig | None, list[str], list[UsageError]]:
    try:
        doc = tomlkit.parse(text).unwrap()
    except ParseError as exc:
        reason = parse_error_text(exc)
        return None, [], [UsageError(f"{path}:{exc.line}:{exc.col}: not valid TOML ({reason}), so no cell runs "
                                     "until it is fixed", "edit the file by hand: mino never rewrites a file it "
                                     "cannot parse")]
    errors: list[UsageError] = []
    values: dict = {}
    for top in doc:
        if top != SECTION:
            line = _line_of(text, top, None) or _line_of(text, top, "")
            errors.append(UsageError(f'{path}:{line}: unknown section or key "{top}" (settings go under '
                                     f"[{SECTION}])", f"valid keys: {', '.join(f'{SECTION}.{k}' for k in KEYS)}"))
    section = doc.get(SECTION, {})
    if not isinstance(section, dict):
        return None, [], [UsageError(f"{path}: [{SECTION}] must be a table", "edit the file by hand")]
    for key, value in section.items():
        try:
            values[key] = validate_value(key, value)
        except UsageError as exc:
            errors.append(UsageError(f"{path}:{_line_of(text, key, SECTION)}: {exc.message}",
                                     f"{exc.hint}; {SET_HINT}" if exc.hint else SET_HINT))
    return FileConfig(path, values, text), [], errors


def load(cwd: Path, env: Mapping[str, str] | None = None,
         presets: Mapping[str, Sequence[AllowEntry]] | None = None) -> Loaded:
    """The global file and the nearest trusted project file, validated (see the module doc).
    `presets` is accepted for the callers' convenience; validation needs no presets."""
    warnings: list[str] = []
    g, w, errors = read_file(global_path(env))
    warnings += w
    project, untrusted = None, []
    for pf in project_files(cwd):
        if pf.problem:
            warnings.append(f"mino: {pf.path} is {pf.problem}, so it has no effect (project files must be "
                            "regular files); remove it or replace it with the file itself")
            continue
        if is_trusted(pf.path, pf.text, env):
            project, w, e = parse_text(pf.path, pf.text)
            warnings += w
            errors += e
            break
        fc, _, _ = parse_text(pf.path, pf.text)
        if fc is None or fc.values:  # an empty file would change nothing anyway
            untrusted.append(pf.path)
            warnings.append(f"mino: {pf.path} is not trusted, so it has no effect; review it, then "
                            f"`%mino trust {pf.path}` (or `mino-jupyter trust {pf.path}`)")
    return Loaded(g, project, tuple(warnings), untrusted=tuple(untrusted), errors=tuple(errors))


def network_choice(fc: FileConfig | None, label: str) -> NetworkChoice | None:
    if fc is None:
        return None
    v = fc.values
    allow = tuple(v["network_allow"]) if "network_allow" in v else None
    return NetworkChoice(f"{label} {fc.path}", v.get("network"), v.get("network_preset"), allow)


def merged(loaded: Loaded, key: str, default: Any = None) -> tuple[Any, str]:
    """A non-network value and where it comes from: project > global > default."""
    for fc, label in ((loaded.project, "project"), (loaded.global_, "global")):
        if fc is not None and key in fc.values:
            return fc.values[key], f"{label} {fc.path}"
    return default, "default"



# --------------------------------------------------------------------------- trust
def trust_store(env: Mapping[str, str] | None = None) -> Path:
    return state_dir(env) / "trusted-projects.json"


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_trust(env) -> dict:
    try:
        data = json.loads(trust_store(env).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _trust_key(path: Path) -> str:
    """A project file's identity for trust: its directory's real path and its own name (the file
    itself is never a link: those are never trusted)."""
    path = Path(path)
    return str(Path(os.path.realpath(path.parent)) / path.name)


def is_trusted(path: Path, text: str, env: Mapping[str, str] | None = None) -> bool:
    return not os.path.islink(path) and _read_trust(env).get(_trust_key(path)) == content_hash(text)


def record_trust(path: Path, text: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Trust the file's current content at its real path. Returns its hash."""
    if text is None:
        text, problem = _read_regular(Path(path))
        if problem:
            raise UsageError(f"{path} is {problem}; mino trusts only regular project files",
                             "replace it with the file itself, then trust it")
    digest = content_hash(text)
    store = trust_store(env)
    if not store.parent.is_dir():
        store.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(store.parent, 0o700)
    with _locked(store):
        data = _read_trust(env)
        data[_trust_key(path)] = digest
        _atomic_write(store, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return digest


def trust_project(path: Path | None, cwd: Path, env: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """Trust a project file's current content (the user reviewed it): (its path, a message).
    Without a path: the nearest project file that is not trusted yet, else the nearest one."""
    if path is None:
        found = [pf for pf in project_files(cwd) if pf.problem is None]
        pick = next((pf for pf in found if not is_trusted(pf.path, pf.text, env)), found[0] if found else None)
        if pick is None:
            raise UsageError("no project file to trust (no .mino.toml here or above)",
                             "the project file is .mino.toml in this directory or a parent, or give its path")
        path = pick.path
    path = Path(path)
    text, problem = _read_regular(path)
    if problem:
        raise UsageError(f"cannot trust {path}: it is {problem}",
                         "mino trusts only regular project files, never links; give the file itself")
    digest = record_trust(path, text, env)
    return path, f"trusted {_trust_key(path)} (sha256 {digest[:16]}...); it is asked again if its content changes"


# --------------------------------------------------------------------------- editing
def canonical_key(name: str) -> str:
    key = name[len(SECTION) + 1:] if name.startswith(SECTION + ".") else name
    if key not in KEYS:
        raise UsageError(f'unknown config key "{name}"', f"valid keys: {', '.join(f'{SECTION}.{k}' for k in KEYS)}")
    return key


def parse_raw(key: str, raw: str, presets: Mapping[str, Any] | None = None) -> Any:
    """A value typed on a command line, converted to the key's type and validated."""
    spec = KEYS[key]
    if spec.kind is bool:
        lowered = raw.strip().lower()
        if lowered not in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            raise UsageError(f"{SECTION}.{key} must be true or false, not \"{raw}\"", spec.help)
        value: Any = lowered in ("true", "yes", "on", "1")
    elif spec.kind is int:
        if not raw.strip().isdigit():
            raise UsageError(f"{SECTION}.{key} must be an integer, not \"{raw}\"", spec.help)
        value = int(raw)
    elif spec.kind is list:
        value = [str(e) for e in parse_allow_list([raw], where=f"{SECTION}.{key}")]
    else:
        value = raw.strip()
    value = validate_value(key, value)
    if key == "network_preset" and presets is not None and value not in presets:
        available = ", ".join(sorted(presets)) or "none"
        raise UsageError(f'unknown network preset "{value}"', f"available presets: {available}")
    if key == "ca_bundle" and value not in ("auto", "none") and not os.path.isfile(value):
        raise UsageError(f'ca_bundle "{value}" is not a file', 'use "auto", "none" or the path of a PEM bundle')
    return value


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _atomic_write(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def edit(path: Path, key: str, value: Any | None) -> str:
    """Set (value) or remove (None) one key in one file. Returns the new text.

    Only that key's line changes. A file that does not parse is refused, never rewritten.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        try:
            doc = tomlkit.parse(text)
        except ParseError as exc:
            raise UsageError(f"{path}:{exc.line}:{exc.col}: not valid TOML ({parse_error_text(exc)}); "
                             "mino will not rewrite it", "fix the file by hand first") from None
        table = doc.get(SECTION)
        if value is None:
            if table is None or key not in table:
                return text
            del table[key]
        else:
            if table is None:
                table = tomlkit.table()
                doc.add(SECTION, table)
            elif not isinstance(table, dict):
                raise UsageError(f"{path}: [{SECTION}] is not a table; mino will not rewrite it",
                                 "fix the file by hand first")
            table[key] = value
        new = tomlkit.dumps(doc)
        if new != text:
            _atomic_write(path, new)
        return new


def target_file(local: bool, cwd: Path, env: Mapping[str, str] | None = None) -> Path:
    """The file `config set` edits: the global one, or (--local) the nearest regular project file
    (a new one next to the notebook when there is none). mino never edits through a link."""
    if not local:
        return global_path(env)
    nearest = next(iter(project_files(cwd)), None)
    if nearest is not None and nearest.problem:
        raise UsageError(f"{nearest.path} is {nearest.problem}; mino edits only regular project files",
                         "remove it, then `config set --local` creates a regular one")
    return nearest.path if nearest else (cwd.resolve() / PROJECT_FILE)


def set_key(name: str, raw: str, *, local: bool, cwd: Path, env=None, presets=None) -> tuple[Path, Any]:
    key = canonical_key(name)
    value = parse_raw(key, raw, presets)
    path = target_file(local, cwd, env)
    trusted_before = _trusted_or_new(path, env)
    text = edit(path, key, value)
    if local and trusted_before:
        record_trust(path, text, env)  # the user wrote it; a file that came untrusted stays untrusted
    return path, value


def _trusted_or_new(path: Path, env) -> bool:
    try:
        return is_trusted(path, path.read_text(encoding="utf-8"), env)
    except FileNotFoundError:
        return True


def unset_key(name: str, *, local: bool, cwd: Path, env=None) -> tuple[Path, bool]:
    key = canonical_key(name)
    path = target_file(local, cwd, env)
    if not path.exists():
        return path, False
    before = path.read_text(encoding="utf-8")
    trusted_before = _trusted_or_new(path, env)
    text = edit(path, key, None)
    if local and text != before and trusted_before:
        record_trust(path, text, env)
    return path, text != before


def toml_value(value: Any) -> str:
    return tomlkit.item(value).as_string()


def describe(loaded: Loaded) -> list[tuple[str, str, str]]:
    """(key, value, source) for every key, as `config show` prints it."""
    rows = []
    for key in KEYS:
        value, source = merged(loaded, key)
        if key in NETWORK_KEYS:
            for fc, label in ((loaded.project, "project"), (loaded.global_, "global")):
                if fc is not None and set(fc.values) & NETWORK_KEYS:
                    value, source = fc.values.get(key), f"{label} {fc.path}"
                    break
        rows.append((f"{SECTION}.{key}", "-" if value is None else toml_value(value), source))
    return rows
