import os
from pathlib import Path
import socket

import pytest

from mino_jupyter import doctor, image
from mino_jupyter.errors import UsageError
from mino_jupyter.owner import current_owner, owner_alive, process_start_ticks


def test_a_live_process_is_alive_until_it_ends():
    """Another process, its start time read from /proc here (not through the code under test)."""
    import subprocess

    child = subprocess.Popen(["sleep", "30"])
    try:
        stat = open(f"/proc/{child.pid}/stat").read()
        start = stat[stat.rindex(")") + 2:].split()[19]
        labels = current_owner().labels() | {"io.mino.owner-pid": str(child.pid), "io.mino.owner-start": start}
        assert owner_alive(labels)
    finally:
        child.kill()
        child.wait()
    assert not owner_alive(labels)


def test_a_killed_owner_that_is_still_a_zombie_is_dead():
    """SIGKILLed, not yet reaped by its parent (a bare KernelManager never waits): /proc still
    shows the old start time, state Z. The watchdog and the reaper must call it dead."""
    import signal
    import subprocess
    import time

    child = subprocess.Popen(["sleep", "30"])
    stat = open(f"/proc/{child.pid}/stat").read()
    start = stat[stat.rindex(")") + 2:].split()[19]
    labels = current_owner().labels() | {"io.mino.owner-pid": str(child.pid), "io.mino.owner-start": start}
    try:
        assert owner_alive(labels)
        child.send_signal(signal.SIGKILL)
        for _ in range(100):  # until the kernel has made it a zombie (we do not wait for it yet)
            stat = open(f"/proc/{child.pid}/stat").read()
            if stat[stat.rindex(")") + 2:].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert stat[stat.rindex(")") + 2:].split()[19] == start  # the entry still looks like the owner
        assert not owner_alive(labels)
    finally:
        child.wait()


def test_owner_with_reused_pid_is_dead():
    labels = current_owner().labels()
    labels["io.mino.owner-start"] = str(int(labels["io.mino.owner-start"]) + 1)
    assert not owner_alive(labels)


def test_owner_from_previous_boot_is_dead():
    labels = current_owner().labels() | {"io.mino.boot-id": "00000000-dead"}
    assert not owner_alive(labels)


def test_owner_gone_is_dead():
    labels = current_owner().labels() | {"io.mino.owner-pid": "999999999"}
    assert process_start_ticks(999999999) is None
    assert not owner_alive(labels)


def test_other_hosts_and_unlabelled_containers_are_not_judged():
    dead_here = current_owner().labels() | {"io.mino.owner-pid": "999999999"}
    assert not owner_alive(dead_here)  # the contrast: on this host, a dead owner is dead
    assert owner_alive(dead_here | {"io.mino.host": socket.gethostname() + "-x"})  # elsewhere: not ours to judge
    assert owner_alive({})  # no owner labels at all: not ours either
    assert owner_alive({"io.mino.host": socket.gethostname(), "io.mino.owner-pid": "not-a-number"})


def test_probe_judgement():
    good = doctor.parse_probe("CapInh:\t0000000000000000\nCapPrm:\t0\nCapEff:\t0\nCapBnd:\t0000000000000000\n"
                              "CapAmb:\t0\nNoNewPrivs:\t1\nSeccomp:\t2\nPids: 4096\nUid: 1000\n"
                              "Userns: refused\nRoot: read-only\n")
    assert doctor.judge_probe(good) == []
    bad = dict(good, CapBnd="00000000a80425fb", NoNewPrivs="0", Pids="max", Uid="0", Seccomp="0",
               Userns="open", Root="writable")
    assert doctor.judge_probe(bad) == ["CapBnd=00000000a80425fb", "NoNewPrivs=0", "pids.max=max", "uid=0",
                                       "Seccomp=0 (no filter)", "user namespaces are open",
                                       "the root filesystem is writable"]
    assert "CapEff=None" in doctor.judge_probe({})


