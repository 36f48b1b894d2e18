"""A small detached process that removes a kernel's containers when the kernel dies.

The kernel holds the write end of a pipe whose read end is this process's stdin. A clean
shutdown writes "bye" first (the kernel has removed its containers itself). End of file without
"bye" means the kernel died (SIGKILL, OOM, crash): remove every container labelled with its
owner token. If the pipe closes while the kernel still lives (its code closed the descriptor),
fall back to watching the kernel's pid.

Usage: python -m mino_jupyter.watchdog TOKEN ENGINE_URL PID START_TICKS
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    token, url, pid, start = argv[1], argv[2], int(argv[3]), int(argv[4])
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
    from .owner import process_start_ticks

    while process_start_ticks(pid) == start:  # pipe closed but the kernel lives: poll it
        time.sleep(2)
    from .reaper import owned_by, remove_containers
    from .runtime import Engine, discover

    env = dict(os.environ)
    if discover(env, os.geteuid()).url != url:
        env["CONTAINER_HOST"] = url  # the engine the kernel used, not a default of ours
    for attempt in range(3):
        try:
            engine = Engine.connect(env)
            remove_containers(engine, owned_by(engine, token))
            return 0
        except Exception:
            time.sleep(1 + attempt)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
