"""The widgets' logic with real ipywidgets objects over a real session manager (no containers)."""

from pathlib import Path

import ipywidgets

import pytest

from mino_jupyter import config
from mino_jupyter.sessions import SessionManager
from mino_jupyter.widgets import NetworkPicker


@pytest.fixture
def manager(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "XDG_STATE_HOME": str(tmp_path / "state")}
    project = tmp_path / "project"
    project.mkdir()
    m = SessionManager(cwd=lambda: project, env=env, notice=lambda n: None, watchdog=False)
    yield m
    m.shutdown()


def test_picker_offers_the_five_choices_with_bridge_selected(manager):
    picker = NetworkPicker(manager)
    labels = [label for label, _ in picker.choice.options]
    assert [l.split(" — ")[0] for l in labels] == ["Bridge", "Host", "Allowlist: dev",
                                                     "Allowlist: registries", "None"]
    assert all(" — " in l for l in labels)  # each with its one-line meaning
    assert picker.choice.value == ("bridge", None)
    assert [b.description for b in picker.buttons] == ["for this kernel", "for this project (.mino.toml)",
                                                        "for all projects (global)"]
    assert "mino network picker" in picker._repr_mimebundle_()["text/plain"]


def test_saving_for_the_project_writes_a_trusted_mino_toml(manager):
    picker = NetworkPicker(manager)
    picker.choice.value = ("allowlist", "registries")
    picker.buttons[1].click()
    path = manager.cwd() / ".mino.toml"
    assert path.read_text() == '[container]\nnetwork = "allowlist"\nnetwork_preset = "registries"\n'
    assert f"saved in {path}" in picker.status.value
    assert all(b.disabled for b in picker.buttons)
    loaded = manager.choices.settings()
    assert loaded.project is not None and loaded.untrusted == () and loaded.explicit_network()


def test_saving_bridge_globally_counts_as_a_choice(manager):
    picker = NetworkPicker(manager)
    picker.buttons[2].click()
    assert config.load(manager.cwd(), manager.env).explicit_network()
    assert Path(config.global_path(manager.env)).read_text() == '[container]\nnetwork = "bridge"\n'


def test_saving_for_this_session_sets_the_kernel_layer_only(manager):
    picker = NetworkPicker(manager)
    picker.choice.value = ("none", None)
    picker.buttons[0].click()
    assert manager.choices.network.network == "none"
    assert not Path(config.global_path(manager.env)).exists() and not (manager.cwd() / ".mino.toml").exists()
    assert manager.current_network().plan.mode == "none"


def test_a_refused_save_shows_the_error_in_the_picker(manager):
    gpath = Path(config.global_path(manager.env))
    gpath.parent.mkdir(parents=True)
    gpath.write_text("broken = [\n")
    picker = NetworkPicker(manager)
    picker.buttons[2].click()
    assert "not valid TOML" in picker.status.value and not any(b.disabled for b in picker.buttons)
    assert gpath.read_text() == "broken = [\n"


# ---------------------------------------------------------------- the panel
from mino_jupyter.network import NetworkPlan  # noqa: E402
from mino_jupyter.network import NetworkChoice  # noqa: E402
from mino_jupyter.sessions import Session  # noqa: E402
from mino_jupyter.widgets import Panel  # noqa: E402


def _fake_session(manager, name, state="idle", started=1000.0):
    s = Session(name=name, image="img:1", plan=NetworkPlan("bridge"), fresh=False,
                log_path=manager.log_dir / f"{name}.log", state=state, cells_run=2, last_exit=0, started_at=started)
    s.log_path.parent.mkdir(parents=True, exist_ok=True)
    s.log_path.write_text(f"=== cell 1\\n--- output\\nhello from {name}\\n=== exit 0 after 0.10 s\\n")
    manager.sessions[name] = s
    return s


def test_panel_marks_each_invalid_entry_with_the_magics_message(manager):
    p = Panel(manager)
    p.allow.value = "10.88.0.1:8080\npypi.org\n*.evil.com:443"
    assert 'invalid allow entry "pypi.org": missing :PORT' in p.allow_errors.value
    assert 'invalid allow entry "*.evil.com:443": wildcards are not supported' in p.allow_errors.value
    assert p.apply_button.disabled and p.save_project.disabled and p.save_global.disabled
    p.allow.value = "10.88.0.1:8080"
    assert p.allow_errors.value == "" and not p.apply_button.disabled


