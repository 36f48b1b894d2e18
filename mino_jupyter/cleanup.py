"""Containers never outlive their kernel: the one owner of removing them.

Four ways a container goes, all here:

* **fresh containers** go right after their cell, on a background thread (:meth:`Cleanup.remove_soon`),
  so the cell does not wait for Podman's network and storage teardown (about 0.3 s);
* **shutdown** (exit, restart, ``%unload_ext``) removes every container labelled with the kernel's
  owner token (:meth:`Cleanup.shutdown`);
* **the watchdog**, a small detached process, removes them when the kernel dies without shutting
  down (SIGKILL, OOM, crash): the kernel holds the write end of a pipe whose read end is the
  watchdog's stdin; a clean shutdown writes "bye" first; end of file without "bye" means the
  kernel died. If the pipe closes while the kernel still lives, it watches the kernel's pid;
* **the reaper** removes containers whose owner process is gone (the watchdog died too): when any
  kernel loads the extension, from ``mino-jupyter prune`` and ``%mino prune``.

Watchdog usage: ``python -m mino_jupyter.cleanup TOKEN ENGINE_URL PID START_TICKS [SESSIONS_DIR]``

Each removal of containers is followed by the removal of what they used on this machine: the
sessions' disks and overlay mounts (:mod:`mino_jupyter.storage`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping

from pathlib import Path

from . import mounts, storage
from .owner import Owner, owner_alive, process_start_ticks
from .policy import MANAGED
from .runtime import Engine

Notice = Callable[[str], None]


# ---------------------------------------------------------------------------- removing containers

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


def state_key(state: Path) -> str:
    """Which mino installation (state directory) a container belongs to: a kernel reaps only
    orphans of its own (another user's, or a concurrent test run's, are theirs to judge)."""
    return storage.path_key(state)


def orphans(engine: Engine, state: Path | None = None) -> list[dict]:
    key = state_key(state) if state is not None else None
    return [c for c in engine.list(MANAGED)
            if not owner_alive(c.get("Labels") or {})
            and (key is None or (c.get("Labels") or {}).get("io.mino.state", key) == key)]


def prune(engine: Engine, everything: bool = False, state: Path | None = None) -> list[str]:
    """Remove orphaned mino containers of this state directory (or, with `everything`, all of
    this host's)."""
    victims = engine.list(MANAGED) if everything else orphans(engine, state)
    return remove_containers(engine, victims)


# ---------------------------------------------------------------------------- one kernel's cleanup

class Cleanup:
    """What one kernel does so that its containers never outlive it."""

    def __init__(self, owner: Owner, env: Mapping[str, str] | None, notice: Notice, *, watchdog: bool = True,
                 storage_root: Path):
        self.owner = owner
        self.env = env
        self.notice = notice
        self.storage_root = storage_root  # mino's state directory: sessions/, caches/
        self.want_watchdog = watchdog
        self.reaped = False
        self.reaped_ids: list[str] = []  # what this kernel's reaper removed (tests, diagnostics)
        self._watchdog: subprocess.Popen | None = None
        self._watchdog_pipe: int | None = None
        self._removals: list[threading.Thread] = []

    # ------------------------------------------------------------------ reaping
    def start_background_reap(self) -> None:
        """At extension load: remove containers of kernels that died, without delaying the load."""
        def reap() -> None:
            try:
                engine = Engine.connect(self.env, autostart=False)
            except Exception:
                return  # no engine running: reap when a cell first connects
            try:
                self.reap(engine)
            finally:
                engine.close()

        threading.Thread(target=reap, name="mino-reaper", daemon=True).start()

    def reap_later(self, engine: Engine) -> None:
        """The first connection of a kernel whose load-time reap found no engine."""
        if not self.reaped:
            threading.Thread(target=self.reap, args=(engine,), name="mino-reaper", daemon=True).start()

    def reap(self, engine: Engine) -> None:
        self.reaped = True
        try:
            removed = prune(engine, state=self.storage_root)
            self.reaped_ids += removed
            storage.reap(self.storage_root / "sessions", owner_alive, mounts.for_cleanup(engine))
            _release_caches(engine, self.storage_root)
        except Exception:
            return
        if removed:
            self.notice(f"mino: removed {len(removed)} container(s) left behind by a kernel that died")

    # ------------------------------------------------------------------ fresh containers
    def remove_soon(self, engine: Engine, cid: str, name: str, after: Callable[[], None] | None = None) -> None:
        """A --fresh container goes right after its cell, without making the cell wait; `after`
        runs once it is gone (its storage). Shutdown waits for these."""
        def remove() -> None:
            try:
                engine.remove(cid)
                if after is not None:
                    after()
            except Exception:
                pass  # the shutdown sweep, the watchdog or the reaper removes it

        thread = threading.Thread(target=remove, name=f"mino-remove-{name}", daemon=True)
        self._removals = [t for t in self._removals if t.is_alive()] + [thread]
        thread.start()

    def wait_for_removals(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self._removals):
            thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ the watchdog
    def ensure_watchdog(self, engine: Engine) -> None:
        if not self.want_watchdog or (self._watchdog and self._watchdog.poll() is None):
            return
        read_end, write_end = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                [sys.executable, "-m", "mino_jupyter.cleanup", self.owner.token, engine.endpoint.url,
                 str(self.owner.pid), str(self.owner.start_ticks),
                 str(self.storage_root / "sessions" / self.owner.token)],
                stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )
        finally:
            os.close(read_end)
        self._watchdog_pipe = write_end  # never inherited (O_CLOEXEC); closes when we die

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, engine: Engine | None) -> bool:
        """Remove every container of this kernel (no engine connected: nothing was started).
        True when they are gone; the watchdog is told "bye" only then."""
        removed = engine is None
        try:
            if engine is not None:
                self.wait_for_removals()
                remove_containers(engine, owned_by(engine, self.owner.token))
                removed = True
        except Exception:
            pass  # not saying "bye" leaves the work to the watchdog
        finally:
            if self._watchdog_pipe is not None:
                try:
                    if removed:
                        os.write(self._watchdog_pipe, b"bye\n")
                    os.close(self._watchdog_pipe)
                except OSError:
                    pass
                self._watchdog_pipe = None
        return removed

    def release_caches(self, engine: Engine) -> None:
        _release_caches(engine, self.storage_root)