def test_probe_judgement_where_the_engine_applies_no_cgroup_limits():
    """Rootless on cgroup v1: pids.max is not the container's; the nproc ulimit must be 4096."""
    from mino_jupyter import policy

    v1 = policy.EngineFacts(rootless=True, cgroup_limits=False)
    base = {"CapInh": "0", "CapPrm": "0", "CapEff": "0", "CapBnd": "0", "CapAmb": "0", "NoNewPrivs": "1",
            "Seccomp": "2", "Uid": "1000", "Userns": "refused", "Root": "read-only", "Pids": "max"}
    assert doctor.judge_probe({**base, "Nproc": "4096"}, v1) == []
    assert doctor.judge_probe({**base, "Nproc": "32768"}, v1) == [
        "no process limit: the engine applies no pids.max and the nproc ulimit is 32768"]
    assert doctor.judge_probe({**base, "Nproc": "4096"}) == ["pids.max=max"]  # rootful: the cgroup must hold


def test_base_plan():
    have_none = lambda ref: False
    assert image.plan_base(offline=True, from_image=None, have=have_none).source == "debootstrap"
    assert image.plan_base(offline=True, from_image=None, have=lambda r: r == image.BOOTSTRAP_REF).source == "local"
    assert image.plan_base(offline=False, from_image=None, have=have_none) == image.BuildPlan("registry", image.REGISTRY_BASE)
    assert image.plan_base(offline=False, from_image="x:1", have=lambda r: r == "x:1") == image.BuildPlan("local", "x:1")
    with pytest.raises(UsageError):
        image.plan_base(offline=True, from_image="x:1", have=have_none)


def test_base_image_ref_names_the_version():
    from mino_jupyter import __version__

    assert image.base_image_ref() == f"localhost/mino-base:{__version__}"


def test_missing_subordinate_ids_are_one_line_with_the_fix(tmp_path):
    from mino_jupyter import host

    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("alice:100000:65536\n")
    subgid.write_text("someone:165536:65536\n")
    problem = host.subordinate_ids_problem("alice", 4242, (str(subuid), str(subgid)))
    assert problem.message == f"user alice has no subordinate ID range in {subgid}, which rootless Podman needs"
    assert problem.hint.startswith("as root: usermod --add-subuids 231072-296607 --add-subgids 231072-296607 alice")
    subgid.write_text("4242:100000:65536\n")  # by uid works too
    assert host.subordinate_ids_problem("alice", 4242, (str(subuid), str(subgid))) is None


def test_exit_command_delay_is_the_last_file_that_sets_it(tmp_path):
    from mino_jupyter import host

    usr, etc, dropin = tmp_path / "usr.conf", tmp_path / "etc.conf", tmp_path / "51.conf"
    usr.write_text("[engine]\n#exit_command_delay = 300\n")
    etc.write_text("[engine]\nexit_command_delay = 60\n[containers]\nlog_size_max = 1\n")
    dropin.write_text("[engine]\nexit_command_delay = 10\n")
    assert host.exit_command_delay([usr]) == (300, None)  # a comment is not a setting
    assert host.exit_command_delay([usr, etc]) == (60, etc)
    assert host.exit_command_delay([usr, etc, dropin, tmp_path / "missing.conf"]) == (10, dropin)
    (tmp_path / "broken.conf").write_text("[engine\n")
    assert host.exit_command_delay([dropin, tmp_path / "broken.conf"]) == (10, dropin)


def test_containers_conf_files_follow_podmans_order(tmp_path):
    from mino_jupyter import runtime

    only = tmp_path / "only.conf"
    assert runtime.containers_conf_files({"CONTAINERS_CONF": str(only)}) == [only]
    user = tmp_path / "cfg" / "containers"
    (user / "containers.conf.d").mkdir(parents=True)
    (user / "containers.conf.d" / "b.conf").write_text("")
    (user / "containers.conf.d" / "a.conf").write_text("")
    files = runtime.containers_conf_files({"XDG_CONFIG_HOME": str(tmp_path / "cfg")}, uid=1000)
    assert files[:2] == [Path("/usr/share/containers/containers.conf"), Path("/etc/containers/containers.conf")]
    assert files[-3:] == [user / "containers.conf", user / "containers.conf.d" / "a.conf",
                          user / "containers.conf.d" / "b.conf"]
    assert user / "containers.conf" not in runtime.containers_conf_files({"XDG_CONFIG_HOME": str(tmp_path / "cfg")}, uid=0)
    # connections (`podman system connection add`) are kept in the user's file, root's too
    assert user / "containers.conf" in runtime.containers_conf_files({"XDG_CONFIG_HOME": str(tmp_path / "cfg")},
                                                                      uid=0, user=True)


