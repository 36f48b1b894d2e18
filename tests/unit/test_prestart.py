"""Starting the default session ahead changes when, never what: the first cell takes the
prestarted session only if it would have started the very same one (no engine here: the
decision and the notices)."""

from pathlib import Path

import pytest

from mino_jupyter.network import NetworkChoice, NetworkPlan
from mino_jupyter.sessions import CellOptions, Session, SessionManager


@pytest.fixture
def manager(tmp_path):
    env = {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "MINO_CONFIG": str(tmp_path / "cfg" / "config.toml")}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.toml").write_text('[container]\nnetwork = "bridge"\n')
    cwd = [tmp_path / "project"]
    cwd[0].mkdir()
    said: list[str] = []
    m = SessionManager(cwd=lambda: cwd[0], env=env, notice=said.append, watchdog=False)
    m.said, m.dirs = said, cwd
    yield m
    m.shutdown()


def _prestarted(m: SessionManager) -> Session:
    loaded = m.choices.settings()
    s = Session(name="default", image="img", plan=NetworkPlan("bridge"), fresh=False,
                log_path=m.log_dir / "default.log", state="idle")
    s.prestarted = m._new_session(CellOptions(), loaded)
    s.held_notices = ["mino: said while starting ahead"]
    m.sessions["default"] = s
    return s


def _take(m: SessionManager, opts: CellOptions = CellOptions()):
    loaded = m.choices.settings()
    return m._take_prestarted(m.sessions["default"], opts, loaded, m.choices.presets())


def test_the_first_cell_takes_the_same_session_and_its_notices(manager):
    s = _prestarted(manager)
    assert _take(manager) is s and s.prestarted is None and s.state == "idle"
    assert manager.said == ["mino: said while starting ahead"]  # shown with that cell, once


@pytest.mark.parametrize("change", ["kernel network", "config file", "directory", "cell flags"])
def test_anything_different_means_a_session_of_its_own(manager, change, tmp_path):
    s = _prestarted(manager)
    opts = CellOptions()
    if change == "kernel network":
        manager.choices.network = NetworkChoice("%config MinoMagics", "none", None)
    elif change == "config file":
        Path(manager.env["MINO_CONFIG"]).write_text('[container]\nnetwork = "bridge"\nmemory = "1g"\n')
    elif change == "directory":
        other = tmp_path / "elsewhere"
        other.mkdir()
        manager.dirs[0] = other
    else:
        opts = CellOptions(network=NetworkChoice("cell flags", "none", None))
    assert _take(manager, opts) is None
    assert s.state == "stopped" and manager.said == []  # its notices went with it


def test_notices_of_a_holding_thread_wait(manager):
    manager._holding.notices = held = []
    manager.notice("later")
    manager._holding.notices = None
    manager.notice("now")
    assert held == ["later"] and manager.said == ["now"]


def test_no_prestart_on_a_first_run_or_with_a_broken_file(manager):
    Path(manager.env["MINO_CONFIG"]).write_text("[container]\n")
    assert manager.prestart() is None  # no network chosen: the picker comes with the first cell
    Path(manager.env["MINO_CONFIG"]).write_text('[container]\nnetwork = "nnone"\n')
    assert manager.prestart() is None


def test_once_notices_of_a_dropped_start_may_come_again(manager):
    s = _prestarted(manager)
    manager._shown.add("mino: on this engine, something")
    s.held_notices = ["mino: on this engine, something"]
    manager.choices.network = NetworkChoice("%config MinoMagics", "none", None)
    assert _take(manager) is None
    assert "mino: on this engine, something" not in manager._shown  # the new session's start says it
