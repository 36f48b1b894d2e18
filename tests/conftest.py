"""Shared fixtures. Podman-backed tests never skip silently in CI: with MINO_REQUIRE_PODMAN=1
(set by `make test`), an unreachable engine or a missing base image is a failure."""

from __future__ import annotations

import os
import uuid

import pytest

REQUIRE_PODMAN = os.environ.get("MINO_REQUIRE_PODMAN") == "1"
ROOTLESS = os.geteuid() != 0  # the rootless home: a normal user with their own Podman


def give_to_cell(path) -> None:
    """Make `path` the cell's, as a user would for a directory the sandbox may write: uid 1000
    under rootful Podman; under rootless keep-id the cell already is the kernel's user."""
    if not ROOTLESS:
        os.chown(path, 1000, 1000)


def _unavailable(reason: str):
    if REQUIRE_PODMAN:
        pytest.fail(f"Podman is required here (MINO_REQUIRE_PODMAN=1): {reason}", pytrace=False)
    pytest.skip(f"Podman not available: {reason}")


@pytest.fixture(scope="session")
def engine():
    from mino_jupyter.errors import MinoError
    from mino_jupyter.runtime import Engine

    try:
        eng = Engine.connect()
    except MinoError as exc:
        _unavailable(exc.render())
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def base_image(engine):
    from mino_jupyter.image import base_image_ref

    ref = base_image_ref()
    if not engine.image_exists(ref):
        _unavailable(f"{ref} is missing; run `make setup`")
    return ref


@pytest.fixture(scope="session")
def gateway(engine, base_image):
    """This machine as a bridge session reaches it: the Podman bridge gateway (rootful, with its
    interface up for the whole run: a keeper container), or under rootless Podman this machine's
    own address through slirp4netns (`host.containers.internal`). Test listeners bind here."""
    from mino_jupyter import host, policy
    from mino_jupyter.owner import current_owner

    gw = host.seen_from_sessions(engine.facts(), engine.networks())[0]
    keeper = engine.run(policy.session_spec(policy.SessionRequest(
        name=f"mino-test-keeper-{uuid.uuid4().hex[:6]}", image=base_image, network="bridge",
        labels=policy.labels("test", current_owner().labels()),
        limits=engine.host_limits(), engine=engine.facts())))
    yield gw
    engine.remove(keeper)


