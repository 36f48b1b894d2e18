"""One session's firewall: its firewall container, the control channel to it, and the answers.

A :class:`SessionFirewall` is made when a bridge or allowlist session starts and closed when it
stops. It owns everything about the session's firewall that changes over time:

* ``start``: the firewall container (NET_ADMIN and NET_BIND_SERVICE, nothing else) joins the
  session's network namespace, mino attaches to its agent (requests on its stdin, which only the
  engine's API reaches), installs the ruleset and verifies what was installed, chain by chain
  and rule by rule. Any failure raises :class:`FirewallError`: nothing runs on an open network.
* ``start_from_host``: the same rules and checks for a bridge session of a local rootful engine,
  with this machine's ``nft`` run in the session's network namespace (:class:`HostRules`): no
  firewall container to create and start (a third of a new session's start). A bridge session
  needs no process of its own in the namespace (no name server), so nothing else changes.
* ``refresh``: after :data:`RESOLVE_REFRESH` seconds the names are resolved again; changed
  answers replace the rules and ``/etc/hosts``.
* ``replace``: the cell's allow entries changed; new rules (flows to removed destinations stop
  at their next packet), new hosts.
* ``report``: what was refused since the last report, as lines for the user. An allowlist
  session of a local rootful engine has its counters read from this machine (:attr:`counters`,
  no exec in the firewall container) and asks its firewall container only for the names.
* ``close``: the channel goes (the container goes with its session: removal with dependents).

The decisions (the rulesets, their verification, hosts lines, keeping a name's last answers) are
pure functions in :mod:`mino_jupyter.firewall`; this module only acts on them.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from typing import Callable

from . import firewall, libnft, mounts, policy
from .errors import FirewallError, MinoError
from .network import NetworkPlan
from .runtime import Attached, Engine

RESOLVE_REFRESH = 30.0  # seconds after which names are resolved again (at the next cell)

Notice = Callable[[str], None]


def resolve(plan: NetworkPlan, resolver: firewall.Resolver, notice: Notice,
            previous: firewall.Resolved | None = None) -> firewall.Resolved:
    """Resolve the plan's names on this host; say once which names have no address."""
    resolved = firewall.keep_last_answers(firewall.resolve_entries(plan.allow, resolver), previous, plan.allow)
    if resolved.unresolved and (previous is None or set(resolved.unresolved) != set(previous.unresolved)):
        notice("mino: allowlist: no address for " + ", ".join(resolved.unresolved)
               + " on this host; they stay unreachable")
    return resolved


def create_container(engine: Engine, *, session_container: str, mode: str, image: str, name: str, labels: dict,
                     seccomp_profile: str | None, engine_kind: policy.EngineFacts, lease: int | None = None) -> str:
    """Create (not start) a session's firewall container, joining the session's namespace.
    `lease`: it keeps the session's lease too, and goes when it ends (an engine elsewhere)."""
    return engine.create(policy.firewall_spec(
        name=name, image=image, target_container=session_container, labels=labels, limits=engine.host_limits(),
        command=firewall.agent_command("allowlist" if mode == "allowlist" else "bridge", lease),
        seccomp_profile=seccomp_profile, engine=engine_kind, lease=lease))


