"""Containers never outlive their kernel: the one owner of removing them.

Four ways a container goes, all here:

* **fresh containers** go right after their cell, on a background thread (:meth:`Cleanup.remove_soon`),
  so the cell does not wait for Podman's network and storage teardown (about 0.3 s), which starts
  once the cell's reply is on its way (:data:`REMOVE_AFTER`);
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
from .policy import LEASE_DIR, LEASE_FILE, MANAGED
from .runtime import Engine

Notice = Callable[[str], None]

# A fresh container's removal starts this long after its cell, so that Podman's teardown (both
# cores here, for about 0.2 s) and the removal's own Python do not compete with the cell's
# reply. What the cell left running lives that much longer (inside its firewall, as before).
REMOVE_AFTER = 0.05


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
    removed = remove_containers(engine, victims)
    if everything:  # mino's support volumes on the engine (engines elsewhere), unless a session uses one
        engine.remove_unused_volumes({"io.mino.support": None})
    return removed


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
        self._lease_lock = threading.Lock()
        self._leased: dict[str, Engine] = {}
        self._lease_every = 30.0
        self._lease_count = 0
        self._lease_thread: threading.Thread | None = None

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
            time.sleep(REMOVE_AFTER)
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

    # ------------------------------------------------------------------ leases
    def lease(self, engine: Engine, cid: str, seconds: int) -> None:
        """Renew this container's lease (:data:`mino_jupyter.policy.LEASE_SCRIPT`) every quarter
        of it, from a thread of this kernel, until it is gone: if this kernel dies or loses the
        engine, no one renews it and the container ends itself."""
        with self._lease_lock:
            self._leased[cid] = engine
            self._lease_every = min(self._lease_every, seconds / 4)
            if self._lease_thread is None or not self._lease_thread.is_alive():
                self._lease_thread = threading.Thread(target=self._renew, name="mino-lease", daemon=True)
                self._lease_thread.start()

    def unlease(self, cid: str) -> None:
        with self._lease_lock:
            self._leased.pop(cid, None)

    def _renew(self) -> None:
        while True:
            with self._lease_lock:
                leased = dict(self._leased)
            if not leased:
                with self._lease_lock:
                    if not self._leased:
                        self._lease_thread = None
                        return
                continue
            self._lease_count += 1
            data = lease_tar(self._lease_count)
            for cid, engine in leased.items():
                try:
                    engine.put_archive(cid, LEASE_DIR, data)
                except Exception as exc:  # noqa: BLE001 - a container gone, or the engine lost for now
                    if "no such container" in str(exc).lower() or "does not exist" in str(exc).lower():
                        self.unlease(cid)
            time.sleep(self._lease_every)

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


LEASE_ENV = "MINO_LEASE"
LEASE_DEFAULT = 120


def lease_seconds(env: Mapping[str, str] | None) -> int:
    """How long a container on an engine elsewhere outlives its kernel's last renewal."""
    text = (os.environ if env is None else env).get(LEASE_ENV, "")
    if not text:
        return LEASE_DEFAULT
    if not text.isdigit() or int(text) < 8:
        from .errors import UsageError

        raise UsageError(f"{LEASE_ENV}={text!r}: a lease is a whole number of seconds, 8 or more",
                         f"unset it for the default ({LEASE_DEFAULT} s)")
    return int(text)


def lease_tar(count: int) -> bytes:
    """The lease file with a new number (what the container's main process looks for)."""
    import io
    import tarfile

    data = f"{count}\n".encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo(LEASE_FILE)
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


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
    failure = None
    for attempt in range(3):
        try:
            engine = Engine.connect(env)
            removed = remove_containers(engine, owned_by(engine, token))
            break
        except Exception as exc:  # noqa: BLE001 - tried again, then logged
            failure = exc
            time.sleep(1 + attempt)
    else:
        if sessions is not None:
            _log(sessions.parent.parent / "watchdog.log",
                 f"could not remove the containers of kernel {token} (pid {pid}), which died: {failure}")
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
