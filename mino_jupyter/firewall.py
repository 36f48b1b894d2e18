"""A session's firewall: name resolution on the host, the nftables ruleset, its verification
and the refused-connection report. Pure except for :func:`system_resolver`.

The rules live in the session container's network namespace and are installed from the firewall
container (NET_ADMIN only); the cell's processes hold no capability and cannot change them.

Two rulesets, IPv4 and IPv6 alike (one ``inet`` table):

* **bridge**: the internet, but not this machine or the networks next to it. New connections to
  every address of this machine (the bridge gateway included, except the name servers' port 53),
  to the container networks (other sessions, other kernels), to link-local ranges (a cloud's
  metadata service), multicast, and to the private subnets this machine is attached to are
  *rejected*, unless an allow entry names that address and port.
* **allowlist**: egress denied by default; loopback, IPv6 neighbour discovery and TCP to each
  allowed address:port are accepted, new or established: a destination taken off the list
  stops at its next packet, flows already open included.

Both: no new inbound connection or datagram from outside the session's own loopback (replies to
what the session opened itself pass). Refusals are rejections (TCP reset, ICMP
admin-prohibited) so a blocked attempt fails at once; refused TCP/UDP destinations are remembered
in sets and counted, and names an allowlist session looked up are remembered by the firewall
container's loopback name server, so mino can say after a cell what was refused.
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


# ---------------------------------------------------------------------------- local networks

@dataclass(frozen=True)
class LocalNetworks:
    """What "this machine and the networks next to it" is, for a session's firewall: refused to
    bridge sessions unless an allow entry names the address and port."""

    v4: tuple[str, ...] = ()  # CIDRs, collapsed (nft interval sets refuse overlaps)
    v6: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()  # the session's name servers: port 53 stays open to them


ALWAYS_LOCAL = ("169.254.0.0/16", "224.0.0.0/4", "255.255.255.255/32", "0.0.0.0/8", "127.0.0.0/8",
                "fe80::/10", "ff00::/8", "::1/128", "::/128")
PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                                             "192.0.0.0/24", "192.0.2.0/24", "198.18.0.0/15", "198.51.100.0/24",
                                             "203.0.113.0/24", "fc00::/7", "2001:db8::/32")]


def local_networks(host_addresses: Iterable[tuple[str, int]], container_subnets: Iterable[str],
                   dns: Iterable[str] = (), *, engine_elsewhere: bool = False) -> LocalNetworks:
    """Pure. `host_addresses`: (address, prefix length) of every interface of this machine;
    `container_subnets`: the engine's networks. Refused: every address of this machine, every
    container network, link-local and multicast ranges, and the private subnets this machine is
    attached to (its LAN, a cloud VPC); public subnets stay reachable, the machine's own
    address in them excepted. `engine_elsewhere`: the containers run on another machine, whose
    networks mino cannot list: every private range is refused."""
    nets = [ipaddress.ip_network(n) for n in ALWAYS_LOCAL] + (list(PRIVATE) if engine_elsewhere else [])
    for address, prefix in host_addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        nets.append(ipaddress.ip_network(f"{ip}/{ip.max_prefixlen}"))
        subnet = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        if any(subnet.version == p.version and subnet.subnet_of(p) for p in PRIVATE):
            nets.append(subnet)
    for subnet in container_subnets:
        nets.append(ipaddress.ip_network(subnet, strict=False))
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    return LocalNetworks(tuple(str(n) for n in ipaddress.collapse_addresses(v4)),
                         tuple(str(n) for n in ipaddress.collapse_addresses(v6)),
                         tuple(sorted(set(dns), key=lambda a: (ipaddress.ip_address(a).version, a))))


# ---------------------------------------------------------------------------- the ruleset, as data
# Each rule is written twice, side by side: as nft text (what is installed) and as the
# expression nft lists back in JSON (what verification expects). A rule that is installed but
# not expected, or missing, or out of order, fails the session before any cell runs.

def _match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key):
    return {"meta": {"key": key}}


def _field(protocol, name):
    return {"payload": {"protocol": protocol, "field": name}}


def _concat(*parts):
    return {"concat": list(parts)}


def _state(*states):
    return _match({"ct": {"key": "state"}}, list(states) if len(states) > 1 else states[0], op="in")


ACCEPT, DROP = {"accept": None}, {"drop": None}
TCP_UDP = {"set": ["tcp", "udp"]}
ND_OUT = ("nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-solicit", "mld-listener-report",
          "mld2-listener-report")
ND_IN = ("nd-neighbor-solicit", "nd-neighbor-advert", "nd-router-advert", "nd-redirect")


@dataclass(frozen=True)
class Rule:
    text: str
    expr: tuple


def _rule(text: str, *expr) -> Rule:
    return Rule(text, tuple(expr))


OUT_COMMON = (
    _rule('oifname "lo" accept', _match(_meta("oifname"), "lo"), ACCEPT),
    _rule(f"icmpv6 type {{ {', '.join(ND_OUT)} }} accept", _match(_field("icmpv6", "type"), {"set": list(ND_OUT)}), ACCEPT),
)
OUT_DNS = (
    _rule("meta l4proto { tcp, udp } ip daddr @dns4 th dport 53 accept",
          _match(_meta("l4proto"), TCP_UDP), _match(_field("ip", "daddr"), "@dns4"), _match(_field("th", "dport"), 53), ACCEPT),
    _rule("meta l4proto { tcp, udp } ip6 daddr @dns6 th dport 53 accept",
          _match(_meta("l4proto"), TCP_UDP), _match(_field("ip6", "daddr"), "@dns6"), _match(_field("th", "dport"), 53), ACCEPT),
)
# TCP to an allowed address:port, new or established: a flow whose destination is removed from
# the set matches no more, so narrowing the allowlist cuts it at its next packet.
OUT_ALLOWED = (
    _rule("meta l4proto tcp ip daddr . tcp dport @allow4 accept",
          _match(_concat(_field("ip", "daddr"), _field("tcp", "dport")), "@allow4"), ACCEPT),
    _rule("meta l4proto tcp ip6 daddr . tcp dport @allow6 accept",
          _match(_concat(_field("ip6", "daddr"), _field("tcp", "dport")), "@allow6"), ACCEPT),
)
OUT_LOCAL = (
    _rule("ip daddr @local4 jump refuse", _match(_field("ip", "daddr"), "@local4"), {"jump": {"target": "refuse"}}),
    _rule("ip6 daddr @local6 jump refuse", _match(_field("ip6", "daddr"), "@local6"), {"jump": {"target": "refuse"}}),
)
REFUSE = (
    _rule("meta nfproto ipv4 meta l4proto { tcp, udp } add @refused4 { ip daddr . meta l4proto . th dport }",
          _match(_meta("l4proto"), TCP_UDP),
          {"set": {"op": "add", "elem": _concat(_field("ip", "daddr"), _meta("l4proto"), _field("th", "dport")), "set": "@refused4"}}),
    _rule("meta nfproto ipv6 meta l4proto { tcp, udp } add @refused6 { ip6 daddr . meta l4proto . th dport }",
          _match(_meta("l4proto"), TCP_UDP),
          {"set": {"op": "add", "elem": _concat(_field("ip6", "daddr"), _meta("l4proto"), _field("th", "dport")), "set": "@refused6"}}),
    _rule('meta l4proto tcp counter name "refused_tcp" reject with tcp reset',
          _match(_meta("l4proto"), "tcp"), {"counter": "refused_tcp"}, {"reject": {"type": "tcp reset"}}),
    _rule('meta l4proto udp counter name "refused_udp" reject with icmpx type admin-prohibited',
          _match(_meta("l4proto"), "udp"), {"counter": "refused_udp"}, {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
    _rule("reject with icmpx type admin-prohibited", {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}),
)
IN_COMMON = (
    _rule('iifname "lo" accept', _match(_meta("iifname"), "lo"), ACCEPT),
    _rule(f"icmpv6 type {{ {', '.join(ND_IN)} }} accept", _match(_field("icmpv6", "type"), {"set": list(ND_IN)}), ACCEPT),
)
IN_REPLIES = (  # bridge: replies to what the session opened itself
    _rule("ct state established,related accept", _state("established", "related"), ACCEPT),
)
IN_ALLOWED = (  # allowlist: replies from allowed destinations only, and errors about them
    _rule("meta l4proto tcp ip saddr . tcp sport @allow4 ct state established accept",
          _match(_concat(_field("ip", "saddr"), _field("tcp", "sport")), "@allow4"), _state("established"), ACCEPT),
    _rule("meta l4proto tcp ip6 saddr . tcp sport @allow6 ct state established accept",
          _match(_concat(_field("ip6", "saddr"), _field("tcp", "sport")), "@allow6"), _state("established"), ACCEPT),
    _rule("meta l4proto { icmp, ipv6-icmp } ct state related accept",
          _match(_meta("l4proto"), {"set": ["icmp", "ipv6-icmp"]}), _state("related"), ACCEPT),
)
IN_END = (_rule('counter name "refused_in" drop', {"counter": "refused_in"}, DROP),)


@dataclass(frozen=True)
class Chain:
    name: str
    hook: str | None  # None: a regular chain (jumped to)
    policy: str | None
    rules: tuple[Rule, ...]


def chains(mode: str) -> tuple[Chain, ...]:
    """The chains of a session's table: "bridge" (the internet, but not this machine or its
    networks) or "allowlist" (only the allowed destinations). Both accept no new inbound
    connection or datagram from outside the session's own loopback."""
    if mode == "bridge":
        return (Chain("output", "output", "accept", OUT_COMMON + OUT_DNS + OUT_ALLOWED + OUT_LOCAL),
                Chain("refuse", None, None, REFUSE),
                Chain("input", "input", "drop", IN_COMMON + IN_REPLIES + IN_END))
    if mode == "allowlist":
        return (Chain("output", "output", "drop", OUT_COMMON + OUT_ALLOWED + (
                    _rule("jump refuse", {"jump": {"target": "refuse"}}),)),
                Chain("refuse", None, None, REFUSE),
                Chain("input", "input", "drop", IN_COMMON + IN_ALLOWED + IN_END))
    raise ValueError(f"firewall mode must be bridge or allowlist, not {mode!r}")


