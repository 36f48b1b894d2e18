"""Network modes and their resolution: the only module that knows the precedence rules.

Pure: plain values in, a :class:`NetworkPlan` and warnings out. No Podman, no IPython.

Layers, highest first: the cell's flags, the session's remembered choice, the kernel's choice
(``%config MinoMagics.network``/``network_preset``, or "remember for this kernel" in the
first-run picker), the project ``.mino.toml``, the global config, the default (bridge). The highest layer that says anything
about the network decides it completely; lower layers are not mixed in. Within one layer:

* a preset and allow entries combine (union) into allowlist mode;
* ``bridge`` with allow entries (no preset): bridge, and those entries are the local services
  (this machine's, its networks') that stay reachable, e.g. ``host.containers.internal:8888``;
* ``host`` together with a preset or allow entries: the allowlist wins, with a warning;
* ``none`` together with a preset or allow entries: an error naming both;
* ``allowlist`` without any preset or allow entry: an error.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from .errors import UsageError

MODES = ("bridge", "host", "none", "allowlist")
DEFAULT_MODE = "bridge"

MODE_MEANINGS = {
    "bridge": "the internet through Podman's bridge; not this machine's services or its local networks",
    "host": "the host's own network: everything this machine reaches, its local services included",
    "none": "no network at all (loopback only)",
    "allowlist": "only the listed host:port destinations (TCP); everything else is refused",
}

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
ENTRY_RULE = ("expected HOST:PORT with a hostname (letters, digits, hyphens, dots), an IPv4 address or "
              "[IPv6] in brackets, and a port 1-65535, e.g. pypi.org:443 or [2001:db8::1]:443")


@dataclass(frozen=True, order=True)
class AllowEntry:
    host: str  # lower-case hostname, or an IP literal (IPv6 without brackets)
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return True
        except ValueError:
            return False

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def valid_hostname(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return False
    return not labels[-1].isdigit()  # "1.2.3.999" is a bad address, not a name


def parse_allow_entry(text: str, *, where: str = "") -> AllowEntry:
    """Parse one ``HOST:PORT`` entry; errors quote it and state the rule."""
    raw = text
    text = text.strip()

    def bad(reason: str) -> UsageError:
        place = f" in {where}" if where else ""
        return UsageError(f'invalid allow entry "{raw}"{place}: {reason}', ENTRY_RULE)

    if not text:
        raise bad("it is empty")
    if any(c.isspace() for c in text):
        raise bad("it contains whitespace")
    if "*" in text:
        raise bad("wildcards are not supported; list each host")
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise bad("missing ']' after the IPv6 address")
        host, rest = text[1:close], text[close + 1:]
        if not rest.startswith(":"):
            raise bad("missing :PORT after the IPv6 address")
        port_text = rest[1:]
        try:
            addr = ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f'"{host}" is not an IPv6 address') from None
        host = str(addr)
    else:
        if text.count(":") > 1:
            raise bad("IPv6 addresses go in brackets, e.g. [2001:db8::1]:443")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise bad("missing :PORT")
        if not host:
            raise bad("missing HOST before the port")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise bad(f'"{host}" is not an IPv4 address') from None
        elif not valid_hostname(host):
            raise bad(f'"{host}" is not a valid hostname')
        else:
            host = host.lower().rstrip(".")
    if not port_text.isascii() or not port_text.isdigit():
        raise bad(f'port "{port_text}" is not a number' if port_text else "missing PORT after ':'")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise bad(f"port {port} is out of range 1-65535")
    return AllowEntry(host, port)


def parse_allow_list(items: Iterable[str], *, where: str = "") -> tuple[AllowEntry, ...]:
    """Entries from flags (comma-separated allowed) or config lists, in order, deduplicated."""
    seen: dict[AllowEntry, None] = {}
    for item in items:
        for part in item.split(","):
            if part.strip() == "" and "," in item:
                continue  # tolerate "a:1, b:2," trailing commas
            seen.setdefault(parse_allow_entry(part, where=where), None)
    return tuple(seen)


# --------------------------------------------------------------------------- resolution

@dataclass(frozen=True)
class NetworkChoice:
    """What one layer says about the network. All None = this layer is silent."""

    source: str  # "cell flags", "session 'x'", "project /p/.mino.toml", "global /g/config.toml"
    network: str | None = None
    preset: str | None = None
    allow: tuple[str, ...] | None = None

    @property
    def silent(self) -> bool:
        return self.network is None and self.preset is None and not self.allow


@dataclass(frozen=True)
class NetworkResolutionInput:
    flags: NetworkChoice = NetworkChoice("cell flags")
    session: NetworkChoice | None = None
    kernel: NetworkChoice | None = None
    project: NetworkChoice | None = None
    global_: NetworkChoice | None = None

    def layers(self) -> list[NetworkChoice]:
        return [c for c in (self.flags, self.session, self.kernel, self.project, self.global_) if c is not None]


@dataclass(frozen=True)
class NetworkPlan:
    mode: str  # bridge | host | none | allowlist
    preset: str | None = None
    allow: tuple[AllowEntry, ...] = ()  # the union of the preset's and the extra entries
    extra: tuple[AllowEntry, ...] = ()  # the extra entries alone (for display)
    source: str = field(default="default", compare=False)  # where it was decided, not what

    def describe(self) -> str:
        if self.mode == "bridge" and self.allow:
            return "bridge (+" + ",".join(map(str, self.allow)) + ")"
        if self.mode != "allowlist":
            return self.mode
        parts = []
        if self.preset:
            parts.append(self.preset)
        if self.extra:
            parts.append(f"+{len(self.extra)}" if self.preset else ",".join(map(str, self.extra)))
        return "allowlist (" + " ".join(parts) + ")"

    def as_choice(self, source: str) -> NetworkChoice:
        """The plan as a layer, to remember it for a session."""
        return NetworkChoice(source, self.mode, self.preset, tuple(str(e) for e in self.extra) or None)


@dataclass(frozen=True)
class Resolution:
    plan: NetworkPlan
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _flag_names(choice: NetworkChoice) -> tuple[str, str, str]:
    if choice.source == "cell flags":
        return "--network", "--network-preset", "--network-allow"
    return "network", "network_preset", "network_allow"


def resolve(inp: NetworkResolutionInput, presets: Mapping[str, Sequence[AllowEntry]]) -> Resolution:
    """Decide the network plan. `presets` maps preset names to their entries."""
    for choice in inp.layers():
        if not choice.silent:
            return _resolve_layer(choice, presets)
    return Resolution(NetworkPlan(DEFAULT_MODE, source="default"))


def _resolve_layer(choice: NetworkChoice, presets: Mapping[str, Sequence[AllowEntry]]) -> Resolution:
    net_flag, preset_flag, allow_flag = _flag_names(choice)
    where = choice.source
    mode = choice.network
    if mode is not None and mode not in MODES:
        raise UsageError(f'unknown network mode "{mode}" ({where})',
                         f"valid modes: {', '.join(MODES)}")
    extra = parse_allow_list(choice.allow or (), where=where)
    entries: tuple[AllowEntry, ...] = ()
    if choice.preset is not None:
        if choice.preset not in presets:
            available = ", ".join(sorted(presets)) or "none"
            raise UsageError(f'unknown network preset "{choice.preset}" ({where})',
                             f"available presets: {available} (`%mino presets` lists them)")
        entries = tuple(presets[choice.preset])
    restricted = choice.preset is not None or bool(extra)
    warnings: list[str] = []
    if mode == "none" and restricted:
        other = f"{preset_flag} {choice.preset}" if choice.preset else f"{allow_flag}"
        raise UsageError(f"{net_flag} none conflicts with {other} ({where}): no network cannot allow destinations",
                         f"drop {net_flag} none to use the allowlist, or drop {other} for no network")
    if mode == "host" and restricted:
        by = f"{preset_flag} {choice.preset}" if choice.preset else allow_flag
        suffix = "" if choice.source == "cell flags" else f" ({where})"
        warnings.append(f"{net_flag} host overridden by {by}{suffix}")
    if mode == "allowlist" and not restricted:
        raise UsageError(f"{net_flag} allowlist needs {preset_flag} or {allow_flag} ({where})",
                         f"e.g. {preset_flag} registries, or {allow_flag} pypi.org:443")
    if mode == "bridge" and choice.preset is None and extra:
        return Resolution(NetworkPlan("bridge", None, extra, extra, where), tuple(warnings))
    if restricted:
        union = tuple(dict.fromkeys(entries + extra))
        return Resolution(NetworkPlan("allowlist", choice.preset, union, extra, where), tuple(warnings))
    return Resolution(NetworkPlan(mode or DEFAULT_MODE, source=where), tuple(warnings))
