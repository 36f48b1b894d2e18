"""An ssh:// engine: the URL and connection entries as Podman reads them, and the ssh command
mino runs (a forward only, no prompt, nothing of the URL read as an option)."""

from pathlib import Path

import pytest

from mino_jupyter import ssh
from mino_jupyter.errors import PodmanUnavailable
from mino_jupyter.runtime import discover


def test_podman_s_ssh_url():
    t = ssh.parse("ssh://core@build.example:2222/run/user/1000/podman/podman.sock", "/keys/id")
    assert (t.destination, t.port, t.socket, t.identity) == ("core@build.example", 2222,
                                                             "/run/user/1000/podman/podman.sock", "/keys/id")
    assert ssh.parse("ssh://box/run/podman/podman.sock").destination == "box"


@pytest.mark.parametrize("url, says", [
    ("ssh://user@host", "does not say where the Podman socket is"),
    ("ssh://user@host/", "does not say where the Podman socket is"),
    ("ssh://-oProxyCommand=touch%20x/run/podman/podman.sock", "no usable host"),
    ("ssh://-oProxyCommand=x@host/run/podman/podman.sock", "no usable user name"),
    ("ssh://user@host:twenty/run/podman/podman.sock", "is not a number"),
])
def test_a_url_mino_cannot_use_is_one_line(url, says):
    with pytest.raises(PodmanUnavailable) as e:
        ssh.parse(url)
    assert says in e.value.message and "\n" not in e.value.message and e.value.hint


def test_the_ssh_command_forwards_only_and_never_prompts():
    t = ssh.parse("ssh://core@host:2222/run/podman/podman.sock", "/keys/id")
    cmd = ssh.command(t, "/tmp/mino-ssh-x/api.sock", "/cfg")
    assert cmd[0] == "/usr/bin/ssh" and "-N" in cmd
    assert cmd[-2:] == ["--", "core@host"]  # the destination is never an option
    for option in ("BatchMode=yes", "ExitOnForwardFailure=yes", f"ConnectTimeout={ssh.CONNECT_TIMEOUT}"):
        assert option in cmd
    assert cmd[cmd.index("-L") + 1] == "/tmp/mino-ssh-x/api.sock:/run/podman/podman.sock"
    assert cmd[cmd.index("-i") + 1] == "/keys/id" and cmd[cmd.index("-F") + 1] == "/cfg"
    assert cmd[cmd.index("-p") + 1] == "2222"
    assert "-F" not in ssh.command(ssh.parse("ssh://h/s.sock"), "/x", None)


def test_connections_and_keys_as_podman_reads_them(tmp_path):
    conf = tmp_path / "cfg" / "containers" / "containers.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text('[engine.service_destinations.builder]\nuri = "ssh://core@build:2222/run/podman/podman.sock"\n'
                    'identity = "/keys/build"\n')
    env = {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "CONTAINER_CONNECTION": "builder"}
    e = discover(env, 0)  # root too: connections live in the user's file
    assert e.url == "ssh://core@build:2222/run/podman/podman.sock" and not e.local
    assert e.ssh.identity == "/keys/build" and e.source == "the Podman connection builder"
    assert discover({**env, "CONTAINER_SSHKEY": "/keys/other"}, 0).ssh.identity == "/keys/other"
    with pytest.raises(PodmanUnavailable) as err:
        discover({**env, "CONTAINER_CONNECTION": "nope"}, 0)
    assert err.value.message == 'no Podman connection named "nope" (CONTAINER_CONNECTION)'
    # Podman 5 (`podman machine init`, `podman system connection add`) keeps them in JSON, first
    (tmp_path / "cfg" / "containers" / "podman-connections.json").write_text(
        '{"Connection": {"Default": "builder", "Connections": {"builder": {"URI": "ssh://core@vm:33333/run/'
        'podman/podman.sock", "Identity": "/keys/machine", "IsMachine": true}}}, "Farm": {}}')
    e = discover(env, 0)
    assert e.url == "ssh://core@vm:33333/run/podman/podman.sock" and e.ssh.identity == "/keys/machine"
    assert discover({**env, "PODMAN_CONNECTIONS_CONF": str(tmp_path / "none.json")}, 0).ssh.identity == "/keys/build"
    assert discover({"CONTAINER_HOST": "tcp://127.0.0.1:8080"}, 0).local is False
    assert discover({"CONTAINER_HOST": "unix:///run/podman/podman.sock"}, 0).local is True


def test_forwards_left_by_killed_kernels_are_swept_and_live_ones_kept(tmp_path):
    import os
    import socket

    stale, fresh, live = (tmp_path / f"{ssh.PREFIX}{name}" for name in ("stale", "fresh", "live"))
    for d in (stale, fresh, live):
        d.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(live / "api.sock"))
    listener.listen(1)
    (stale / "ssh.err").write_text("")
    for d in (stale, live):
        os.utime(d, (1, 1))
    try:
        ssh._sweep(tmp_path)
    finally:
        listener.close()
    assert not stale.exists() and fresh.exists() and live.exists()


def test_threads_that_find_the_forward_dead_at_once_start_one_ssh(monkeypatch, tmp_path):
    """Two threads (a cell's and the lease's) lose the forward together: one ssh replaces it, not
    one each (the second would be left running); the other uses it."""
    import threading
    import time

    monkeypatch.setattr(ssh.tempfile, "gettempdir", lambda: str(tmp_path))
    forward = ssh.Forward(ssh.parse("ssh://box/run/podman/podman.sock"), {})
    started = []

    class Ssh:
        def poll(self):
            return None

    def fake_open(ping, timeout=ssh.OPEN_TIMEOUT):
        started.append(threading.get_ident())
        time.sleep(0.1)  # ssh starting: the other thread arrives meanwhile
        forward._proc = Ssh()
        forward.generation += 1

    monkeypatch.setattr(forward, "_open", fake_open)
    threads = [threading.Thread(target=forward.revive, args=(lambda s: None,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(started) == 1 and forward.alive() and forward.generation == 1
    forward._proc = None
    forward.close()
