"""The rootless half of `bench/run.py`'s section 9, run as the rootless test user (mino-ci):
one kernel of its own, timing what the root side asks for on stdin, one answer per line.

    warm      -> seconds for `%%mino true` in the reused default session
    start N   -> seconds for the first cell of a new bridge session sN (then stopped)
    quit
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.kernel import Kernel, isolated_env  # noqa: E402


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="mino-bench-rootless-"))
    kernel = Kernel(cwd=str(work), env=isolated_env(work / "home"))
    try:
        kernel.ok("%load_ext mino_jupyter")
        for _ in range(4):
            kernel.ok("%%mino\ntrue")  # the session, warmed up
        print("ready", flush=True)
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "quit":
                break
            start = time.perf_counter()
            if words[0] == "warm":
                kernel.ok("%%mino\ntrue")
                print(time.perf_counter() - start, flush=True)
            elif words[0] == "start":
                kernel.ok(f"%%mino --session s{words[1]}\ntrue")
                print(time.perf_counter() - start, flush=True)
                kernel.ok(f"%mino stop s{words[1]}")
    finally:
        kernel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
