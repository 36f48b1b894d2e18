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


# ---------------------------------------------------------------------- the spare for --fresh cells
class _Engine:
    """Just what taking or dropping a spare asks of the engine."""

    def __init__(self, running=True):
        self.running, self.removed = running, []

    def inspect(self, cid):
        return {"State": {"Running": self.running}}

    def remove(self, cid):
        self.removed.append(cid)


def _spare(m: SessionManager, opts: CellOptions = CellOptions(fresh=True), running=True) -> Session:
    m._engine = _Engine(running)
    s = Session(name="fresh-7", image="img", plan=NetworkPlan("bridge"), fresh=True,
                log_path=m.log_dir / "fresh-7.log", state="idle", container_id="c7")
    s.prestarted = m._new_session(opts, m.choices.settings())
    s.held_notices = ["mino: said while starting the spare"]
    m.spare = s
    return s


def _take_spare(m: SessionManager, opts: CellOptions = CellOptions(fresh=True)):
    return m._take_spare(opts, m.choices.settings(), m.choices.presets())


def test_a_fresh_cell_takes_a_spare_that_fits_once(manager):
    s = _spare(manager)
    assert _take_spare(manager) is s and s.prestarted is None
    assert manager.sessions["fresh-7"] is s and manager.spare is None
    assert manager.said == ["mino: said while starting the spare"]
    assert _take_spare(manager) is None  # single use


@pytest.mark.parametrize("why", ["other options", "container gone"])
def test_a_spare_that_does_not_fit_or_runs_no_more_goes(manager, why):
    s = _spare(manager, running=why != "container gone")
    opts = CellOptions(fresh=True, network=NetworkChoice("cell flags", "none", None)) if why == "other options" \
        else CellOptions(fresh=True)
    assert _take_spare(manager, opts) is None
    manager.wait_for_removals()
    assert s.state == "stopped" and manager._engine.removed == ["c7"] and "fresh-7" not in manager.sessions
    assert manager.spare is None and manager.said == []


@pytest.mark.parametrize("dead", [None, "the cell executor ended"])
def test_a_spare_s_executor_says_whether_its_container_still_runs(manager, dead):
    s = _spare(manager, running=False)  # not asked: the executor's connection is the sign
    s.executor = type("Ex", (), {"dead": dead, "disconnect": lambda self: None})()
    assert (_take_spare(manager) is s) is (dead is None)


def test_no_spare_is_started_when_spares_are_off(manager):
    manager.spares = False
    manager._refill_spare(CellOptions(fresh=True))
    assert manager._spare_thread is None
