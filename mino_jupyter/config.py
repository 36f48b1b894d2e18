"""Configuration files: where they are, what keys they hold, how they merge.

Global: ``$MINO_CONFIG``, else ``$XDG_CONFIG_HOME/mino/config.toml``, else
``~/.config/mino/config.toml``. Project: the nearest ``.mino.toml`` walking up from the notebook's
directory. Keys live under ``[container]``. A file that does not parse is reported (path, line,
column) and ignored, never overwritten.

Edits go through tomlkit and touch only the edited key (comments and formatting elsewhere stay
byte for byte), under an exclusive lock, written to a temporary file and renamed into place.

Trust: a project file arrives with whatever repository was cloned. Until its current content is
trusted (its SHA-256 recorded in the user's state directory), values that would weaken isolation
are not applied: image, ca_bundle, a read-write workspace, and network settings less strict than
what applies without the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import tomlkit
from tomlkit.exceptions import ParseError

from .errors import UsageError
from .network import (MODES, AllowEntry, NetworkChoice, NetworkPlan, NetworkResolutionInput,
                      parse_allow_list, resolve)
from .paths import config_dir, state_dir
from .policy import PIDS_LIMIT

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
    Key("workdir_readonly", bool, "mount the notebook's directory read-only at /workspace"),
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


def find_project(start: Path) -> Path | None:
    start = start.resolve()
    for directory in (start, *start.parents):
        candidate = directory / PROJECT_FILE
        if candidate.is_file():
            return candidate
    return None


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
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{SECTION}.{key} must be a non-empty string, not {value!r}{place}", spec.help)
    if key == "network" and value not in MODES:
        raise UsageError(f'unknown network mode "{value}"{place}', f"valid modes: {', '.join(MODES)}")
    return value


@dataclass(frozen=True)
class FileConfig:
    path: Path
    values: dict  # validated [container] values
    text: str = ""


@dataclass(frozen=True)
class Loaded:
    global_: FileConfig | None
    project: FileConfig | None  # its values are the ones applied (filtered when untrusted)
    warnings: tuple[str, ...] = field(default_factory=tuple)
    project_trusted: bool = True
    skipped: dict = field(default_factory=dict)  # untrusted project values not applied

    def explicit_network(self) -> bool:
        """Has the user chosen a network anywhere in a file (whatever the value)?"""
        files = [self.global_, self.project]
        return any(fc is not None and set(fc.values) & NETWORK_KEYS for fc in files) or \
            bool(set(self.skipped) & NETWORK_KEYS)


def read_file(path: Path) -> tuple[FileConfig | None, list[str]]:
    """Parse and validate one file. Problems become warnings; the file counts as empty.

    Cached while the file's size and modification time stay the same (every cell reads it).
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None, []
    except OSError as exc:
        return None, [f"mino: cannot read {path}: {exc.strerror}; using defaults for it"]
    fc, warnings = _read_cached(str(path), st.st_mtime_ns, st.st_size, st.st_ino)
    return fc, list(warnings)


@functools.lru_cache(maxsize=64)
def _read_cached(path_text: str, _mtime_ns: int, _size: int, _ino: int) -> tuple[FileConfig | None, tuple[str, ...]]:
    fc, warnings = _read_uncached(Path(path_text))
    return fc, tuple(warnings)


