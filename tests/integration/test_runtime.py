"""The runtime layer against the real Podman API service."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import pytest

from mino_jupyter import policy
from mino_jupyter.owner import current_owner
from mino_jupyter.runtime import Engine, _socket_peer_pid

pytestmark = pytest.mark.podman

STATUS_PROBE = (
    "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status; "
    "echo pids.max=$(cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max); "
    "echo uid=$(id -u); ulimit -Hn; ulimit -Hu"
)


def _labels():
    return policy.labels("test", current_owner().labels())


@pytest.fixture
def hardened(engine, base_image):
    created = []

    def make(network="bridge"):
        spec = policy.session_spec(policy.SessionRequest(
            name=f"mino-test-{uuid.uuid4().hex[:8]}", image=base_image, network=network,
            labels=_labels(), limits=engine.host_limits(), engine=engine.facts()))
        cid = engine.run(spec)
        created.append(cid)
        return cid

    yield make
    for cid in created:
        engine.remove(cid)
    for cid in created:
        assert engine.inspect(cid) is None


@pytest.mark.parametrize("network", ["bridge", "host", "none"])
def test_hardened_container_seen_from_inside(engine, hardened, network):
    cid = hardened(network)
    code, out, err = engine.exec_run(cid, policy.exec_body(["bash", "-c", STATUS_PROBE]))
    assert code == 0, err
    lines = out.decode().split("\n")
    fields = dict(line.split(":\t") for line in lines if ":\t" in line)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"] == "1"
    if engine.facts().cgroup_limits:
        assert "pids.max=4096" in lines
    else:  # rootless on cgroup v1: the nproc ulimit is the process limit
        assert int(lines[-2]) == 4096
    assert "uid=1000" in lines
    limits = engine.host_limits()
    nofile, nproc = int(lines[-3]), int(lines[-2])
    assert nofile <= limits.nofile and nproc <= limits.nproc


def test_root_exec_in_a_session_container_has_no_capabilities(engine, hardened):
    cid = hardened()
    code, out, _ = engine.exec_run(cid, policy.exec_body(["grep", "-E", "^Cap(Eff|Bnd|Prm)", "/proc/self/status"],
                                                         user="0:0"))
    assert code == 0
    assert [int(line.split()[1], 16) for line in out.decode().splitlines()] == [0, 0, 0]


def test_exec_exit_code_and_stream_separation(engine, hardened):
    cid = hardened()
    code, out, err = engine.exec_run(cid, policy.exec_body(["bash", "-c", "echo out; echo err >&2; exit 42"]))
    assert (code, out, err) == (42, b"out\n", b"err\n")


def test_a_service_that_is_not_running_is_started(engine, base_image, tmp_path, monkeypatch):
    """Against a socket of its own (a rootless-style $XDG_RUNTIME_DIR path under tmp_path), so
    the machine's shared service is never touched."""
    runtime_dir = tmp_path / "run"
    runtime_dir.mkdir()
    env = {"XDG_RUNTIME_DIR": str(runtime_dir), "XDG_STATE_HOME": str(tmp_path / "state"), "PATH": os.environ["PATH"]}
    path = str(runtime_dir / "podman" / "podman.sock")
    if os.geteuid() == 0:  # discovery picks $XDG_RUNTIME_DIR (which it may start) for a user's own
        os.chown(runtime_dir, 1000, 1000)
        monkeypatch.setattr(os, "geteuid", lambda: 1000)
    notes = []
    doomed = tmp_path / "a-notebook-dir"
    doomed.mkdir()
    monkeypatch.chdir(doomed)  # kernels start the service from notebook directories
    fresh = Engine.connect(env, notify=notes.append)
    monkeypatch.undo()
    service = _socket_peer_pid(path)
    try:
        assert fresh.started_service and fresh.endpoint.socket_path == path
        assert notes and "started the Podman API service" in notes[0] and path in notes[0]
        assert fresh.image_exists(base_image)
        assert os.readlink(f"/proc/{service}/cwd") == "/"  # not the directory that may be deleted
        assert service != _socket_peer_pid(engine.endpoint.socket_path)  # not the shared one
    finally:
        fresh.close()
        if service:
            os.kill(service, signal.SIGTERM)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mino_jupyter.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_bogus_container_host_is_one_clear_error(tmp_path):
    url = f"unix://{tmp_path}/nothing-here.sock"
    result = _cli("prune", env={"CONTAINER_HOST": url})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("mino: cannot reach the Podman API at " + url)
    assert lines[1].strip().startswith("hint:") and "CONTAINER_HOST" in lines[1]