class SessionFirewall:
    def __init__(self, engine: Engine, *, session_container: str, plan: NetworkPlan,
                 resolver: firewall.Resolver, notice: Notice, hosts_path: str | None,
                 local: firewall.LocalNetworks, clock: Callable[[], float] = time.monotonic,
                 files: mounts.Local | None = None):
        self.engine = engine
        self.mode = "allowlist" if plan.mode == "allowlist" else "bridge"
        self.local = local
        self.session_container = session_container
        self.hosts_path = hosts_path  # the session's /etc/hosts on this machine (Podman's HostsPath)
        self.files = files or mounts.Local()  # who may write the engine's files (rootless: in its namespace)
        self.plan = plan
        self.resolver = resolver
        self.notice = notice
        self.clock = clock
        self.container: str | None = None
        self.channel: Attached | HostRules | None = None
        # An allowlist session of a local rootful engine: its refused counters and sets read by this
        # machine (HostRules, no exec), its firewall container asked only for the names.
        self.counters: HostRules | None = None
        self.resolved: firewall.Resolved | None = None
        self.resolved_at = 0.0
        # One request at a time on the channel (a background cell's report can meet a foreground
        # cell's refresh), and no close while one is in flight.
        self._turn = threading.RLock()

    def resolve(self, plan: NetworkPlan, previous: firewall.Resolved | None = None) -> firewall.Resolved:
        return resolve(plan, self.resolver, self.notice, previous)

    # ------------------------------------------------------------------ lifecycle
    def start(self, *, image: str, name: str, labels: dict, resolved: firewall.Resolved,
              seccomp_profile: str | None = None, engine: policy.EngineFacts = policy.ROOTFUL,
              container: str | None = None, lease: int | None = None) -> None:
        """Start the firewall container in the session's namespace (made now, or `container`,
        made by :func:`create_container` before the session started) and install the rules."""
        self.container = container or create_container(
            self.engine, session_container=self.session_container, mode=self.mode, image=image, name=name,
            labels=labels, seccomp_profile=seccomp_profile, engine_kind=engine, lease=lease)
        self.engine.start(self.container)  # a failure: the caller removes the session, with this container
        self.channel = self.engine.attach(self.container)
        self._install(resolved)

    def start_from_host(self, rules: "HostRules", resolved: firewall.Resolved) -> None:
        """Install the rules from this machine (:class:`HostRules`); the channel is the caller's
        until this returns, then this firewall's (closed with it)."""
        self.channel = rules
        self._install(resolved)

    def due(self) -> bool:
        return self.clock() - self.resolved_at > RESOLVE_REFRESH

    @property
    def names_pinned(self) -> bool:
        """An allowlist session whose /etc/hosts mino cannot rewrite (its engine's files are not
        this machine's): its names keep the answers they were created with."""
        return self.mode == "allowlist" and not self.hosts_path

    def refresh(self) -> None:
        """Resolve again; replace the rules and hosts only when the answers changed."""
        if self.names_pinned:
            self.resolved_at = self.clock()
            return
        resolved = self.resolve(self.plan, self.resolved)
        if firewall.same_answers(resolved, self.resolved):
            self.resolved_at = self.clock()
            return
        self._apply(resolved)

    def replace(self, plan: NetworkPlan) -> None:
        """New allowlist entries for the live session (not where :attr:`names_pinned`: the
        sessions say so before anything changes)."""
        resolved = self.resolve(plan)
        old = self.plan
        self.plan = plan
        try:
            self._apply(resolved)
        except MinoError:
            self.plan = old
            raise

    def report(self) -> list[str]:
        """Lines about what was refused since the last report (none: nothing was)."""
        with self._turn:  # both answers belong to one report (a background cell's may come too)
            try:
                code, out = self._counters_and_names()
            except MinoError:
                return []
        if code != 0:
            return []
        try:
            refused = firewall.parse_refused(out)
        except (ValueError, TypeError, KeyError):
            return ["mino: the firewall's report of refused connections could not be read"]
        return firewall.describe_refused(refused, self.resolved or firewall.Resolved(), self.mode)

    def _counters_and_names(self) -> tuple[int, str]:
        """The report's answer: from the firewall container, or (allowlist, :attr:`counters`) the
        counters from this machine and the names from the container. Counters this machine can
        no longer read: the container reads them from now on (the session goes on)."""
        counters = self.counters
        if counters is not None and not self.from_host:
            try:
                code, out, _ = self._exchange(counters, firewall.REPORT_REQUEST)
            except (OSError, ConnectionError):
                counters.close()
                self.counters = None
            else:
                if code == 0:
                    try:
                        out += self._request(firewall.ASKED_REQUEST)[1]
                    except MinoError:
                        pass  # the refusals are still told; the names come with the next report
                return code, out
        code, out, _ = self._request(firewall.REPORT_REQUEST)
        return code, out

    def close(self) -> None:
        with self._turn:
            for channel in (self.channel, self.counters):
                if channel is not None:
                    channel.close()
            self.channel = self.counters = None

    # ------------------------------------------------------------------ acting
    def _request(self, request: bytes) -> tuple[int, str, str]:
        with self._turn:
            if self.channel is None:
                raise FirewallError("the firewall container's control channel is closed")
            try:
                return self._exchange(self.channel, request)
            except (OSError, ConnectionError) as exc:
                self.close()
                raise FirewallError(f"lost the firewall container's control channel: {exc}") from None

    @staticmethod
    def _exchange(channel: "Attached | HostRules", request: bytes) -> tuple[int, str, str]:
        channel.send(request)
        out, err = channel.read_until(firewall.END)
        code, text = firewall.split_answer(out)
        return code, text, err.decode(errors="replace") or (text if code else "")

    def _install(self, resolved: firewall.Resolved) -> None:
        """Install the ruleset from the firewall container and check it is what we asked for."""
        code, out, err = self._request(firewall.install_request(firewall.ruleset(resolved, self.mode, self.local)))
        if code != 0:
            raise FirewallError(f"nft failed (exit {code}): {(err or out).strip()[:300]}")
        problems = firewall.verify(out, resolved, self.mode, self.local)
        if problems:
            raise FirewallError("the installed rules differ from what mino asked for: " + "; ".join(problems))
        self.resolved = resolved
        self.resolved_at = self.clock()

    @property
    def from_host(self) -> bool:
        return isinstance(self.channel, HostRules)

    def _write_hosts(self, resolved: firewall.Resolved) -> None:
        """Rewrite the session's /etc/hosts from this machine: Podman bind-mounts that file from
        its own directory into the container. No process runs in the session for this (a process
        there would run where the cell's files are; as root, it could be the cell's)."""
        if not self.hosts_path:
            raise FirewallError("the engine did not say where the session's /etc/hosts is")
        try:
            fd = os.open(self.hosts_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as f:
                current = f.read()
        except OSError as exc:
            raise FirewallError(f"could not read the session's hosts file {self.hosts_path}: {exc.strerror}") from None
        names = {e.host for e in self.plan.allow if not e.is_ip} | \
            {n for n, _ in (self.resolved or firewall.Resolved()).hosts}
        try:
            # in place: the container's bind mount follows this inode, not the name
            self.files.write_in_place(self.hosts_path, firewall.rewrite_hosts(current, names, resolved.hosts))
        except MinoError as exc:
            raise FirewallError(f"could not write the session's hosts file: {exc.message}") from None

    def _apply(self, resolved: firewall.Resolved) -> None:
        self._install(resolved)
        if self.mode == "allowlist":
            self._write_hosts(resolved)


class HostRules:
    """The firewall agent's two requests served from this machine: ``nft`` (this machine's, by
    absolute path, with a fixed environment) run through ``nsenter`` in the session's network
    namespace, held open as a file descriptor from the moment the session started.

    For bridge sessions of a local rootful engine only (:func:`open_netns` decides): this process
    is root there, the namespace is Podman's own (its ``SandboxKey`` under ``/run/netns``, checked
    to be the one the container's init is in), and nothing here reads or runs anything a cell can
    write. It speaks the agent's protocol (:func:`firewall.install_request`, ``REPORT_REQUEST``;
    answers end with ``@@mino-end RC``), so :class:`SessionFirewall` treats both alike. Each
    ``nft`` command goes through libnftables from a thread that enters the namespace and ends
    (:mod:`mino_jupyter.libnft`: no exec per cell); where that cannot be done, ``nsenter`` runs
    ``nft`` as before.
    """

    NSENTER = "/usr/bin/nsenter"
    ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    TIMEOUT = 30.0

    def __init__(self, netns_fd: int):
        self.fd = netns_fd
        self._request = b""

    @classmethod
    def usable(cls) -> bool:
        return os.access(cls.NSENTER, os.X_OK) and os.access(firewall.NFT, os.X_OK)

    def nft(self, *args: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
        if self.fd < 0:
            raise ConnectionError("the session's network namespace is closed")
        done = libnft.run(self.fd, args, stdin)  # the same command without two execs (0.3 ms, not 4.5)
        if done is not None:
            return done
        try:
            done = subprocess.run([self.NSENTER, f"--net=/proc/self/fd/{self.fd}", firewall.NFT, *args],
                                  input=stdin, capture_output=True, env=self.ENV, cwd="/", pass_fds=(self.fd,),
                                  timeout=self.TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ConnectionError(f"nft on this machine: {exc}") from None
        return done.returncode, done.stdout, done.stderr

    # The channel's side of SessionFirewall._request.
    def send(self, data: bytes) -> None:
        self._request += data

    def read_until(self, marker: bytes) -> tuple[bytes, bytes]:
        request, self._request = self._request, b""
        head, _, body = request.partition(b"\n")
        if head.startswith(b"install "):
            code, out, err = self.nft("-f", "-", stdin=body)
            if code != 0:
                return err + out + b"@@mino-end 1\n", err
            code, listing, err = self.nft("-j", "list", "table", "inet", firewall.TABLE)
            return listing + b"@@mino-end %d\n" % (0 if code == 0 else 1), err
        if request == firewall.REPORT_REQUEST:
            code, counters, err = self.nft("-j", "reset", "counters", "table", "inet", firewall.TABLE)
            if code != 0:
                return b"@@mino-end 1\n", err
            parts = [counters]
            if re.search(rb'"packets":\s*[1-9]', counters):  # the sets fill only where these count
                for name in ("refused4", "refused6"):
                    parts.append(self.nft("-j", "list", "set", "inet", firewall.TABLE, name)[1])
                    self.nft("flush", "set", "inet", firewall.TABLE, name)
            return b"".join(parts) + b'{"asked": []}\n@@mino-end 0\n', b""
        return b"@@mino-end 2\n", b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_netns(sandbox_key: str | None, pid: int | None) -> int | None:
    """The session's network namespace as a file descriptor, or None when it cannot be had for
    sure: Podman's namespace file (``SandboxKey``, under ``/run/netns``, not a link) must be the
    very namespace the container's init is in, as this machine sees it (same device and inode
    as ``/proc/PID/ns/net``); a remote engine, or one in another mount namespace, fails that."""
    if not sandbox_key or not pid or os.path.dirname(sandbox_key) != "/run/netns" \
            or os.path.normpath(sandbox_key) != sandbox_key:
        return None
    try:
        fd = os.open(sandbox_key, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        mine, theirs = os.fstat(fd), os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        os.close(fd)
        return None
    if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
        os.close(fd)
        return None
    return fd
