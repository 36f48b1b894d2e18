"""`%%mino` and `%mino`: parse, display, delegate. No decisions of their own."""

from __future__ import annotations

import os
import re
from pathlib import Path
import shlex
import sys
from subprocess import CalledProcessError

from IPython.core.magic import Magics, line_cell_magic, magics_class
from traitlets import Bool, Int, TraitError, Unicode, observe, validate

from .commands import (DEFAULT_SESSION, HelpShown, cell_parser, line_parser, magic_help, render_jobs, render_sessions,
                       run_config_command)
from .errors import MinoError, UsageError
from .network import MODES, NetworkChoice
from .runtime import STDERR
from .sessions import CellOptions, SessionManager

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_DIFFS = 5  # `%mino changes` shows the diffs of the first few modified text files


class CellFailed(CalledProcessError):
    """A `%%mino` cell that exited non-zero, timed out or was interrupted (a CalledProcessError)."""

    def __init__(self, returncode: int, cmd: str, reason: str = ""):
        super().__init__(returncode, cmd)
        self.reason = reason

    def __str__(self) -> str:
        extra = f" ({self.reason})" if self.reason else ""
        return f"%%mino cell returned non-zero exit status {self.returncode}{extra}."


class _DisplaySink:
    """Cell output to the notebook (or into --out/--err variables), as it arrives.

    IPython 9 keeps a copy of everything a cell writes to stdout/stderr in its output history,
    for the life of the kernel. A cell that prints gigabytes would pin them all in memory, so
    only the first HISTORY_LIMIT characters per stream go through IPython's recording write;
    the rest goes straight to the stream (the notebook shows all of it either way).
    """

    HISTORY_LIMIT = 1 << 20

    def __init__(self, capture_out: bool, capture_err: bool, max_lines: int = 0, max_bytes: int = 0):
        self.captured = {1: [] if capture_out else None, 2: [] if capture_err else None}
        self.recorded = {1: 0, 2: 0}
        self.last: int | None = None
        # What a notebook can render: beyond these (0: no limit) output is counted, not shown.
        self.max_lines, self.max_bytes = max_lines, max_bytes
        self.shown_lines = self.shown_bytes = 0
        self.hidden_lines = self.hidden_bytes = 0

    def write(self, stream: int, text: str) -> None:
        target = self.captured[stream]
        if target is not None:
            target.append(text)
            return
        text = self._within_limits(text)
        if not text:
            return
        if self.last is not None and self.last != stream:  # the kernel sends each stream on its own
            (sys.stderr if self.last == STDERR else sys.stdout).flush()  # timer: keep their order
        self.last = stream
        out = sys.stderr if stream == STDERR else sys.stdout
        if self.recorded[stream] < self.HISTORY_LIMIT:
            self.recorded[stream] += len(text)
            out.write(text)
        else:
            type(out).write(out, text)  # the stream's own write, without IPython's history copy

    def _within_limits(self, text: str) -> str:
        """The part of `text` still within the display limits; the rest is counted."""
        if not (self.max_lines or self.max_bytes):
            return text
        keep = 0 if self.hidden_bytes else len(text)
        if keep and self.max_bytes:
            keep = min(keep, max(0, self.max_bytes - self.shown_bytes))  # characters: close enough to bytes
        if keep and self.max_lines:
            room, at = self.max_lines - self.shown_lines, -1  # newlines that may still be shown
            for _ in range(max(0, room)):
                at = text.find("\n", at + 1)
                if at < 0:
                    break
            if room <= 0:
                keep = 0
            elif at >= 0:  # the last newline that fits: nothing after it
                keep = min(keep, at + 1)
        shown, rest = text[:keep], text[keep:]
        self.shown_lines += shown.count("\n")
        self.shown_bytes += len(shown)
        if rest:
            self.hidden_lines += rest.count("\n")
            self.hidden_bytes += len(rest.encode("utf-8", "replace"))
        return shown

    def flush(self) -> None:
        sys.stdout.flush()
        sys.stderr.flush()

    def flush_soon(self) -> None:
        """ipykernel's streams: their sends scheduled on the kernel's I/O thread, not waited for
        (its flush() waits for a round trip); other streams: flushed."""
        for out in (sys.stdout, sys.stderr):
            pub, send = getattr(out, "pub_thread", None), getattr(out, "_flush", None)
            if pub is not None and callable(send) and callable(getattr(pub, "schedule", None)) \
                    and getattr(pub, "thread", None) is not None and pub.thread.is_alive():
                pub.schedule(send)
            else:
                out.flush()


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"