def _pair_elements(pairs: Iterable[tuple[str, int]]) -> str:
    items = sorted(pairs, key=lambda p: (ipaddress.ip_address(p[0]), p[1]))
    return " elements = { " + ", ".join(f"{addr} . {port}" for addr, port in items) + " };" if items else ""


def _elements(values: Iterable[str]) -> str:
    items = list(values)
    return " elements = { " + ", ".join(items) + " };" if items else ""


def ruleset(resolved: Resolved, mode: str = "allowlist", local: LocalNetworks | None = None) -> str:
    """The complete nftables ruleset; replacing it is one atomic transaction."""
    local = local or LocalNetworks()
    dns4 = [a for a in local.dns if ":" not in a]
    dns6 = [a for a in local.dns if ":" in a]
    body = []
    for chain in chains(mode):
        head = f"    type filter hook {chain.hook} priority 0; policy {chain.policy};\n" if chain.hook else ""
        rules = "".join(f"    {r.text}\n" for r in chain.rules)
        body.append(f"  chain {chain.name} {{\n{head}{rules}  }}\n")
    what = ("the internet, but not this machine or its networks" if mode == "bridge"
            else "egress denied except the listed destinations")
    return f"""table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  comment "mino {mode}: {what}; no inbound"
  counter refused_tcp {{ }}
  counter refused_udp {{ }}
  counter refused_in {{ }}
  set allow4 {{ type ipv4_addr . inet_service;{_pair_elements(resolved.v4)} }}
  set allow6 {{ type ipv6_addr . inet_service;{_pair_elements(resolved.v6)} }}
  set local4 {{ type ipv4_addr; flags interval;{_elements(local.v4)} }}
  set local6 {{ type ipv6_addr; flags interval;{_elements(local.v6)} }}
  set dns4 {{ type ipv4_addr;{_elements(dns4)} }}
  set dns6 {{ type ipv6_addr;{_elements(dns6)} }}
  set refused4 {{ type ipv4_addr . inet_proto . inet_service; flags dynamic; size 4096; }}
  set refused6 {{ type ipv6_addr . inet_proto . inet_service; flags dynamic; size 4096; }}
{"".join(body)}}}
"""


