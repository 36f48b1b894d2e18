"""Starting one session: gather the host facts, prepare its storage, start its container and its
firewall, and undo everything when a step fails (nothing half-made is left, nothing runs on an
open network).

The decisions are made elsewhere: the container's shape by :mod:`policy`, the network plan by
:mod:`network`, the firewall's rules by :mod:`firewall`. This module gathers what those need from
this machine and the engine, in order, and times each phase (benchmarks read them).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import config, copied, firewall, host, image as images, mounts, policy, session_firewall, storage
from .errors import FirewallError, MinoError
from . import executor
from .network import NetworkPlan
from .runtime import Engine

Notice = Callable[[str], None]


@dataclass(frozen=True)
class Request:
    """One new session, as the kernel's choices and the cell's flags decided it."""

    name: str
    fresh: bool
    image: str
    plan: NetworkPlan
    workspace: str
    resources: policy.Resources
    loaded: config.Loaded
    notebook_dir: Path
    home: str | None


@dataclass(frozen=True)
class Kernel:
    """Who starts sessions and where their files go."""

    owner: dict
    kernel_id: str | None
    protected: tuple[Path, ...]  # mino's state and configuration: never copied to an engine elsewhere
    state: Path  # mino's state directory: image homes, caches, the seccomp profile
    storage_dir: Path  # this kernel's sessions' disks
    firewall_image: str
    resolver: firewall.Resolver
    notice: Notice
    before_container: Callable[[Engine], None]  # e.g. make sure the watchdog runs
    shown: set = field(default_factory=set)  # notices this kernel has shown once
    executor: bool = True  # mount the resident cell executor (False: one exec per cell)
    lease: int = 120  # seconds a container on an engine elsewhere outlives its kernel's last renewal

    def notice_once(self, text: str) -> None:
        if text not in self.shown:
            self.shown.add(text)
            self.notice(text)


@dataclass
class Started:
    container: str
    workspace: str  # as mounted (a home directory is never shared read-write)
    storage: "storage.SessionStorage | copied.CopiedFiles"
    firewall: session_firewall.SessionFirewall | None
    namespace: str | None  # the container's PID namespace, as seen from here
    cgroup: str | None
    oom_kills: int
    phases: dict[str, float] = field(default_factory=dict)
    cell_uid: int = policy.CELL_UID  # the cell's uid as this machine sees it
    executor: bool = False  # the cell executor is mounted (cells may go through it)
    lease: int | None = None  # the containers end themselves without the kernel's renewals
    early: "EarlyExecutor | None" = None  # the executor, starting while the firewall is set up


class EarlyExecutor:
    """A session's executor, started on a thread of its own as soon as its container runs, so
    its start overlaps the firewall's. It runs nothing until a cell asks, and no cell asks
    before the session (firewall included) is ready."""

    def __init__(self, engine: Engine, container: str):
        self._done = threading.Event()
        self._discarded = False
        self.value: executor.Executor | None = None
        self.error: BaseException | None = None
        threading.Thread(target=self._start, args=(engine, container), name="mino-executor-start", daemon=True).start()

    def _start(self, engine: Engine, container: str) -> None:
        try:
            self.value = executor.Executor.start(engine, container)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for it
            self.error = exc
        finally:
            self._done.set()
            if self._discarded and self.value is not None:
                self.value.disconnect()

    def result(self, timeout: float) -> "executor.Executor":
        if not self._done.wait(timeout):
            raise MinoError(f"the cell executor did not start within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.value

    def discard(self) -> None:
        """The session did not come about: the executor goes (now, or when its start ends)."""
        self._discarded = True
        if self._done.is_set() and self.value is not None:
            self.value.disconnect()


def start(engine: Engine, req: Request, k: Kernel) -> Started:
    image_id = images.ensure(engine, req.image, k.notice)  # mino's own images are built on first use
    kind = engine.facts()
    if kind.rootless and (problem := host.subordinate_ids_problem()):
        raise problem
    k.before_container(engine)  # the watchdog runs before the first container (a loader) is made
    elsewhere = host.engine_elsewhere(engine)
    workspace, note = policy.workspace_mode(req.workspace, str(req.notebook_dir), req.home)
    if elsewhere:  # nothing of this machine can be bound in: the workspace is copied
        workspace = copied.workspace_mode(workspace)
        copied.probe_limits(engine, image=req.image, labels=k.owner)  # its machine's are not readable here
        k.notice_once(f"mino: the Podman engine at {engine.endpoint.url} is not on this machine ({elsewhere}), "
                      f"so nothing of this machine is bound into its containers: each session gets a copy of "
                      f"{req.notebook_dir}, and what cells change there comes back with `%mino changes` and "
                      "`%mino apply`")
        k.notice_once(f"mino: on this engine, {COPIED_GAPS}")
        mounter = None
    else:
        mounter = mounts.for_engine(engine)  # where overlays are mounted: fails early, before anything is made
    for gap in policy.unenforced(kind):
        k.notice_once(f"mino: on this engine, {gap}")
    if note:
        k.notice(f"mino: {note}")
    if mounter is not None and kind.cell_uid_mapped and _inside(k.state, req.notebook_dir):
        k.notice_once(f"mino: mino's state directory {k.state} is inside this notebook's directory, and under "
                      "rootless Podman the cell is you: cells can read it (other sessions' files and logs); "
                      "`%mino apply` never writes there. Set XDG_STATE_HOME outside the notebooks, or open "
                      "them from a folder of their own")
    variant = images.variant_of(req.image)
    settings = policy.SessionSettings(image=req.image, workspace=workspace, resources=req.resources,
                                      package_cache=config.merged(req.loaded, "package_cache", True)[0],
                                      toolchain=variant.name if variant else None)
    guarded = req.plan.mode in ("bridge", "allowlist")  # a firewall in the session's namespace
    resolved, resolver, networks = None, k.resolver, []
    if guarded:
        if k.firewall_image != req.image:  # else just looked at
            engine.require_image(k.firewall_image)
        networks = engine.networks()  # the session's (gateway) and every other container's subnets
        base = k.resolver if not elsewhere else copied.engine_resolver(  # names as its machine sees them
            engine, sorted({e.host for e in req.plan.allow if not e.is_ip}), image=k.firewall_image, labels=k.owner,
            lease=k.lease)
        resolver = with_host_name(base, host.seen_from_sessions(kind, networks, copied.engine_addresses(
            engine, image=k.firewall_image, labels=k.owner, lease=k.lease) if elsewhere and kind.rootless else None))
        resolved = session_firewall.resolve(req.plan, resolver, k.notice)
    ca = host.ca_bundle(config.merged(req.loaded, "ca_bundle", "auto")[0])
    timer = _Phases()
    seccomp_profile, support, has_executor = host.seccomp_profile(k.state), None, False
    if mounter is None:
        if seccomp_profile or k.executor:  # the engine reads the profile on its machine, from mino's volume
            support, seccomp_profile, has_executor = copied.support_volume(
                engine, image=req.image, seccomp_profile=seccomp_profile, state=k.state, labels=k.owner,
                notice=k.notice_once, with_executor=k.executor)
        timer.done("support volume")
        store = copied.prepare(k.storage_dir, req.name, k.owner, notebook_dir=req.notebook_dir, mode=workspace,
                               disk=req.resources.disk)
    else:
        home_lower = storage.image_home(engine, req.image, image_id, k.state / "image-homes", k.owner,
                                        mounter.cell_uid)
        timer.done("image home")
        store = storage.prepare(k.storage_dir, req.name, k.owner, notebook_dir=req.notebook_dir, mode=workspace,
                                home_lower=home_lower, disk_bytes=req.resources.disk, mounter=mounter)
    timer.done("storage")
    starting = contextlib.ExitStack()  # what must hold until the container runs
    try:
        caches = policy.package_caches(settings.toolchain, settings.package_cache) if mounter else ()
        if caches:  # no reaper unmounts the project's caches between their mount and this start
            starting.enter_context(storage.caches_in_use(k.state / "caches", req.notebook_dir))
        facts = policy.HostFacts(
            limits=engine.host_limits(),
            storage=store.mounts() if mounter else policy.CopiedStorage(
                read_only=workspace == "ro", tmp_bytes=min(req.resources.disk, req.resources.memory // 2),
                support_volume=support),
            ca_bundle=ca,
            caches=storage.project_caches(k.state / "caches", req.notebook_dir, tuple(c for c, _ in caches),
                                          req.resources.disk, mounter) if caches else None,
            project=storage.project_key(req.notebook_dir) if caches else None,
            seccomp_profile=seccomp_profile, kernel_id=k.kernel_id, engine=kind,
            executor=_executor_dir(k) if mounter else None,
            # Elsewhere, the kernel (and its watchdog) may lose the engine: the container ends itself.
            lease=None if engine.processes_here() else k.lease)
        shape = policy.session_request(req.name, req.plan, settings, facts, k.owner, fresh=req.fresh,
                                       hosts=resolved.hosts if resolved and req.plan.mode == "allowlist" else (),
                                       container_name=f"mino-{k.owner['io.mino.owner'][:8]}-{req.name}")
        k.before_container(engine)
        warned: list[str] = []
        engine.warnings = lambda _name, said: warned.extend(said)
        try:
            container = engine.create(policy.session_spec(shape.request))
        finally:
            engine.warnings = None
        try:
            # The firewall container is made before the session starts (it joins the session's
            # namespace once both run), so its creation is not in line with the starts. Not
            # for a bridge session whose rules this machine's nft will likely set.
            fw_container = session_firewall.create_container(
                engine, session_container=container, mode=req.plan.mode, image=k.firewall_image,
                name=f"{shape.request.name}-fw", labels=dict(shape.network_labels),
                seccomp_profile=facts.seccomp_profile, engine_kind=kind, lease=facts.lease) \
                if guarded and not _host_rules_likely(engine, kind, req.plan) else None
            if mounter is None:  # before the start: the cell never sees a half-copied workspace
                store.base = copied.copy_in(engine, container, req.notebook_dir, image=req.image, labels=k.owner,
                                            limit=req.resources.disk, protected=k.protected, notice=k.notice)
                if ca:
                    copied.copy_ca(engine, container, ca)
                timer.done("copy in")
            engine.start(container)
        except BaseException:
            engine.remove(container)  # with the firewall container made for it
            raise
        finally:
            starting.close()
        for warning in policy.unexplained_warnings(warned, kind):
            k.notice_once(f"mino: Podman warned when starting session '{req.name}': {warning}")
        timer.done("container")
    except BaseException:
        starting.close()
        store.teardown()
        raise
    info = engine.inspect(container) or {}
    state = info.get("State", {})
    # The pids, cgroups and files the engine reports are this machine's only when its processes
    # are (elsewhere they name other things here, never to be read or signalled). Its own
    # cgroup only where the engine applies limits: rootless on cgroup v1 reports the service's,
    # which mino must never freeze or read as the session's.
    here = engine.processes_here()
    cgroup = state.get("CgroupPath") if kind.cgroup_limits and here else None
    started = Started(container, workspace, store, None,
                      host.pid_namespace(int(state["Pid"])) if state.get("Pid") and here else None,
                      cgroup, host.oom_kills(cgroup) or 0, timer.phases,
                      cell_uid=mounter.cell_uid if mounter else policy.CELL_UID,
                      executor=facts.executor is not None or has_executor, lease=facts.lease)
    if started.executor:
        started.early = EarlyExecutor(engine, container)
    if guarded:
        try:
            mine = host.host_addresses() + (copied.engine_addresses(
                engine, image=k.firewall_image, labels=k.owner, lease=k.lease) if not here else [])
            local = firewall.local_networks(
                mine, [n["subnet"] for net in networks for n in net.get("subnets", [])],
                _nameservers(engine, container, info, here) if req.plan.mode == "bridge" else (),
                engine_elsewhere=not here)
            started.firewall = session_firewall.SessionFirewall(
                engine, session_container=container, plan=req.plan, resolver=resolver, notice=k.notice,
                hosts_path=info.get("HostsPath") if mounter else None, local=local, files=mounter)
            if fw_container is not None or not _rules_from_host(engine, kind, req.plan, info, started.firewall,
                                                                resolved, k):
                started.firewall.start(image=k.firewall_image, name=f"{shape.request.name}-fw",
                                       labels=dict(shape.network_labels), resolved=resolved,
                                       seccomp_profile=facts.seccomp_profile, engine=kind, container=fw_container,
                                       lease=facts.lease)
                started.firewall.counters = _counters_from_host(engine, kind, req.plan, info)
        except BaseException as exc:  # an interrupt too: no container is left without its rules
            if started.early is not None:
                started.early.discard()
            engine.remove(container)  # with its firewall container (removal with dependents)
            if started.firewall is not None:
                started.firewall.close()
            store.teardown()
            if not isinstance(exc, MinoError):
                raise
            raise FirewallError(f"the {req.plan.mode} firewall could not be installed, so nothing ran: {exc.message}",
                                "mino never falls back to an open network; `mino-jupyter doctor` checks "
                                "the image (nft) and the engine") from None
        timer.done("firewall")
    return started


COPIED_GAPS = ("the disk limit is not applied to a copied workspace or home (volumes on the engine's machine; "
               "`%mino changes` reads back at most the disk limit), /tmp and /var/tmp are memory (within the "
               "memory limit), and package caches are not shared")


def _nameservers(engine: Engine, container: str, info: dict, here: bool) -> list[str]:
    """The name servers the session was given: Podman's file for it when the engine's files are
    this machine's, else read through the engine (no cell has run yet)."""
    if here:
        return host.nameservers(info.get("ResolvConfPath"))
    return host.nameservers_in(copied.read_file(engine, container, "/etc/resolv.conf").decode("utf-8", "replace"))