class _BackgroundSink:
    """A background cell's output: kept for its --out/--err variables, otherwise dropped here
    (the session's log has it; shown, it would land in whatever cell runs at that moment)."""

    def __init__(self, capture_out: bool, capture_err: bool):
        self.captured = {1: [] if capture_out else None, 2: [] if capture_err else None}

    def write(self, stream: int, text: str) -> None:
        if self.captured[stream] is not None:
            self.captured[stream].append(text)

    def flush(self) -> None:
        pass


@magics_class
class MinoMagics(Magics):
    """`%%mino` runs a cell in a hardened container; `%mino COMMAND` manages sessions."""

    image = Unicode("", help="image for new sessions in this kernel (above config files)").tag(config=True)
    network = Unicode("", help="network mode for this kernel: bridge, host, none or allowlist").tag(config=True)
    network_preset = Unicode("", help="allowlist preset for this kernel").tag(config=True)
    workspace_readonly = Bool(False, help="mount the notebook's directory read-only by default").tag(config=True)
    display_lines = Int(10_000, help="lines of a cell's output shown in the notebook (0: no limit); the rest "
                                     "is counted and stays in the session's log").tag(config=True)
    display_bytes = Int(2 << 20, help="bytes of a cell's output shown in the notebook (0: no limit)").tag(config=True)
    prestart = Bool(True, help="start containers ahead: the default session when the extension loads, if "
                               "the network is already chosen, and after each --fresh cell a spare for the "
                               "next one (a cell takes either only if it would start the same one)"
                    ).tag(config=True)

    def __init__(self, shell, manager: SessionManager | None = None):
        self.manager = manager or SessionManager()  # before the traits: @observe writes into it
        super().__init__(shell)
        self.manager.first_run_hook = self._first_run
        self._apply_traits(None)
        self._apply_prestart(None)

    @observe("prestart")
    def _apply_prestart(self, change) -> None:
        self.manager.spares = self.prestart
        if not self.prestart:
            self.manager.drop_spare()

    # `%config MinoMagics.network='bogus'` fails when it is set, not at the next cell.
    @validate("network")
    def _valid_network(self, proposal):
        value = proposal["value"]
        if value and value not in MODES:
            raise TraitError(f'mino: unknown network mode "{value}" for MinoMagics.network; '
                             f"valid modes: {', '.join(MODES)} (or '' for none chosen here)")
        return value

    @validate("network_preset")
    def _valid_preset(self, proposal):
        value = proposal["value"]
        known = self.manager.choices.presets()
        if value and value not in known:
            raise TraitError(f'mino: unknown network preset "{value}" for MinoMagics.network_preset; '
                             f"known presets: {', '.join(sorted(known))}")
        return value

    # One writer for the kernel-level choice: a trait writes it when it changes (never again at
    # every cell, which silently undid a later choice made in the panel).
    @observe("image", "network", "network_preset", "workspace_readonly")
    def _apply_traits(self, change) -> None:
        choices = self.manager.choices
        choices.image = self.image or None
        choices.workspace = "ro" if self.workspace_readonly else None
        if change is not None and change["name"] not in ("network", "network_preset"):
            return
        if self.network or self.network_preset:
            choices.network = NetworkChoice("%config MinoMagics", self.network or None,
                                            self.network_preset or None)
        elif choices.network is not None and choices.network.source == "%config MinoMagics":
            choices.network = None
        if change is not None:
            self.manager.kernel_choice_changed()

    def _first_run(self) -> None:
        """No network chosen anywhere yet: offer the picker (interactive) or say so (headless)."""
        if interactive_frontend(self.shell):
            from IPython.display import display

            from .widgets import NetworkPicker

            display(NetworkPicker(self.manager))
        else:
            print("mino: no network chosen yet, so this runs with bridge (full internet, no access to this "
                  "machine's services); to choose: `%mino config set network MODE` (--local for this project)",
                  file=sys.stderr)

    # -------------------------------------------------------------- the magic
    @line_cell_magic
    def mino(self, line: str, cell: str | None = None):
        # The docstring (what `%%mino?` shows) is generated from the parsers: see the end of the class.
        __tracebackhide__ = True
        try:
            if cell is None:
                return self._command(line)
            return self._cell(line, cell)
        except HelpShown:
            return None

    def _cell(self, line: str, cell: str):
        __tracebackhide__ = True
        args = cell_parser().parse_args(shlex.split(line))
        opts = CellOptions(
            session=args.session,
            fresh=args.fresh,
            image=args.image,
            timeout=args.timeout,
            env=self._env(args.env),
            secrets=self._secrets(args.secret),
            network=NetworkChoice("cell flags", args.network, args.network_preset,
                                  tuple(args.network_allow) if args.network_allow else None),
            workspace=args.workspace, memory=args.memory, cpus=args.cpus, disk=args.disk,
        )
        for var in (args.out, args.err):
            if var is not None and not var.isidentifier():
                raise UsageError(f'--out/--err need a Python variable name, not "{var}"', "e.g. --out result")
        if args.bg:
            return self._background(cell, opts, args.out, args.err)
        sink = _DisplaySink(args.out is not None, args.err is not None, self.display_lines, self.display_bytes)
        try:
            result, session = self.manager.run_cell(cell, opts, sink)
        finally:
            if args.out is not None and sink.captured[1] is not None:
                self.shell.user_ns[args.out] = "".join(sink.captured[1])
            if args.err is not None and sink.captured[2] is not None:
                self.shell.user_ns[args.err] = "".join(sink.captured[2])

        if sink.hidden_bytes:
            print(f"mino: {sink.hidden_lines:,} more line(s) ({_size(sink.hidden_bytes)}) not shown: the display "
                  f"stops at {sink.max_lines:,} lines or {_size(sink.max_bytes)} a cell, which a notebook renders "
                  f"well; `%mino logs {session.name}` has them, `--out VAR` keeps all of it, "
                  "`%config MinoMagics.display_lines = 0` (and display_bytes) lifts the limit", file=sys.stderr)
        if result.survivors:
            shown = ", ".join(f"{p.pid} ({p.command})" for p in result.survivors[:5])
            print(f"mino: {len(result.survivors)} process(es) the cell started could not be stopped: {shown}; "
                  f"`%mino stop {session.name}` removes the container", file=sys.stderr)
        if result.stopped_everything:
            print(f"mino: some processes kept changing pid to escape; with no freezer on this engine, every process "
                  f"of the cell's user in session '{session.name}' was ended, earlier cells' background "
                  "processes too", file=sys.stderr)
        if result.timed_out:
            stopped = "its processes were stopped" if not result.survivors else "the rest of its processes were stopped"
            print(f"mino: cell timed out after {result.timeout:g} s; {stopped} (exit 124)", file=sys.stderr)
            if args.raise_error:
                raise CellFailed(124, cell, f"timed out after {result.timeout:g} s")
        elif result.interrupted:
            print(f"Process was {result.interrupted}.")
            if args.raise_error:
                raise CellFailed(result.exit_code, cell, result.interrupted)
        elif result.exit_code != 0 and args.raise_error:
            raise CellFailed(result.exit_code, cell)
        return None

    def _background(self, cell: str, opts: CellOptions, out: str | None, err: str | None) -> None:
        """`%%mino --bg`: IPython's `--bg` habit. Nothing is shown from a background cell (it
        would land in whatever cell runs then): --out/--err VAR fill in when it ends; otherwise
        its output is in the session's log."""
        sink = _BackgroundSink(out is not None, err is not None)
        user_ns = self.shell.user_ns

        def done(job) -> None:
            if out is not None:
                user_ns[out] = "".join(sink.captured[1])
            if err is not None:
                user_ns[err] = "".join(sink.captured[2])

        job = self.manager.start_background(cell, opts, sink, done)
        where = " and ".join(f"--{name} {var}" for name, var in (("out", out), ("err", err)) if var)
        print(f"mino: background job {job.number} started in session '{job.session}'; its output "
              + (f"fills {where} when it ends" if where else f"goes to `%mino logs {job.session}`")
              + f"; `%mino jobs` lists it, `%mino kill {job.number}` stops it")

    def _show_changes(self, name: str) -> None:
        from .changes import render

        found = self.manager.changes(name)
        print(render(found))
        shown = 0
        for change in found:
            if change.status == "modified" and shown < MAX_DIFFS:
                text = self.manager.diff(name, change)
                if text:
                    print(text.rstrip("\n"))
                    shown += 1
        if found:
            print(f"apply with `%mino apply{'' if name == DEFAULT_SESSION else ' ' + name}` (plain data) "
                  "or name paths: `%mino apply PATH ...`")

    def _env(self, items: list[str]) -> dict[str, str]:
        env = {}
        for item in items:
            name, sep, value = item.partition("=")
            if not ENV_NAME.match(name):
                raise UsageError(f'invalid environment variable "{item}": the name must be letters, digits '
                                 "and '_', not starting with a digit", "e.g. -e MODE=fast")
            if not sep:
                if name not in os.environ:
                    raise UsageError(f'-e {name}: no value given and the kernel has no ${name}',
                                     f"use -e {name}=VALUE")
                value = os.environ[name]
            env[name] = value
        return env

    def _secrets(self, names: list[str]) -> dict[str, str]:
        secrets = {}
        for name in names:
            if not ENV_NAME.match(name):
                raise UsageError(f'invalid secret name "{name}"', "use a Python variable or environment variable name")
            value = self.shell.user_ns.get(name) if name in self.shell.user_ns else os.environ.get(name)
            if value is None:
                raise UsageError(f"secret {name} not found: no Python variable and no environment variable "
                                 "of that name", f"set it first, e.g. {name} = getpass.getpass()")
            if not isinstance(value, str):
                raise UsageError(f"secret {name} must be a str, not {type(value).__name__}", "")
            secrets[name] = value
        return secrets

    # -------------------------------------------------------------- commands
    def _command(self, line: str):
        __tracebackhide__ = True
        args = line_parser().parse_args(shlex.split(line) or ["help"])
        m = self.manager
        if args.command == "help":
            print(magic_help())
        elif args.command == "sessions":
            print(render_sessions(m.rows()))
            if m.spare is not None:
                print(f"(and {m.spare.name}: a spare container for the next --fresh cell, "
                      "`%config MinoMagics.prestart = False` turns spares off)")
        elif args.command == "jobs":
            print(render_jobs(list(m.jobs.values())))
        elif args.command == "kill":
            if args.all == bool(args.jobs):
                raise UsageError("say which background jobs to stop, or --all", "e.g. %mino kill 1; `%mino jobs` lists them")
            killed = m.kill_jobs(None if args.all else args.jobs)
            print(f"stopped {len(killed)} background job(s)" + (": " + ", ".join(str(j.number) for j in killed)
                                                                 if killed else ""))
        elif args.command == "stop":
            if args.all == bool(args.name):
                raise UsageError("say which session to stop, or --all", "e.g. %mino stop default")
            if args.all:
                stopped = m.stop_all()
                print(f"stopped {len(stopped)} session(s)" + (f": {', '.join(stopped)}" if stopped else ""))
            else:
                s = m.stop(args.name)
                print(f"stopped session '{s.name}'; `%mino logs {s.name}` still shows its output")
        elif args.command == "logs":
            if args.tail is not None and args.tail < 1:
                raise UsageError(f"--tail must be a positive number of lines, not {args.tail}", "e.g. --tail 20")
            sys.stdout.write(m.logs(args.name, args.tail))
        elif args.command == "changes":
            self._show_changes(args.name)
        elif args.command == "apply":
            items = list(args.items)
            name = args.session
            if name is None:
                name = items.pop(0) if items and items[0] in m.sessions else DEFAULT_SESSION
            for outcome in m.apply(name, items or None):
                print(f"{outcome.path}: {outcome.message}")
        elif args.command == "prune":
            forgotten, removed = m.prune()
            print(f"forgot {len(forgotten)} stopped session(s); removed {len(removed)} orphaned container(s)")
        elif args.command == "doctor":
            from .doctor import run_checks

            run_checks(lambda c: print(c.render(), flush=True), m.env)
        elif args.command == "presets":
            from . import presets

            print(presets.render(presets.load(env=m.env)))
        elif args.command == "config":
            run_config_command(args, cwd=m.cwd(), env=m.env, presets=m.choices.presets(),
                               kernel=m.choices.network)
            if args.action in ("set", "unset"):
                m.settings_changed()
        elif args.command == "trust":
            print(m.trust_project(Path(args.path) if args.path else None))
        elif args.command == "panel":
            from IPython.display import display

            from .widgets import Panel

            display(Panel(m))
        return None


