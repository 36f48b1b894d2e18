"""The allowlist firewall: name resolution on the host, the nftables ruleset, its verification
and the refused-connection report. Pure except for :func:`system_resolver`.

The rules live in the session container's network namespace and are installed from the firewall
container (NET_ADMIN only); the cell's processes hold no capability and cannot change them.

Policy, IPv4 and IPv6 alike (one ``inet`` table): egress is denied by default; loopback,
established/related traffic, IPv6 neighbour discovery and TCP to each allowed address:port are
accepted; everything else is *rejected* (TCP reset, ICMP admin-prohibited) so a blocked attempt
fails at once. Refused TCP/UDP destinations are remembered in sets and counted, so mino can say
after a cell what was refused.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .network import AllowEntry

TABLE = "mino"
RESOLVE_TIMEOUT = 5.0

Resolver = Callable[[str], list[str]]  # hostname -> IP address strings (may be empty)


@dataclass(frozen=True)
class Resolved:
    """The allowlist turned into addresses, as the container will see it."""

    v4: frozenset[tuple[str, int]] = frozenset()
    v6: frozenset[tuple[str, int]] = frozenset()
    hosts: tuple[tuple[str, str], ...] = ()  # (name, address) lines for /etc/hosts
    unresolved: tuple[str, ...] = ()

    def names_for(self, address: str) -> list[str]:
        return sorted({name for name, addr in self.hosts if addr == address})


def system_resolver(name: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(info[4][0] for info in infos))


def resolve_entries(entries: Sequence[AllowEntry], resolver: Resolver = system_resolver,
                    timeout: float = RESOLVE_TIMEOUT) -> Resolved:
    """Resolve every allowed name on the host, in parallel, with an overall deadline."""
    names = sorted({e.host for e in entries if not e.is_ip})
    answers: dict[str, list[str]] = {}
    if names:
        pool = ThreadPoolExecutor(max_workers=min(16, len(names)))
        futures = {pool.submit(resolver, n): n for n in names}
        done, _ = wait(futures, timeout=timeout)
        for future, name in futures.items():
            answers[name] = future.result() if future in done and future.exception() is None else []
        pool.shutdown(wait=False, cancel_futures=True)
    v4, v6, hosts = set(), set(), []
    for entry in entries:
        addresses = [entry.host] if entry.is_ip else answers.get(entry.host, [])
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            (v4 if ip.version == 4 else v6).add((str(ip), entry.port))
            if not entry.is_ip and (entry.host, str(ip)) not in hosts:
                hosts.append((entry.host, str(ip)))
    unresolved = tuple(n for n in names if not answers.get(n))
    return Resolved(frozenset(v4), frozenset(v6), tuple(hosts), unresolved)


def keep_last_answers(resolved: Resolved, previous: Resolved | None,
                      entries: Sequence[AllowEntry]) -> Resolved:
    """A name that stopped resolving keeps its last answers rather than breaking the session
    (a resolver hiccup must not cut a working allowlist); names that still resolve take their
    new answers."""
    if previous is None or not resolved.unresolved:
        return resolved
    keep = [(n, a) for n, a in previous.hosts if n in resolved.unresolved]
    if not keep:
        return resolved
    kept = {(a, e.port) for n, a in keep for e in entries if e.host == n}
    return Resolved(
        resolved.v4 | {p for p in kept if ":" not in p[0]},
        resolved.v6 | {p for p in kept if ":" in p[0]},
        resolved.hosts + tuple(keep),
        tuple(n for n in resolved.unresolved if n not in {k[0] for k in keep}))


def same_answers(a: Resolved | None, b: Resolved | None) -> bool:
    return a is not None and b is not None and (a.v4, a.v6, set(a.hosts)) == (b.v4, b.v6, set(b.hosts))


def _elements(pairs: Iterable[tuple[str, int]]) -> str:
    items = sorted(pairs, key=lambda p: (ipaddress.ip_address(p[0]), p[1]))
    if not items:
        return ""
    return " elements = { " + ", ".join(f"{addr} . {port}" for addr, port in items) + " };"


def ruleset(resolved: Resolved) -> str:
    """The complete nftables ruleset; replacing it is one atomic transaction."""
    return f"""table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  comment "mino allowlist: egress denied except the listed destinations"
  counter refused_tcp {{ }}
  counter refused_udp {{ }}
  set allow4 {{ type ipv4_addr . inet_service;{_elements(resolved.v4)} }}
  set allow6 {{ type ipv6_addr . inet_service;{_elements(resolved.v6)} }}
  set refused4 {{ type ipv4_addr . inet_proto . inet_service; flags dynamic; size 4096; }}
  set refused6 {{ type ipv6_addr . inet_proto . inet_service; flags dynamic; size 4096; }}
  chain output {{
    type filter hook output priority 0; policy drop;
    oifname "lo" accept
    ct state established,related accept
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, mld-listener-report, mld2-listener-report }} accept
    meta l4proto tcp ip daddr . tcp dport @allow4 accept
    meta l4proto tcp ip6 daddr . tcp dport @allow6 accept
    meta nfproto ipv4 meta l4proto {{ tcp, udp }} add @refused4 {{ ip daddr . meta l4proto . th dport }}
    meta nfproto ipv6 meta l4proto {{ tcp, udp }} add @refused6 {{ ip6 daddr . meta l4proto . th dport }}
    meta l4proto tcp counter name "refused_tcp" reject with tcp reset
    meta l4proto udp counter name "refused_udp" reject with icmpx type admin-prohibited
    reject with icmpx type admin-prohibited
  }}
}}
"""


READ_REFUSED = (f"nft -j reset counters table inet {TABLE}; nft -j list set inet {TABLE} refused4; "
                f"nft -j list set inet {TABLE} refused6; nft flush set inet {TABLE} refused4; "
                f"nft flush set inet {TABLE} refused6")

# The firewall container's main process: it serves requests on its stdin, which only mino can
# reach (through the engine's attach), so installing rules and reading what was refused take
# one round trip instead of a new process each time. Requests: "install N\n" + N bytes of
# ruleset, or "report\n". Every answer ends with a line "@@mino-end RC".
END = b"@@mino-end"
AGENT = (
    "while IFS=' ' read -r cmd n; do\n"
    "  case \"$cmd\" in\n"
    "    install) head -c \"$n\" > /tmp/rules\n"
    "      if nft -f /tmp/rules 2>/tmp/err; then nft -j list table inet " + TABLE + "; echo '@@mino-end 0';\n"
    "      else cat /tmp/err; echo '@@mino-end 1'; fi ;;\n"
    "    report) " + READ_REFUSED.replace("; ", " 2>/dev/null; ") + " 2>/dev/null; echo '@@mino-end 0' ;;\n"
    "    *) echo '@@mino-end 2' ;;\n"
    "  esac\n"
    "done\n"
)


def install_request(text: str) -> bytes:
    data = text.encode()
    return f"install {len(data)}\n".encode() + data


REPORT_REQUEST = b"report\n"


def split_answer(out: bytes) -> tuple[int, str]:
    """(return code, text before the end line) of an agent answer."""
    body, _, tail = out.rpartition(END)
    code = int(tail.split()[0]) if tail.split() else 1
    return code, body.decode(errors="replace")


def _objects(text: str) -> list[dict]:
    """nft -j prints one JSON document per command; collect their objects."""
    objects, decoder, index = [], json.JSONDecoder(), 0
    text = text.strip()
    while index < len(text):
        document, end = decoder.raw_decode(text, index)
        objects.extend(document.get("nftables", []))
        index = end
        while index < len(text) and text[index].isspace():
            index += 1
    return objects


def _pairs(elements: list) -> set[tuple[str, int]]:
    found = set()
    for element in elements or []:
        value = element.get("elem", {}).get("val", element) if isinstance(element, dict) and "elem" in element else element
        concat = value.get("concat") if isinstance(value, dict) else None
        if concat and len(concat) == 2:
            found.add((str(ipaddress.ip_address(concat[0])), int(concat[1])))
    return found


def verify(listing: str, resolved: Resolved) -> list[str]:
    """Problems with an installed ruleset (empty = it is what we asked for)."""
    try:
        objects = _objects(listing)
    except ValueError as exc:
        return [f"unreadable nft listing: {exc}"]
    problems = []
    chains = [o["chain"] for o in objects if "chain" in o and o["chain"].get("table") == TABLE]
    output = [c for c in chains if c.get("name") == "output"]
    if not output:
        problems.append("no output chain")
    elif output[0].get("hook") != "output" or output[0].get("policy") != "drop" or output[0].get("family") != "inet":
        problems.append(f"output chain is not an inet output hook with policy drop: {output[0]}")
    sets = {o["set"]["name"]: o["set"] for o in objects if "set" in o and o["set"].get("table") == TABLE}
    for name, expected in (("allow4", resolved.v4), ("allow6", resolved.v6)):
        if name not in sets:
            problems.append(f"set {name} missing")
        elif _pairs(sets[name].get("elem", [])) != set(expected):
            problems.append(f"set {name} holds {sorted(_pairs(sets[name].get('elem', [])))}, not {sorted(expected)}")
    rules = [o["rule"] for o in objects if "rule" in o and o["rule"].get("chain") == "output"]
    if not rules or "reject" not in json.dumps(rules[-1]):
        problems.append("the output chain does not end in a reject rule")
    return problems


@dataclass(frozen=True)
class Refused:
    count: int = 0
    destinations: tuple[tuple[str, str, int], ...] = field(default_factory=tuple)  # (addr, proto, port)


def parse_refused(text: str) -> Refused:
    count, destinations = 0, []
    for obj in _objects(text):
        if "counter" in obj and obj["counter"].get("name") in ("refused_tcp", "refused_udp"):
            count += int(obj["counter"].get("packets", 0))
        if "set" in obj and obj["set"].get("name") in ("refused4", "refused6"):
            for element in obj["set"].get("elem", []) or []:
                value = element.get("elem", {}).get("val") if "elem" in element else element
                concat = value.get("concat") if isinstance(value, dict) else None
                if concat and len(concat) == 3:
                    destinations.append((str(concat[0]), str(concat[1]), int(concat[2])))
    return Refused(count, tuple(sorted(set(destinations))))


def describe_refused(refused: Refused, resolved: Resolved, limit: int = 5) -> str | None:
    """One line for the user, or None when nothing was refused."""
    if not refused.destinations and not refused.count:
        return None
    parts = []
    for addr, proto, port in refused.destinations[:limit]:
        shown = f"[{addr}]" if ":" in addr else addr
        names = resolved.names_for(addr)
        label = f"{names[0]} ({shown})" if names else shown
        parts.append(f"{label}:{port}/{proto}")
    more = len(refused.destinations) - limit
    if more > 0:
        parts.append(f"and {more} more")
    count = max(refused.count, len(refused.destinations))
    return (f"mino: the allowlist refused {count} connection attempt(s) to "
            + ", ".join(parts) + " (not allowed; add them with --network-allow HOST:PORT)")


HOSTS_MARK = "# mino allowlist"


def rewrite_hosts(current: str, names: set[str], hosts: Sequence[tuple[str, str]]) -> str:
    """/etc/hosts with the allowlisted names' lines replaced by `hosts` (other lines kept)."""
    kept = []
    for line in current.splitlines():
        fields = line.split("#", 1)[0].split()
        if line.rstrip().endswith(HOSTS_MARK) or (len(fields) > 1 and set(fields[1:]) & names):
            continue
        kept.append(line)
    kept += [f"{addr}\t{name}\t{HOSTS_MARK}" for name, addr in hosts]
    return "\n".join(kept) + "\n"
