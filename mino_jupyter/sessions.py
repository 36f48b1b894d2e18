"""The kernel's sessions: which exist, starting them, running cells in them, stopping them.

One :class:`SessionManager` per kernel. The magics and the panel call it. :mod:`choices` says
what a new session will be (network plan, image, workspace, limits), :mod:`launch` starts it
(storage, container, firewall), and the owners of each concern do the rest: :mod:`cell` runs
one cell, :mod:`session_firewall` owns a session's firewall, :mod:`changes` lists and applies
what cells wrote, :mod:`cleanup` makes sure nothing outlives the kernel, :mod:`logs` keeps the
output.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from . import changes, config, copied, executor as executors, firewall, host, launch, mounts, policy, storage
from .choices import Choices, size_text
from .cell import CellResult, Sink, run_script
from .cleanup import Cleanup, lease_seconds, owned_by, prune, remove_containers, state_key
from .commands import DEFAULT_SESSION
from .errors import FirewallError, MinoError, UsageError
from .image import base_image_ref
from .session_firewall import SessionFirewall
from .logs import CellSink, SessionLog
from .redact import mask
from .network import NetworkChoice, NetworkPlan, Resolution
from .owner import Owner, current_owner, owner_alive
from .paths import config_dir, logs_dir, state_dir
from .runtime import Engine

SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
SPARE_WAIT = 15.0  # seconds shutdown waits for a session or spare being started (then the sweep takes it)
# A spare's start waits this long after the --fresh cell that asked for it, so that the start's
# own Python work does not compete (for the GIL and 2 cores) with that cell's last output and reply.
SPARE_DELAY = 0.1

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
    cancel: threading.Event | None = None  # set: the cell stops as if interrupted (`%mino kill`)


@dataclass
class Job:
    """A background cell (`%%mino --bg`): it runs on in its session while the kernel goes on."""

    number: int
    session: str
    command: str  # the cell's first line, for `%mino jobs`
    started_at: float
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    result: CellResult | None = None
    error: str | None = None  # what stopped it before it ran, or the engine's failure

    @property
    def state(self) -> str:
        if self.error is not None:
            return "failed"
        if self.result is None:
            return "running"
        if self.result.interrupted:
            return "killed"
        return "timed out" if self.result.timed_out else f"exit {self.result.exit_code}"


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
    cells_run: int = 0  # in this container
    cell_base: int = 0  # cells of this name's earlier containers: the log's numbers go on from there
    last_exit: int | None = None
    started_at: float = field(default_factory=time.time)
    stopped_at: float | None = None
    stop_reason: str | None = None
    firewall: SessionFirewall | None = None
    storage: "storage.SessionStorage | copied.CopiedFiles | None" = None
    namespace: str | None = None  # the container's PID namespace, as seen from here (None: not visible here)
    cgroup: str | None = None  # its own cgroup, when the engine gave it one
    cell_uid: int = policy.CELL_UID  # the cell's uid as this machine sees it
    oom_kills: int = 0
    secrets: set[str] = field(default_factory=set, repr=False)  # every value passed in; memory only
    startup: dict[str, float] = field(default_factory=dict)  # seconds per phase of its start (benchmarks)
    # Started ahead of its first cell (SessionManager.prestart): what it was started for, and the
    # notices of its start, shown by the first cell that takes it. None once a cell has.
    prestarted: tuple | None = field(default=None, repr=False)
    held_notices: list[str] = field(default_factory=list, repr=False)
    # The resident cell executor (None: not started yet, or cells are execs of their own).
    executor_mounted: bool = False
    executor: executors.Executor | None = field(default=None, repr=False)
    executor_busy: threading.Lock = field(default_factory=threading.Lock, repr=False)
    executor_failures: int = 0
    executor_early: launch.EarlyExecutor | None = field(default=None, repr=False)

    def row(self) -> dict:
        return {
            "name": self.name, "container": (self.container_id or "")[:12], "image": self.image,
            "network": self.plan.describe(), "cells": self.cells_run, "state": self.state,
            "last_exit": self.last_exit, "started": self.started_at, "stopped": self.stopped_at,
            "workspace": self.workspace,
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
    the cell's run, the workspace's changes, cleanup and logs each have their own owner.
    """

    def __init__(self, *, cwd: Callable[[], Path] = Path.cwd, notice: Notice | None = None,
                 env: Mapping[str, str] | None = None, owner: Owner | None = None,
                 watchdog: bool = True, resolver: firewall.Resolver = firewall.system_resolver):
        self.cwd = cwd
        self._say = notice or (lambda message: print(message, file=sys.stderr))
        self._holding = threading.local()  # a thread whose notices wait (the prestart's)
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
        # One spare container for the next --fresh cell (after the first one), started ahead
        # with the last --fresh cell's options; invisible until a cell takes it.
        self.spare: Session | None = None
        self.spares = True  # MinoMagics.prestart
        self._spare_thread: threading.Thread | None = None
        self._prestart_thread: threading.Thread | None = None
        self._spare_epoch = 0  # moved on by `stop --all` and spares off: a spare being started then goes
        self._shown: set[str] = set()  # once-per-kernel notices (what this engine cannot apply)
        self.jobs: dict[int, Job] = {}  # background cells (`%%mino --bg`), by number
        self._job_count = 0
        self._closed = False
        self.log_dir = logs_dir(env) / f"{time.strftime('%Y%m%d-%H%M%S')}-{self.owner.token}"
        self.listeners: list[Callable[[], None]] = []  # called when sessions change (the panel)
        self.choices = Choices(cwd, env, self.state, self.notice)
        self.first_run_hook: Callable[[], None] | None = None  # no network chosen anywhere yet
        atexit.register(self.shutdown)

    def notice(self, message: str) -> None:
        """Say something to the user, or keep it for later when this thread's notices wait."""
        held = getattr(self._holding, "notices", None)
        if held is not None:
            held.append(message)
        else:
            self._say(message)

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

    # ------------------------------------------------------------------ cells
    def run_cell(self, script: str, opts: CellOptions, sink: Sink) -> tuple[CellResult, Session]:
        session, loaded = self._prepare(opts)
        result = self._run_in(session, script, opts, sink)
        if session.storage is not None and config.merged(loaded, "auto_apply", False)[0]:
            self._auto_apply(session)
        return result, session

    def start_background(self, script: str, opts: CellOptions, sink: Sink,
                         done: Callable[[Job], None] | None = None) -> Job:
        """Start a cell that runs on in its session (`%%mino --bg`): the session is made (or
        checked) now, so a bad option fails here; the cell then runs on a thread of its own, is
        logged like any cell and ends with its session (or `kill_jobs`)."""
        job = Job(number=self._job_count + 1, session=opts.session, command=(script.strip().splitlines() or [""])[0][:60],
                  started_at=time.time())
        opts = dataclasses.replace(opts, cancel=job.cancel)
        session, loaded = self._prepare(opts)
        self._job_count += 1
        job.session = session.name

        def run() -> None:
            try:
                job.result = self._run_in(session, script, opts, sink)
                if session.storage is not None and config.merged(loaded, "auto_apply", False)[0]:
                    self._auto_apply(session)
            except Exception as exc:  # noqa: BLE001 - a thread's failure is the job's state
                job.error = getattr(exc, "message", None) or str(exc)
            finally:
                if done is not None:
                    done(job)
                self._changed()

        job.thread = threading.Thread(target=run, name=f"mino-job-{job.number}", daemon=True)
        self.jobs[job.number] = job
        job.thread.start()
        return job

    def kill_jobs(self, numbers: list[int] | None = None, wait: float = 10.0) -> list[Job]:
        """Stop background cells (all running ones when `numbers` is None); they end as an
        interrupted cell does. Returns the jobs that were running."""
        if numbers is not None:
            unknown = [n for n in numbers if n not in self.jobs]
            if unknown:
                raise UsageError(f"no background job {unknown[0]} in this kernel",
                                 "`%mino jobs` lists them" + (f": {', '.join(map(str, self.jobs))}" if self.jobs else ""))
        chosen = [j for n, j in self.jobs.items() if (numbers is None or n in numbers) and j.state == "running"]
        for job in chosen:
            job.cancel.set()
        end = time.monotonic() + wait
        for job in chosen:
            if job.thread is not None:
                job.thread.join(max(0.0, end - time.monotonic()))
        return chosen

    def _prepare(self, opts: CellOptions) -> tuple[Session, config.Loaded]:
        """Everything before a cell runs: its options checked, its network decided, its session
        found or started."""
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
        choices = self.choices
        presets = choices.presets()  # read once per cell, for the files and the plan
        loaded = choices.settings(presets)
        choices.warn_once(loaded)
        loaded.require_usable()  # a config file that cannot be used as written: nothing runs
        first_run = (not choices.first_run_done and opts.network.silent and choices.network is None
                     and not loaded.explicit_network() and opts.session not in self.sessions)
        with self._lock:
            existing = None if opts.fresh else self.sessions.get(opts.session)
            if existing is not None and existing.state == "stopped":
                existing = None
            if existing is not None and existing.prestarted is not None:
                existing = self._take_prestarted(existing, opts, loaded, presets)
            resolution = choices.plan(opts.network, (existing.name, existing.plan) if existing else None,
                                      loaded, presets)
            image = choices.image_for(opts.image, loaded)
            if existing is not None:
                self._check_compatible(existing, resolution.plan, image, opts)
            else:
                workspace = choices.workspace_for(opts.workspace, loaded)
                resources = choices.resources_for(opts.memory, opts.cpus, opts.disk, loaded)
            for warning in resolution.warnings:
                self.notice(f"mino: {warning}")
            engine = self.engine
            if existing is not None and resolution.plan != existing.plan:
                self._replan(existing, resolution.plan)  # allowlist entries changed: new rules
            session = (existing or (self._take_spare(opts, loaded, presets) if opts.fresh else None)
                       or self._start_session(engine, opts, image, resolution.plan, workspace, resources, loaded))
            if first_run:
                choices.first_run_done = True
                if self.first_run_hook:
                    self.first_run_hook()
            if session.firewall is not None and session.firewall.due():
                self._guard_firewall(session, session.firewall.refresh)
        return session, loaded

    # ------------------------------------------------------------------ the default session, ahead
    def prestart(self) -> threading.Thread | None:
        """Start the default session in the background when the network is already chosen (the
        extension has just loaded), so the first cell does not wait for it. That cell takes it
        only if it would have started the very same session itself (network plan, image,
        workspace and its directory, limits, settings), else it is removed and the cell starts
        its own: starting ahead changes when, never what. Its notices wait for that cell."""
        try:
            loaded = self.choices.settings()
        except MinoError:
            return None
        if loaded.errors or not (loaded.explicit_network() or self.choices.network is not None):
            return None  # a first run (the picker comes with the first cell) or a broken file
        thread = threading.Thread(target=self._prestart, name="mino-prestart", daemon=True)
        self._prestart_thread = thread
        thread.start()
        return thread

    def _new_session(self, opts: CellOptions, loaded: config.Loaded, presets: dict | None = None) -> tuple:
        """What a cell with `opts` would start as a new session now: the network plan, image,
        workspace, the limits as asked (the settings hold the files' values: a default taken
        from the free disk space may move a little between two looks), the notebook's directory
        and the home. Its notices are the caller's."""
        choices = self.choices
        return (choices.plan(opts.network, None, loaded, presets).plan, choices.image_for(opts.image, loaded),
                choices.workspace_for(opts.workspace, loaded), (opts.memory, opts.cpus, opts.disk),
                self.cwd().resolve(), choices.home(), config.describe(loaded))

    def _prestart(self) -> None:
        held: list[str] = []
        self._holding.notices = held
        try:
            with self._lock:
                current = self.sessions.get(DEFAULT_SESSION)
                if self._closed or (current is not None and current.state != "stopped"):
                    return
                if host.engine_elsewhere(self.engine):  # a copy made now, not when its first cell runs
                    return
                loaded = self.choices.settings()
                opts = CellOptions()
                resolution = self.choices.plan(opts.network, None, loaded)
                for warning in resolution.warnings:
                    self.notice(f"mino: {warning}")
                wanted = self._new_session(opts, loaded)
                plan, image, workspace = wanted[:3]
                resources = self.choices.resources_for(opts.memory, opts.cpus, opts.disk, loaded)
                session = self._start_session(self.engine, opts, image, plan, workspace, resources, loaded)
                session.prestarted, session.held_notices = wanted, held
                self._start_executor(session)
                if self._closed:  # unloaded meanwhile: nothing of it stays
                    self._remove(session)
        except Exception:  # noqa: BLE001 - the first cell starts its own session and reports why not
            self._forget_notices(held)
        finally:
            self._holding.notices = None

    def _forget_notices(self, held: list[str]) -> None:
        """Notices that were held and will never be shown: once-per-kernel ones may come again."""
        self._shown.difference_update(held)

    def _take_prestarted(self, session: Session, opts: CellOptions, loaded: config.Loaded,
                         presets: dict) -> Session | None:
        """The prestarted default session if this cell would start the same one, else None (removed)."""
        self._holding.notices = []
        try:
            same = self._new_session(opts, loaded, presets) == session.prestarted
        finally:
            self._holding.notices = None
        if not same:
            self._remove(session)
            self._forget_notices(session.held_notices)
            return None
        session.prestarted = None
        for message in session.held_notices:
            self.notice(message)
        session.held_notices = []
        return session

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
        name = self._fresh_name() if opts.fresh else opts.session
        session = self._launch(engine, name, opts.fresh, image, plan, workspace, resources, loaded)
        self._register(session)
        return session

    def _fresh_name(self) -> str:
        self._fresh_count += 1
        return f"fresh-{self._fresh_count}"

    def _launch(self, engine: Engine, name: str, fresh: bool, image: str, plan: NetworkPlan,
                workspace: str, resources: policy.Resources, loaded: config.Loaded) -> Session:
        """Start a session's container (storage, firewall, executor); not yet one of the kernel's."""
        started = launch.start(engine, launch.Request(
            name=name, fresh=fresh, image=image, plan=plan, workspace=workspace, resources=resources,
            loaded=loaded, notebook_dir=self.cwd().resolve(), home=self.choices.home()), launch.Kernel(
            owner={**self.owner.labels(), "io.mino.state": state_key(self.state)}, kernel_id=self.kernel_id,
            state=self.state, storage_dir=self.storage_dir,
            firewall_image=self.firewall_image, resolver=self.resolver, notice=self.notice,
            before_container=self.cleanup.ensure_watchdog, shown=self._shown,
            executor=executors.enabled(self.env), protected=tuple(self._own_dirs()),
            lease=lease_seconds(self.env)))
        if started.lease:
            for cid in (started.container, started.firewall.container if started.firewall else None):
                if cid:
                    self.cleanup.lease(engine, cid, started.lease)
        previous = self.sessions.get(name)  # a restarted session goes on in the same log: so do its numbers
        return Session(name=name, image=image, plan=plan, fresh=fresh, log_path=self.log_dir / f"{name}.log",
                       workspace=started.workspace, resources=resources, container_id=started.container,
                       storage=started.storage, firewall=started.firewall, namespace=started.namespace,
                       cgroup=started.cgroup, cell_uid=started.cell_uid, oom_kills=started.oom_kills,
                       startup=started.phases, state="idle", executor_mounted=started.executor,
                       executor_early=started.early,
                       cell_base=previous.cell_base + previous.cells_run if previous is not None else 0)

    def _register(self, session: Session) -> None:
        """The session is the kernel's now: listed, shown, and said what it opens."""
        self.sessions[session.name] = session
        if session.plan.mode == "host":
            self.notice(f"mino: session '{session.name}' uses the host network: cells reach everything this "
                        "machine reaches, its local services included")
        if session.workspace == "rw":
            self.notice(policy.RW_WARNING.format(name=session.name, workspace=session.storage.notebook_dir))
        self._changed()

    # ------------------------------------------------------------------ a spare for --fresh cells
    def _refill_spare(self, opts: CellOptions) -> None:
        """After a --fresh cell: start a spare container for the next one with the same options,
        on a thread (no cell waits for it, and none waits for a cell). One at a time."""
        if not self.spares or self._closed or self.spare is not None:
            return
        if self._spare_thread is not None and self._spare_thread.is_alive():
            return
        if self._engine is not None and host.engine_elsewhere(self._engine):
            return  # its workspace would be a copy made now, not of the notebook's directory when the cell runs
        like = CellOptions(fresh=True, image=opts.image, network=opts.network, workspace=opts.workspace,
                           memory=opts.memory, cpus=opts.cpus, disk=opts.disk)
        self._spare_thread = threading.Thread(target=self._start_spare, args=(like,), name="mino-spare", daemon=True)
        self._spare_thread.start()

    def _start_spare(self, opts: CellOptions) -> None:
        """A --fresh session as the next cell like `opts` would start it, firewall and executor
        included; nothing runs in it until a cell takes it. Its notices wait for that cell."""
        held: list[str] = []
        self._holding.notices = held
        session = None
        time.sleep(SPARE_DELAY)
        try:
            with self._lock:  # the decisions; the start itself does not hold up other cells
                loaded = self.choices.settings()
                if self._closed or not self.spares or self.spare is not None or loaded.errors:
                    return
                epoch = self._spare_epoch
                wanted = self._new_session(opts, loaded)
                plan, image, workspace = wanted[:3]
                resources = self.choices.resources_for(opts.memory, opts.cpus, opts.disk, loaded)
                name = self._fresh_name()
            session = self._launch(self.engine, name, True, image, plan, workspace, resources, loaded)
            session.prestarted, session.held_notices = wanted, held
            self._start_executor(session)
            with self._lock:
                if not self._closed and self.spares and self.spare is None and epoch == self._spare_epoch:
                    self.spare, session = session, None
        except Exception:  # noqa: BLE001 - the next --fresh cell starts its own container
            self._forget_notices(held)
        finally:
            self._holding.notices = None
            if session is not None:
                self._discard_spare(session)

    def _take_spare(self, opts: CellOptions, loaded: config.Loaded, presets: dict) -> Session | None:
        """The spare, if it is what this --fresh cell would start (and still runs); else it goes."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        self._holding.notices = []
        try:
            same = self._new_session(opts, loaded, presets) == spare.prestarted
        finally:
            self._holding.notices = None
        if not same or not self._still_runs(spare):
            self._discard_spare(spare)
            return None
        spare.prestarted, spare.started_at = None, time.time()
        for message in spare.held_notices:
            self.notice(message)
        spare.held_notices = []
        self._register(spare)
        return spare

    def _still_runs(self, spare: Session) -> bool:
        """The spare's container runs: its executor's connection is open (it closes when the
        container goes), or where it has none, the engine says so."""
        if spare.executor is not None:
            return not spare.executor.dead
        info = self.engine.inspect(spare.container_id) or {}
        return bool(info.get("State", {}).get("Running"))

    def drop_spare(self) -> None:
        """No spare any more (spares turned off): the one ready goes."""
        with self._lock:
            spare, self.spare = self.spare, None
            self._spare_epoch += 1
        if spare is not None:
            self._discard_spare(spare)

    def _discard_spare(self, session: Session) -> None:
        """A spare no cell will take: its container goes in the background, then its disk."""
        self._forget_notices(session.held_notices)
        self._mark_stopped(session)
        self.cleanup.remove_soon(self.engine, session.container_id, session.name,
                                 after=lambda s=session: self._release_fresh(s))

    # ------------------------------------------------------------------ the firewall
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
        if session.firewall.names_pinned:  # nothing touched: the session goes on as it was
            raise UsageError(f"session '{session.name}' runs on an engine elsewhere, where mino cannot rewrite its "
                             "/etc/hosts: its allowlist is fixed while it runs; nothing was changed",
                             f"`%mino stop {session.name}`, then run the cell with the new entries")
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
        log.cell_start(session.cell_base + session.cells_run, script, secrets)
        cell_sink = CellSink(sink, log, secrets)
        session.state = "running"
        self._changed()
        executor = self._take_executor(session)
        try:
            try:
                result = self._run_script(session, script, env, cell_sink, opts, executor)
            except MinoError:
                session.state = "idle"
                gone = self._container_gone(session)
                if gone:
                    raise MinoError(f"session '{session.name}' stopped: {gone}; its processes and the files "
                                    "outside /workspace are gone", "run the cell again to start a new container") from None
                raise
            finally:
                cell_sink.close()
                self._report_refused(session, secrets)
            log.cell_end(result, cell_sink.dropped)
            session.last_exit = result.exit_code
            if result.lost and not self._container_gone(session):
                self.notice(f"mino: {result.lost}; the cell did not complete (run it again); the next cell "
                            "starts a new executor")
            if result.exit_code >= 128 or result.exit_code < 0:
                self._after_kill(session, result)
        finally:
            log.close()
            if executor is not None:
                session.executor_busy.release()
            if session.fresh:  # whatever happened, a --fresh container goes now, its replacement comes
                self._refill_spare(opts)
                self._keep_changes(session)
                self._mark_stopped(session)
                self.cleanup.remove_soon(self.engine, session.container_id, session.name,
                                         after=lambda s=session: self._release_fresh(s))
            elif session.state == "running":
                session.state = "idle"
        self._changed()
        return result

    def _run_script(self, session: Session, script: str, env: dict, sink, opts: CellOptions,
                    executor: executors.Executor | None) -> CellResult:
        def run(through: executors.Executor | None) -> CellResult:
            return run_script(self.engine, session.container_id, script, env=env, sink=sink, timeout=opts.timeout,
                              control=session.storage if getattr(session.storage, "control_files", False) else None,
                              namespace=session.namespace, cgroup=session.cgroup,
                              cell_uid=session.cell_uid, cancel=opts.cancel, executor=through)
        if executor is not None:
            try:
                return run(executor)
            except executors.ExecutorGone as exc:  # it could not take the cell: nothing ran
                session.executor = None
                self.notice(f"mino: {exc.message}; a new executor runs this cell")
            replacement = self._start_executor(session)  # the lock for the session's executor is this cell's
            if replacement is not None:
                try:
                    return run(replacement)
                except executors.ExecutorGone:
                    session.executor = None
        return run(None)

    # ------------------------------------------------------------------ the cell executor
    def _start_executor(self, session: Session) -> executors.Executor | None:
        """The session's executor, started if it is not running. After two failed starts in a
        row its cells are execs of their own, said once."""
        if not session.executor_mounted or session.executor_failures >= 2:
            return None
        if session.executor is not None and not session.executor.dead:
            return session.executor
        early, session.executor_early = session.executor_early, None
        try:
            session.executor = (early.result(executors.HELLO_TIMEOUT + 5) if early is not None
                                else executors.Executor.start(self.engine, session.container_id))
            session.executor_failures = 0
        except Exception as exc:  # noqa: BLE001 - any failure to start: the exec path stays
            session.executor = None
            session.executor_failures += 1
            if session.executor_failures >= 2:
                why = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                self.notice(f"mino: session '{session.name}': the cell executor does not start ({why}); "
                            "its cells run as one exec each (slower)")
        return session.executor

    def _take_executor(self, session: Session) -> executors.Executor | None:
        """The executor for this cell, or None when another cell of the session holds it (a
        background cell) or there is none: then the cell is an exec of its own."""
        if not session.executor_busy.acquire(blocking=False):
            return None
        executor = self._start_executor(session)
        if executor is None:
            session.executor_busy.release()
        return executor

    def _report_refused(self, session: Session, secrets: list[str]) -> None:
        """What the firewall refused during the cell, masked like the cell's output (a cell can
        spell a secret into a name it looks up)."""
        if session.firewall is None or session.state != "running":
            return
        for line in session.firewall.report():
            self.notice(mask(line, secrets))

    def _after_kill(self, session: Session, result: CellResult) -> None:
        """A cell ended by a signal: the kernel's OOM killer? the container itself?"""
        kills = host.oom_kills(session.cgroup)
        if kills is not None and kills > session.oom_kills:
            session.oom_kills = kills
            self.notice(f"mino: killed: out of memory (limit {size_text(session.resources.memory)}); raise it with "
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
            reason = f"its container ran out of memory (limit {size_text(session.resources.memory)})"
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
        if not self._holds_changes(store):
            store.teardown()
            session.storage = None

    @staticmethod
    def _holds_changes(store) -> bool:
        if isinstance(store, copied.CopiedFiles):
            return store.holds_changes()
        return store.upper is not None and any(os.scandir(store.upper))

    def _keep_changes(self, session: Session) -> None:
        """Before a container goes: a copied workspace is read back (an overlay's stays here)."""
        if isinstance(session.storage, copied.CopiedFiles) and session.container_id:
            session.storage.before_removal(self.engine, session.container_id, self.notice)

    # ------------------------------------------------------------------ what cells wrote
    def _storage_of(self, name: str, refresh: bool = True) -> "storage.SessionStorage | copied.CopiedFiles":
        session = self.get(name)
        if refresh and isinstance(session.storage, copied.CopiedFiles) and session.state != "stopped":
            session.storage.refresh(self.engine, session.container_id)  # what the cells wrote until now
        if session.storage is None or session.storage.upper is None:
            mode = session.workspace
            why = ("its workspace is not an overlay (" + mode + ")") if mode != "overlay" else "its disk is gone"
            raise UsageError(f"session '{name}' has no changes to show: {why}",
                             "cells' writes wait for `%mino apply` only in the overlay workspace (the default)")
        return session.storage

    def changes(self, name: str = DEFAULT_SESSION) -> list[changes.Change]:
        store = self._storage_of(name)
        return changes.list_changes(store.upper, store.notebook_dir, store.opaque_xattr, _deleted(store))

    def diff(self, name: str, change: changes.Change) -> str | None:
        store = self._storage_of(name, refresh=False)  # the read-back its listing made
        return changes.diff(change, store.upper, store.notebook_dir)

    def apply(self, name: str = DEFAULT_SESSION, paths: list[str] | None = None) -> list[changes.Outcome]:
        store = self._storage_of(name)
        outcomes = changes.apply(store.upper, store.notebook_dir, paths or None, budget=self._budget(name),
                                 opaque_xattr=store.opaque_xattr, protected=self._own_dirs(), deleted=_deleted(store))
        self._changed()
        return outcomes

    def _own_dirs(self) -> list[Path]:
        """mino's state and configuration: never written by an apply, wherever they sit."""
        return [self.state, config_dir(self.env)]

    def _budget(self, name: str) -> int:
        """What one apply may write next to the notebook: no more than the session's disk could
        hold, and no more than half the free space there."""
        session = self.get(name)
        return min(session.resources.disk, host.disk_free(session.storage.notebook_dir) // 2)

    def _auto_apply(self, session: Session) -> None:
        if isinstance(session.storage, copied.CopiedFiles) and session.state != "stopped":
            try:
                session.storage.refresh(self.engine, session.container_id)
            except MinoError as exc:
                self.notice(f"mino: auto_apply could not read the workspace back: {exc.message}")
                return
        if session.storage is None or session.storage.upper is None:
            return
        store = session.storage
        done = [o.path for o in changes.apply(store.upper, store.notebook_dir, None, budget=self._budget(session.name),
                                              opaque_xattr=store.opaque_xattr, protected=self._own_dirs(),
                                              deleted=_deleted(store))
                if o.applied]
        if done:
            self.notice(f"mino: applied {len(done)} data file(s) (auto_apply): " + ", ".join(done[:10])
                        + (" ..." if len(done) > 10 else ""))

    # ------------------------------------------------------------------ choices that touch sessions
    def remember_network(self, mode: str, preset: str | None, scope: str, allow: tuple[str, ...] = ()) -> str:
        """Save a network choice (scope "session": this kernel, "project" or "global"). The
        default session restarts at its next cell when its network differs from the new choice."""
        message = self.choices.remember_network(mode, preset, scope, allow)
        if self._follow_kernel_choice():
            message += "; the default session restarts with it at the next cell"
        self._changed()
        return message

    def settings_changed(self) -> None:
        """A configuration file was edited (`%mino config set`): the views show it."""
        self._changed()

    def kernel_choice_changed(self) -> None:
        """The kernel-level choice changed outside the panel (`%config MinoMagics.network`)."""
        if self._follow_kernel_choice():
            self.notice("mino: the default session restarts with the new network at the next cell")
        self._changed()

    def _follow_kernel_choice(self) -> bool:
        """Bring the default session to what a new cell would now get, as cell flags would: the
        same mode with other allow entries changes its rules live (its processes and /tmp stay);
        another mode stops it, to restart at the next cell (True)."""
        current = self.sessions.get(DEFAULT_SESSION)
        if current is None or current.state == "stopped":
            return False
        wanted = self.choices.plan(NetworkChoice("cell flags"), None, self.choices.settings()).plan
        if wanted == current.plan:
            return False
        if wanted.mode == current.plan.mode and current.firewall is not None:
            with self._lock:
                self._replan(current, wanted)
            return False
        self.stop(DEFAULT_SESSION)
        return True

    def trust_project(self, path: Path | None = None) -> str:
        message = self.choices.trust_project(path)
        self._changed()
        return message

    def current_network(self) -> Resolution:
        """What the next plain %%mino cell in the default session would get."""
        session = self.sessions.get(DEFAULT_SESSION)
        live = (session.name, session.plan) if session is not None and session.state != "stopped" else None
        return self.choices.plan(NetworkChoice("cell flags"), live, self.choices.settings())

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
            spare, self.spare = self.spare, None
            self._spare_epoch += 1
            for s in live:  # a copied workspace is read back before its container goes
                self._keep_changes(s)
            if live or spare is not None:
                remove_containers(self.engine, owned_by(self.engine, self.owner.token))
            for s in live + ([spare] if spare is not None else []):
                self._mark_stopped(s)
        self._changed()
        return [s.name for s in live]

    def _remove(self, session: Session) -> None:
        if session.container_id:
            self._keep_changes(session)
            self.engine.remove(session.container_id)
            self.cleanup.unlease(session.container_id)
        self._mark_stopped(session)

    def wait_for_removals(self, timeout: float = 10.0) -> None:
        self.cleanup.wait_for_removals(timeout)

    def _mark_stopped(self, session: Session) -> None:
        """The container is gone (or going, for --fresh): its overlays go; its disk stays, with
        the changes cells made, until the session is forgotten (prune) or the kernel ends."""
        session.state = "stopped"
        session.stopped_at = time.time()
        if session.executor is not None:  # its stdin closes: it kills what it started and exits
            session.executor.disconnect()
            session.executor = None
        if session.executor_early is not None:
            session.executor_early.discard()
            session.executor_early = None
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
        orphaned = prune(self.engine, state=self.state)
        storage.reap(self.state / "sessions", owner_alive, mounts.for_cleanup(self.engine))
        self._changed()
        return gone, orphaned

    def shutdown(self) -> None:
        """Remove every container of this kernel, then its sessions' disks and mounts. Runs at
        exit, restart and unload."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        for job in self.jobs.values():  # background cells end with the kernel (their containers go next)
            job.cancel.set()
        # A session or spare being started (its containers, the image's home read through a
        # short-lived one): in place before the sweep, or this process could exit between their
        # creation and their removal. Each removes what it made once it sees _closed.
        end = time.monotonic() + SPARE_WAIT
        for thread in (self._prestart_thread, self._spare_thread):
            if thread is not None:
                thread.join(max(0.0, end - time.monotonic()))
        spare, self.spare = self.spare, None
        if self.cleanup.shutdown(self._engine):
            for s in list(self.sessions.values()) + ([spare] if spare is not None else []):
                if s.state != "stopped":
                    self._mark_stopped(s)
            storage.teardown_owner(self.storage_dir, mounts.for_cleanup(self._engine) if self._engine else mounts.Local())
            if self._engine is not None:
                self.cleanup.release_caches(self._engine)


def _deleted(store) -> list[str]:
    """What the cells deleted, where the engine's layer cannot mark it (a copied workspace)."""
    return list(getattr(store, "deleted", ()))
