"""An engine whose processes are not this machine's (another machine, a virtual machine behind a
forwarded socket): every pid it reports names some other process here, so none is ever read
or signalled here; cells are stopped from inside their container."""

import os
import signal
import threading

import pytest

from mino_jupyter import cell, executor, firewall, procs
from mino_jupyter.errors import MinoError


class Engine:
    """Reports the pid of a live process of this machine (this test's own), as an engine
    elsewhere would report one of its own that happens to be a pid here."""

    def __init__(self, here: bool):
        self.here = here
        self.execs: list[list[str]] = []

    def processes_here(self) -> bool:
        return self.here

    def exec_inspect(self, _exec_id):
        return {"Running": True, "Pid": os.getpid()}

    def exec_run(self, _container, body):
        self.execs.append(body["Cmd"])
        return 0, b"", b""

    killed = 0

    def kill(self, _container):
        self.killed += 1


@pytest.fixture
def no_local_signals(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(os, "killpg", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(procs, "stop", lambda *a, **kw: pytest.fail("a pid of the engine's was used here"))
    return sent


def test_an_exec_s_cell_is_stopped_from_inside_without_its_pid(no_local_signals):
    engine = Engine(here=False)
    stopped = cell._stopper(engine, "ctr", "exec", None, None, 0, 1000)()
    assert no_local_signals == []
    assert engine.execs == [["/bin/kill", "-INT", "-1"], ["/bin/kill", "-KILL", "-1"]]
    assert stopped.everything


def test_the_executor_s_cell_is_signalled_through_it_then_everything_goes_from_inside(no_local_signals):
    engine = Engine(here=False)

    class Run:
        pid = 7  # in the container
        ended = threading.Event()
        executor = type("E", (), {"host_pid": os.getpid()})()
        signals: list = []

        def signal(self, sig):
            self.signals.append(sig)
            return True

        def wait_end(self, _timeout):
            return True

    run = Run()
    stopped = cell._executor_stopper(run, engine, "ctr", None, None, 0, 1000)()
    assert run.signals == [signal.SIGINT] and no_local_signals == []
    assert engine.execs == [["/bin/kill", "-KILL", "-1"]] and stopped.signal == "INT"


def test_an_executor_of_an_engine_elsewhere_is_never_killed_here(no_local_signals):
    ex = executor.Executor.__new__(executor.Executor)
    ex.engine, ex.exec_id = Engine(here=False), "exec"
    ex.disconnect = lambda: None
    ex.kill()
    assert no_local_signals == []
    ex.engine = Engine(here=True)
    ex.kill()
    assert no_local_signals == [(os.getpid(), signal.SIGKILL)]


def test_the_bridge_refuses_every_private_range_when_the_engine_is_elsewhere():
    here = firewall.local_networks([("192.168.1.5", 24)], ["10.88.0.0/16"])
    elsewhere = firewall.local_networks([("192.168.1.5", 24)], ["10.88.0.0/16"], engine_elsewhere=True)
    assert "10.0.0.0/8" not in here.v4 and "172.16.0.0/12" not in here.v4
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"} <= set(elsewhere.v4)
    assert "fc00::/7" in elsewhere.v6


def test_where_nothing_can_run_inside_the_container_itself_is_killed(no_local_signals):
    """No process can start there (the cell used up the process limit): the container goes
    rather than a cell said stopped that still runs."""
    class Full(Engine):
        def exec_run(self, _container, body):
            raise MinoError("Podman could not start a process: fork: resource temporarily unavailable")

    for engine in (Full(here=False),):
        assert cell._stopper(engine, "ctr", "exec", None, None, 0, 1000)().signal == "KILL"
        assert engine.killed == 1 and no_local_signals == []
    fine = Engine(here=False)
    cell._stopper(fine, "ctr", "exec", None, None, 0, 1000)()
    assert fine.killed == 0


def test_the_lease_setting_is_checked():
    from mino_jupyter.cleanup import LEASE_DEFAULT, lease_seconds, lease_tar
    from mino_jupyter.errors import UsageError

    assert lease_seconds({}) == LEASE_DEFAULT and lease_seconds({"MINO_LEASE": "30"}) == 30
    for bad in ("3", "ten", "-5", "1e3"):
        with pytest.raises(UsageError, match="whole number of seconds"):
            lease_seconds({"MINO_LEASE": bad})
    import io
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(lease_tar(7))) as tar:
        assert [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()] == [("seq", b"7\n")]
    assert firewall.agent_command("allowlist", 30)[-2:] == ("dns", "lease=30")
    assert not any(a.startswith("lease=") for a in firewall.agent_command("bridge"))


FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 93.184.216.0/24 2 0 2
           |-- 93.184.216.0
              /24 link UNICAST
           |-- 93.184.216.34
              /32 host LOCAL
        |-- 93.184.216.255
           /32 link BROADCAST
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
2a001450000000000000000000000007 04 40 00 82     eth0
"""


def test_the_engine_machine_s_own_addresses_are_read_from_its_tables_and_refused():
    from mino_jupyter import copied

    found = copied.parse_addresses(FIB_TRIE)
    assert found == [("127.0.0.1", 32), ("2a00:1450::7", 128), ("93.184.216.34", 32), ("fe80::fc:ff:fe00:1", 128)]
    local = firewall.local_networks([("192.168.1.5", 24)] + found, [], engine_elsewhere=True)
    assert "93.184.216.34/32" in local.v4 and "2a00:1450::7/128" in local.v6
    assert "93.184.216.0/24" not in local.v4  # a public subnet stays reachable, the machine itself excepted


def test_host_containers_internal_names_the_engine_s_machine_for_a_rootless_engine_elsewhere():
    import types

    from mino_jupyter import host

    rootless = types.SimpleNamespace(rootless=True)
    there = [("127.0.0.1", 32), ("fe80::1", 128), ("198.51.100.20", 32)]
    assert host.seen_from_sessions(rootless, [], there) == ["198.51.100.20"]
    rootful = types.SimpleNamespace(rootless=False)
    nets = [{"name": "podman", "subnets": [{"subnet": "10.88.0.0/16", "gateway": "10.88.0.1"}]}]
    assert host.seen_from_sessions(rootful, nets, there) == ["10.88.0.1"]


def test_a_cell_too_long_for_a_command_line_without_a_place_for_it_is_refused_in_one_line():
    from mino_jupyter.errors import UsageError

    with pytest.raises(UsageError, match="more than a command line holds") as err:
        cell.run_script(Engine(here=False), "ctr", "x" * (cell.MAX_ARGV_SCRIPT + 1), env={}, sink=None,
                        control=None)
    assert "nothing ran" in err.value.message
