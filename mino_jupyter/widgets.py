"""ipywidgets views over the session manager. They display and forward; they decide nothing.

* :class:`NetworkPicker`: the first-run choice (a mode and where to remember it).
"""

from __future__ import annotations

from typing import Callable

import ipywidgets as w

from .errors import MinoError
from .network import MODE_MEANINGS

# (label, (mode, preset)) in the order the picker shows them.
PICKER_CHOICES = [
    ("Bridge (recommended)", ("bridge", None), MODE_MEANINGS["bridge"]),
    ("Host", ("host", None), MODE_MEANINGS["host"]),
    ("Allowlist: dev", ("allowlist", "dev"),
     "only code hosting, package registries and AI APIs (the dev preset)"),
    ("Allowlist: registries", ("allowlist", "registries"), "only the package registries (npm, crates.io, PyPI)"),
    ("None", ("none", None), MODE_MEANINGS["none"]),
]
SCOPES = [("for this session", "session"), ("for this project (.mino.toml)", "project"),
          ("for all projects (global)", "global")]


class NetworkPicker:
    """Shown once, at the first %%mino cell, when no network has been chosen anywhere.

    It never blocks: the cell has already run with bridge. Choosing and remembering calls
    ``remember(mode, preset, scope) -> message``.
    """

    def __init__(self, remember: Callable[[str, str | None, str], str]):
        self._remember = remember
        self.choice = w.RadioButtons(
            options=[(f"{label} — {meaning}", value) for label, value, meaning in PICKER_CHOICES],
            value=("bridge", None), layout=w.Layout(width="auto"))
        self.buttons = [w.Button(description=text, tooltip=f"remember {text}") for text, _ in SCOPES]
        for button, (_, scope) in zip(self.buttons, SCOPES):
            button.on_click(lambda _b, scope=scope: self.save(scope))
        self.status = w.HTML("This cell ran with <b>bridge</b>. Pick a network and remember it:")
        self.view = w.VBox([self.status, self.choice, w.HBox([w.Label("Remember:"), *self.buttons])])

    def save(self, scope: str) -> str:
        mode, preset = self.choice.value
        try:
            message = self._remember(mode, preset, scope)
        except MinoError as exc:
            self.status.value = f"<span style='color:#b00'>{_escape(exc.message)}</span>"
            return exc.message
        self.status.value = _escape(message)
        for button in self.buttons:
            button.disabled = True
        self.choice.disabled = True
        return message

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.view._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = ("mino network picker (bridge now; choices: "
                                + ", ".join(label for label, _, _ in PICKER_CHOICES) + ")")
        return bundle


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
