"""llm-sandbox (Podman backend): a warm ``session.execute_command("true")``, for comparison with
mino's warm cell.

llm-sandbox lives in its own venv (:data:`BENCH_VENV`, made by ``bench/setup-llm-sandbox.sh``),
never in the project's. :func:`measure` runs in the project's venv: it asks mino's own
:class:`~mino_jupyter.runtime.Engine` for the Podman endpoint (starting the service like mino
does) and the host's hard limits, then runs this same file with the bench venv's python as a
child, which opens one llm-sandbox session the way a user would:

* ``SandboxSession(backend="podman", client=PodmanClient(base_url=...), image=<local image>)``:
  a local image is used as is (``client.images.get`` finds it, so nothing is pulled; only an
  image it pulled or built would be removed on close, and ``keep_template=True`` says so too);
* ``skip_environment_setup=True``: otherwise ``open()`` runs ``python -m venv`` and
  ``pip install --upgrade pip`` in the container (mino's base image has no python, and no
  registry is reachable);
* ``runtime_configs`` go to podman-py's ``containers.create``: ``ulimits`` no higher than the
  host's hard limits (the same :func:`mino_jupyter.policy.container_ulimits` mino uses; Podman's
  defaults exceed them on some hosts and the container then fails to start), ``init`` (so the
  stop in ``close()`` is immediate: the image's ``sleep infinity`` as PID 1 ignores SIGTERM),
  and a name and labels so a container left by a killed child is found and removed.

Each ``execute_command`` is one exec through the REST API (podman-py's ``exec_run``: create,
start, inspect for the exit code); no file is copied per call (``run()`` would add a
``put_archive`` of the code file and the interpreter's start).

    .venv/bin/python bench/llm_sandbox.py [--pairs 15]
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
BENCH_VENV = ROOT / ".bench-venv"
BENCH_PYTHON = BENCH_VENV / "bin" / "python"
SETUP_SCRIPT = ROOT / "bench" / "setup-llm-sandbox.sh"
LLM_SANDBOX_VERSION = "0.3.46"  # the version setup-llm-sandbox.sh pins (measured with it)
WARMUP = 3
CHILD_TIMEOUT = 300  # seconds, for open + warm-up + pairs + close
LABEL = "io.mino.bench"  # value "llm-sandbox"; LABEL + ".run" holds the run's id
NAME_PREFIX = "llm-sandbox-bench-"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _not_measured(why: str) -> str:
    return (f"not measured: {why}; install it with `bash {_rel(SETUP_SCRIPT)}` "
            f"(= python3 -m venv {_rel(BENCH_VENV)} && "
            f"{_rel(BENCH_PYTHON)} -m pip install 'llm-sandbox[podman]=={LLM_SANDBOX_VERSION}')")


def _installed() -> str | None:
    """None when the bench venv has llm-sandbox with podman-py, else why not."""
    if not BENCH_PYTHON.exists():
        return f"no bench venv at {BENCH_VENV}"
    probe = subprocess.run(
        [str(BENCH_PYTHON), "-I", "-c", "import llm_sandbox, podman; from importlib.metadata import version; "
                                        "print(version('llm-sandbox'))"],
        capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"llm-sandbox[podman] is not importable in {BENCH_VENV} ({last})"
    return None


def _remove_leftovers(engine, run_id: str) -> list[str]:
    """Remove the containers this run created (by its own label) that are still there."""
    removed = []
    for c in engine.client.containers.list(all=True, filters={"label": f"{LABEL}.run={run_id}"}):
        try:
            c.remove(force=True)
            removed.append(c.name)
        except Exception:  # noqa: BLE001 - reported by the caller's check below
            pass
    return removed


def measure(pairs: int = 15, *, image: str | None = None) -> dict | str:
    """Median/min/max (ms) of ``pairs`` warm ``execute_command("true")`` calls, or why not measured."""
    why = _installed()
    if why:
        return _not_measured(why)
    sys.path.insert(0, str(ROOT))
    from mino_jupyter import policy
    from mino_jupyter.image import base_image_ref
    from mino_jupyter.runtime import Engine, client_url

    engine = Engine.connect()
    run_id = uuid.uuid4().hex[:12]
    try:
        image = image or base_image_ref()
        if not engine.image_exists(image):
            return f"not measured: image {image} is not in Podman's local storage (`mino-jupyter image build`)"
        config = {
            "url": client_url(engine.endpoint.url),
            "image": image,
            "ulimits": [{"Name": u["type"], "Soft": u["soft"], "Hard": u["hard"]}
                        for u in policy.container_ulimits(engine.host_limits())],
            "name": NAME_PREFIX + run_id,
            "labels": {LABEL: "llm-sandbox", f"{LABEL}.run": run_id},
            "pairs": pairs,
            "warmup": WARMUP,
        }
        try:
            child = subprocess.run([str(BENCH_PYTHON), "-I", str(HERE), "--child"], input=json.dumps(config),
                                   capture_output=True, text=True, timeout=CHILD_TIMEOUT, cwd="/")
        except subprocess.TimeoutExpired:
            return f"not measured: the llm-sandbox child took more than {CHILD_TIMEOUT} s"
        lines = child.stdout.strip().splitlines()
        if child.returncode != 0 or not lines:
            err = (child.stderr.strip().splitlines() or ["no output"])[-1]
            return f"not measured: the llm-sandbox child failed (exit {child.returncode}): {err}"
        return json.loads(lines[-1])
    finally:
        left = _remove_leftovers(engine, run_id)
        if left:
            print(f"llm-sandbox bench: removed containers its session left: {', '.join(left)}", file=sys.stderr)
        engine.close()


# ------------------------------------------------------------------ child (bench venv)

def _child() -> int:
    """Runs under the bench venv's python: one session, warm-up, timed calls, JSON on stdout."""
    import statistics
    import time
    from importlib.metadata import version

    # `python -I` leaves this file's directory off sys.path; be sure, so `llm_sandbox` is the package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
    from llm_sandbox import SandboxBackend, SandboxSession
    from podman import PodmanClient

    cfg = json.loads(sys.stdin.read())
    client = PodmanClient(base_url=cfg["url"])
    session = SandboxSession(
        backend=SandboxBackend.PODMAN,
        client=client,
        image=cfg["image"],
        lang="python",
        keep_template=True,
        skip_environment_setup=True,
        runtime_configs={
            "ulimits": cfg["ulimits"],
            "init": True,
            "name": cfg["name"],
            "labels": cfg["labels"],
        },
    )
    times = []
    try:
        session.open()
        for _ in range(cfg["warmup"]):
            out = session.execute_command("true")
            if out.exit_code != 0:
                raise RuntimeError(f"`true` exited {out.exit_code}: {out.stderr.strip()}")
        for _ in range(cfg["pairs"]):
            start = time.perf_counter()
            out = session.execute_command("true")
            times.append(time.perf_counter() - start)
            if out.exit_code != 0:
                raise RuntimeError(f"`true` exited {out.exit_code}: {out.stderr.strip()}")
    finally:
        session.close()
        client.close()
    print(json.dumps({
        "median_ms": round(statistics.median(times) * 1000, 2),
        "min_ms": round(min(times) * 1000, 2),
        "max_ms": round(max(times) * 1000, 2),
        "n": len(times),
        "version": version("llm-sandbox"),
    }))
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        return _child()
    pairs = int(argv[argv.index("--pairs") + 1]) if "--pairs" in argv else 15
    result = measure(pairs)
    print(result if isinstance(result, str) else json.dumps(result))
    return 0 if isinstance(result, dict) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
