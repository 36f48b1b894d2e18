"""A session as a Kubernetes Pod: the same policy, written as a manifest. Pure.

``mino-jupyter kube`` prints what this module renders; nothing here (or anywhere in mino) talks to
a cluster. The Pod is *translated* from the dicts :mod:`mino_jupyter.policy` builds for Podman
(:func:`policy.session_request` → :func:`policy.session_spec`, and :func:`policy.firewall_spec`),
key by key (:func:`_container`): every hardening decision is policy's, and a key policy adds that
this module does not know stops the rendering instead of being dropped. Where a Pod cannot say
what the Podman spec says, the nearest equivalent is used and the reason is written next to it.

The Pod:

* **cell** container: the session image as uid 1000 (:data:`policy.CELL_UID`), no capability,
  no privilege escalation, read-only root, emptyDir volumes where policy mounts the session's
  writable places, the session's limits; PID 1 waits for cells (``kubectl exec``), ignoring the
  signals a cell could send it.
* **firewall** init container, first: mino's base image (nft, perl), root with NET_ADMIN and
  nothing else; it installs :func:`firewall.ruleset` in the Pod's network namespace, lists the
  table back and compares it with what :func:`firewall.chains` and the sets say it must hold
  (:data:`VERIFIER`). Any difference, or any nft failure, exits non-zero: the kubelet (and
  ``podman kube play``) never starts the cell.
* **home** init container: the session image as the cell user copies the image's home into the
  home volume (an emptyDir starts empty on a cluster, and mino's ``python`` image keeps its
  virtualenv there).

Network modes: ``allowlist`` installs the allowlist ruleset with the addresses resolved *when the
manifest is rendered* (a snapshot: render again when they change), which ``hostAliases`` carry to
``/etc/hosts``, and the Pod's only name server is its own loopback, where nothing answers: no DNS
query leaves the Pod. ``none`` is the allowlist ruleset with nothing allowed (a Pod always has the
cluster's interface). ``bridge`` is the bridge ruleset with every private, link-local and
multicast range as "this machine's networks" (a cluster's node, Pod and Service networks, the
cloud's metadata service), except port 53 of the cluster DNS addresses given. ``host`` is refused
(:func:`check_plan`).
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import json
import math
import re
import shlex
from dataclasses import dataclass
from typing import Sequence

import yaml

from . import __version__, config, firewall, policy
from .errors import UsageError
from .network import NetworkPlan

POD_PREFIX = "mino-"
# A forgotten Pod does not run forever: on a cluster no kernel watches it, so the deadline does
# what the watchdog does for a Podman session. A working day; --timeout sets another.
DEFAULT_DEADLINE = 8 * 3600
# Kubernetes versions the manifest is checked against (tests/unit/test_kube.py, with the
# offline schemas of `kubernetes-validate`): the oldest and the newest it ships.
CHECKED_KUBERNETES = ("1.29.0", "1.37.0")

_POD_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# The Pod's name and its volumes' (mino-SESSION-workspace, the longest) are DNS labels.
MAX_SESSION_NAME = 63 - len(POD_PREFIX) - len("-workspace")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
HOME_COPY = "/mnt/mino-home"  # where the home init container sees the home volume
NFT = "/usr/sbin/nft"
PERL = "/usr/bin/perl"
CP = "/bin/cp"
# Podman's ulimits come from the engine's hard limits; a Pod has none (NOT_IN_A_POD["r_limits"]).
UNLIMITED = policy.HostLimits(policy.RLIM_INFINITY, policy.RLIM_INFINITY)


def volumes(pod_name: str) -> policy.StorageMounts:
    """The emptyDir volumes policy's writable places become (policy.storage_mounts names their
    targets). Named after the Pod: Podman 4.3's `kube play` keeps an emptyDir as a named volume
    called as the Pod's volume is, so two Pods with the same volume names would share files."""
    return policy.StorageMounts(workspace=f"{pod_name}-workspace", workspace_mode="overlay",
                                home=f"{pod_name}-home", tmp=f"{pod_name}-tmp", var_tmp=f"{pod_name}-var-tmp",
                                control=f"{pod_name}-control")


