"""ipywidgets views over the session manager. They display and forward; they decide nothing.

* :class:`NetworkPicker`: the first-run choice (a mode and where to remember it).
* :class:`Panel`: network picker, the kernel's sessions (logs, stop), project trust.

Both listen to the manager: whatever changed the kernel's network (the picker, the panel,
``%config``, ``%mino config``), every view on screen shows it at once. The panel's uptimes tick
on a small timer thread while its view is open.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Callable

import ipywidgets as w

from . import presets as presets_mod
from .commands import DEFAULT_SESSION
from .errors import MinoError
from .network import MODE_MEANINGS, MODES, parse_allow_entry

# (label, (mode, preset)) in the order the picker shows them.
PICKER_CHOICES = [
    ("Bridge", ("bridge", None), MODE_MEANINGS["bridge"]),
    ("Host", ("host", None), MODE_MEANINGS["host"]),
    ("Allowlist: dev", ("allowlist", "dev"),
     "only code hosting, package registries and AI APIs (the dev preset)"),
    ("Allowlist: registries", ("allowlist", "registries"), "only the package registries (npm, crates.io, PyPI)"),
    ("None", ("none", None), MODE_MEANINGS["none"]),
]
# "session" inside mino is this kernel's choice: the word for containers stays with the table.
SCOPES = [("for this kernel", "session"), ("for this project (.mino.toml)", "project"),
          ("for all projects (global)", "global")]


WARN_STYLE = "color:#a05a00"
ERROR_STYLE = "color:#b00020"
# The picker's long radio labels wrap instead of overlapping (ipywidgets gives each radio label
# one fixed-height line that does not wrap).
_WRAP_CSS = ("<style>.mino-picker-choices label{display:flex;align-items:flex-start;white-space:normal;"
             "height:auto;line-height:1.4;margin-bottom:4px}.mino-picker-choices label input{flex:0 0 auto;"
             "order:-1;margin:2px 6px 0 0}</style>")


def _wrapping_row() -> w.Layout:
    """Rows of buttons wrap instead of running past the output area's edge."""
    return w.Layout(flex_flow="row wrap", align_items="center", max_width="100%")


def _button(description: str, **kwargs) -> w.Button:
    """A button as wide as its text: never cut to an ellipsis, in a row that wraps."""
    return w.Button(description=description, layout=w.Layout(width="auto", flex="0 0 auto"), **kwargs)


class NetworkPicker:
    """Shown once, at the first %%mino cell, when no network has been chosen anywhere.

    It never blocks: the cell has already run with bridge. Choosing and remembering calls
    ``remember(mode, preset, scope) -> message``.
    """

    def __init__(self, manager):
        self.m = manager
        self.choice = w.RadioButtons(
            options=[(f"{label} — {meaning}", value) for label, value, meaning in PICKER_CHOICES],
            value=("bridge", None), layout=w.Layout(width="auto", max_width="100%"))
        self.choice.add_class("mino-picker-choices")  # long labels wrap (see _WRAP_CSS)
        self.buttons = [_button(text, tooltip=f"remember {text}") for text, _ in SCOPES]
        for button, (_, scope) in zip(self.buttons, SCOPES):
            button.on_click(lambda _b, scope=scope: self.save(scope))
        self.status = w.HTML("This cell ran with <b>bridge</b>. Each choice says what a cell may reach; "
                             "pick one and remember it:")
        self.current = w.HTML()
        self.chosen: str | None = None
        self.view = w.VBox([w.HTML(_WRAP_CSS), self.status, self.choice, self.current,
                            w.HBox([w.Label("Remember:"), *self.buttons], layout=_wrapping_row())])
        manager.listeners.append(self.refresh)

    def refresh(self) -> None:
        """A choice made elsewhere (the panel, %config, %mino config) shows here too."""
        try:
            plan = self.m.current_network().plan
        except MinoError as exc:
            self.current.value = f"<span style='{ERROR_STYLE}'>{_text(exc.message)}</span>"
            return
        self.current.value = (f"next cell: <b>{_text(plan.describe())}</b> <small>({_text(plan.source)})</small>")
        if not self.choice.disabled and (plan.mode, plan.preset) in {v for _, v, _ in PICKER_CHOICES} \
                and not plan.extra:
            self.choice.value = (plan.mode, plan.preset)

    def save(self, scope: str) -> str:
        mode, preset = self.choice.value
        try:
            message = self.m.remember_network(mode, preset, scope)
        except MinoError as exc:
            self.status.value = f"<span style='color:#b00'>{_text(exc.message)}</span>"
            return exc.message
        self.status.value = _text(message)
        self.chosen = message
        for button in self.buttons:
            button.disabled = True
        self.choice.disabled = True
        return message

    def close(self) -> None:
        if self.refresh in self.m.listeners:
            self.m.listeners.remove(self.refresh)
        self.view.close()

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.view._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = (f"mino network picker: {self.chosen}" if self.chosen else
                                "mino network picker (this cell ran with bridge; choices: "
                                + ", ".join(label for label, _, _ in PICKER_CHOICES) + ")")
        return bundle