def _host_rules_likely(engine: Engine, kind: policy.EngineFacts, plan: NetworkPlan, mode: str = "bridge") -> bool:
    """A `mode` session of a local rootful engine, mino itself root (it enters the namespace), nft
    here: a bridge session's rules come from this machine, an allowlist session's counters."""
    return (plan.mode == mode and not kind.rootless and os.geteuid() == 0 and engine.endpoint.local
            and session_firewall.HostRules.usable())


def _session_netns(info: dict) -> int | None:
    """The session's network namespace as a checked file descriptor (:func:`session_firewall.open_netns`)."""
    return session_firewall.open_netns((info.get("NetworkSettings") or {}).get("SandboxKey"),
                                       (info.get("State") or {}).get("Pid"))


def _counters_from_host(engine: Engine, kind: policy.EngineFacts, plan: NetworkPlan,
                        info: dict) -> session_firewall.HostRules | None:
    """An allowlist session of a local rootful engine: what its firewall refused is read by this
    machine in the session's namespace after each cell (no exec in the firewall container, which
    keeps its rules and name server). None: the firewall container reads it."""
    if not _host_rules_likely(engine, kind, plan, "allowlist"):
        return None
    fd = _session_netns(info)
    return session_firewall.HostRules(fd) if fd is not None else None


