"""pip and npm in cells: bridge, the registries preset, none, and the package caches.

Destinations are the package registries this machine reaches (as ordinary allowlisted requests)
and local test servers.
"""

from __future__ import annotations

import os
import uuid

import pytest

from mino_jupyter import image as images
from mino_jupyter.network import NetworkChoice
from mino_jupyter.sessions import CellOptions, SessionManager
from tests.kernel import Capture, isolated_env
from tests.listeners import TcpListener

pytestmark = pytest.mark.podman


@pytest.fixture(scope="module")
def toolchains(engine, base_image):
    for name in ("python", "node"):
        if not engine.image_exists(images.VARIANTS[name].ref):
            from tests.conftest import _unavailable

            _unavailable(f"{images.VARIANTS[name].ref} is missing; `make test` builds it (setup --toolchains)")


@pytest.fixture
def manager(toolchains, tmp_path):
    notices = []
    m = SessionManager(cwd=lambda: tmp_path, notice=notices.append, watchdog=False,
                       env={**os.environ, **isolated_env(tmp_path / "mino-home")})
    m.notices = notices
    yield m
    m.shutdown()


def run(m, script, image, session=None, network=None, preset=None, allow=None):
    sink = Capture()
    opts = CellOptions(session=session or f"s{uuid.uuid4().hex[:6]}", image=image,
                       network=NetworkChoice("cell flags", network, preset, tuple(allow) if allow else None))
    result, _ = m.run_cell(script, opts, sink)
    return result.exit_code, "".join(sink.out), "".join(sink.err)


PIP = "pip download --no-deps -d /tmp/dl six"
NPM = "npm view is-number version"


def test_short_names_resolve_to_local_tags():
    from mino_jupyter import __version__

    assert images.resolve_ref("python") == f"localhost/mino-python:{__version__}"
    assert images.resolve_ref("node") == f"localhost/mino-node:{__version__}"
    assert images.resolve_ref("docker.io/library/debian:bookworm") == "docker.io/library/debian:bookworm"


def test_bridge_pip_and_npm(manager):
    code, out, err = run(manager, f"{PIP} && ls /tmp/dl", "python")
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("six-") and out.strip().endswith(".whl")
    code, out, err = run(manager, NPM, "node")
    assert code == 0 and out.strip().split(".")[0].isdigit(), err


def test_registries_preset_allows_registries_and_refuses_the_rest(manager, gateway):
    other = TcpListener(gateway)
    try:
        code, out, err = run(manager, f"{PIP} >/dev/null && echo pip-ok\n"
                                      f"curl -sS -m 5 http://{gateway}:{other.port}/ || echo \"refused-$?\"",
                             "python", preset="registries")
        assert out.split() == ["pip-ok", "refused-7"], err
        assert other.hits == 0
        code, out, err = run(manager, f"{NPM} && curl -sS -m 5 http://{gateway}:{other.port}/ || echo \"refused-$?\"",
                             "node", preset="registries")
        assert out.split()[-1] == "refused-7" and out.split()[0][0].isdigit(), err
        assert other.hits == 0
    finally:
        other.close()


def test_none_fails_fast_with_a_network_error(manager):
    code, out, err = run(manager, f"start=$(date +%s)\n{PIP}; rc=$?\necho \"pip exit $rc after $(( $(date +%s) - start )) s\"\n"
                                  "exit $rc", "python", network="none")
    assert code != 0
    seconds = int(out.split()[-2])
    assert seconds <= 5, out  # no minutes of retries
    assert "No matching distribution" in err or "Failed to establish a new connection" in err or "resolve" in err.lower()
    # A cache of its own: the shared one may hold this answer from an earlier test.
    code, out, err = run(manager, f"start=$(date +%s)\n{NPM} --cache /tmp/empty-npm-cache; rc=$?\n"
                                  "echo \"npm exit $rc after $(( $(date +%s) - start )) s\"; exit $rc", "node", network="none")
    assert int(out.split()[-2]) <= 5, out
    assert code != 0 and ("EAI_AGAIN" in err or "ENOTFOUND" in err or "network" in err.lower()), err


def test_package_caches_persist_across_sessions(manager):
    # npm: the second session installs with --offline, which only a cache can satisfy.
    code, out, err = run(manager, "cd /tmp && npm install --no-audit --no-fund is-number >/dev/null && echo installed",
                         "node")
    assert code == 0 and out.strip() == "installed", err
    code, out, err = run(manager, "cd /tmp && npm install --offline --no-audit --no-fund is-number >/dev/null "
                                  "&& echo from-cache", "node", network="none")
    assert code == 0 and out.strip() == "from-cache", err
    # pip: a wheel pip builds in one session is in the cache volume that the next session mounts.
    # (pip's HTTP cache stores nothing on this machine: its TLS proxy strips Cache-Control.)
    code, out, err = run(manager, "pip install -q --no-binary six --use-pep517 six && echo built", "python")
    assert code == 0 and out.strip().endswith("built"), err
    code, out, _ = run(manager, "find ~/.cache/pip/wheels -name 'six-*.whl' | head -1 | xargs -r basename\n"
                                "grep -c ' /home/developer/.cache/pip ' /proc/self/mounts", "python", network="none")
    wheel, mounts = out.split()
    assert wheel.startswith("six-") and wheel.endswith(".whl") and mounts == "1"


def test_package_cache_can_be_turned_off(manager, tmp_path):
    from mino_jupyter import config

    code, out, _ = run(manager, "grep -c ' /home/developer/.npm ' /proc/self/mounts || true", "node")
    assert out.strip() == "1"  # the control: on by default
    config.set_key("package_cache", "false", local=False, cwd=tmp_path, env=manager.env)
    code, out, _ = run(manager, "grep -c ' /home/developer/.npm ' /proc/self/mounts || true", "node")
    assert out.strip() == "0"
