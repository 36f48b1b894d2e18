"""The kernel's sessions: which containers exist, running cells in them, logs, cleanup.

One :class:`SessionManager` per kernel. The magics and the panel call it; it asks
:mod:`network` for the plan, :mod:`policy` for container specs, :mod:`runtime` to act, and
keeps logs that outlive the containers.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Mapping

from . import config, firewall, policy, presets as presets_mod
from .cell import CellResult, Sink, run_script
from .errors import FirewallError, MinoError, UsageError
from . import image as images
from .image import base_image_ref
from .network import NetworkChoice, NetworkPlan, NetworkResolutionInput, Resolution, resolve
from .owner import Owner, current_owner
from .paths import logs_dir
from .reaper import owned_by, prune, remove_containers
from .redact import Redactor, mask
from .runtime import STDERR, STDOUT, Engine

SESSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,40}$")
DEFAULT_SESSION = "default"
LOG_CELL_LIMIT = 1 << 20  # bytes of output kept in the log per cell
RESOLVE_REFRESH = 30.0  # seconds after which an allowlist session's names are resolved again
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
    firewall_id: str | None = None
    fw_channel: object | None = None  # runtime.Attached to the firewall agent, when the engine allows
    resolved: firewall.Resolved | None = None
    resolved_at: float = 0.0

    def row(self) -> dict:
        return {
            "name": self.name, "container": (self.container_id or "")[:12], "image": self.image,
            "network": self.plan.describe(), "cells": self.cells_run, "state": self.state,
            "last_exit": self.last_exit, "started": self.started_at, "stopped": self.stopped_at,
        }


class SessionLog:
    """A session's output on the host, secrets masked; it outlives the container."""

    def __init__(self, path: Path):
        self.path = path
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            for directory in (path.parent.parent, path.parent):  # output can be sensitive: owner only
                os.chmod(directory, 0o700)

    def cell_start(self, number: int, script: str, secrets: list[str]) -> None:
        stamp = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        body = "".join(f"$ {line}\n" for line in mask(script, secrets).splitlines())
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"=== cell {number} at {stamp}\n{body}--- output\n")

    def write(self, text: str) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)

    def cell_end(self, result: CellResult, dropped: int) -> None:
        note = f"[{dropped} bytes of output not logged]\n" if dropped else ""
        if result.timed_out:
            status = f"timed out after {result.timeout:g} s (exit 124)"
        elif result.interrupted:
            status = f"{result.interrupted} (exit {result.exit_code})"
        else:
            status = f"exit {result.exit_code}"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{note}=== {status} after {result.duration:.2f} s\n")

    def tail(self, lines: int | None) -> str:
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        if lines is None:
            return text
        return "\n".join(text.splitlines()[-lines:]) + ("\n" if text else "")


class _CellSink:
    """Fans a cell's output out to the display (masked) and the log (masked, capped)."""

    def __init__(self, sink: Sink, log: SessionLog, secrets: list[str]):
        self.sink = sink
        self.log = log
        self.redactors = {STDOUT: Redactor(secrets), STDERR: Redactor(secrets)}
        self.logged = 0
        self.dropped = 0

    def write(self, stream: int, text: str) -> None:
        text = self.redactors[stream].feed(text)
        if text:
            self._out(stream, text)

    def _out(self, stream: int, text: str) -> None:
        self.sink.write(stream, text)
        size = len(text.encode("utf-8", "replace"))
        if self.logged + size <= LOG_CELL_LIMIT:
            self.log.write(text)
            self.logged += size
        else:
            self.dropped += size

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        for stream, redactor in self.redactors.items():
            rest = redactor.flush()
            if rest:
                self._out(stream, rest)
        self.sink.flush()


def _labels(owner: Owner, extra: Mapping[str, str]) -> dict[str, str]:
    return {**policy.version_labels(), **owner.labels(), **extra}


def kernel_id() -> str | None:
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).stem
        return name[len("kernel-"):] if name.startswith("kernel-") else name
    except Exception:
        return None


