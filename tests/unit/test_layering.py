"""Dependencies point one way: the pure decisions import nothing that acts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mino_jupyter"

# The pure layer: plain data in, plain data out. No engine, no kernel, no widgets.
PURE = ("policy", "network", "firewall", "presets", "config", "paths", "errors", "redact", "seccomp", "kube")
# What acts (engine, sessions, user interface) and outside libraries that act.
ACTING = {"runtime", "sessions", "cell", "session_firewall", "cleanup", "magics", "widgets", "cli", "doctor",
          "image", "demo", "logs", "commands", "owner", "storage", "changes", "host", "procs", "choices",
          "launch", "mounts", "executor", "copied", "libnft"}
FORBIDDEN_LIBS = {"IPython", "ipywidgets", "ipykernel", "podman", "traitlets", "requests"}
# Downward only: who may import whom among the acting modules.
LAYERS = {
    "magics": 50,
    "widgets": 40, "cli": 40,
    "sessions": 30, "doctor": 30,
    "choices": 25, "launch": 27,
    "logs": 25,
    "cleanup": 22,
    "session_firewall": 20, "cell": 20, "image": 21, "demo": 21, "storage": 20, "host": 20, "copied": 21,
    "mounts": 17,
    "procs": 15, "changes": 15,
    "executor": 12, "libnft": 12,
    "ssh": 8,
    "runtime": 10, "commands": 10, "owner": 10,
}


def _imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from . import x / from .x import y
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(alias.name.split(".")[0] for alias in node.names)
            elif node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
    return found


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_import_nothing_that_acts(module):
    imported = _imports(module)
    assert not imported & ACTING, f"{module} imports {sorted(imported & ACTING)}"
    assert not imported & FORBIDDEN_LIBS, f"{module} imports {sorted(imported & FORBIDDEN_LIBS)}"


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_acting_modules_import_only_downwards(module):
    for other in _imports(module) & set(LAYERS):
        assert LAYERS[other] < LAYERS[module] or other == module, f"{module} imports {other} (not below it)"


def test_every_module_is_placed():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules <= set(PURE) | set(LAYERS), sorted(modules - set(PURE) - set(LAYERS))


def test_commands_and_the_command_line_import_no_ipython():
    assert "magics" not in _imports("cli")
    assert not _imports("commands") & FORBIDDEN_LIBS