def interactive_frontend(shell) -> bool:
    """A person at a notebook frontend (which allows stdin), not nbclient/nbval/papermill/CI."""
    if os.environ.get("MINO_NO_PICKER"):
        return False
    kernel = getattr(shell, "kernel", None)
    return bool(kernel is not None and getattr(kernel, "_allow_stdin", False))


# `%%mino?` and `%mino?` show this: the options and every command, from the parsers themselves.
MinoMagics.mino.__doc__ = magic_help()


def _show_mino_error(shell, etype, value, tb, tb_offset=None):
    """Expected failures: the message and its hint, no traceback (the cell still counts as failed).
    A failed cell shows as the CalledProcessError it is (what `%%bash` raises), not as a trace
    through mino's own code."""
    if isinstance(value, CellFailed):
        stb = [f"CalledProcessError: {value}"]
        shell._showtraceback(CalledProcessError, value, stb)
        return stb
    stb = [value.render()]
    shell._showtraceback(etype, value, stb)
    return stb


_loaded: dict[int, MinoMagics] = {}
_previous_exc: dict[int, tuple] = {}  # the custom exception display that was there before mino


def _install_exception_display(ipython) -> None:
    """IPython keeps one custom exception display per shell: mino's handles its own errors and
    hands every other listed exception to the display that was there before it."""
    before_types, before_handler = tuple(ipython.custom_exceptions), getattr(ipython, "CustomTB", None)
    _previous_exc[id(ipython)] = (before_types, before_handler)
    mine = (MinoError, CellFailed)

    def show(shell, etype, value, tb, tb_offset=None):
        if isinstance(value, mine):
            return _show_mino_error(shell, etype, value, tb, tb_offset)
        return before_handler(etype, value, tb, tb_offset=tb_offset)  # IPython bound it to the shell

    ipython.set_custom_exc(tuple(dict.fromkeys(before_types + mine)), show)
    _previous_exc[id(ipython)] += (ipython.CustomTB,)  # what IPython installed for us: recognised on unload