def _rules_from_host(engine: Engine, kind: policy.EngineFacts, plan: NetworkPlan, info: dict,
                     fw: session_firewall.SessionFirewall, resolved: firewall.Resolved, k: Kernel) -> bool:
    """A bridge session of a local rootful engine gets its rules from this machine's nft in its
    network namespace (no firewall container to start). False: the firewall container does it
    (allowlist sessions, which need its name server; rootless or remote engines; no nft here;
    Podman's namespace file not the container's; or nft here failed, said once)."""
    if not _host_rules_likely(engine, kind, plan):
        return False
    fd = _session_netns(info)
    if fd is None:
        return False
    try:
        fw.start_from_host(session_firewall.HostRules(fd), resolved)
        return True
    except MinoError as exc:
        fw.close()
        k.notice_once(f"mino: this machine's nft could not set a session's rules ({exc.message}); "
                      "firewall containers do it")
        return False


def _executor_dir(k: Kernel) -> str | None:
    """The cell executor's host directory, or None (then every cell is its own exec, said once)."""
    if not k.executor:
        return None
    try:
        return str(executor.ensure_binary(k.state))
    except MinoError as exc:
        k.notice_once(f"mino: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        return None


def _inside(path: Path, directory: Path) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(directory)
    return real == top or real.startswith(top.rstrip("/") + "/")


def with_host_name(resolver: firewall.Resolver, gateways: list[str]) -> firewall.Resolver:
    """Names resolve on this machine; `host.containers.internal` is this machine as the session
    sees it (:func:`mino_jupyter.host.seen_from_sessions`), for allow entries that open a local service."""
    def resolve_name(name: str) -> list[str]:
        return list(gateways) if name == "host.containers.internal" else resolver(name)
    return resolve_name


class _Phases:
    def __init__(self):
        self.phases: dict[str, float] = {}
        self._clock = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self._clock
        self._clock = now