def test_panel_preset_preview_and_host_warning(manager):
    p = Panel(manager)
    p.preset.value = "registries"
    assert "pypi.org:443" in p.preview.value and "Package registries" in p.preview.value
    p.mode.value = "host"
    assert "--network host overridden by --network-preset registries" in p.mode_note.value
    p.preset.value = None
    assert "host: cells reach everything this machine reaches" in p.mode_note.value
    p.mode.value = "none"
    p.allow.value = "a.b:1"
    assert "none cannot be combined" in p.mode_note.value and p.apply_button.disabled


def test_panel_apply_and_save(manager):
    p = Panel(manager)
    p.preset.value = "registries"
    p.allow.value = "10.88.0.1:8080"
    p.apply_button.click()
    assert manager.choices.network.network == "allowlist" and manager.choices.network.allow == ("10.88.0.1:8080",)
    assert "saved for this kernel" in p.status.value
    assert "allowlist (registries +1)" in p.current.value
    p.save_project.click()
    text = (manager.cwd() / ".mino.toml").read_text()
    assert 'network_preset = "registries"' in text and 'network_allow = ["10.88.0.1:8080"]' in text
    assert f"saved in {manager.cwd() / '.mino.toml'}" in p.status.value


def test_panel_sessions_table_logs_and_summary(manager):
    _fake_session(manager, "default", started=1000.0)
    _fake_session(manager, "old", state="stopped")
    p = Panel(manager, clock=lambda: 1125.0)
    labels = [c.value for c in p.sessions.children if isinstance(c, __import__("ipywidgets").Label)]
    assert labels[:7] == ["default", "idle", "bridge", "img:1", "2", "0", "2m05s"]
    assert labels[7:14] == ["old", "stopped", "bridge", "img:1", "2", "0", "-"]
    buttons = [c for c in p.sessions.children if isinstance(c, __import__("ipywidgets").Button)]
    assert [b.description for b in buttons] == ["logs", "stop", "changes", "logs", "stop", "changes"]
    assert buttons[4].disabled  # a stopped session cannot be stopped again
    assert not buttons[5].disabled  # its changes can still be applied
    buttons[0].click()
    assert "hello from default" in p.logs.value
    assert "hello from default" not in p.status.value  # shown once, not again in the status line
    assert p.summary() == ("mino panel: next cell network bridge; sessions: default (idle, bridge, 2 cells); "
                           "old (stopped, bridge, 2 cells)")
    assert p._repr_mimebundle_()["text/plain"] == p.summary()


def test_panel_updates_when_sessions_change(manager):
    p = Panel(manager)
    assert len(p.sessions.children) == len(Panel.SESSION_COLUMNS)
    _fake_session(manager, "new")
    manager._changed()
    assert "new" in [getattr(c, "value", None) for c in p.sessions.children]


def test_the_restart_note_gives_way_once_the_default_session_has_restarted(manager):
    """"restarts with it at the next cell" stayed after the restart; now the status says it did."""
    p = Panel(manager)
    p._guard(lambda: "mino: network none saved; the default session restarts with it at the next cell")
    assert "restarts with it at the next cell" in p.status.value  # nothing restarted yet
    _fake_session(manager, "default", state="idle")  # the next cell started it again
    manager._changed()
    assert p.status.value == "the default session restarted with bridge" and not p.awaiting_restart


def test_panel_trust_button(manager):
    (manager.cwd() / ".mino.toml").write_text('[container]\nnetwork = "host"\n')
    p = Panel(manager)
    (note, button) = p.trust_box.children
    assert "is not trusted" in note.value and 'network = "host"' in note.value
    button.click()
    assert p.trust_box.children == () or list(p.trust_box.children) == []
    assert "trusted" in p.status.value and manager.choices.settings().project is not None


def test_panel_shows_errors_not_tracebacks(manager):
    from mino_jupyter.errors import UsageError

    p = Panel(manager)

    def boom():
        raise UsageError("no session named \"x\"", "sessions in this kernel: none yet")

    p._guard(boom)
    assert 'no session named "x"' in p.status.value and "sessions in this kernel" in p.status.value