# ---------------------------------------------------------------------------- the agent
# The firewall container's main process (perl: the image's perl-base, no extra package). It
# serves requests on its stdin, which only mino reaches (through the engine's attach):
# "install N\n" + N bytes of ruleset, or "report\n"; every answer ends with "@@mino-end RC".
# With the argument "dns" it also answers name queries on 127.0.0.1:53 of the session's
# network namespace (allowlist sessions, whose resolver is loopback): always "no such name",
# remembering the names asked, so mino can say which name a cell wanted that is not allowed.
# Programs by absolute path; nothing here runs cell code or reads what a cell wrote.
END = b"@@mino-end"
NFT = "/usr/sbin/nft"
AGENT = r"""
use strict; use warnings; use IO::Socket::INET; use IO::Select;
my $NFT = '/usr/sbin/nft';
$| = 1; binmode STDIN; binmode STDOUT; $SIG{PIPE} = 'IGNORE';
my ($dns, $lease);
for (@ARGV) { $lease = $1 if /\Alease=(\d+)\z/; }
if (grep { $_ eq 'dns' } @ARGV) {
  $dns = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 53, Proto => 'udp')
    or die "mino firewall: cannot answer names on 127.0.0.1:53: $!\n";
}
my (%asked, @order);
sub run { my $pid = open(my $fh, '-|') // return (127, "fork: $!");
  if (!$pid) { open(STDERR, '>&', \*STDOUT); exec { $_[0] } @_; exit 127 }
  local $/; my $out = <$fh> // ''; close $fh; return ($? >> 8, $out); }
sub quiet { my ($rc, $out) = run(@_); return $rc == 0 ? $out : ''; }
sub answer {
  my $from = $dns->recv(my $q, 512, 0);
  return unless defined $from && length($q) >= 12;
  my ($id, $flags) = unpack('n n', $q);
  return if $flags & 0x8000;
  my ($pos, @labels) = (12);
  while ($pos < length $q) { my $len = ord(substr($q, $pos++, 1)); last if $len == 0;
    return if $len > 63 || $pos + $len > length $q; push @labels, substr($q, $pos, $len); $pos += $len; }
  return if $pos + 4 > length $q;
  my $name = lc join('.', @labels);
  if (@order < 64 && $name =~ /\A[a-z0-9_.-]{1,253}\z/ && !$asked{$name}++) { push @order, $name; }
  $dns->send(pack('n n n n n n', $id, 0x8000 | ($flags & 0x7900) | 3, 1, 0, 0, 0)
             . substr($q, 12, $pos + 4 - 12), 0, $from);
}
my $in = '';
sub serve {
  while ((my $nl = index($in, "\n")) >= 0) {
    my ($cmd, $n) = split / /, substr($in, 0, $nl);
    if ($cmd eq 'install') {
      return if length($in) < $nl + 1 + $n;
      my $rules = substr($in, $nl + 1, $n); $in = substr($in, $nl + 1 + $n);
      open(my $f, '>', '/tmp/rules') or die "mino firewall: /tmp/rules: $!\n"; print $f $rules; close $f;
      my ($rc, $err) = run($NFT, '-f', '/tmp/rules');
      if ($rc == 0) { print((run($NFT, '-j', 'list', 'table', 'inet', 'mino'))[1]); print "\@\@mino-end 0\n"; }
      else { print $err; print "\@\@mino-end 1\n"; }
    } elsif ($cmd eq 'report') {
      $in = substr($in, $nl + 1);
      my $counters = quiet($NFT, '-j', 'reset', 'counters', 'table', 'inet', 'mino');
      print $counters;
      if ($counters =~ /"packets":\s*[1-9]/) {  # the sets fill only where these count
        for my $set ('refused4', 'refused6') {
          print quiet($NFT, '-j', 'list', 'set', 'inet', 'mino', $set);
          run($NFT, 'flush', 'set', 'inet', 'mino', $set);
        }
      }
      print '{"asked": [' . join(',', map { "\"$_\"" } @order) . "]}\n"; %asked = (); @order = ();
      print "\@\@mino-end 0\n";
    } elsif ($cmd eq 'asked') {  # the names only: this machine read the counters itself
      $in = substr($in, $nl + 1);
      print '{"asked": [' . join(',', map { "\"$_\"" } @order) . "]}\n"; %asked = (); @order = ();
      print "\@\@mino-end 0\n";
    } else { $in = substr($in, $nl + 1); print "\@\@mino-end 2\n"; }
  }
}
my $sel = IO::Select->new(\*STDIN); $sel->add($dns) if $dns;
my ($last, $renewed) = ('', time);
sub leased {  # an engine elsewhere: no renewal of the lease for $lease seconds ends the firewall too
  return 1 unless $lease;
  if (open(my $f, '<', '/run/mino-lease/seq')) { my $seq = <$f> // ''; close $f;
    if ($seq ne '' && $seq ne $last) { ($last, $renewed) = ($seq, time); } }
  return time - $renewed < $lease;
}
while (1) {
  exit 0 unless leased();
  for my $fh ($sel->can_read($lease ? 2 : undef)) {
    if ($dns && $fh == $dns) { answer(); next; }
    my $got = sysread(STDIN, my $chunk, 65536);
    exit 0 unless $got;
    $in .= $chunk; serve();
  }
}
"""


