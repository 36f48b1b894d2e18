"""Configuration files: where they are, what keys they hold, how they merge.

Global: ``$MINO_CONFIG``, else ``$XDG_CONFIG_HOME/mino/config.toml``, else
``~/.config/mino/config.toml``. Project: the nearest ``.mino.toml`` walking up from the notebook's
directory. Keys live under ``[container]``. A file that does not parse is reported (path, line,
column) and ignored, never overwritten.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tomlkit
from tomlkit.exceptions import ParseError

from .errors import UsageError
from .network import MODES, NetworkChoice, parse_allow_list
from .paths import config_dir

PROJECT_FILE = ".mino.toml"
SECTION = "container"


@dataclass(frozen=True)
class Key:
    name: str
    kind: type
    help: str
    weakens: bool = False  # from an untrusted project file it is not applied


KEYS: dict[str, Key] = {k.name: k for k in (
    Key("image", str, "image for new sessions: a short name (base) or a full reference", weakens=True),
    Key("network", str, f"network mode: {', '.join(MODES)}", weakens=True),
    Key("network_preset", str, "allowlist preset name (see `%mino presets`)", weakens=True),
    Key("network_allow", list, 'extra allowlist entries, e.g. ["pypi.org:443"]', weakens=True),
    Key("pids_limit", int, "process limit per container, 1-4096 (can only tighten the default)"),
    Key("workdir_readonly", bool, "mount the notebook's directory read-only at /workspace"),
    Key("ca_bundle", str, 'CA bundle to trust inside: "auto" (the host\'s), "none", or a path', weakens=True),
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
        if key == "pids_limit" and not 1 <= value <= 4096:
            raise UsageError(f"{SECTION}.pids_limit must be between 1 and 4096, not {value}{place}", spec.help)
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
    project: FileConfig | None
    warnings: tuple[str, ...] = field(default_factory=tuple)


def read_file(path: Path) -> tuple[FileConfig | None, list[str]]:
    """Parse and validate one file. Problems become warnings; the file counts as empty."""
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


def load(cwd: Path, env: Mapping[str, str] | None = None) -> Loaded:
    warnings: list[str] = []
    g, w = read_file(global_path(env))
    warnings += w
    project_path = find_project(cwd)
    p, w = read_file(project_path) if project_path else (None, [])
    warnings += w
    return Loaded(g, p, tuple(warnings))


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