@dataclass(frozen=True)
class KubeRequest:
    """Everything that varies between session Pods; the rest is policy."""

    session: str  # the Pod is mino-SESSION
    image: str  # the cell's image, a full reference
    firewall_image: str  # mino's base image: nft and perl
    plan: NetworkPlan
    resolved: firewall.Resolved = firewall.Resolved()  # the plan's names, resolved when rendering
    resources: policy.Resources = policy.Resources()
    deadline: int = DEFAULT_DEADLINE  # activeDeadlineSeconds
    cluster_dns: tuple[str, ...] = ()  # bridge: the cluster DNS Service addresses (port 53 stays open)
    resolved_at: str | None = None  # when the names were resolved (shown in an annotation)


# ---------------------------------------------------------------------------- checks

def check_session(name: str) -> str:
    """The Pod's name: ``mino-`` and the session name, a DNS label (lower case, digits, '-')."""
    if not (_POD_NAME.match(name) and len(name) <= MAX_SESSION_NAME):
        raise UsageError(f'session name "{name}" cannot name a Pod',
                         f"use lower-case letters, digits and '-' (up to {MAX_SESSION_NAME} characters), "
                         "starting and ending with a letter or digit, e.g. --session analysis-1")
    return POD_PREFIX + name


def check_plan(plan: NetworkPlan, cluster_dns: Sequence[str]) -> tuple[str, ...]:
    """Refuse what a Pod cannot mean as mino means it; the cluster DNS addresses, checked.

    ``host`` is refused rather than rendered as ``hostNetwork``: on this machine it is the user's
    own network, which they chose to open; in a Pod it is the *node's*: the kubelet's ports,
    every other tenant's traffic, the cloud metadata service with the node's credentials. That is
    a different and far larger grant than the one the user made, and it needs the privileged Pod
    Security level on top.
    """
    if plan.mode == "host":
        raise UsageError("--network host cannot be rendered as a Pod: a Pod's host network is the node's "
                         "(the kubelet, other Pods' traffic, the cloud's metadata service), not this machine's",
                         "use --network bridge --cluster-dns ADDRESS, or an allowlist (--network-preset NAME, "
                         "--network-allow HOST:PORT)")
    addresses = []
    for text in cluster_dns:
        for part in filter(None, (p.strip() for p in text.split(","))):
            try:
                addresses.append(str(ipaddress.ip_address(part)))
            except ValueError:
                raise UsageError(f'--cluster-dns "{part}" is not an IP address',
                                 "the cluster DNS Service's address, e.g. 10.96.0.10") from None
    if plan.mode == "bridge" and not addresses:
        raise UsageError("--network bridge needs --cluster-dns ADDRESS on Kubernetes: bridge refuses every "
                         "private address, the cluster's DNS Service included, except the name servers named",
                         "kubectl -n kube-system get service kube-dns -o jsonpath='{.spec.clusterIP}' gives it; "
                         "or use an allowlist (--network-preset NAME, --network-allow HOST:PORT)")
    if plan.mode != "bridge" and addresses:
        raise UsageError(f"--cluster-dns is for --network bridge, not {plan.mode}",
                         "an allowlist Pod resolves only its allowed names (hostAliases); drop --cluster-dns")
    return tuple(dict.fromkeys(addresses))


def resources(memory: str | None, cpus: str | None, disk: str | None, loaded: config.Loaded) -> policy.Resources:
    """The Pod's limits: the flags, else the configuration files, else policy's defaults. Not this
    machine's size, as a local session's default is: the Pod runs on another machine."""
    default = policy.Resources()

    def pick(flag: str | None, key: str) -> str | None:
        return flag if flag is not None else config.merged(loaded, key)[0]

    memory, cpus, disk = pick(memory, "memory"), pick(cpus, "cpus"), pick(disk, "disk")
    return policy.Resources(memory=config.parse_size(memory, "memory") if memory else default.memory,
                            cpus=config.parse_cpus(cpus) if cpus else default.cpus,
                            disk=config.parse_size(disk, "disk") if disk else default.disk)


def deadline(timeout: float | None) -> int:
    """activeDeadlineSeconds: ``--timeout`` rounded up to whole seconds, else the default."""
    if timeout is None:
        return DEFAULT_DEADLINE
    if not timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {timeout:g}", "e.g. --timeout 3600")
    return math.ceil(timeout)


# ---------------------------------------------------------------------------- the firewall