def _text(text: str) -> str:
    """HTML text content (quotes stay quotes: messages quote what they reject)."""
    return html.escape(text, quote=False)


def _uptime(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Panel:
    """`%mino panel` / `mino_jupyter.panel()`. Every action goes through the SessionManager."""

    SESSION_COLUMNS = ("name", "state", "network", "image", "cells", "last exit", "uptime", "", "", "")

    def __init__(self, manager, clock: Callable[[], float] = time.time, tick: float | None = 1.0):
        self.m = manager
        self.clock = clock
        self._shown_choice: tuple | None = None  # the kernel's choice the form last showed
        self._uptimes: dict[str, tuple[w.Label, float]] = {}  # running sessions' uptime labels
        self.awaiting_restart = False  # the status says the default session restarts at the next cell
        self.presets = presets_mod.load(env=manager.env)
        # ---------------------------------------------------------------- network picker
        self.mode = w.Dropdown(options=list(MODES), description="mode")
        self.preset = w.Dropdown(options=[("(none)", None)] + [(n, n) for n in sorted(self.presets)],
                                 description="preset")
        self.preview = w.HTML()
        self.allow = w.Textarea(placeholder="extra allow entries, host:port, one per line",
                                layout=w.Layout(width="32em", max_width="calc(100% - 4px)", height="5em"))  # its 2 px margins
        self.allow_errors = w.HTML()
        self.mode_note = w.HTML()
        self.apply_button = _button("apply to this kernel")
        self.save_project = _button("save for this project")
        self.save_global = _button("save globally")
        self.apply_button.on_click(lambda _: self.save("session"))
        self.save_project.on_click(lambda _: self.save("project"))
        self.save_global.on_click(lambda _: self.save("global"))
        self.current = w.HTML()
        for widget in (self.mode, self.preset, self.allow):
            widget.observe(lambda _change: self._validate(), names="value")
        self.preset.observe(self._preset_chosen, names="value")
        # ---------------------------------------------------------------- sessions
        self.sessions = w.GridBox(layout=w.Layout(grid_template_columns="repeat(10, max-content)",
                                                  grid_gap="2px 12px", max_width="100%", overflow="auto"))
        self.stop_all_button = _button("stop all")
        self.stop_all_button.layout.align_self = "flex-start"
        self.stop_all_button.on_click(lambda _: self._guard(self._stop_all))
        self.logs = w.HTML()
        self.changes_box = w.VBox()  # what a session's cells wrote, with checkboxes to apply
        # ---------------------------------------------------------------- trust and status
        self.trust_box = w.VBox()
        self.status = w.HTML()
        self.view = w.VBox([
            w.HTML("<b>Network</b>"), self.current,
            w.HBox([self.mode, self.preset], layout=_wrapping_row()), self.mode_note, self.preview,
            self.allow, self.allow_errors,
            w.HBox([self.apply_button, self.save_project, self.save_global], layout=_wrapping_row()),
            self.trust_box,
            w.HTML("<b>Sessions</b>"), self.sessions, self.stop_all_button, self.changes_box, self.logs,
            self.status,
        ])
        self._validate()
        self.refresh()
        manager.listeners.append(self.refresh)
        self._closed = threading.Event()
        self._ticker = threading.Thread(target=self._tick, args=(tick,), name="mino-panel-uptime", daemon=True)
        if tick:
            self._ticker.start()

    # ------------------------------------------------------------------ network choice
    def _show_choice(self, plan) -> None:
        """The form shows the kernel's current choice whenever that changes, from wherever it
        came; between changes it keeps what the user is typing."""
        shown = (plan.mode, plan.preset, tuple(str(e) for e in plan.extra))
        if shown == self._shown_choice:
            return
        self._shown_choice = shown
        self.mode.value = plan.mode
        self.preset.value = plan.preset if plan.preset in self.presets else None
        self.allow.value = "\n".join(shown[2])

    def _preset_chosen(self, change) -> None:
        if change["new"] and self.mode.value == "bridge":
            self.mode.value = "allowlist"  # a preset means an allowlist; host keeps its override note

    def entries(self) -> tuple[list[str], list[str]]:
        """(valid entries, error messages) from the text area, one entry per line or comma."""
        valid, errors = [], []
        for raw in self.allow.value.replace(",", "\n").splitlines():
            if not raw.strip():
                continue
            try:
                valid.append(str(parse_allow_entry(raw)))
            except MinoError as exc:
                errors.append(exc.message)
        return valid, errors

    def choice(self) -> tuple[str, str | None, tuple[str, ...]]:
        """What the buttons save: a preset or entries make it an allowlist (host is overridden,
        as the note under the mode says)."""
        entries, _ = self.entries()
        mode, preset = self.mode.value, self.preset.value
        if (preset or entries) and mode in ("bridge", "host"):
            mode = "allowlist"
        return mode, preset, tuple(entries)

    def _validate(self) -> None:
        preset = self.presets.get(self.preset.value) if self.preset.value else None
        if preset:
            self.preview.value = (f"<small>{_text(preset.description)}<br>"
                                  + _text(", ".join(str(e) for e in preset.allow)) + "</small>")
        else:
            self.preview.value = ""
        entries, errors = self.entries()
        self.allow_errors.value = "".join(f"<div style='{ERROR_STYLE}'>{_text(e)}</div>" for e in errors)
        notes = []
        mode = self.mode.value
        if mode == "host" and not (preset or entries):
            notes.append("host: cells reach everything this machine reaches, its local services included")
        elif mode == "host":
            by = f"--network-preset {preset.name}" if preset else "--network-allow"
            notes.append(f"--network host overridden by {by}")
        if mode == "none" and (preset or entries):
            notes.append("none cannot be combined with a preset or allow entries")
        if mode == "allowlist" and not (preset or entries):
            notes.append("allowlist needs a preset or allow entries")
        self.mode_note.value = "".join(f"<div style='{WARN_STYLE}'>{_text(n)}</div>" for n in notes)
        blocked = bool(errors) or (mode == "none" and bool(preset or entries)) or \
            (mode == "allowlist" and not (preset or entries))
        for button in (self.apply_button, self.save_project, self.save_global):
            button.disabled = blocked

    def save(self, scope: str) -> str:
        mode, preset, entries = self.choice()
        return self._guard(lambda: self.m.remember_network(mode, preset, scope, entries))

    # ------------------------------------------------------------------ sessions
    def refresh(self) -> None:
        try:
            resolution = self.m.current_network()
            self.current.value = (f"next cell: <b>{_text(resolution.plan.describe())}</b> "
                                  f"<small>({_text(resolution.plan.source)})</small>")
            self._show_choice(resolution.plan)
        except MinoError as exc:
            self.current.value = f"<span style='{ERROR_STYLE}'>{_text(exc.message)}</span>"
        cells: list = [w.HTML(f"<b>{c}</b>") for c in self.SESSION_COLUMNS]
        now = self.clock()
        uptimes = {}
        for row in self.m.rows():
            uptime = w.Label("-" if row["state"] == "stopped" else _uptime(now - row["started"]))
            if row["state"] != "stopped":
                uptimes[row["name"]] = (uptime, row["started"])
            last = "-" if row["last_exit"] is None else str(row["last_exit"])
            cells += [w.Label(row["name"]), w.Label(row["state"]), w.Label(row["network"]),
                      w.Label(row["image"]), w.Label(str(row["cells"])), w.Label(last), uptime]
            logs = _button("logs")
            logs.on_click(lambda _b, name=row["name"]: self._guard(lambda: self.show_logs(name)))
            stop = _button("stop", disabled=row["state"] == "stopped")
            stop.on_click(lambda _b, name=row["name"]: self._guard(lambda: self._stop(name)))
            changed = _button("changes", disabled=row.get("workspace", "overlay") != "overlay")
            changed.on_click(lambda _b, name=row["name"]: self._guard(lambda: self.show_changes(name)))
            cells += [logs, stop, changed]
        self.sessions.children = cells
        self._uptimes = uptimes
        self.stop_all_button.disabled = not any(r["state"] != "stopped" for r in self.m.rows())
        restarted = next((r for r in self.m.rows() if r["name"] == DEFAULT_SESSION and r["state"] != "stopped"), None)
        if self.awaiting_restart and restarted is not None:  # "restarts at the next cell" is done: say so
            self.awaiting_restart = False
            self.status.value = _text(f"the default session restarted with {restarted['network']}")
        self._refresh_trust()

    def _refresh_trust(self) -> None:
        try:
            loaded = self.m.choices.settings()
        except MinoError:
            return
        if loaded.untrusted:
            from .config import read_file, toml_value

            path = loaded.untrusted[0]
            fc, _, _ = read_file(path)
            values = ", ".join(f"{k} = {toml_value(v)}" for k, v in (fc.values if fc else {}).items())
            button = _button("trust", button_style="warning")
            button.on_click(lambda _b: self._guard(lambda: self.m.trust_project(path)))
            self.trust_box.children = [w.HTML(
                f"<div style='{WARN_STYLE}'>{_text(str(path))} is not trusted, so it has no effect"
                f"{': ' + _text(values) if values else ''}; review it, then trust it</div>"), button]
        else:
            self.trust_box.children = []

    def show_changes(self, name: str, outcomes: list | None = None) -> str:
        """What the session's cells wrote, one checkbox each: plain data is ticked, code, dotfiles
        and executables are not (ticking one names it, as `%mino apply PATH` does), links and
        other special files cannot be ticked. Applying goes through the session manager."""
        from .changes import LETTERS, display_path

        found = self.m.changes(name)
        boxes = []
        for change in found:
            appliable = change.kind == "file" or change.status == "deleted"
            note = change.risk or ("" if appliable else f"{change.kind}: never applied")
            box = w.Checkbox(value=appliable and not change.risk and change.status != "deleted", disabled=not appliable,
                             indent=False, layout=w.Layout(width="auto"),
                             description=f"{LETTERS[change.status]} {display_path(change.path)}"
                                         + (f" ({note})" if note else ""))
            box.mino_path = change.path
            boxes.append(box)
        apply = _button("apply selected", disabled=not boxes)
        apply.on_click(lambda _b: self._guard(lambda: self._apply_selected(name, boxes)))
        done = [w.HTML(f"<div>{_text(o.path)}: {_text(o.message)}</div>") for o in outcomes or []]
        title = (f"<b>changes of {_text(name)}</b> (not in the notebook's directory until applied)" if boxes
                 else f"<b>changes of {_text(name)}</b>: none waiting")
        self.changes_box.children = [w.HTML(title), *done, *boxes, apply]
        return f"{len(found)} change(s) in session '{name}'"

    def _apply_selected(self, name: str, boxes: list) -> str:
        paths = [box.mino_path for box in boxes if box.value]
        if not paths:
            return "nothing selected"
        outcomes = self.m.apply(name, paths)
        self.show_changes(name, outcomes)
        applied = sum(1 for o in outcomes if o.applied)
        return f"applied {applied} of {len(paths)} to the notebook's directory"

    def show_logs(self, name: str) -> str:
        """The log below the table; the status line only says so (not the log again, run together)."""
        text = self.m.logs(name, tail=40)
        self.logs.value = (f"<b>logs of {_text(name)}</b> (last 40 lines)"
                           f"<pre style='max-height:20em;overflow:auto'>{_text(text)}</pre>")
        return f"the last 40 lines of session '{name}' are shown above"

    def _stop(self, name: str) -> str:
        self.m.stop(name)
        return f"stopped session '{name}'"

    def _stop_all(self) -> str:
        names = self.m.stop_all()
        return f"stopped {len(names)} session(s)"

    def _guard(self, action: Callable[[], str | None]) -> str:
        """Run an action; its message or its error goes to the status line, never a traceback."""
        try:
            message = action() or ""
        except MinoError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            self.status.value = f"<span style='{ERROR_STYLE}'>{_text(exc.message + hint)}</span>"
            return exc.message
        self.status.value = _text(message)
        self.awaiting_restart = "restarts with it at the next cell" in message
        self.refresh()
        return message

    # ------------------------------------------------------------------ text
    def summary(self) -> str:
        try:
            network = self.m.current_network().plan.describe()
        except MinoError as exc:
            network = f"error: {exc.message}"
        rows = self.m.rows()
        sessions = "; ".join(f"{r['name']} ({r['state']}, {r['network']}, {r['cells']} cells)" for r in rows)
        return f"mino panel: next cell network {network}; sessions: {sessions or 'none'}"

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.view._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = self.summary()
        return bundle

    def tick(self) -> None:
        """Bring the running sessions' uptimes to now (a label sends only when its text changes)."""
        now = self.clock()
        for label, started in list(self._uptimes.values()):
            label.value = _uptime(now - started)

    def _tick(self, every: float) -> None:
        while not self._closed.wait(every):
            if self.view.comm is None:  # the view was closed (cleared output, closed notebook)
                return
            try:
                self.tick()
            except Exception:  # a kernel shutting down; the next tick or close() ends this
                pass

    def close(self) -> None:
        self._closed.set()
        if self.refresh in self.m.listeners:
            self.m.listeners.remove(self.refresh)
        self.view.close()