def test_panel_changes_tick_plain_data_and_apply_exactly_what_is_ticked(manager):
    from mino_jupyter.changes import PYTHON, Change, Outcome

    _fake_session(manager, "default")
    found = [Change("results.csv", "added", "file", 8, False, None),
             Change("helper.py", "added", "file", 5, False, PYTHON),
             Change("link", "added", "symlink", 0, False, None),
             Change("old.csv", "deleted", "file", 0, False, None)]
    applied = []
    manager.changes = lambda name: found
    manager.apply = lambda name, paths: applied.append((name, list(paths))) or [Outcome(p, True, "applied") for p in paths]
    p = Panel(manager)
    p.show_changes("default")
    boxes = {b.mino_path: b for b in p.changes_box.children if isinstance(b, ipywidgets.Checkbox)}
    assert boxes["results.csv"].value and not boxes["results.csv"].disabled
    assert not boxes["helper.py"].value and PYTHON in boxes["helper.py"].description  # ticked only by hand
    assert boxes["link"].disabled and not boxes["link"].value  # never applied
    assert not boxes["old.csv"].value and not boxes["old.csv"].disabled  # a deletion: only when ticked
    boxes["helper.py"].value = True
    button = p.changes_box.children[-1]
    button.click()
    assert applied == [("default", ["results.csv", "helper.py"])]
    assert "applied 2 of 2" in p.status.value


def test_every_view_shows_a_choice_made_elsewhere(manager):
    """The form went stale: after a picker choice the panel still said bridge / (none), and
    applying from there silently changed the network back."""
    p = Panel(manager, tick=None)
    picker = NetworkPicker(manager)
    assert (p.mode.value, p.preset.value) == ("bridge", None)
    picker.choice.value = ("allowlist", "registries")
    picker.buttons[0].click()
    assert (p.mode.value, p.preset.value, p.allow.value) == ("allowlist", "registries", "")
    assert "allowlist (registries)" in p.current.value
    p.mode.value, p.preset.value = "none", None
    p.apply_button.click()  # the panel's own choice shows in the picker that is still on screen
    assert "next cell: <b>none</b>" in picker.current.value
    assert picker.choice.disabled and picker.choice.value == ("allowlist", "registries")  # it saved; it keeps its own
    other = NetworkPicker(manager)
    manager.choices.network = NetworkChoice("%config MinoMagics", "host", None)
    manager.kernel_choice_changed()
    assert other.choice.value == ("host", None) and p.mode.value == "host"


def test_the_form_keeps_what_the_user_types_until_the_choice_changes(manager):
    p = Panel(manager, tick=None)
    p.allow.value = "10.88.0.1:8080"
    _fake_session(manager, "busy")
    manager._changed()  # a cell ended: the table changes, the text being typed stays
    assert p.allow.value == "10.88.0.1:8080"


def test_uptime_ticks_while_the_panel_is_open(manager):
    now = [1000.0]
    _fake_session(manager, "default", started=1000.0)
    _fake_session(manager, "old", state="stopped")
    p = Panel(manager, clock=lambda: now[0], tick=None)
    uptime = [c for c in p.sessions.children if isinstance(c, ipywidgets.Label)][6]
    assert uptime.value == "0s"
    now[0] = 1075.0
    p.tick()
    assert uptime.value == "1m15s"
    labels = [c.value for c in p.sessions.children if isinstance(c, ipywidgets.Label)]
    assert labels[13] == "-"  # a stopped session has no uptime


def test_the_tick_thread_updates_and_stops_with_the_panel(manager):
    import time as _time

    _fake_session(manager, "default", started=_time.time() - 5)
    p = Panel(manager, tick=0.05)
    uptime = [c for c in p.sessions.children if isinstance(c, ipywidgets.Label)][6]
    first = uptime.value
    deadline = _time.monotonic() + 5
    while uptime.value == first and _time.monotonic() < deadline:
        _time.sleep(0.05)
    assert uptime.value != first
    p.close()
    p._ticker.join(2)
    assert not p._ticker.is_alive()
