"""Removing what dead owners left behind: at extension load, from the CLI, from the watchdog."""

from __future__ import annotations

import threading

from .owner import owner_alive
from .runtime import Engine

MANAGED = {"io.mino.managed": "true"}


def remove_all(engine: Engine, ids: list[str]) -> None:
    """Remove containers in parallel: kernel shutdown with many sessions must not take long."""
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


def orphans(engine: Engine) -> list[dict]:
    return [c for c in engine.list(MANAGED) if not owner_alive(c.get("Labels") or {})]


def prune(engine: Engine, everything: bool = False) -> list[str]:
    """Remove orphaned mino containers (or, with `everything`, all of this host's)."""
    victims = engine.list(MANAGED) if everything else orphans(engine)
    ids = [c["Id"] for c in victims]
    remove_all(engine, ids)
    return ids