def _read_uncached(path: Path) -> tuple[FileConfig | None, list[str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, []
    except OSError as exc:
        return None, [f"mino: cannot read {path}: {exc.strerror}; using defaults for it"]
    try:
        doc = tomlkit.parse(text).unwrap()
    except ParseError as exc:
        reason = parse_error_text(exc)
        return None, [f"mino: {path}:{exc.line}:{exc.col}: not valid TOML ({reason}); this file is ignored "
                      f"and left untouched"]
    warnings: list[str] = []
    values: dict = {}
    for top in doc:
        if top != SECTION:
            warnings.append(f'mino: {path}: unknown section or key "{top}" ignored (settings go under [{SECTION}])')
    section = doc.get(SECTION, {})
    if not isinstance(section, dict):
        return None, [f"mino: {path}: [{SECTION}] must be a table; this file is ignored"]
    for key, value in section.items():
        try:
            values[key] = validate_value(key, value, where=str(path))
        except UsageError as exc:
            warnings.append(f"mino: {exc.message}; ignored")
    return FileConfig(path, values, text), warnings


def load(cwd: Path, env: Mapping[str, str] | None = None,
         presets: Mapping[str, Sequence[AllowEntry]] | None = None) -> Loaded:
    """Both files, validated; an untrusted project file filtered (see the module doc)."""
    warnings: list[str] = []
    g, w = read_file(global_path(env))
    warnings += w
    project_path = find_project(cwd)
    p, w = read_file(project_path) if project_path else (None, [])
    warnings += w
    if p is None or not p.values or is_trusted(p.path, p.text, env):
        return Loaded(g, p, tuple(warnings))
    kept, skipped = untrusted_filter(p.values, network_choice(g, "global"), presets or {})
    if skipped:
        shown = ", ".join(f"{k}={toml_value(v)}" for k, v in skipped.items())
        warnings.append(f"mino: {p.path} is not trusted, so {shown} from it "
                        f"{'is' if len(skipped) == 1 else 'are'} not applied; review the file, then "
                        f"`%mino trust` (or `mino-jupyter trust`)")
    return Loaded(g, FileConfig(p.path, kept, p.text), tuple(warnings), project_trusted=False, skipped=skipped)


STRICTNESS = {"host": 0, "bridge": 1, "allowlist": 2, "none": 3}


def at_least_as_strict(a: NetworkPlan, b: NetworkPlan) -> bool:
    """Does plan `a` allow nothing that plan `b` forbids?"""
    if a.mode == b.mode == "allowlist":
        return set(a.allow) <= set(b.allow)
    return STRICTNESS[a.mode] >= STRICTNESS[b.mode]


def untrusted_filter(values: dict, fallback: NetworkChoice | None,
                     presets: Mapping[str, Sequence[AllowEntry]]) -> tuple[dict, dict]:
    """Split an untrusted project file's values into (applied, skipped)."""
    kept, skipped = {}, {}
    for key, value in values.items():
        if key in ("image", "ca_bundle") or (key == "workdir_readonly" and value is not True) or \
                (key == "package_cache" and value is not False):
            skipped[key] = value
        elif key not in NETWORK_KEYS:
            kept[key] = value
    network = {k: v for k, v in values.items() if k in NETWORK_KEYS}
    if network:
        mine = NetworkChoice("project", network.get("network"), network.get("network_preset"),
                             tuple(network["network_allow"]) if "network_allow" in network else None)
        try:
            plan = resolve(NetworkResolutionInput(project=mine), presets).plan
            before = resolve(NetworkResolutionInput(global_=fallback), presets).plan
            safe = at_least_as_strict(plan, before)
        except UsageError:
            safe = False
        (kept if safe else skipped).update(network)
    return kept, skipped


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


def is_trusted(path: Path, text: str, env: Mapping[str, str] | None = None) -> bool:
    return _read_trust(env).get(str(Path(path).resolve())) == content_hash(text)


def record_trust(path: Path, text: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Trust the file's current content. Returns its hash."""
    path = Path(path).resolve()
    if text is None:
        text = path.read_text(encoding="utf-8")
    digest = content_hash(text)
    store = trust_store(env)
    if not store.parent.is_dir():
        store.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(store.parent, 0o700)
    with _locked(store):
        data = _read_trust(env)
        data[str(path)] = digest
        _atomic_write(store, json.dumps(data, indent=2, sort_keys=True) + "\n")
    return digest


def trust_project(path: Path | None, cwd: Path, env: Mapping[str, str] | None = None) -> tuple[Path, str]:
    """Trust a project file's current content (the user reviewed it): (its path, a message)."""
    path = Path(path) if path else find_project(cwd)
    if path is None or not path.is_file():
        raise UsageError(f"no project file to trust ({path or 'no .mino.toml here or above'})",
                         "the project file is .mino.toml in this directory or a parent, or give its path")
    digest = record_trust(path, path.read_text(encoding="utf-8"), env)
    return path, f"trusted {path.resolve()} (sha256 {digest[:16]}...); it is asked again if its content changes"


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
    if not local:
        return global_path(env)
    return find_project(cwd) or (cwd.resolve() / PROJECT_FILE)


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
        if key in loaded.skipped:
            source += f" (untrusted project value {toml_value(loaded.skipped[key])} not applied)"
        rows.append((f"{SECTION}.{key}", "-" if value is None else toml_value(value), source))
    return rows