def test_doctor_warns_about_a_long_exit_command_delay(tmp_path):
    from mino_jupyter import doctor

    conf = tmp_path / "c.conf"
    conf.write_text("[engine]\nexit_command_delay = 10\n")
    assert doctor._exec_cleanup(None, [conf]).render().startswith("[ok  ] exec clean-up: finished cells' exec records go after 10 s")
    line = doctor._exec_cleanup(None, []).render()
    assert line.startswith("[warn] exec clean-up: exit_command_delay is 300 s (Podman's default)")
    assert "fix: put `[engine]` / `exit_command_delay = 10`" in line


def test_a_machine_with_the_same_host_name_is_not_judged_by_its_boot_id():
    """Another machine sharing our host name (and the engine) boots with another boot id: read as
    "this machine rebooted", its live kernel's containers were reaped. Its machine id says it is
    another machine."""
    from mino_jupyter.owner import machine_id

    mine = current_owner()
    assert mine.labels()["io.mino.machine-id"] == machine_id()
    elsewhere = mine.labels() | {"io.mino.boot-id": "another-boot", "io.mino.owner-pid": "999999999"}
    assert not owner_alive(elsewhere, machine=elsewhere["io.mino.machine-id"])  # here: rebooted, so dead
    assert owner_alive(elsewhere | {"io.mino.machine-id": "f" * 32}, machine="0" * 32)  # there: not ours


def test_machine_id_falls_back_and_says_unknown(tmp_path):
    from mino_jupyter.owner import machine_id

    files = (tmp_path / "machine-id", tmp_path / "dbus-machine-id")
    assert machine_id(files) == "unknown"
    files[1].write_text("from-dbus\n")
    assert machine_id(files) == "from-dbus"
    files[0].write_text("abc123\n")
    assert machine_id(files) == "abc123"


# ---------------------------------------------------------------------- is the engine on this machine?
class _Placed:
    def __init__(self, here, local, peer):
        import types

        self.here, self.endpoint, self.peer = here, types.SimpleNamespace(local=local), peer

    def processes_here(self):
        return self.here

    def service_pid(self):
        return self.peer


@pytest.mark.parametrize("engine,reason", [
    (_Placed(True, True, 12), None),
    (_Placed(False, False, None), "it is reached over the network"),
    (_Placed(False, True, None), "its socket has no process of this machine behind it"),
    (_Placed(False, True, 12), "its socket's process is not a Podman of this machine's mount namespace"),
])
def test_only_an_engine_whose_processes_are_here_gets_this_machine_s_files(engine, reason):
    from mino_jupyter import host

    assert host.engine_elsewhere(engine) == reason


def test_an_engine_s_processes_are_here_only_behind_a_podman_of_our_mount_namespace(monkeypatch):
    """A forwarded socket's peer (ssh, a virtual machine's proxy) is a process here, not Podman."""
    import types

    from mino_jupyter.runtime import Engine

    from mino_jupyter import runtime

    def engine(exe, holder=None):
        e = Engine.__new__(Engine)
        e._processes_here = None
        e.endpoint = types.SimpleNamespace(socket_path="/run/podman/podman.sock")
        e.service_pid = lambda: os.getpid()
        e.facts = lambda: types.SimpleNamespace(rootless=False)
        monkeypatch.setattr(os, "readlink", lambda path: exe)
        monkeypatch.setattr(runtime, "_podman_holding", lambda path: holder)
        return e

    assert engine("/usr/bin/podman").processes_here() is True
    assert engine("/usr/bin/ssh").processes_here() is False
    assert engine("/usr/bin/gvproxy").processes_here() is False
    # socket activation: the peer is systemd; the Podman it started holds the socket
    assert engine("/usr/lib/systemd/systemd", holder=os.getpid()).processes_here() is True


def test_the_podman_holding_a_socket_is_found_by_the_socket_s_inode(tmp_path):
    from mino_jupyter.runtime import _podman_holding

    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "unix").write_text(
        "Num       RefCount Protocol Flags    Type St Inode Path\n"
        "0000: 00000002 00000000 00010000 0001 01 4242 /run/podman/podman.sock\n"
        "0000: 00000002 00000000 00010000 0001 03 4343 /run/podman/podman.sock\n")
    assert _podman_holding("/run/podman/podman.sock", tmp_path) is None  # no process holds it here
    assert _podman_holding("/run/other.sock", tmp_path) is None