def watchdog_main(argv: list[str]) -> int:
    token, url, pid, start = argv[1], argv[2], int(argv[3]), int(argv[4])
    sessions = Path(argv[5]) if len(argv) > 5 else None
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the kernel's interrupts are not for us
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    received = b""
    while True:
        chunk = os.read(0, 64)
        if not chunk:
            break
        received += chunk
    if b"bye" in received:
        return 0
    while process_start_ticks(pid) == start:  # pipe closed but the kernel lives: poll it
        time.sleep(2)
    from .runtime import discover

    env = dict(os.environ)
    if discover(env, os.geteuid()).url != url:
        env["CONTAINER_HOST"] = url  # the engine the kernel used, not a default of ours
    for attempt in range(3):
        try:
            engine = Engine.connect(env)
            removed = remove_containers(engine, owned_by(engine, token))
            break
        except Exception:
            time.sleep(1 + attempt)
    else:
        return 1
    if sessions is not None:  # the kernel's session disks and mounts, now that no container uses them
        storage.teardown_owner(sessions, mounts.for_cleanup(engine))
        state = sessions.parent.parent
        _release_caches(engine, state)
        _log(state / "watchdog.log",
             f"removed {len(removed)} container(s) and the session disks of kernel {token} (pid {pid}), which died")
    return 0


def _release_caches(engine: Engine, state: Path) -> None:
    """Project cache disks that no mino container uses any more are unmounted."""
    try:
        in_use = {(c.get("Labels") or {}).get("io.mino.project") for c in engine.list(MANAGED)}
        storage.release_caches(state / "caches", {k for k in in_use if k})
    except Exception:
        pass


def _log(path: Path, line: str) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(watchdog_main(sys.argv))