class SessionManager:
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
        self._engine: Engine | None = None
        self._lock = threading.RLock()
        self._fresh_count = 0
        self._want_watchdog = watchdog
        self._watchdog: subprocess.Popen | None = None
        self._watchdog_pipe: int | None = None
        self._closed = False
        self._reaped = False
        self._removals: list[threading.Thread] = []
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
            if not self._reaped:  # the load-time reap found no engine running
                threading.Thread(target=self._reap_orphans, name="mino-reaper", daemon=True).start()
        return self._engine

    def start_background_reap(self) -> None:
        """At extension load: remove containers of kernels that died, without delaying the load."""
        def reap() -> None:
            try:
                engine = Engine.connect(self.env, autostart=False)
            except Exception:
                return  # no engine running: reap when a cell first connects
            try:
                self._reap(engine)
            finally:
                engine.close()

        threading.Thread(target=reap, name="mino-reaper", daemon=True).start()

    def _reap_orphans(self) -> None:
        self._reap(self._engine)

    def _reap(self, engine: Engine) -> None:
        self._reaped = True
        try:
            removed = prune(engine)
        except Exception:
            return
        if removed:
            self.notice(f"mino: removed {len(removed)} container(s) left behind by a kernel that died")

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
            if session.firewall_id and time.monotonic() - session.resolved_at > RESOLVE_REFRESH:
                self._refresh_firewall(session)
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

    def _start_session(self, engine: Engine, opts: CellOptions, image: str, plan: NetworkPlan,
                       readonly: bool, loaded: config.Loaded) -> Session:
        images.ensure(engine, image, self.notice)  # mino's own images are built on first use
        if opts.fresh:
            self._fresh_count += 1
            name = f"fresh-{self._fresh_count}"
        else:
            name = opts.session
        session = Session(name=name, image=image, plan=plan, fresh=opts.fresh,
                          log_path=self.log_dir / f"{name}.log", workspace_readonly=readonly)
        pids_limit = config.merged(loaded, "pids_limit", policy.PIDS_LIMIT)[0]
        volumes = images.cache_volumes(image) if config.merged(loaded, "package_cache", True)[0] else ()
        for volume, _ in volumes:
            self._ensure_volume(engine, volume)
        resolved = None
        if plan.mode == "allowlist":
            engine.require_image(self.firewall_image)
            resolved = self._resolve(plan)
        workspace = self.cwd().resolve()
        try:
            present = [entry.name for entry in os.scandir(workspace)]
        except OSError:
            present = []
        home = (self.env or os.environ).get("HOME")
        shared = policy.workspace_mounts(str(workspace), readonly=readonly,
                                         home=str(Path(home).resolve()) if home else None, existing=present)
        if shared.note:
            self.notice(f"mino: {shared.note}")
            readonly = True
            session.workspace_readonly = True
        ca_setting = config.merged(loaded, "ca_bundle", "auto")[0]
        base_labels = {
            "io.mino.session": name,
            "io.mino.network": plan.describe(),
            **({"io.mino.kernel-id": self.kernel_id} if self.kernel_id else {}),
        }
        request = policy.SessionRequest(
            name=f"mino-{self.owner.token[:8]}-{name}",
            image=image,
            network="bridge" if plan.mode == "allowlist" else plan.mode,
            labels=_labels(self.owner, {"io.mino.role": "fresh" if opts.fresh else "session", **base_labels}),
            limits=engine.host_limits(),
            workspace=shared.mounts,
            ca_bundle=_ca_bundle(ca_setting),
            hosts=resolved.hosts if resolved else (),
            no_dns=resolved is not None,
            pids_limit=pids_limit,
            volumes=volumes,
        )
        self._ensure_watchdog(engine)
        session.container_id = engine.run(policy.session_spec(request))
        if resolved is not None:
            try:
                session.firewall_id = engine.run(policy.firewall_spec(
                    name=f"{request.name}-fw", image=self.firewall_image, target_container=session.container_id,
                    labels=_labels(self.owner, {"io.mino.role": "firewall", **base_labels}),
                    limits=engine.host_limits(), command=("sh", "-c", firewall.AGENT)))
                try:
                    session.fw_channel = engine.attach(session.firewall_id)
                except MinoError:
                    session.fw_channel = None  # an engine we cannot attach to: exec each time
                self._install_rules(session, resolved)
            except MinoError as exc:
                engine.remove(session.container_id)
                raise FirewallError(f"the allowlist firewall could not be installed, so nothing ran: {exc.message}",
                                    "mino never falls back to an open network; `mino-jupyter doctor` checks "
                                    "the image (nft) and the engine") from None
        session.state = "idle"
        self.sessions[name] = session
        if plan.mode == "host":
            self.notice(f"mino: session '{name}' uses the host network: cells reach everything this "
                        "machine reaches, its local services included")
        if not readonly and not _writable_by_cell_user(workspace):
            self.notice(f"mino: {workspace} is mounted at /workspace but the sandbox user (uid "
                        f"{policy.CELL_UID}) cannot write there; to let cells save files next to the "
                        f"notebook: `chown {policy.CELL_UID} {workspace}` or `setfacl -m u:{policy.CELL_UID}:rwx {workspace}`")
        self._changed()
        return session

    def _ensure_volume(self, engine: Engine, name: str) -> None:
        """A package cache volume, labelled as mino's. Podman copies the image's directory (owned
        by the sandbox user) into it on first mount; it is shared by this user's sessions only."""
        if engine.request("get", f"/volumes/{name}/exists", what=f"look up volume {name}", ok_missing=True) is None:
            engine.request("post", "/volumes/create", data=json.dumps(
                {"Name": name, "Label": {**policy.version_labels(), "io.mino.cache": name}}),
                headers={"Content-Type": "application/json"}, what=f"create volume {name}")

    # ------------------------------------------------------------------ the allowlist
    def _resolve(self, plan: NetworkPlan, previous: firewall.Resolved | None = None) -> firewall.Resolved:
        resolved = firewall.resolve_entries(plan.allow, self.resolver)
        if previous is not None and resolved.unresolved:
            # A name that stopped resolving keeps its last answers rather than breaking the session.
            keep = [(n, a) for n, a in previous.hosts if n in resolved.unresolved]
            if keep:
                kept = {(a, e.port) for n, a in keep for e in plan.allow if e.host == n}
                resolved = firewall.Resolved(
                    resolved.v4 | {p for p in kept if ":" not in p[0]},
                    resolved.v6 | {p for p in kept if ":" in p[0]},
                    resolved.hosts + tuple(keep),
                    tuple(n for n in resolved.unresolved if n not in {k[0] for k in keep}))
        if resolved.unresolved and (previous is None or set(resolved.unresolved) != set(previous.unresolved)):
            self.notice("mino: allowlist: no address for " + ", ".join(resolved.unresolved)
                        + " on this host; they stay unreachable")
        return resolved

    def _firewall_request(self, session: Session, request: bytes, script: list[str]) -> tuple[int, str, str]:
        """Ask the firewall container: through its attached agent, else with an exec."""
        if session.fw_channel is not None:
            try:
                session.fw_channel.send(request)
                out, err = session.fw_channel.read_until(firewall.END)
                code, text = firewall.split_answer(out)
                return code, text, err.decode(errors="replace") or (text if code else "")
            except (OSError, ConnectionError) as exc:
                session.fw_channel.close()
                session.fw_channel = None
                raise FirewallError(f"lost the firewall container's control channel: {exc}") from None
        code, out, err = self.engine.exec_run(session.firewall_id, policy.exec_body(
            ["sh", "-c", *script], workdir="/", user="0:0"))
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    def _install_rules(self, session: Session, resolved: firewall.Resolved) -> None:
        """Install the ruleset from the firewall container and check it is what we asked for."""
        text = firewall.ruleset(resolved)
        code, out, err = self._firewall_request(session, firewall.install_request(text),
                                                [firewall.INSTALL, "mino-firewall", text])
        if code != 0:
            raise FirewallError(f"nft failed (exit {code}): {(err or out).strip()[:300]}")
        problems = firewall.verify(out, resolved)
        if problems:
            raise FirewallError("the installed rules differ from the allowlist: " + "; ".join(problems))
        session.resolved = resolved
        session.resolved_at = time.monotonic()

    def _write_hosts(self, session: Session, resolved: firewall.Resolved) -> None:
        code, out, _ = self.engine.exec_run(session.container_id, policy.exec_body(
            ["cat", "/etc/hosts"], workdir="/"))
        names = {e.host for e in session.plan.allow if not e.is_ip} | {n for n, _ in (session.resolved or firewall.Resolved()).hosts}
        text = firewall.rewrite_hosts(out.decode(errors="replace"), names, resolved.hosts)
        # Root in the session container holds no capability; it only owns /etc/hosts.
        code, _, err = self.engine.exec_run(session.container_id, policy.exec_body(
            ["sh", "-c", 'printf "%s" "$1" > /etc/hosts', "mino-hosts", text], workdir="/", user="0:0"))
        if code != 0:
            raise FirewallError(f"could not update /etc/hosts: {err.decode(errors='replace').strip()}")

    def _apply(self, session: Session, resolved: firewall.Resolved) -> None:
        try:
            self._install_rules(session, resolved)
            self._write_hosts(session, resolved)
        except MinoError as exc:
            # The old rules may be half-replaced: this session must not run anything any more.
            self._remove(session)
            raise FirewallError(f"updating the allowlist of session '{session.name}' failed, the session "
                                f"was stopped and nothing ran: {exc.message}",
                                "run the cell again to start a new session") from None

    def _refresh_firewall(self, session: Session) -> None:
        resolved = self._resolve(session.plan, session.resolved)
        if session.resolved is not None and (resolved.v4, resolved.v6, set(resolved.hosts)) == \
                (session.resolved.v4, session.resolved.v6, set(session.resolved.hosts)):
            session.resolved_at = time.monotonic()
            return
        self._apply(session, resolved)

    def _replan(self, session: Session, plan: NetworkPlan) -> None:
        """Allowlist entries changed for a live session: re-resolve and replace the rules."""
        old = session.plan
        resolved = self._resolve(plan)
        session.plan = plan
        try:
            self._apply(session, resolved)
        except MinoError:
            session.plan = old
            raise
        self.notice(f"mino: session '{session.name}' network is now {plan.describe()}")

    def _report_refused(self, session: Session) -> None:
        try:
            code, out, _ = self._firewall_request(session, firewall.REPORT_REQUEST, [firewall.READ_REFUSED])
        except MinoError:
            return
        if code == 0:
            line = firewall.describe_refused(firewall.parse_refused(out),
                                             session.resolved or firewall.Resolved())
            if line:
                self.notice(line)

    def _run_in(self, session: Session, script: str, opts: CellOptions, sink: Sink) -> tuple[CellResult, Session]:
        secrets = list(opts.secrets.values())
        env = {**opts.env, **opts.secrets}
        log = SessionLog(session.log_path)
        session.cells_run += 1
        log.cell_start(session.cells_run, script, secrets)
        cell_sink = _CellSink(sink, log, secrets)
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
            if session.firewall_id and session.state == "running":
                self._report_refused(session)
            if session.fresh:
                self._remove_soon(session)
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

    def _remove_soon(self, session: Session) -> None:
        """A --fresh container goes right after its cell, without making the cell wait for
        Podman's teardown (network and storage, about 0.3 s). Shutdown waits for these."""
        self._mark_stopped(session)
        cid, engine = session.container_id, self.engine

        def remove() -> None:
            try:
                engine.remove(cid)
            except Exception:
                pass  # the shutdown sweep, the watchdog or the reaper removes it

        thread = threading.Thread(target=remove, name=f"mino-remove-{session.name}", daemon=True)
        self._removals = [t for t in self._removals if t.is_alive()] + [thread]
        thread.start()

    def wait_for_removals(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self._removals):
            thread.join(max(0.0, deadline - time.monotonic()))

    def _mark_stopped(self, session: Session) -> None:
        session.state = "stopped"
        session.stopped_at = time.time()
        if session.fw_channel is not None:
            session.fw_channel.close()
            session.fw_channel = None

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

    # ------------------------------------------------------------------ lifetime
    def _ensure_watchdog(self, engine: Engine) -> None:
        if not self._want_watchdog or (self._watchdog and self._watchdog.poll() is None):
            return
        read_end, write_end = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "mino_jupyter.watchdog", self.owner.token, engine.endpoint.url,
                 str(self.owner.pid), str(self.owner.start_ticks)],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        finally:
            os.close(read_end)
        self._watchdog_pipe = write_end  # never inherited (O_CLOEXEC); closes when we die

    def shutdown(self) -> None:
        """Remove every container of this kernel. Runs at exit, restart and unload."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        removed = self._engine is None
        try:
            if self._engine is not None:
                self.wait_for_removals()
                remove_containers(self._engine, owned_by(self._engine, self.owner.token))
                removed = True
                for s in self.sessions.values():
                    if s.state != "stopped":
                        self._mark_stopped(s)
        except Exception:
            pass  # not saying "bye" leaves the work to the watchdog
        finally:
            if self._watchdog_pipe is not None:
                try:
                    if removed:
                        os.write(self._watchdog_pipe, b"bye\n")
                    os.close(self._watchdog_pipe)
                except OSError:
                    pass
                self._watchdog_pipe = None


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