def agent_command(mode: str, lease: int | None = None) -> tuple[str, ...]:
    return ("/usr/bin/perl", "-e", AGENT) + (("dns",) if mode == "allowlist" else ()) + \
        ((f"lease={int(lease)}",) if lease else ())


def install_request(text: str) -> bytes:
    data = text.encode()
    return f"install {len(data)}\n".encode() + data


REPORT_REQUEST = b"report\n"
ASKED_REQUEST = b"asked\n"  # the names the cell asked for, without the counters (read from this machine)


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
        objects.extend(document.get("nftables", [document]))
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


def _networks(elements: list) -> set:
    """An interval set's elements as networks (nft lists /32s as plain addresses)."""
    nets = []
    for element in elements or []:
        if isinstance(element, dict) and "prefix" in element:
            nets.append(ipaddress.ip_network(f"{element['prefix']['addr']}/{element['prefix']['len']}"))
        elif isinstance(element, dict) and "range" in element:
            low, high = (ipaddress.ip_address(a) for a in element["range"])
            nets.extend(ipaddress.summarize_address_range(low, high))
        elif isinstance(element, str):
            nets.append(ipaddress.ip_network(element))
    return set(ipaddress.collapse_addresses(nets)) if nets else set()


def _canonical(value):
    """nft lists set literals in its own order: compare them sorted."""
    if isinstance(value, dict):
        return {k: (sorted(map(json.dumps, v)) if k == "set" and isinstance(v, list) else _canonical(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def verify(listing: str, resolved: Resolved, mode: str = "allowlist", local: LocalNetworks | None = None) -> list[str]:
    """Problems with an installed table (empty = it is exactly what we asked for): every chain,
    hook and policy, every rule in order, and the content of every set."""
    local = local or LocalNetworks()
    try:
        objects = _objects(listing)
    except ValueError as exc:
        return [f"unreadable nft listing: {exc}"]
    problems = []
    found = {o["chain"]["name"]: o["chain"] for o in objects if "chain" in o and o["chain"].get("table") == TABLE}
    rules: dict[str, list] = {}
    for o in objects:
        if "rule" in o and o["rule"].get("table") == TABLE:
            rules.setdefault(o["rule"].get("chain"), []).append(_canonical(o["rule"].get("expr")))
    expected = chains(mode)
    if set(found) != {c.name for c in expected}:
        problems.append(f"chains {sorted(found)}, not {sorted(c.name for c in expected)}")
    for chain in expected:
        got = found.get(chain.name)
        if got is None:
            continue
        if (got.get("hook"), got.get("policy"), got.get("family")) != (chain.hook, chain.policy, "inet"):
            problems.append(f"chain {chain.name} is hook {got.get('hook')} policy {got.get('policy')}, "
                            f"not {chain.hook} {chain.policy}")
        want = [_canonical(list(r.expr)) for r in chain.rules]
        have = rules.get(chain.name, [])
        if have != want:
            extra = len(have) - len(want)
            where = next((i for i, (h, w) in enumerate(zip(have, want)) if h != w), min(len(have), len(want)))
            problems.append(f"chain {chain.name}: rule {where + 1} differs from what mino installs"
                            + (f" ({extra:+d} rules)" if extra else ""))
    sets = {o["set"]["name"]: o["set"] for o in objects if "set" in o and o["set"].get("table") == TABLE}
    for name, expected_pairs in (("allow4", resolved.v4), ("allow6", resolved.v6)):
        if name not in sets:
            problems.append(f"set {name} missing")
        elif _pairs(sets[name].get("elem", [])) != set(expected_pairs):
            problems.append(f"set {name} holds {sorted(_pairs(sets[name].get('elem', [])))}, not {sorted(expected_pairs)}")
    for name, nets in (("local4", local.v4), ("local6", local.v6)):
        want = set(ipaddress.collapse_addresses(ipaddress.ip_network(n) for n in nets)) if nets else set()
        if name not in sets:
            problems.append(f"set {name} missing")
        elif _networks(sets[name].get("elem", [])) != want:
            problems.append(f"set {name} holds other networks than this machine's")
    for name, version in (("dns4", 4), ("dns6", 6)):
        want = {a for a in local.dns if ipaddress.ip_address(a).version == version}
        have = {str(e) for e in (sets.get(name, {}).get("elem") or []) if isinstance(e, str)}
        if name not in sets or have != want:
            problems.append(f"set {name} holds {sorted(have)}, not {sorted(want)}")
    return problems


@dataclass(frozen=True)
class Refused:
    count: int = 0
    destinations: tuple[tuple[str, str, int], ...] = field(default_factory=tuple)  # (addr, proto, port)
    asked: tuple[str, ...] = ()  # names looked up through the loopback name server (allowlist)


def parse_refused(text: str) -> Refused:
    count, destinations, asked = 0, [], []
    for obj in _objects(text):
        if "asked" in obj:
            asked.extend(str(n) for n in obj["asked"])
        if "counter" in obj and obj["counter"].get("name") in ("refused_tcp", "refused_udp"):
            count += int(obj["counter"].get("packets", 0))
        if "set" in obj and obj["set"].get("name") in ("refused4", "refused6"):
            for element in obj["set"].get("elem", []) or []:
                value = element.get("elem", {}).get("val") if "elem" in element else element
                concat = value.get("concat") if isinstance(value, dict) else None
                if concat and len(concat) == 3:
                    destinations.append((str(concat[0]), str(concat[1]), int(concat[2])))
    return Refused(count, tuple(sorted(set(destinations))), tuple(asked))


def describe_refused(refused: Refused, resolved: Resolved, mode: str = "allowlist", limit: int = 5) -> list[str]:
    """Lines for the user (none when nothing was refused)."""
    lines = []
    if refused.destinations or refused.count:
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
        if mode == "bridge":
            lines.append(f"mino: bridge refused {count} connection attempt(s) to this machine or its local networks: "
                         + ", ".join(parts) + " (to reach one: --network bridge --network-allow HOST:PORT)")
        else:
            lines.append(f"mino: the allowlist refused {count} connection attempt(s) to "
                         + ", ".join(parts) + " (not allowed; add them with --network-allow HOST:PORT)")
    unresolved = set(resolved.unresolved)
    for name in [n for n in refused.asked if n not in unresolved][:limit]:
        lines.append(f"mino: {name} is not on this session's allowlist, so it does not resolve here; "
                     f"add --network-allow {name}:443 (or the port it uses)")
    return lines


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