def cluster_networks(cluster_dns: Sequence[str] = ()) -> firewall.LocalNetworks:
    """What bridge refuses in a Pod: :data:`firewall.ALWAYS_LOCAL` and every private range of
    :data:`firewall.PRIVATE`, whole. Rendering happens away from the cluster, so its node, Pod and
    Service networks cannot be looked up; they are private ranges on every cluster mino knows of.
    A cluster on public addresses needs a NetworkPolicy as well (see the README)."""
    return firewall.local_networks((), [str(n) for n in firewall.PRIVATE], cluster_dns)


def firewall_inputs(req: KubeRequest) -> tuple[str, firewall.Resolved, firewall.LocalNetworks]:
    """(ruleset mode, allowed addresses, local networks) of the Pod's firewall."""
    if req.plan.mode == "bridge":
        return "bridge", req.resolved, cluster_networks(req.cluster_dns)
    if req.plan.mode == "allowlist":
        return "allowlist", req.resolved, firewall.LocalNetworks()
    if req.plan.mode == "none":
        # A Pod always has the cluster's interface: nothing allowed is the nearest to no network.
        return "allowlist", firewall.Resolved(), firewall.LocalNetworks()
    raise ValueError(f"no Pod firewall for network mode {req.plan.mode!r}")


def canonical(value) -> str:
    """One text for a JSON value, as :data:`VERIFIER` writes it for what nft lists: keys sorted,
    set literals (a list under the key ``set``) sorted, no spaces. The same ordering rule as
    :func:`firewall.verify` (nft lists set literals in its own order)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{_canonical_in(k, v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r'[ !#-\[\]-~]*', value):  # printable ASCII but " and \
        raise ValueError(f"{value!r}: the verifier compares strings without quotes, backslashes or non-ASCII only")
    return json.dumps(value)


def _canonical_in(key: str, value) -> str:
    if key == "set" and isinstance(value, (list, tuple)):
        return "[" + ",".join(sorted(canonical(v) for v in value)) + "]"
    return canonical(value)


def _network(text: str) -> str:
    return str(ipaddress.ip_network(text, strict=False))


def expected_listing(resolved: firewall.Resolved, mode: str, local: firewall.LocalNetworks) -> str:
    """What the installed table must hold, one sorted line per chain, rule and set: chains with
    their family, hook and policy; every rule of :func:`firewall.chains` in order; every set with
    its elements (addresses as networks, since nft lists a /32 of an interval set as an address).
    The dynamic sets of refused destinations start empty."""
    lines = []
    for chain in firewall.chains(mode):
        lines.append(" ".join(["chain", canonical(chain.name), canonical("inet"), canonical(chain.hook),
                               canonical(chain.policy)]))
        lines += [f"rule {canonical(chain.name)} {i:04d} {canonical(list(rule.expr))}"
                  for i, rule in enumerate(chain.rules)]
    sets = {
        "allow4": [canonical({"concat": [a, p]}) for a, p in resolved.v4],
        "allow6": [canonical({"concat": [a, p]}) for a, p in resolved.v6],
        "local4": [_network(n) for n in local.v4],
        "local6": [_network(n) for n in local.v6],
        "dns4": [_network(a) for a in local.dns if ipaddress.ip_address(a).version == 4],
        "dns6": [_network(a) for a in local.dns if ipaddress.ip_address(a).version == 6],
        "refused4": [],
        "refused6": [],
    }
    lines += [" ".join(["set", canonical(name), *sorted(elements)]) for name, elements in sets.items()]
    return "\n".join(sorted(lines))


# The firewall init container's program. Perl, because mino's base image has perl-base and nft
# and no Python (core perl only: no JSON module, hence the small reader below). Its arguments are
# the ruleset and the expected listing (expected_listing): they travel in the container's
# arguments rather than in a ConfigMap because a Pod's spec cannot change once it exists, so what
# the init container installs is exactly what was rendered (a ConfigMap stays editable by whoever
# may write ConfigMaps in the namespace, between rendering and start), the manifest stays one
# object, and `podman kube play` 4.3 runs it as written. It installs the ruleset (`nft -f`, one
# atomic transaction) through a pipe, lists the table as JSON, writes each chain, rule and set in
# the same form as expected_listing and compares; any failure or difference exits 1, which keeps
# the cell container from starting. Programs by absolute path; it reads nothing else.
VERIFIER = r"""use strict; use warnings;
my ($rules, $want) = @ARGV;
my $NFT = '__NFT__';
$SIG{PIPE} = 'IGNORE';
sub fail { print STDERR "mino firewall: $_[0]; the cell does not start\n"; exit 1 }
defined $want or fail('usage: RULESET EXPECTED');
open(my $to, '|-', $NFT, '-f', '/dev/stdin') or fail("cannot run nft: $!");
print $to $rules; close($to);
fail('nft could not install the ruleset (exit ' . ($? >> 8) . ')') if $?;
open(my $from, '-|', $NFT, '-j', 'list', 'table', 'inet', 'mino') or fail("cannot run nft: $!");
my $t = do { local $/; <$from> } // ''; close($from);
fail('nft could not list the table it installed (exit ' . ($? >> 8) . ')') if $?;
sub val {
  $t =~ /\G\s+/gc;
  if ($t =~ /\G\{/gc) {
    my %h; $t =~ /\G\s+/gc; return \%h if $t =~ /\G\}/gc;
    while (1) {
      $t =~ /\G\s*"([^"\\]*)"\s*:/gc or die "a key expected\n";
      my $k = $1; $h{$k} = val(); $t =~ /\G\s+/gc;
      next if $t =~ /\G,/gc; $t =~ /\G\}/gc or die "',' or '}' expected\n"; return \%h;
    }
  }
  if ($t =~ /\G\[/gc) {
    my @a; $t =~ /\G\s+/gc; return \@a if $t =~ /\G\]/gc;
    while (1) {
      push @a, val(); $t =~ /\G\s+/gc;
      next if $t =~ /\G,/gc; $t =~ /\G\]/gc or die "',' or ']' expected\n"; return \@a;
    }
  }
  return $1 if $t =~ /\G("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null)/gc;
  die 'unexpected text at ' . (pos($t) // 0) . "\n";
}
sub canon {
  my ($v, $key) = @_;
  return '{' . join(',', map { "\"$_\":" . canon($v->{$_}, $_) } sort keys %$v) . '}' if ref $v eq 'HASH';
  if (ref $v eq 'ARRAY') {
    my @e = map { canon($_) } @$v; @e = sort @e if defined $key && $key eq 'set';
    return '[' . join(',', @e) . ']';
  }
  return $v;
}
sub element {
  my ($e) = @_;
  $e = $e->{elem}{val} if ref $e eq 'HASH' && ref $e->{elem} eq 'HASH';
  return substr($e->{prefix}{addr}, 1, -1) . '/' . $e->{prefix}{len}
    if ref $e eq 'HASH' && ref $e->{prefix} eq 'HASH' && !ref $e->{prefix}{addr} && $e->{prefix}{addr} =~ /^"/;
  return substr($e, 1, -1) . ($e =~ /:/ ? '/128' : '/32') if !ref $e && $e =~ /^"[0-9a-fA-F.:]+"$/;
  return canon($e);
}
my @have;
eval {
  my $doc = val(); $t =~ /\G\s*\z/gc or die "text after the listing\n";
  ref $doc eq 'HASH' && ref $doc->{nftables} eq 'ARRAY' or die "no nftables array\n";
  my %n;
  for my $o (@{$doc->{nftables}}) {
    next unless ref $o eq 'HASH';
    if (ref $o->{chain} eq 'HASH' && ($o->{chain}{table} // '') eq '"mino"') {
      my $c = $o->{chain};
      push @have, join(' ', 'chain', map { $c->{$_} // 'null' } qw(name family hook policy));
    } elsif (ref $o->{rule} eq 'HASH' && ($o->{rule}{table} // '') eq '"mino"') {
      my $r = $o->{rule}; my $chain = $r->{chain} // 'null';
      push @have, sprintf('rule %s %04d %s', $chain, $n{$chain}++, canon($r->{expr} // 'null'));
    } elsif (ref $o->{set} eq 'HASH' && ($o->{set}{table} // '') eq '"mino"') {
      my $s = $o->{set}; my $elems = ref $s->{elem} eq 'ARRAY' ? $s->{elem} : [];
      push @have, join(' ', 'set', $s->{name} // 'null', sort map { element($_) } @$elems);
    }
  }
  1;
} or fail("unreadable nft listing: $@");
my $got = join("\n", sort @have);
if ($got ne $want) {
  my %w = map { $_ => 1 } split /\n/, $want; my %h = map { $_ => 1 } @have;
  my @missing = grep { !$h{$_} } sort keys %w; my @extra = grep { !$w{$_} } sort keys %h;
  my $said = sprintf('%d missing, %d not asked for', scalar @missing, scalar @extra);
  print STDERR 'mino firewall: missing: ' . substr($_, 0, 300) . "\n" for grep { defined } @missing[0 .. 4];
  print STDERR 'mino firewall: not asked for: ' . substr($_, 0, 300) . "\n" for grep { defined } @extra[0 .. 4];
  fail("the installed table differs from what mino asked for ($said)");
}
my %count; $count{(split / /)[0]}++ for @have;
printf "mino firewall: installed and verified: %d chains, %d rules, %d sets\n",
  $count{chain} // 0, $count{rule} // 0, $count{set} // 0;
""".replace("__NFT__", NFT)


def firewall_command(req: KubeRequest) -> list[str]:
    """The init container's command: :data:`VERIFIER` with the ruleset and what it must list."""
    mode, resolved, local = firewall_inputs(req)
    return [PERL, "-e", VERIFIER, firewall.ruleset(resolved, mode, local), expected_listing(resolved, mode, local)]


# ---------------------------------------------------------------------------- translation

def _quantity_bytes(value: int) -> str:
    for unit, size in (("Gi", policy.GIB), ("Mi", policy.MIB), ("Ki", 1024)):
        if value % size == 0:
            return f"{value // size}{unit}"
    return str(value)


def _quantity_cpu(quota: int, period: int) -> str:
    milli = round(quota * 1000 / period)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


# Keys of a policy spec that have no Pod field, and why nothing is lost (or what stands in).
NOT_IN_A_POD = {
    "entrypoint": "a container's `command` replaces the image's entrypoint",
    "remove": "restartPolicy Never: the Pod is not restarted; deleting it is the cluster's",
    "r_limits": "a Pod has no rlimits: the node's container runtime sets them",
    "oom_score_adj": "a Pod has no OOM score: its QoS class decides (requests = limits: Guaranteed)",
    "stdin": "the firewall agent's requests; the init container takes its ruleset as arguments",
    "seccomp_profile_path": "the Pod asks for RuntimeDefault, the runtime's own profile: mino's would have to "
                            "be installed on every node as a Localhost profile (README)",
    "labels": "labels are the Pod's (metadata.labels and, for values a label cannot hold, annotations)",
    "init": "a Pod has no init flag: the cell's PID 1 is WAIT, which reaps; the firewall's program is its "
            "PID 1 and waits for its own children",
}


def _container(spec: dict, *, name: str, run_as: int) -> tuple[dict, list[dict]]:
    """One policy spec as a Pod container, and the volumes its mounts become.

    Every key is consumed; one that is neither translated here nor listed in
    :data:`NOT_IN_A_POD` stops the rendering (a new hardening flag must not vanish on the way).
    `run_as` is the container's uid: in a Pod every ``kubectl exec`` runs as the container's own
    user, so the cell container runs as the cell's uid where Podman's runs its init as another.
    """
    s = dict(spec)
    for key in NOT_IN_A_POD:
        s.pop(key, None)
    s.pop("name")  # names are the Pod's: mino-SESSION, containers cell/firewall/home
    s.pop("user")  # see run_as
    s.pop("hostname", None)  # the Pod's (spec.hostname)
    s.pop("hostadd", None)  # the Pod's hostAliases
    s.pop("dns_server", None), s.pop("dns_search", None)  # the Pod's dnsConfig
    s.pop("stop_timeout", None)  # the Pod's terminationGracePeriodSeconds
    netns = s.pop("netns")["nsmode"]
    if netns not in ("bridge", "none", "container"):
        raise ValueError(f"a Pod cannot take network namespace mode {netns!r}")  # host is refused earlier
    if s.pop("ipcns") != {"nsmode": "private"}:
        raise ValueError("policy asked for a shared IPC namespace; a mino Pod keeps hostIPC false")
    if s.pop("userns", {"nsmode": "host"}).get("nsmode") not in ("host",):
        raise ValueError("a Pod cannot take a user namespace mode (rendering assumes a rootful engine)")
    limits = s.pop("resource_limits")
    if set(limits) != {"pids", "memory", "cpu"} or limits["memory"].get("swap") != limits["memory"]["limit"]:
        raise ValueError(f"policy's resource limits {sorted(limits)} (or its swap) have no Pod equivalent here")
    caps = {"drop": list(s.pop("cap_drop"))}
    added = list(s.pop("cap_add"))
    if added:
        caps["add"] = added
    mounts, made = [], []
    for m in s.pop("mounts"):
        if m["type"] != "bind":
            raise ValueError(f"a Pod rendering has no {m['type']!r} mount")
        volume = {"name": m["source"], "emptyDir": {}}
        mounts.append({"name": volume["name"], "mountPath": m["destination"],
                       **({"readOnly": True} if "ro" in m.get("options", ()) else {})})
        made.append(volume)
    quantities = {"memory": _quantity_bytes(limits["memory"]["limit"]),
                  "cpu": _quantity_cpu(limits["cpu"]["quota"], limits["cpu"]["period"])}
    container = {
        "name": name,
        "image": s.pop("image"),
        "command": list(s.pop("command")),
        "workingDir": s.pop("work_dir"),
        "env": [{"name": k, "value": v} for k, v in s.pop("env").items()],
        "securityContext": {
            "runAsUser": run_as,
            "runAsGroup": run_as,
            "runAsNonRoot": run_as != 0,
            "allowPrivilegeEscalation": not s.pop("no_new_privileges"),
            "privileged": s.pop("privileged"),
            "readOnlyRootFilesystem": s.pop("read_only_filesystem"),
            "capabilities": caps,
        },
        # Requests = limits: the scheduler places the Pod where what the cell may use fits.
        "resources": {"limits": dict(quantities), "requests": dict(quantities)},
        "volumeMounts": mounts,
        # The pids limit (limits["pids"]) has no container field: it is the node's podPidsLimit.
    }
    if s:
        raise ValueError(f"policy's spec has keys a Pod rendering does not know: {sorted(s)}")
    if not mounts:
        del container["volumeMounts"]
    return container, made


# ---------------------------------------------------------------------------- the Pod

# The cell container's PID 1 (policy's `init` plus its `sleep infinity`): a Pod has no init
# flag. bash reaps every child it adopts, and it ignores the signals a cell could send it (in a
# PID namespace, signals its init has no handler for are dropped), so a cell, which shares its
# uid in a Pod, cannot stop its container; the kubelet's SIGKILL after the grace period can.
WAIT = "trap '' TERM INT HUP QUIT USR1 USR2; while :; do {command} & wait $!; done"


def _split_labels(labels: dict) -> tuple[dict, dict]:
    """Kubernetes labels hold short, plain values only: the others (the network's description)
    become annotations under the same key."""
    plain = {k: v for k, v in labels.items() if len(v) <= 63 and _LABEL_VALUE.match(v)}
    return plain, {k: v for k, v in labels.items() if k not in plain}


def _host_aliases(hostadd: Sequence[str]) -> list[dict]:
    grouped: dict[str, list[str]] = {}
    for entry in hostadd:
        name, address = entry.split(":", 1)
        grouped.setdefault(address, []).append(name)
    return [{"ip": address, "hostnames": names} for address, names in grouped.items()]


def pod(req: KubeRequest) -> dict:
    """The Pod, as plain data."""
    pod_name = check_session(req.session)
    check_plan(req.plan, req.cluster_dns)
    if not (isinstance(req.deadline, int) and req.deadline > 0):
        raise UsageError(f"the Pod's deadline must be a positive number of seconds, not {req.deadline}",
                         "e.g. --timeout 3600")
    allowlist = req.plan.mode == "allowlist"
    shape = policy.session_request(
        req.session, req.plan,
        policy.SessionSettings(image=req.image, resources=req.resources, package_cache=False),
        policy.HostFacts(limits=UNLIMITED, storage=volumes(pod_name)), {}, fresh=False,
        hosts=req.resolved.hosts if allowlist else (), container_name=pod_name)
    request = shape.request
    if req.plan.mode == "none":
        # As allowlist: names resolve nowhere (the loopback name server of policy's no_dns).
        request = dataclasses.replace(request, no_dns=True)
    spec = policy.session_spec(request)
    labels, annotations = _split_labels(spec["labels"])
    hostadd, dns_server = spec.get("hostadd", []), spec.get("dns_server")
    grace = spec["stop_timeout"]
    hostname = spec["hostname"]

    cell, cell_volumes = _container(spec, name="cell", run_as=policy.CELL_UID)
    cell["command"] = [policy.BASH, "--noprofile", "--norc", "-c", WAIT.format(command=shlex.join(cell["command"]))]
    cell["resources"]["limits"]["ephemeral-storage"] = cell["resources"]["requests"]["ephemeral-storage"] = \
        _quantity_bytes(req.resources.disk)  # policy's disk: everything the cell writes (emptyDirs)

    fw_spec = policy.firewall_spec(
        name=f"{pod_name}-fw", image=req.firewall_image, target_container=pod_name, labels={},
        limits=UNLIMITED, command=firewall_command(req))
    # The firewall container's one writable place holds the ruleset its agent installs from a
    # file; the init container pipes its ruleset to nft and writes nothing, so it gets none.
    # (Podman 4.3's `kube play` would also keep an init container's emptyDir after the Pod.)
    if any(m["type"] != "tmpfs" for m in fw_spec["mounts"]):
        raise ValueError("policy gave the firewall container a mount other than its /tmp")
    fw_spec["mounts"] = []
    fw, _ = _container(fw_spec, name="firewall", run_as=0)
    # NET_BIND_SERVICE is for the firewall container's loopback name server, which answers an
    # allowlist session's queries for as long as it lives; an init container ends before the
    # cell starts, so it serves nothing and keeps NET_ADMIN alone.
    fw["securityContext"]["capabilities"]["add"] = [
        c for c in fw["securityContext"]["capabilities"].get("add", []) if c != "NET_BIND_SERVICE"]

    # An image without the cell user's home (any image may be named) starts with an empty one.
    copy_home = [policy.BASH, "--noprofile", "--norc", "-c", f'[ ! -d "$1" ] || exec {CP} -a "$1/." "$2/"',
                 "mino-home", policy.HOME, HOME_COPY]
    home = {**copy.deepcopy(cell), "name": "home", "command": copy_home, "workingDir": "/",
            "volumeMounts": [{"name": volumes(pod_name).home, "mountPath": HOME_COPY}]}

    metadata = {"name": pod_name, "labels": labels}
    notes = dict(annotations)
    if req.plan.allow:
        notes["io.mino.resolved"] = (f"names resolved {req.resolved_at} (a snapshot)" if req.resolved_at
                                     else "names resolved when rendered (a snapshot)")
    if req.resolved.unresolved:
        notes["io.mino.unresolved"] = ",".join(req.resolved.unresolved)
    if notes:
        metadata["annotations"] = notes
    spec_out = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": req.deadline,
        "terminationGracePeriodSeconds": grace,
        "automountServiceAccountToken": False,  # no API credentials in the sandbox
        "enableServiceLinks": False,  # no environment variables naming the cluster's Services
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,  # policy's private IPC namespace
        "shareProcessNamespace": False,
        "hostname": hostname,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": policy.CELL_UID,
            "runAsGroup": policy.CELL_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if dns_server:
        spec_out["dnsPolicy"] = "None"
        spec_out["dnsConfig"] = {"nameservers": list(dns_server)}  # no search domains (policy's ".")
    if hostadd:
        spec_out["hostAliases"] = _host_aliases(hostadd)
    spec_out["initContainers"] = [fw, home]
    spec_out["containers"] = [cell]
    spec_out["volumes"] = cell_volumes
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec_out}


# ---------------------------------------------------------------------------- YAML

class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    # Multi-line strings (the ruleset, the verifier) as literal blocks: readable in review.
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def header(req: KubeRequest) -> str:
    """Comment lines on top of the manifest: what it is and what a cluster must allow."""
    lines = [
        f"mino-jupyter {__version__}: session '{req.session}' as a Pod ({req.plan.describe()}).",
        "Written by `mino-jupyter kube`; mino itself never talks to a cluster.",
        "The 'firewall' init container runs as root with NET_ADMIN: the namespace needs the privileged",
        "Pod Security level (restricted and baseline refuse NET_ADMIN). Without it, use a NetworkPolicy",
        "from the same addresses instead (it drops where this firewall rejects). See the README.",
    ]
    if req.plan.allow:
        lines.append("Allowed names were resolved when this was written"
                     + (f" ({req.resolved_at})" if req.resolved_at else "") + ": render again when they move.")
    return "".join(f"# {line}\n" for line in lines)


def render(req: KubeRequest) -> str:
    """The manifest: comments, then the Pod as YAML (one document)."""
    body = yaml.dump(pod(req), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
    return header(req) + "---\n" + body
