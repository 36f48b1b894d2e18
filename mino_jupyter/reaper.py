"""Removing what dead owners left behind: at extension load, from the CLI, from the watchdog."""

from __future__ import annotations

import threading

from .owner import owner_alive
from .runtime import Engine

MANAGED = {"io.mino.managed": "true"}


def _parallel(engine: Engine, ids: list[str]) -> None:
    # Plain threads, not concurrent.futures: this also runs from atexit, where executors refuse work.
    errors: list[BaseException] = []

    def remove(cid: str) -> None:
        try:
            engine.remove(cid, timeout=0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=remove, args=(cid,), daemon=True) for cid in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def remove_containers(engine: Engine, containers: list[dict]) -> list[str]:
    """Remove containers (as listed by Engine.list) in parallel; firewall containers, which join
    their session's network namespace, go with their session (removal with dependents)."""
    sessions = [c["Id"] for c in containers if (c.get("Labels") or {}).get("io.mino.role") != "firewall"]
    _parallel(engine, sessions)
    left = {c["Id"] for c in engine.list(MANAGED)}
    firewalls = [c["Id"] for c in containers if c["Id"] not in sessions and c["Id"] in left]
    _parallel(engine, firewalls)
    return [c["Id"] for c in containers]


def owned_by(engine: Engine, token: str) -> list[dict]:
    return engine.list({**MANAGED, "io.mino.owner": token})


def orphans(engine: Engine) -> list[dict]:
    return [c for c in engine.list(MANAGED) if not owner_alive(c.get("Labels") or {})]


def prune(engine: Engine, everything: bool = False) -> list[str]:
    """Remove orphaned mino containers (or, with `everything`, all of this host's)."""
    victims = engine.list(MANAGED) if everything else orphans(engine)
    return remove_containers(engine, victims)
