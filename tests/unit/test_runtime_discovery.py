from mino_jupyter.policy import HostLimits
from mino_jupyter.runtime import client_url, discover, min_limits, _read_proc_limits

import os


def test_root_uses_rootful_socket_and_may_autostart():
    ep = discover({}, 0)
    assert ep.url == "unix:///run/podman/podman.sock"
    assert ep.socket_path == "/run/podman/podman.sock"
    assert ep.may_autostart


def test_rootless_uses_xdg_runtime_dir(tmp_path):
    ep = discover({"XDG_RUNTIME_DIR": str(tmp_path)}, os.geteuid() or 1234)
    assert ep.url == f"unix://{tmp_path}/podman/podman.sock"
    assert ep.may_autostart
    assert (ep.problem is None) == (os.geteuid() != 0)  # as root, tmp_path is not uid 1234's


def test_rootless_without_xdg_runtime_dir_falls_back_as_podman_does(tmp_path):
    """No $XDG_RUNTIME_DIR and no /run/user/UID (e.g. after `su -`): Podman's own fallback."""
    ep = discover({"TMPDIR": str(tmp_path)}, 54321)
    assert ep.socket_path == f"{tmp_path}/podman-run-54321/podman/podman.sock" and ep.problem is None


def test_an_xdg_runtime_dir_of_someone_else_is_one_line_with_the_fix(tmp_path):
    """`su` keeps the caller's XDG_RUNTIME_DIR: root's /run/user/0 is not the user's."""
    from mino_jupyter.runtime import RUNTIME_DIR_HINT

    ep = discover({"XDG_RUNTIME_DIR": str(tmp_path)}, 54321)
    assert ep.problem == (f"XDG_RUNTIME_DIR={tmp_path} cannot hold the Podman socket: belongs to "
                          f"{'root' if os.stat(tmp_path).st_uid == 0 else 'uid ' + str(os.stat(tmp_path).st_uid)}"
                          f", not to you (uid 54321)")
    missing = discover({"XDG_RUNTIME_DIR": str(tmp_path / "gone")}, 54321)
    assert missing.problem == f"XDG_RUNTIME_DIR={tmp_path}/gone cannot hold the Podman socket: does not exist"
    assert "unset XDG_RUNTIME_DIR" in RUNTIME_DIR_HINT and "loginctl enable-linger" in RUNTIME_DIR_HINT


def test_an_unusable_runtime_dir_stops_connect_with_one_line_not_a_traceback(tmp_path, monkeypatch):
    import mino_jupyter.runtime as runtime
    from mino_jupyter.errors import PodmanUnavailable
    import pytest

    monkeypatch.setattr(runtime.os, "geteuid", lambda: 54321)
    with pytest.raises(PodmanUnavailable) as e:
        runtime.Engine.connect({"XDG_RUNTIME_DIR": str(tmp_path / "gone"), "HOME": str(tmp_path)})
    assert e.value.message.startswith("XDG_RUNTIME_DIR=") and e.value.hint == runtime.RUNTIME_DIR_HINT


def test_container_host_wins_and_is_never_autostarted():
    ep = discover({"CONTAINER_HOST": "unix:///tmp/x.sock", "XDG_RUNTIME_DIR": "/run/user/0"}, 0)
    assert ep.url == "unix:///tmp/x.sock"
    assert ep.socket_path == "/tmp/x.sock"
    assert not ep.may_autostart
    assert ep.source == "CONTAINER_HOST"


def test_container_host_tcp_has_no_socket_path():
    ep = discover({"CONTAINER_HOST": "tcp://127.0.0.1:8888"}, 0)
    assert ep.socket_path is None and not ep.may_autostart


def test_blank_container_host_is_ignored():
    assert discover({"CONTAINER_HOST": "  "}, 0).url == "unix:///run/podman/podman.sock"


def test_client_url_translates_unix_scheme():
    assert client_url("unix:///run/podman/podman.sock") == "http+unix:///run/podman/podman.sock"
    assert client_url("tcp://h:1") == "tcp://h:1"


def test_min_limits_treats_minus_one_as_unlimited():
    assert min_limits(HostLimits(-1, 100), HostLimits(50, -1)) == HostLimits(50, 100)
    assert min_limits(HostLimits(10, 20), None) == HostLimits(10, 20)
    assert min_limits(HostLimits(10, 20), HostLimits(30, 5)) == HostLimits(10, 5)


def test_read_proc_limits_of_self_matches_resource():
    import resource

    limits = _read_proc_limits(os.getpid())
    hard_nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = -1 if hard_nofile == resource.RLIM_INFINITY else hard_nofile
    assert limits is not None and limits.nofile == expected


def test_no_engine_at_all_is_one_message_with_the_way_to_run_locally(tmp_path, monkeypatch):
    """Binder-like: an unprivileged user, no podman binary, no socket."""
    import mino_jupyter.runtime as runtime
    from mino_jupyter.errors import PodmanUnavailable
    import pytest

    monkeypatch.setattr(runtime.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    with pytest.raises(PodmanUnavailable) as e:
        runtime.Engine.connect({"TMPDIR": str(tmp_path), "HOME": str(tmp_path)})
    assert e.value.message == "no container engine here: podman is not installed and no Podman API socket answers"
    assert "make demo" in e.value.hint and "Binder" in e.value.hint
    assert "\n" not in e.value.message
