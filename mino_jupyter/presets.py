"""Network presets: named allowlists in TOML files.

Built-ins ship inside the package (``presets/*.toml``); user presets in
``~/.config/mino/presets/*.toml`` add to them or shadow them (reported). A preset file holds::

    description = "one line"
    allow = ["host:port", ...]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping

import tomlkit
from tomlkit.exceptions import ParseError

from .config import parse_error_text
from .errors import ConfigError, UsageError
from .network import AllowEntry, parse_allow_entry
from .paths import config_dir

_NAME_OK = "letters, digits, '-' and '_'"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    allow: tuple[AllowEntry, ...]
    path: str
    builtin: bool
    shadows: str | None = None  # path of the preset this one hides


def builtin_dir() -> Path:
    packaged = Path(str(resources.files("mino_jupyter"))) / "presets"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "presets"  # a source checkout


def user_dir(env: Mapping[str, str] | None = None) -> Path:
    return config_dir(env) / "presets"


def _line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    return 1


def parse_preset(path: Path, *, builtin: bool) -> Preset:
    """Parse one preset file (cached while the file's size and mtime stay the same)."""
    st = path.stat()
    return _parse_cached(str(path), builtin, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=256)
def _parse_cached(path_text: str, builtin: bool, _mtime_ns: int, _size: int) -> Preset:
    path = Path(path_text)
    name = path.stem
    text = path.read_text(encoding="utf-8")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{path}: preset name \"{name}\" must use {_NAME_OK}", "rename the file")
    try:
        doc = tomlkit.parse(text).unwrap()
    except ParseError as exc:
        raise ConfigError(f"{path}:{exc.line}:{exc.col}: not valid TOML: {parse_error_text(exc)}",
                          "fix or remove the file; each preset needs description = \"...\" and allow = [...]") from None
    unknown = sorted(set(doc) - {"description", "allow"})
    if unknown:
        raise ConfigError(f"{path}:{_line_of(text, unknown[0])}: unknown key \"{unknown[0]}\"",
                          "a preset has only `description` and `allow`")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{path}:{_line_of(text, 'description')}: description must be a string",
                          'e.g. description = "package registries"')
    allow = doc.get("allow")
    if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
        raise ConfigError(f"{path}:{_line_of(text, 'allow')}: allow must be a list of \"host:port\" strings",
                          'e.g. allow = ["pypi.org:443"]')
    entries = []
    for item in allow:
        try:
            entries.append(parse_allow_entry(item))
        except UsageError as exc:
            raise ConfigError(f"{path}:{_line_of(text, item)}: {exc.message}", exc.hint) from None
    return Preset(name, description, tuple(dict.fromkeys(entries)), str(path), builtin)


def load(dirs: Iterable[tuple[Path, bool]] | None = None, env: Mapping[str, str] | None = None) -> dict[str, Preset]:
    """Presets by name; later directories shadow earlier ones. Each item is (dir, builtin)."""
    if dirs is None:
        dirs = [(builtin_dir(), True), (user_dir(env), False)]
    found: dict[str, Preset] = {}
    for directory, builtin in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            preset = parse_preset(path, builtin=builtin)
            if preset.name in found:
                preset = Preset(preset.name, preset.description, preset.allow, preset.path,
                                preset.builtin, shadows=found[preset.name].path)
            found[preset.name] = preset
    return found


def entries(presets: Mapping[str, Preset]) -> dict[str, tuple[AllowEntry, ...]]:
    return {name: p.allow for name, p in presets.items()}


def render(presets: Mapping[str, Preset]) -> str:
    lines = []
    for name in sorted(presets):
        p = presets[name]
        origin = "built-in" if p.builtin else p.path
        note = f"; shadows {p.shadows}" if p.shadows else ""
        lines.append(f"{name}: {p.description} [{origin}{note}]")
        lines.append("    " + ", ".join(str(e) for e in p.allow))
    return "\n".join(lines)