def test_tcp_container_host_refused_is_one_clear_error():
    result = _cli("prune", env={"CONTAINER_HOST": "tcp://127.0.0.1:9"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "tcp://127.0.0.1:9" in result.stderr and "hint:" in result.stderr


def test_doctor_passes_every_check(engine):
    """Every line passes, or (rootless) names exactly what this host cannot apply."""
    result = _cli("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    rootless = ["[ok  ] subordinate ids"] if engine.facts().rootless else []
    notes = ["[note] limits"] * len(policy.unenforced(engine.facts()))
    assert [line.split(":")[0] for line in lines] == [
        "[ok  ] podman", "[ok  ] API service", "[ok  ] engine", *rootless, *notes, "[ok  ] exec clean-up",
        "[ok  ] cell executor", "[ok  ] files",
        "[ok  ] base image",
        "[ok  ] hardened container", "[ok  ] session storage"]
    hardened = next(line for line in lines if line.startswith("[ok  ] hardened container"))
    assert "seccomp on, no user namespaces, read-only root" in hardened
    assert ("pids.max=4096" if engine.facts().cgroup_limits else "nproc ulimit=4096") in hardened


def test_missing_image_is_a_clear_error(engine):
    from mino_jupyter.errors import ImageMissing

    with pytest.raises(ImageMissing) as info:
        engine.require_image("localhost/mino-no-such-image:1")
    assert "mino-jupyter image build" in info.value.hint


def test_failed_build_leaves_nothing_tagged(engine):
    from mino_jupyter.errors import ImageBuildError
    from mino_jupyter.image import build_recipe

    target = f"localhost/mino-test-broken:{uuid.uuid4().hex[:6]}"
    with pytest.raises(ImageBuildError):
        build_recipe(engine, base="localhost/mino-no-such-base:1", target=target, progress=lambda m: None)
    assert not engine.image_exists(target)
    assert not engine.image_exists(target + "-candidate")


def test_build_from_a_local_base_image_uses_the_same_recipe(engine, base_image):
    """--from IMAGE (a registry image in real life) goes through the same recipe and checks."""
    from mino_jupyter.image import BOOTSTRAP_REF, build_recipe

    base = BOOTSTRAP_REF if engine.image_exists(BOOTSTRAP_REF) else base_image
    target = f"localhost/mino-test-from:{uuid.uuid4().hex[:6]}"
    seen = []
    try:
        build_recipe(engine, base=base, target=target, progress=seen.append)
        assert engine.image_exists(target)
        assert not engine.image_exists(target + "-candidate")
        labels = engine.image_inspect(target)["Config"]["Labels"]
        from mino_jupyter import __version__

        assert labels["io.mino.version"] == __version__
        assert any(line.strip().startswith("STEP") for line in seen)  # progress was shown
    finally:
        engine.remove_image(target)


def test_offline_and_from_builds_through_the_command_line(engine, base_image):
    """The path every fresh machine takes (debootstrap, import, the recipe, checked, tagged),
    then --from on its rootfs, both under tags of their own (the images sessions use stay)."""
    import uuid

    tag = uuid.uuid4().hex[:8]
    offline, from_ = f"localhost/mino-test-offline:{tag}", f"localhost/mino-test-from:{tag}"
    rootfs = f"localhost/mino-test-offline-bootstrap:{tag}"
    try:
        result = _cli("image", "build", "--offline", "--tag", offline)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        tool = "debootstrap" if os.geteuid() == 0 else "mmdebstrap"  # no root: a user namespace
        assert f"{tool} bookworm from" in result.stdout and f"importing the rootfs as {rootfs}" in result.stdout
        assert result.stdout.strip().splitlines()[-1] == offline
        assert engine.image_exists(offline) and engine.image_exists(rootfs)
        assert not engine.image_exists(f"{offline}-candidate")  # tagged only once checked
        result = _cli("image", "build", "--from", rootfs, "--tag", from_)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        assert f"building {from_} FROM {rootfs}" in result.stdout
        labels = engine.image_inspect(from_)["Labels"]
        assert labels["io.mino.image"] == "mino-base"
        result = _cli("image", "build", "python", "--tag", from_)
        assert result.returncode == 1 and "--tag names the base image only" in result.stderr
    finally:
        for ref in (offline, from_, rootfs):
            engine.remove_image(ref)
