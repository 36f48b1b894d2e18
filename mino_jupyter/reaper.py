"""Removing what dead owners left behind: at extension load, from the CLI, from the watchdog."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .owner import owner_alive
from .runtime import Engine

MANAGED = {"io.mino.managed": "true"}


def remove_all(engine: Engine, ids: list[str]) -> None:
    """Remove containers in parallel: kernel shutdown with many sessions must not take long."""
    if not ids:
        return
    with ThreadPoolExecutor(max_workers=min(8, len(ids))) as pool:
        list(pool.map(lambda cid: engine.remove(cid, timeout=0), ids))


def orphans(engine: Engine) -> list[dict]:
    return [c for c in engine.list(MANAGED) if not owner_alive(c.get("Labels") or {})]


def prune(engine: Engine, everything: bool = False) -> list[str]:
    """Remove orphaned mino containers (or, with `everything`, all of this host's)."""
    victims = engine.list(MANAGED) if everything else orphans(engine)
    ids = [c["Id"] for c in victims]
    remove_all(engine, ids)
    return ids