def _remove_exception_display(ipython) -> None:
    """Put back what was there before, only if mino's display is still the one installed."""
    before_types, before_handler, ours = _previous_exc.pop(id(ipython), ((), None, None))
    if ours is not None and getattr(ipython, "CustomTB", None) is ours:
        if before_types and before_handler is not None:
            ipython.custom_exceptions, ipython.CustomTB = before_types, before_handler
        else:
            ipython.set_custom_exc((), None)


def load_ipython_extension(ipython) -> None:
    if id(ipython) in _loaded:
        return
    magics = MinoMagics(ipython)
    ipython.register_magics(magics)
    _install_exception_display(ipython)
    _loaded[id(ipython)] = magics
    magics.manager.start_background_reap()
    if magics.prestart:
        magics.manager.prestart()


def unload_ipython_extension(ipython) -> None:
    magics = _loaded.pop(id(ipython), None)
    if magics is None:
        return
    magics.manager.shutdown()
    _remove_exception_display(ipython)
    del ipython.magics_manager.magics["line"]["mino"]
    del ipython.magics_manager.magics["cell"]["mino"]


def current_manager(ipython=None) -> SessionManager | None:
    """The session manager of a shell that loaded the extension (for the panel and tests)."""
    if ipython is None:
        from IPython import get_ipython

        ipython = get_ipython()
    magics = _loaded.get(id(ipython))
    return magics.manager if magics else None
