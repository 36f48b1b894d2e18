"""The kernel's sessions: which exist, starting them, running cells in them, stopping them.

One :class:`SessionManager` per kernel. The magics and the panel call it. It asks
:mod:`network` for the plan and :mod:`policy` for the container's shape, gathers the host facts
those need (:mod:`host`, :mod:`storage`), and hands the rest to the owners of each concern:
:mod:`cell` runs one cell, :mod:`allowlist` owns a session's firewall, :mod:`changes` lists and
applies what cells wrote, :mod:`cleanup` makes sure nothing outlives the kernel, :mod:`logs`
keeps the output.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from . import changes, config, firewall, host, policy, presets as presets_mod, session_firewall, storage
from . import image as images
from .cell import CellResult, Sink, run_script
from .cleanup import Cleanup, owned_by, prune, remove_containers
from .commands import DEFAULT_SESSION
from .errors import FirewallError, MinoError, UsageError
from .image import base_image_ref
from .logs import CellSink, SessionLog
from .network import NetworkChoice, NetworkPlan, NetworkResolutionInput, Resolution, resolve
from .owner import Owner, current_owner, owner_alive
from .paths import logs_dir, state_dir
from .runtime import Engine

SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")

Notice = Callable[[str], None]


@dataclass
class CellOptions:
    session: str = DEFAULT_SESSION
    fresh: bool = False
    image: str | None = None
    timeout: float | None = None
    env: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # name -> value; values never stored
    network: NetworkChoice = field(default_factory=lambda: NetworkChoice("cell flags"))
    workspace: str | None = None  # overlay | ro | rw (None: configuration decides)
    memory: str | None = None  # limits for a new session, e.g. "4g"
    cpus: str | None = None
    disk: str | None = None


@dataclass
class Session:
    name: str
    image: str
    plan: NetworkPlan
    fresh: bool
    log_path: Path
    workspace: str = "overlay"
    resources: policy.Resources = policy.Resources()
    container_id: str | None = None
    state: str = "starting"  # starting | idle | running | stopped
    cells_run: int = 0
    last_exit: int | None = None
    started_at: float = field(default_factory=time.time)
    stopped_at: float | None = None
    stop_reason: str | None = None
    firewall: session_firewall.SessionFirewall | None = None
    storage: storage.SessionStorage | None = None
    namespace: str | None = None  # the container's PID namespace, as seen from here
    cgroup: str | None = None
    oom_kills: int = 0
    secrets: set[str] = field(default_factory=set, repr=False)  # every value passed in; memory only

    def row(self) -> dict:
        return {
            "name": self.name, "container": (self.container_id or "")[:12], "image": self.image,
            "network": self.plan.describe(), "cells": self.cells_run, "state": self.state,
            "last_exit": self.last_exit, "started": self.started_at, "stopped": self.stopped_at,
            "workspace": self.workspace,
        }

    @property
    def workspace_readonly(self) -> bool:
        return self.workspace == "ro"


def kernel_id() -> str | None:
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).stem
        return name[len("kernel-"):] if name.startswith("kernel-") else name
    except Exception:
        return None


def _size(value: int) -> str:
    return f"{value / policy.GIB:g} GiB" if value >= policy.GIB else f"{value // policy.MIB} MiB"


class SessionManager:
    """The kernel's sessions, one job: start them, run cells in them, stop them.

    Decisions come from the pure layer (the network plan, the container's shape); the firewall,
    the cell's run, the workspace's changes, cleanup and logs each have their own owner.
    """

    def __init__(self, *, cwd: Callable[[], Path] = Path.cwd, notice: Notice | None = None,
                 env: Mapping[str, str] | None = None, owner: Owner | None = None,
                 watchdog: bool = True, resolver: firewall.Resolver = firewall.system_resolver):
        self.cwd = cwd
        self.notice = notice or (lambda message: print(message, file=sys.stderr))
        self.env = env
        self.resolver = resolver
        # The firewall container always runs mino's own image (it has nft), whatever the session's.
        self.firewall_image = base_image_ref()
        self.owner = owner or current_owner()
        self.kernel_id = kernel_id()
        self.sessions: dict[str, Session] = {}
        self.state = state_dir(env)
        self.storage_dir = self.state / "sessions" / self.owner.token
        self.cleanup = Cleanup(self.owner, env, self.notice, watchdog=watchdog, storage_root=self.state)
        self._engine: Engine | None = None
        self._lock = threading.RLock()
        self._fresh_count = 0
        self._closed = False
        self.log_dir = logs_dir(env) / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.owner.token}"
        self.listeners: list[Callable[[], None]] = []  # called when sessions change (the panel)
        # Kernel-level choices (%config MinoMagics.*, the picker's "for this session").
        self.kernel_network: NetworkChoice | None = None
        self.kernel_image: str | None = None
        self.kernel_workspace: str | None = None
        self.first_run_hook: Callable[[], None] | None = None  # no network chosen anywhere yet
        self._first_run_done = False
        self._shown_warnings: set[str] = set()
        atexit.register(self.shutdown)

    # ------------------------------------------------------------------ engine
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine.connect(self.env, notify=self.notice)
            self.cleanup.reap_later(self._engine)  # the load-time reap found no engine running
        return self._engine

    def start_background_reap(self) -> None:
        self.cleanup.start_background_reap()

    def _changed(self) -> None:
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:
                pass

    # ------------------------------------------------------------------ decisions
    def presets(self) -> dict:
        return presets_mod.entries(presets_mod.load(env=self.env))

    def settings(self, presets: dict | None = None) -> config.Loaded:
        return config.load(self.cwd(), self.env, self.presets() if presets is None else presets)

    def plan_for(self, flags: NetworkChoice, session: Session | None, loaded: config.Loaded,
                 presets: dict | None = None) -> Resolution:
        inp = NetworkResolutionInput(
            flags=flags,
            session=session.plan.as_choice(f"session '{session.name}'") if session and session.state != "stopped" else None,
            kernel=self.kernel_network,
            project=config.network_choice(loaded.project, "project"),
            global_=config.network_choice(loaded.global_, "global"),
        )
        return resolve(inp, self.presets() if presets is None else presets)

    def resolve_image(self, requested: str | None, loaded: config.Loaded) -> str:
        image = requested or self.kernel_image or config.merged(loaded, "image")[0]
        return images.resolve_ref(image or "base")

    def _workspace_mode(self, opts: CellOptions, loaded: config.Loaded) -> str:
        if opts.workspace:
            return opts.workspace
        if self.kernel_workspace:
            return self.kernel_workspace
        mode = config.merged(loaded, "workspace")[0]
        if mode:
            return mode
        return "ro" if config.merged(loaded, "workdir_readonly", False)[0] else "overlay"

    def _resources(self, opts: CellOptions, loaded: config.Loaded) -> policy.Resources:
        default = host.default_resources(self.state)

        def pick(flag: str | None, key: str) -> str | None:
            return flag if flag is not None else config.merged(loaded, key)[0]

        memory, cpus, disk = pick(opts.memory, "memory"), pick(opts.cpus, "cpus"), pick(opts.disk, "disk")
        resources = policy.Resources(
            memory=config.parse_size(memory, "memory") if memory else default.memory,
            cpus=config.parse_cpus(cpus) if cpus else default.cpus,
            disk=config.parse_size(disk, "disk") if disk else default.disk,
            pids=config.merged(loaded, "pids_limit", policy.PIDS_LIMIT)[0])
        free = host.disk_free(self.state)
        if resources.disk > free // 2:
            capped = max(64 * policy.MIB, free // 2 // policy.MIB * policy.MIB)
            self.notice(f"mino: a disk limit of {_size(resources.disk)} is more than half the free space where "
                        f"sessions live ({_size(free)} free in {self.state}); this session gets {_size(capped)}")
            resources = policy.Resources(resources.memory, resources.cpus, capped, resources.pids)
        return resources

    # ------------------------------------------------------------------ cells
    def run_cell(self, script: str, opts: CellOptions, sink: Sink) -> tuple[CellResult, Session]:
        if self._closed:
            raise MinoError("mino has been unloaded in this kernel", "%load_ext mino_jupyter again")
        if not opts.fresh and not SESSION_NAME.match(opts.session):
            raise UsageError(f'invalid session name "{opts.session}"',
                             "use letters, digits, '.', '_' and '-' (up to 41 characters), starting with a letter or digit")
        if opts.timeout is not None and not opts.timeout > 0:
            raise UsageError(f"--timeout must be a positive number of seconds, not {opts.timeout:g}",
                             "e.g. --timeout 30")
        if opts.workspace is not None and opts.workspace not in policy.WORKSPACE_MODES:
            raise UsageError(f'unknown workspace mode "{opts.workspace}"',
                             f"valid modes: {', '.join(policy.WORKSPACE_MODES)}")
        presets = self.presets()  # read once per cell, for the config filter and the plan
        loaded = self.settings(presets)
        for warning in loaded.warnings:
            if warning not in self._shown_warnings:  # once per kernel, not at every cell
                self._shown_warnings.add(warning)
                self.notice(warning)
        first_run = (not self._first_run_done and opts.network.silent and self.kernel_network is None
                     and not loaded.explicit_network() and opts.session not in self.sessions)
        with self._lock:
            existing = None if opts.fresh else self.sessions.get(opts.session)
            if existing is not None and existing.state == "stopped":
                existing = None
            resolution = self.plan_for(opts.network, existing, loaded, presets)
            image = self.resolve_image(opts.image, loaded)
            if existing is not None:
                self._check_compatible(existing, resolution.plan, image, opts)
            else:
                workspace = self._workspace_mode(opts, loaded)
                resources = self._resources(opts, loaded)
            for warning in resolution.warnings:
                self.notice(f"mino: {warning}")
            engine = self.engine
            if existing is not None and resolution.plan != existing.plan:
                self._replan(existing, resolution.plan)  # allowlist entries changed: new rules
            session = existing or self._start_session(engine, opts, image, resolution.plan, workspace,
                                                      resources, loaded)
            if first_run:
                self._first_run_done = True
                if self.first_run_hook:
                    self.first_run_hook()
            if session.firewall is not None and session.firewall.due():
                self._guard_firewall(session, session.firewall.refresh)
        result = self._run_in(session, script, opts, sink)
        if session.storage is not None and config.merged(loaded, "auto_apply", False)[0]:
            self._auto_apply(session)
        return result, session

    def _check_compatible(self, s: Session, plan: NetworkPlan, image: str, opts: CellOptions) -> None:
        hint = (f"use --session NEW_NAME or --fresh for a different set-up, or `%mino stop {s.name}` first")
        if opts.image and image != s.image:
            raise UsageError(f"session '{s.name}' runs image {s.image}, not {image}", hint)
        if plan != s.plan and not opts.network.silent and not (plan.mode == s.plan.mode != "host"):
            raise UsageError(f"session '{s.name}' uses network {s.plan.describe()}, not {plan.describe()}", hint)
        if opts.workspace is not None and opts.workspace != s.workspace:
            raise UsageError(f"session '{s.name}' shares /workspace as {s.workspace}, not {opts.workspace}", hint)
        for key, flag in (("memory", opts.memory), ("cpus", opts.cpus), ("disk", opts.disk)):
            if flag is not None:
                raise UsageError(f"session '{s.name}' is running; --{key} applies to a new session", hint)

    def _start_session(self, engine: Engine, opts: CellOptions, image: str, plan: NetworkPlan,
                       workspace: str, resources: policy.Resources, loaded: config.Loaded) -> Session:
        images.ensure(engine, image, self.notice)  # mino's own images are built on first use
        if os.geteuid() != 0:
            raise MinoError("mino needs to run as root with rootful Podman for now: it mounts each session's "
                            "disk and workspace overlay on this machine",
                            "run the kernel as root (`make lab` does), or see the README on rootless Podman")
        if opts.fresh:
            self._fresh_count += 1
            name = f"fresh-{self._fresh_count}"
        else:
            name = opts.session
        notebook_dir = self.cwd().resolve()
        home = (self.env or os.environ).get("HOME")
        workspace, note = policy.workspace_mode(workspace, str(notebook_dir),
                                                str(Path(home).resolve()) if home else None)
        if note:
            self.notice(f"mino: {note}")
        variant = images.variant_of(image)
        settings = policy.SessionSettings(image=image, workspace=workspace, resources=resources,
                                          package_cache=config.merged(loaded, "package_cache", True)[0],
                                          toolchain=variant.name if variant else None)
        guarded = plan.mode in ("bridge", "allowlist")  # a firewall in the session's namespace
        resolved, gateways = None, []
        if guarded:
            engine.require_image(self.firewall_image)
            gateways = [n["gateway"] for n in engine.network("podman").get("subnets", []) if n.get("gateway")]
            resolved = session_firewall.resolve(plan, self._resolver(gateways), self.notice)
        ca = host.ca_bundle(config.merged(loaded, "ca_bundle", "auto")[0])
        home_lower = storage.image_home(engine, image, self.state / "image-homes", self.owner.labels())
        storage.claim(self.storage_dir, self.owner.labels())
        root = self.storage_dir / name
        if os.path.lexists(root):  # a stopped session of the same name: its changes go now
            storage.SessionStorage(storage.SessionPaths(root), notebook_dir, "ro").teardown()
        store = storage.SessionStorage.create(root, notebook_dir=notebook_dir, mode=workspace,
                                              home_lower=home_lower, disk_bytes=resources.disk)
        try:
            caches = policy.package_caches(settings.toolchain, settings.package_cache)
            facts = policy.HostFacts(
                limits=engine.host_limits(), storage=store.mounts(), ca_bundle=ca,
                caches=storage.project_caches(self.state / "caches", notebook_dir, tuple(c for c, _ in caches),
                                              resources.disk) if caches else None,
                project=storage.project_key(notebook_dir) if caches else None,
                seccomp_profile=host.seccomp_profile(self.state), kernel_id=self.kernel_id)
            shape = policy.session_request(name, plan, settings, facts, self.owner.labels(), fresh=opts.fresh,
                                           hosts=resolved.hosts if resolved and plan.mode == "allowlist" else (),
                                           container_name=f"mino-{self.owner.token[:8]}-{name}")
            self.cleanup.ensure_watchdog(engine)
            container = engine.run(policy.session_spec(shape.request))
        except BaseException:
            store.teardown()
            raise
        session = Session(name=name, image=image, plan=plan, fresh=opts.fresh, log_path=self.log_dir / f"{name}.log",
                          workspace=workspace, resources=resources, container_id=container, storage=store)
        info = engine.inspect(container) or {}
        state = info.get("State", {})
        session.namespace = host.pid_namespace(int(state.get("Pid") or 0)) if state.get("Pid") else None
        session.cgroup = state.get("CgroupPath")
        session.oom_kills = host.oom_kills(session.cgroup) or 0
        if guarded:
            try:
                local = firewall.local_networks(
                    host.host_addresses(), [n["subnet"] for net in engine.networks() for n in net.get("subnets", [])],
                    host.nameservers(info.get("ResolvConfPath")) if plan.mode == "bridge" else ())
                session.firewall = session_firewall.SessionFirewall(
                    engine, session_container=container, plan=plan, resolver=self._resolver(gateways),
                    notice=self.notice, hosts_path=info.get("HostsPath"), local=local)
                session.firewall.start(image=self.firewall_image, name=f"{shape.request.name}-fw",
                                       labels=dict(shape.network_labels), resolved=resolved,
                                       seccomp_profile=facts.seccomp_profile)
            except MinoError as exc:
                if session.firewall is not None:
                    session.firewall.close()
                engine.remove(container)
                store.teardown()
                raise FirewallError(f"the {plan.mode} firewall could not be installed, so nothing ran: {exc.message}",
                                    "mino never falls back to an open network; `mino-jupyter doctor` checks "
                                    "the image (nft) and the engine") from None
        session.state = "idle"
        self.sessions[name] = session
        if plan.mode == "host":
            self.notice(f"mino: session '{name}' uses the host network: cells reach everything this "
                        "machine reaches, its local services included")
        if workspace == "rw":
            self.notice(policy.RW_WARNING.format(name=name, workspace=notebook_dir))
        self._changed()
        return session

    # ------------------------------------------------------------------ the firewall
    def _resolver(self, gateways: list[str]) -> firewall.Resolver:
        """Names resolve on this machine; `host.containers.internal` is this machine as the
        session sees it (the bridge gateway), for allow entries that open a local service."""
        def resolve_name(name: str) -> list[str]:
            return list(gateways) if name == "host.containers.internal" else self.resolver(name)
        return resolve_name

    def _guard_firewall(self, session: Session, action: Callable[[], None]) -> None:
        """Change a live session's firewall; when that fails the old rules may be half-replaced,
        so the session must not run anything any more."""
        try:
            action()
        except MinoError as exc:
            self._remove(session)
            raise FirewallError(f"updating the allowlist of session '{session.name}' failed, the session "
                                f"was stopped and nothing ran: {exc.message}",
                                "run the cell again to start a new session") from None

    def _replan(self, session: Session, plan: NetworkPlan) -> None:
        """Allowlist entries changed for a live session: re-resolve and replace the rules."""
        assert session.firewall is not None
        self._guard_firewall(session, lambda: session.firewall.replace(plan))
        session.plan = plan
        self.notice(f"mino: session '{session.name}' network is now {plan.describe()}")

    # ------------------------------------------------------------------ running
    def _run_in(self, session: Session, script: str, opts: CellOptions, sink: Sink) -> CellResult:
        values = set(opts.secrets.values())
        if values - session.secrets and session.cells_run and not session.fresh:
            self.notice(f"mino: session '{session.name}' has run cells before: anything they left running can "
                        "read this secret (/proc/*/environ); --fresh gives a secret a container of its own")
        session.secrets |= values  # masked in every later output of this session, not only this cell's
        secrets = sorted(s for s in session.secrets if s)
        env = {**opts.env, **opts.secrets}
        log = SessionLog(session.log_path)
        session.cells_run += 1
        log.cell_start(session.cells_run, script, secrets)
        cell_sink = CellSink(sink, log, secrets)
        session.state = "running"
        self._changed()
        try:
            result = run_script(self.engine, session.container_id, script, env=env, sink=cell_sink,
                                timeout=opts.timeout, control=session.storage, namespace=session.namespace)
        except MinoError:
            session.state = "idle"
            gone = self._container_gone(session)
            if gone:
                raise MinoError(f"session '{session.name}' stopped: {gone}; its processes and the files "
                                "outside /workspace are gone", "run the cell again to start a new container") from None
            raise
        finally:
            cell_sink.close()
            if session.firewall is not None and session.state == "running":
                for line in session.firewall.report():
                    self.notice(line)
        log.cell_end(result, cell_sink.dropped)
        session.last_exit = result.exit_code
        if result.exit_code >= 128 or result.exit_code < 0:
            self._after_kill(session, result)
        if session.fresh:
            self._mark_stopped(session)
            self.cleanup.remove_soon(self.engine, session.container_id, session.name,
                                     after=lambda s=session: self._release_fresh(s))
        elif session.state == "running":
            session.state = "idle"
        self._changed()
        return result

    def _after_kill(self, session: Session, result: CellResult) -> None:
        """A cell ended by a signal: the kernel's OOM killer? the container itself?"""
        kills = host.oom_kills(session.cgroup)
        if kills is not None and kills > session.oom_kills:
            session.oom_kills = kills
            self.notice(f"mino: killed: out of memory (limit {_size(session.resources.memory)}); raise it with "
                        f"`%mino config set memory {max(1, 2 * session.resources.memory // policy.GIB)}g` "
                        f"(new sessions) or `%%mino --session NEW --memory ...`")
        gone = self._container_gone(session)
        if gone:
            self.notice(f"mino: session '{session.name}' stopped: {gone}; its processes and the files outside "
                        "/workspace are gone; the next cell starts a new container")

    def _container_gone(self, session: Session) -> str | None:
        """Why the session's container is no longer running (None: it runs). Marks it stopped."""
        info = self.engine.inspect(session.container_id) if session.container_id else None
        state = (info or {}).get("State", {})
        if info is not None and state.get("Running"):
            return None
        if info is None:
            reason = "its container was removed outside mino"
        elif state.get("OOMKilled"):
            reason = f"its container ran out of memory (limit {_size(session.resources.memory)})"
        else:
            reason = f"its container exited (status {state.get('ExitCode')}), stopped from outside"
        session.stop_reason = reason
        self._remove(session)
        return reason

    def _release_fresh(self, session: Session) -> None:
        """After a --fresh container is gone: its disk stays only while it holds changes."""
        store = session.storage
        if store is None:
            return
        store.release()
        upper = store.upper
        if upper is None or not any(os.scandir(upper)):
            store.teardown()
            session.storage = None

    # ------------------------------------------------------------------ what cells wrote
    def _storage_of(self, name: str) -> storage.SessionStorage:
        session = self.get(name)
        if session.storage is None or session.storage.upper is None:
            mode = session.workspace
            why = ("its workspace is not an overlay (" + mode + ")") if mode != "overlay" else "its disk is gone"
            raise UsageError(f"session '{name}' has no changes to show: {why}",
                             "cells' writes wait for `%mino apply` only in the overlay workspace (the default)")
        return session.storage

    def changes(self, name: str = DEFAULT_SESSION) -> list[changes.Change]:
        store = self._storage_of(name)
        return changes.list_changes(store.upper, store.notebook_dir)

    def diff(self, name: str, change: changes.Change) -> str | None:
        store = self._storage_of(name)
        return changes.diff(change, store.upper, store.notebook_dir)

    def apply(self, name: str = DEFAULT_SESSION, paths: list[str] | None = None) -> list[changes.Outcome]:
        store = self._storage_of(name)
        outcomes = changes.apply(store.upper, store.notebook_dir, paths or None)
        self._changed()
        return outcomes

    def _auto_apply(self, session: Session) -> None:
        if session.storage is None or session.storage.upper is None:
            return
        done = [o.path for o in changes.apply(session.storage.upper, session.storage.notebook_dir, None) if o.applied]
        if done:
            self.notice(f"mino: applied {len(done)} data file(s) (auto_apply): " + ", ".join(done[:10])
                        + (" ..." if len(done) > 10 else ""))

    # ------------------------------------------------------------------ choosing a network
    def remember_network(self, mode: str, preset: str | None, scope: str,
                         allow: tuple[str, ...] = ()) -> str:
        """Save a network choice: scope "session" (this kernel), "project" or "global".

        Returns a one-line description of what was saved where. The default session restarts
        at its next cell when its network differs from the new choice.
        """
        if scope not in ("session", "project", "global"):
            raise UsageError(f'unknown scope "{scope}"', "valid scopes: session, project, global")
        choice = NetworkChoice("this kernel", mode, preset, tuple(allow) or None)
        plan = resolve(NetworkResolutionInput(flags=choice), self.presets()).plan  # validate first
        self._first_run_done = True
        if scope == "session":
            self.kernel_network = choice
            where = "for this kernel's sessions"
        else:
            local = scope == "project"
            settings = {"network": mode, "network_preset": preset,
                        "network_allow": ",".join(allow) if allow else None}
            path = None
            for key, value in settings.items():
                if value is None:
                    path, _ = config.unset_key(key, local=local, cwd=self.cwd(), env=self.env)
                else:
                    path, _ = config.set_key(key, value, local=local, cwd=self.cwd(), env=self.env,
                                             presets=self.presets())
            where = f"in {path}"
        message = f"mino: network {plan.describe()} saved {where}"
        current = self.sessions.get(DEFAULT_SESSION)
        if current is not None and current.state != "stopped":
            wanted = self.plan_for(NetworkChoice("cell flags"), None, self.settings()).plan
            if wanted != current.plan:
                self.stop(DEFAULT_SESSION)
                message += "; the default session restarts with it at the next cell"
        self._changed()
        return message

    def trust_project(self, path: Path | None = None) -> str:
        """Trust the project file's current content (after the user reviewed it)."""
        path, message = config.trust_project(path, self.cwd(), self.env)
        self._shown_warnings = {w for w in self._shown_warnings if str(path) not in w}
        self._changed()
        return message

    def current_network(self) -> Resolution:
        """What the next plain %%mino cell in the default session would get."""
        session = self.sessions.get(DEFAULT_SESSION)
        return self.plan_for(NetworkChoice("cell flags"), session, self.settings())

    # ------------------------------------------------------------------ management
    def rows(self) -> list[dict]:
        with self._lock:
            return [s.row() for s in self.sessions.values()]

    def get(self, name: str) -> Session:
        try:
            return self.sessions[name]
        except KeyError:
            known = ", ".join(self.sessions) or "none yet"
            raise UsageError(f'no session named "{name}"', f"sessions in this kernel: {known}") from None

    def stop(self, name: str) -> Session:
        with self._lock:
            session = self.get(name)
            if session.state != "stopped":
                self._remove(session)
        self._changed()
        return session

    def stop_all(self) -> list[str]:
        with self._lock:
            live = [s for s in self.sessions.values() if s.state != "stopped"]
            if live:
                remove_containers(self.engine, owned_by(self.engine, self.owner.token))
            for s in live:
                self._mark_stopped(s)
        self._changed()
        return [s.name for s in live]

    def _remove(self, session: Session) -> None:
        if session.container_id:
            self.engine.remove(session.container_id)
        self._mark_stopped(session)

    def wait_for_removals(self, timeout: float = 10.0) -> None:
        self.cleanup.wait_for_removals(timeout)

    def _mark_stopped(self, session: Session) -> None:
        """The container is gone (or going, for --fresh): its overlays go; its disk stays, with
        the changes cells made, until the session is forgotten (prune) or the kernel ends."""
        session.state = "stopped"
        session.stopped_at = time.time()
        if session.firewall is not None:
            session.firewall.close()
        if session.storage is not None and not session.fresh:
            session.storage.release()

    def logs(self, name: str, tail: int | None = None) -> str:
        return SessionLog(self.get(name).log_path).tail(tail)

    def prune(self) -> tuple[list[str], list[str]]:
        """Forget stopped sessions (their logs stay; their unapplied changes go) and remove what
        dead kernels left behind."""
        with self._lock:
            gone = [n for n, s in self.sessions.items() if s.state == "stopped"]
            for name in gone:
                session = self.sessions.pop(name)
                if session.storage is not None:
                    session.storage.teardown()
        orphaned = prune(self.engine)
        storage.reap(self.state / "sessions", owner_alive)
        self._changed()
        return gone, orphaned

    def shutdown(self) -> None:
        """Remove every container of this kernel, then its sessions' disks and mounts. Runs at
        exit, restart and unload."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        if self.cleanup.shutdown(self._engine):
            for s in self.sessions.values():
                if s.state != "stopped":
                    self._mark_stopped(s)
            storage.teardown_owner(self.storage_dir)
            if self._engine is not None:
                self.cleanup.release_caches(self._engine)

