"""Shared fixtures. Podman-backed tests never skip silently in CI: with MINO_REQUIRE_PODMAN=1
(set by `make test`), an unreachable engine or a missing base image is a failure."""

from __future__ import annotations

import os
import uuid

import pytest

REQUIRE_PODMAN = os.environ.get("MINO_REQUIRE_PODMAN") == "1"


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
    """The Podman bridge gateway, with its interface up for the whole run (a keeper container)."""
    from mino_jupyter import policy
    from mino_jupyter.owner import current_owner

    info = engine.network("podman")
    gw = info["subnets"][0]["gateway"]
    keeper = engine.run(policy.session_spec(policy.SessionRequest(
        name=f"mino-test-keeper-{uuid.uuid4().hex[:6]}", image=base_image, network="bridge",
        labels=policy.labels("test", current_owner().labels()),
        limits=engine.host_limits())))
    yield gw
    engine.remove(keeper)


