"""The kernel's sessions: which exist, starting them, running cells in them, stopping them.

One :class:`SessionManager` per kernel. The magics and the panel call it. It asks
:mod:`network` for the plan and :mod:`policy` for the container's shape, gathers the host facts
those need, and hands the rest to the owners of each concern: :mod:`cell` runs one cell,
:mod:`allowlist` owns a session's firewall, :mod:`cleanup` makes sure no container outlives
the kernel, :mod:`logs` keeps the output.
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from . import allowlist as allowlist_mod, config, firewall, policy, presets as presets_mod
from . import image as images
from .allowlist import SessionAllowlist
from .cell import CellResult, Sink, run_script
from .cleanup import Cleanup, owned_by, prune, remove_containers
from .commands import DEFAULT_SESSION
from .errors import FirewallError, MinoError, UsageError
from .image import base_image_ref
from .logs import CellSink, SessionLog
from .network import NetworkChoice, NetworkPlan, NetworkResolutionInput, Resolution, resolve
from .owner import Owner, current_owner
from .paths import logs_dir
from .runtime import Engine

SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
HOST_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                   "/etc/ssl/cert.pem")

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
    workspace_readonly: bool | None = None


@dataclass
class Session:
    name: str
    image: str
    plan: NetworkPlan
    fresh: bool
    log_path: Path
    container_id: str | None = None
    state: str = "starting"  # starting | idle | running | stopped
    cells_run: int = 0
    last_exit: int | None = None
    started_at: float = field(default_factory=time.time)
    stopped_at: float | None = None
    workspace_readonly: bool = False
    allowlist: SessionAllowlist | None = None

    def row(self) -> dict:
        return {
            "name": self.name, "container": (self.container_id or "")[:12], "image": self.image,
            "network": self.plan.describe(), "cells": self.cells_run, "state": self.state,
            "last_exit": self.last_exit, "started": self.started_at, "stopped": self.stopped_at,
        }


def kernel_id() -> str | None:
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).stem
        return name[len("kernel-"):] if name.startswith("kernel-") else name
    except Exception:
        return None


class SessionManager:
    """The kernel's sessions, one job: start them, run cells in them, stop them.

    Decisions come from the pure layer (the network plan, the container's shape); the firewall,
    the cell's run, cleanup and logs each have their own owner, called from here.
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
        self.cleanup = Cleanup(self.owner, env, self.notice, watchdog=watchdog)
        self._engine: Engine | None = None
        self._lock = threading.RLock()
        self._fresh_count = 0
        self._closed = False
        self.log_dir = logs_dir(env) / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.owner.token}"
        self.listeners: list[Callable[[], None]] = []  # called when sessions change (the panel)
        # Kernel-level choices (%config MinoMagics.*, the picker's "for this session").
        self.kernel_network: NetworkChoice | None = None
        self.kernel_image: str | None = None
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
            readonly = opts.workspace_readonly
            if readonly is None:
                readonly = bool(config.merged(loaded, "workdir_readonly", False)[0])
            if existing is not None:
                self._check_compatible(existing, resolution.plan, image, opts)
            for warning in resolution.warnings:
                self.notice(f"mino: {warning}")
            engine = self.engine
            if existing is not None and resolution.plan != existing.plan:
                self._replan(existing, resolution.plan)  # allowlist entries changed: new rules
            session = existing or self._start_session(engine, opts, image, resolution.plan, readonly, loaded)
            if first_run:
                self._first_run_done = True
                if self.first_run_hook:
                    self.first_run_hook()
            if session.allowlist is not None and session.allowlist.due():
                self._guard_firewall(session, session.allowlist.refresh)
        return self._run_in(session, script, opts, sink)

    def _check_compatible(self, s: Session, plan: NetworkPlan, image: str, opts: CellOptions) -> None:
        hint = (f"use --session NEW_NAME or --fresh for a different set-up, or `%mino stop {s.name}` first")
        if opts.image and image != s.image:
            raise UsageError(f"session '{s.name}' runs image {s.image}, not {image}", hint)
        if plan != s.plan and not opts.network.silent and not (plan.mode == s.plan.mode == "allowlist"):
            raise UsageError(f"session '{s.name}' uses network {s.plan.describe()}, not {plan.describe()}", hint)
        if opts.workspace_readonly is not None and opts.workspace_readonly != s.workspace_readonly:
            mode = "read-only" if s.workspace_readonly else "read-write"
            raise UsageError(f"session '{s.name}' mounts /workspace {mode}", hint)

    def _host_facts(self, engine: Engine, loaded: config.Loaded) -> policy.HostFacts:
        workspace = self.cwd().resolve()
        try:
            present = tuple(entry.name for entry in os.scandir(workspace))
        except OSError:
            present = ()
        home = (self.env or os.environ).get("HOME")
        return policy.HostFacts(
            limits=engine.host_limits(), workspace=str(workspace),
            home=str(Path(home).resolve()) if home else None, present=present,
            ca_bundle=_ca_bundle(config.merged(loaded, "ca_bundle", "auto")[0]), kernel_id=self.kernel_id)

    def _start_session(self, engine: Engine, opts: CellOptions, image: str, plan: NetworkPlan,
                       readonly: bool, loaded: config.Loaded) -> Session:
        images.ensure(engine, image, self.notice)  # mino's own images are built on first use
        if opts.fresh:
            self._fresh_count += 1
            name = f"fresh-{self._fresh_count}"
        else:
            name = opts.session
        variant = images.variant_of(image)
        settings = policy.SessionSettings(
            image=image, workspace_readonly=readonly,
            pids_limit=config.merged(loaded, "pids_limit", policy.PIDS_LIMIT)[0],
            package_cache=config.merged(loaded, "package_cache", True)[0],
            toolchain=variant.name if variant else None)
        resolved = None
        if plan.mode == "allowlist":
            engine.require_image(self.firewall_image)
            resolved = allowlist_mod.resolve(plan, self.resolver, self.notice)
        facts = self._host_facts(engine, loaded)
        shape = policy.session_request(name, plan, settings, facts, self.owner.labels(), fresh=opts.fresh,
                                       hosts=resolved.hosts if resolved else (),
                                       container_name=f"mino-{self.owner.token[:8]}-{name}")
        if shape.note:
            self.notice(f"mino: {shape.note}")
        for volume, _ in shape.request.volumes:
            engine.ensure_volume(volume, policy.cache_volume_labels(volume))
        session = Session(name=name, image=image, plan=plan, fresh=opts.fresh,
                          log_path=self.log_dir / f"{name}.log", workspace_readonly=shape.readonly)
        self.cleanup.ensure_watchdog(engine)
        session.container_id = engine.run(policy.session_spec(shape.request))
        if resolved is not None:
            allowlist = SessionAllowlist(engine, session_container=session.container_id, plan=plan,
                                         resolver=self.resolver, notice=self.notice)
            try:
                allowlist.start(image=self.firewall_image, name=f"{shape.request.name}-fw",
                                labels=dict(shape.network_labels), resolved=resolved)
            except MinoError as exc:
                allowlist.close()
                engine.remove(session.container_id)
                raise FirewallError(f"the allowlist firewall could not be installed, so nothing ran: {exc.message}",
                                    "mino never falls back to an open network; `mino-jupyter doctor` checks "
                                    "the image (nft) and the engine") from None
            session.allowlist = allowlist
        session.state = "idle"
        self.sessions[name] = session
        if plan.mode == "host":
            self.notice(f"mino: session '{name}' uses the host network: cells reach everything this "
                        "machine reaches, its local services included")
        workspace = Path(facts.workspace)
        if not shape.readonly and not _writable_by_cell_user(workspace):
            self.notice(f"mino: {workspace} is mounted at /workspace but the sandbox user (uid "
                        f"{policy.CELL_UID}) cannot write there; to let cells save files next to the "
                        f"notebook: `chown {policy.CELL_UID} {workspace}` or `setfacl -m u:{policy.CELL_UID}:rwx {workspace}`")
        self._changed()
        return session

    # ------------------------------------------------------------------ the allowlist
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
        assert session.allowlist is not None
        self._guard_firewall(session, lambda: session.allowlist.replace(plan))
        session.plan = plan
        self.notice(f"mino: session '{session.name}' network is now {plan.describe()}")

    def _run_in(self, session: Session, script: str, opts: CellOptions, sink: Sink) -> tuple[CellResult, Session]:
        secrets = list(opts.secrets.values())
        env = {**opts.env, **opts.secrets}
        log = SessionLog(session.log_path)
        session.cells_run += 1
        log.cell_start(session.cells_run, script, secrets)
        cell_sink = CellSink(sink, log, secrets)
        session.state = "running"
        self._changed()
        try:
            result = run_script(self.engine, session.container_id, script, env=env, sink=cell_sink,
                                timeout=opts.timeout)
        except MinoError:
            session.state = "idle"
            if self.engine.inspect(session.container_id) is None:
                self._mark_stopped(session)
                raise MinoError(f"session '{session.name}' container is gone (removed outside mino)",
                                "run the cell again to start a new container") from None
            raise
        finally:
            cell_sink.close()
            if session.allowlist is not None and session.state == "running":
                line = session.allowlist.report()
                if line:
                    self.notice(line)
            if session.fresh:
                self._mark_stopped(session)
                self.cleanup.remove_soon(self.engine, session.container_id, session.name)
            elif session.state == "running":
                session.state = "idle"
        log.cell_end(result, cell_sink.dropped)
        session.last_exit = result.exit_code
        self._changed()
        return result, session

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
        session.state = "stopped"
        session.stopped_at = time.time()
        if session.allowlist is not None:
            session.allowlist.close()

    def logs(self, name: str, tail: int | None = None) -> str:
        return SessionLog(self.get(name).log_path).tail(tail)

    def prune(self) -> tuple[list[str], list[str]]:
        """Forget stopped sessions (their log files stay) and remove orphaned containers."""
        with self._lock:
            gone = [n for n, s in self.sessions.items() if s.state == "stopped"]
            for name in gone:
                del self.sessions[name]
        orphaned = prune(self.engine)
        self._changed()
        return gone, orphaned

    def shutdown(self) -> None:
        """Remove every container of this kernel. Runs at exit, restart and unload."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        if self.cleanup.shutdown(self._engine):
            for s in self.sessions.values():
                if s.state != "stopped":
                    self._mark_stopped(s)


def _ca_bundle(setting: str | None) -> str | None:
    if not setting or setting == "none":
        return None
    if setting == "auto":
        for path in HOST_CA_BUNDLES:
            if os.path.isfile(path):
                return os.path.realpath(path)
        return None
    if not os.path.isfile(setting):
        raise UsageError(f"ca_bundle {setting} does not exist", 'set container.ca_bundle to "auto", "none" or a file')
    return os.path.realpath(setting)


def _writable_by_cell_user(path: Path) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_uid == policy.CELL_UID:
        return bool(st.st_mode & 0o200)
    if st.st_gid == policy.CELL_UID:
        return bool(st.st_mode & 0o020)
    if st.st_mode & 0o002:
        return True
    # POSIX ACLs: only a named-user entry for the cell user counts here.
    try:
        out = subprocess.run(["getfacl", "-cpn", str(path)], capture_output=True, text=True, timeout=5).stdout
        return any(line.startswith(f"user:{policy.CELL_UID}:") and "w" in line.split(":")[2]
                   for line in out.splitlines())
    except (OSError, subprocess.SubprocessError):
        return False
