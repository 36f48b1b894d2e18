"""Apply each mutant (tests/mutants/mutants.py) to a scratch copy and run its tests; fail when one
survives (its tests still pass) or no longer applies.

    .venv/bin/python tests/mutants/run.py            # every mutant
    .venv/bin/python tests/mutants/run.py NAME ...   # some
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.mutants.mutants import MUTANTS, Mutant  # noqa: E402

COPY = ("mino_jupyter", "tests", "presets", "pyproject.toml")


def scratch_copy() -> Path:
    work = Path(tempfile.mkdtemp(prefix="mino-mutant-"))
    for name in COPY:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, work / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, work / name)
    return work


def apply(mutant: Mutant, work: Path) -> str | None:
    """Make the mutant; a problem (an edit that does not apply exactly once) as text."""
    path = work / mutant.file
    text = path.read_text()
    for old, new in mutant.edits:
        count = text.count(old)
        if count != 1:
            return f"edit found {count} times in {mutant.file}: {old.splitlines()[0][:70]!r}"
        text = text.replace(old, new)
    path.write_text(text)
    return None


def run(mutant: Mutant) -> tuple[str, float, str]:
    """(verdict, seconds, detail): killed, SURVIVED or BROKEN."""
    work = scratch_copy()
    started = time.monotonic()
    try:
        problem = apply(mutant, work)
        if problem:
            return "BROKEN", 0.0, problem
        env = {**os.environ, "PYTHONPATH": str(work), "MINO_REQUIRE_PODMAN": "1", "PYTHONDONTWRITEBYTECODE": "1",
               **dict(mutant.env)}
        done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                               f"--basetemp={work / 'tmp'}", *mutant.tests],
                              cwd=work, env=env, capture_output=True, text=True, timeout=600)
        seconds = time.monotonic() - started
        last = (done.stdout.strip().splitlines() or [""])[-1]
        if done.returncode == 1:
            return "killed", seconds, last
        if done.returncode == 0:
            return "SURVIVED", seconds, last
        return "BROKEN", seconds, f"pytest exit {done.returncode}: {last}"  # no tests, usage error
    finally:
        _clean(work)


def _clean(work: Path) -> None:
    """A mutant may have disabled mino's own cleanup: what its tests left mounted under the scratch
    copy is unmounted here (deepest first) before the copy goes."""
    from mino_jupyter import storage
    from mino_jupyter.cleanup import prune
    from mino_jupyter.runtime import Engine

    try:  # containers of the killed kernels a mutant left (no watchdog, no reaper)
        engine = Engine.connect(autostart=False)
        prune(engine)
        engine.close()
    except Exception:  # noqa: BLE001 - best effort
        pass
    for mount in sorted(storage.mounts_under(work), key=len, reverse=True):
        try:
            storage.unmount(Path(mount))
        except Exception:  # noqa: BLE001 - best effort; the copy stays and says so below
            pass
    if storage.remove_tree(work) is False:
        print(f"  (left {work}: something is still mounted there)", file=sys.stderr)


def main(argv: list[str]) -> int:
    chosen = [m for m in MUTANTS if not argv or m.name in argv]
    unknown = set(argv) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutant(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    bad = []
    for mutant in chosen:
        verdict, seconds, detail = run(mutant)
        print(f"{verdict:9} {mutant.name:30} {seconds:5.1f} s  ({mutant.promise}) {detail if verdict != 'killed' else ''}",
              flush=True)
        if verdict != "killed":
            bad.append(mutant.name)
    print(f"{len(chosen) - len(bad)} of {len(chosen)} mutants killed" + (f"; not: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
