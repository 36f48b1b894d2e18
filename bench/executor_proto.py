"""The resident executor prototype against mino's current per-cell exec and local bash.

    PYTHONPATH=. .venv/bin/python bench/executor_proto.py [--pairs 40]

Below the kernel (no Jupyter): the same call a session would make, in alternating rounds
(the order of the three rotates every round), medians with min–max. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mino_jupyter import cell, host, policy  # noqa: E402
from mino_jupyter.executor import client  # noqa: E402
from mino_jupyter.image import base_image_ref  # noqa: E402
from mino_jupyter.owner import current_owner  # noqa: E402
from mino_jupyter.runtime import Engine  # noqa: E402

BASH = ["/bin/bash", "--noprofile", "--norc", "-c", "true"]


class Null:
    def write(self, stream: int, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


def stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float]) -> str:
    med, lo, hi = stats(values)
    return f"{med * 1000:7.2f} ms ({lo * 1000:.2f}–{hi * 1000:.2f})"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interrupted(fn, after: float = 0.2) -> float:
    """Seconds from a SIGINT to this process (KeyboardInterrupt in the main thread, as in a
    kernel) until `fn` returns."""
    sent = []

    def fire():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    timer = threading.Timer(after, fire)
    timer.start()
    fn()
    timer.join()
    return time.perf_counter() - sent[0]


def conmons(cid: str) -> int:
    """conmon processes of this container (the container's own, and one per live exec record)."""
    out = subprocess.run(["pgrep", "-c", "-f", f"^/usr/bin/conmon .*{cid}"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--interrupts", type=int, default=8)
    args = parser.parse_args()

    engine = Engine.connect()
    work = Path(tempfile.mkdtemp(prefix="mino-exec-bench-"))
    spec = policy.session_spec(policy.SessionRequest(
        name=f"mino-bench-exec-{uuid.uuid4().hex[:8]}", image=base_image_ref(), network="none",
        labels=policy.labels("test", current_owner().labels()), limits=engine.host_limits(),
        seccomp_profile=host.seccomp_profile(work), engine=engine.facts()))
    spec["mounts"].append(client.mount(client.build(work / "bin")))
    for path in ("/workspace", "/tmp"):  # what the session's disk gives a real session
        spec["mounts"].append({"type": "tmpfs", "source": "tmpfs", "destination": path,
                               "options": ["rw", "nosuid", "nodev", "size=64m", "mode=1777"]})
    cid = engine.run(spec)
    try:
        ex = client.Executor.start(engine, cid)

        def via_executor():
            assert ex.run("true", cwd=policy.WORKDIR).exit_code == 0

        # 100 warm cells in a row through the executor, first (no exec records of the other path
        # yet): drift, and this container's conmon processes.
        peak = 0
        series = []
        for i in range(100):
            series.append(timed(via_executor))
            if i % 10 == 0:
                peak = max(peak, conmons(cid))
        first, last = statistics.median(series[:25]), statistics.median(series[75:])

        starts = []  # a new executor: one exec and its hello
        for _ in range(5):
            t = time.perf_counter()
            other = client.Executor.start(engine, cid)
            starts.append(time.perf_counter() - t)
            other.close()

        def via_exec():
            assert cell.run_script(engine, cid, "true", env={}, sink=Null()).exit_code == 0

        def local():
            subprocess.run(BASH, check=True)

        runs = {"executor": via_executor, "exec": via_exec, "bash": local}
        for fn in runs.values():  # warm-up
            for _ in range(3):
                fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        order = list(runs)
        for i in range(args.pairs):
            rotated = order[i % 3:] + order[:i % 3]
            for name in (rotated if i % 2 == 0 else rotated[::-1]):
                times[name].append(timed(runs[name]))

        # 50 MB of stdout, bytes only (no decoding, no display): the executor's frames vs one
        # exec's stream (engine.exec_run), alternating.
        big = "head -c 50000000 /dev/zero"
        through: dict[str, list[float]] = {"executor": [], "exec": []}
        for i in range(4):
            pair = [("executor", lambda: ex.run(big, on_output=lambda k, d: None)),
                    ("exec", lambda: engine.exec_run(cid, policy.exec_body(["/bin/bash", "-c", big])))]
            for name, fn in (pair if i % 2 == 0 else pair[::-1]):
                through[name].append(timed(fn))

        # Interrupt -> cell ended, `sleep 30`, alternating.
        stops: dict[str, list[float]] = {"executor": [], "exec": []}
        for i in range(args.interrupts):
            pair = [("executor", lambda: ex.run("sleep 30", cwd=policy.WORKDIR)),
                    ("exec", lambda: cell.run_script(engine, cid, "sleep 30", env={}, sink=Null()))]
            for name, fn in (pair if i % 2 == 0 else pair[::-1]):
                stops[name].append(interrupted(fn))
            assert ex.run("echo ok").stdout == b"ok\n"

        ex.close()
    finally:
        engine.remove(cid)
        shutil.rmtree(work, ignore_errors=True)

    ex_m, pe_m, b_m = (stats(times[n])[0] for n in ("executor", "exec", "bash"))
    print(f"Warm `true`, {args.pairs} rounds (Podman {engine.version()}, {os.cpu_count()} cores, "
          f"kernel {os.uname().release}):")
    print(f"  executor (mino-exec)        {fmt(times['executor'])}")
    print(f"  per-cell exec (run_script)  {fmt(times['exec'])}")
    print(f"  local bash -c true          {fmt(times['bash'])}")
    print(f"  executor / bash   {ex_m / b_m:5.2f}x")
    print(f"  exec / bash       {pe_m / b_m:5.2f}x")
    print(f"  exec / executor   {pe_m / ex_m:5.1f}x")
    print(f"Executor start (one exec + hello): {fmt(starts)}")
    print(f"Interrupt (SIGINT to the caller) -> `sleep 30` ended, {args.interrupts} each:")
    print(f"  executor        {fmt(stops['executor'])}")
    print(f"  per-cell exec   {fmt(stops['exec'])}")
    print("50 MB of stdout, bytes only, 4 each (MB/s from the median):")
    for name in ("executor", "exec"):
        print(f"  {name:14s}  {fmt(through[name])}  {50 / stats(through[name])[0]:.0f} MB/s")
    print(f"100 executor cells: median of the last 25 / first 25 = {last / first:.2f}x; "
          f"conmon processes of the container at peak: {peak}")


if __name__ == "__main__":
    main()
