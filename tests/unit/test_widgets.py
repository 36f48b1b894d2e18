"""The widgets' logic with real ipywidgets objects over a real session manager (no containers)."""

from pathlib import Path

import pytest

from mino_jupyter import config
from mino_jupyter.sessions import SessionManager
from mino_jupyter.widgets import PICKER_CHOICES, NetworkPicker


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
    picker = NetworkPicker(manager.remember_network)
    labels = [label for label, _ in picker.choice.options]
    assert [l.split(" — ")[0] for l in labels] == ["Bridge (recommended)", "Host", "Allowlist: dev",
                                                     "Allowlist: registries", "None"]
    assert all(" — " in l for l in labels)  # each with its one-line meaning
    assert picker.choice.value == ("bridge", None)
    assert [b.description for b in picker.buttons] == ["for this session", "for this project (.mino.toml)",
                                                        "for all projects (global)"]
    assert "mino network picker" in picker._repr_mimebundle_()["text/plain"]


def test_saving_for_the_project_writes_a_trusted_mino_toml(manager):
    picker = NetworkPicker(manager.remember_network)
    picker.choice.value = ("allowlist", "registries")
    picker.buttons[1].click()
    path = manager.cwd() / ".mino.toml"
    assert path.read_text() == '[container]\nnetwork = "allowlist"\nnetwork_preset = "registries"\n'
    assert f"saved in {path}" in picker.status.value
    assert all(b.disabled for b in picker.buttons)
    loaded = manager.settings()
    assert loaded.project_trusted and loaded.explicit_network()


def test_saving_bridge_globally_counts_as_a_choice(manager):
    picker = NetworkPicker(manager.remember_network)
    picker.buttons[2].click()
    assert config.load(manager.cwd(), manager.env).explicit_network()
    assert Path(config.global_path(manager.env)).read_text() == '[container]\nnetwork = "bridge"\n'


def test_saving_for_this_session_sets_the_kernel_layer_only(manager):
    picker = NetworkPicker(manager.remember_network)
    picker.choice.value = ("none", None)
    picker.buttons[0].click()
    assert manager.kernel_network.network == "none"
    assert not Path(config.global_path(manager.env)).exists() and not (manager.cwd() / ".mino.toml").exists()
    assert manager.plan_for(manager.kernel_network.__class__("cell flags"), None, manager.settings()).plan.mode == "none"


def test_a_refused_save_shows_the_error_in_the_picker(manager):
    gpath = Path(config.global_path(manager.env))
    gpath.parent.mkdir(parents=True)
    gpath.write_text("broken = [\n")
    picker = NetworkPicker(manager.remember_network)
    picker.buttons[2].click()
    assert "not valid TOML" in picker.status.value and not any(b.disabled for b in picker.buttons)
    assert gpath.read_text() == "broken = [\n"
