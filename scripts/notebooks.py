"""Write the example notebooks from their sources below, execute them for real, commit outputs.

    .venv/bin/python scripts/notebooks.py            # regenerate every notebook in notebooks/
    .venv/bin/python scripts/notebooks.py quickstart # just one

Each notebook runs in a scratch copy of notebooks/ that the sandbox user (uid 1000) may write
to, like a user's own notebook directory; nbval (in `make test`) then checks that a fresh run
still produces the committed outputs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

md = nbformat.v4.new_markdown_cell


def code(source: str, *tags: str):
    cell = nbformat.v4.new_code_cell(source.strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


QUICKSTART = [
    md("# mino-jupyter quickstart\n\n"
       "`%%mino` runs a cell's shell commands with bash inside a hardened Podman container: no "
       "capabilities, no privilege escalation, at most 4096 processes, an unprivileged user "
       "(`developer`, UID 1000), and by default a bridge network that reaches the internet but "
       "not the services on your machine. Load the extension once per kernel:"),
    code("%load_ext mino_jupyter"),
    md("## A first cell\nThe cell runs in this kernel's `default` session container, in `/workspace`, "
       "which is this notebook's directory."),
    code("%%mino\necho \"hello from $(hostname) as $(id -un) (uid $(id -u)) in $PWD\"\n"
         "grep -E '^(CapEff|NoNewPrivs)' /proc/self/status"),
    md("## Output streams as it is printed\nLines arrive while the cell runs; stdout and stderr stay apart."),
    code("%%mino\nfor i in 1 2 3; do\n  echo \"step $i\"\n  sleep 0.3\ndone\necho 'this goes to stderr' >&2"),
    md("## Exit codes\nA non-zero exit raises `CalledProcessError`, like `%%bash`; `--no-raise-error` "
       "turns that off."),
    code("%%mino\necho 'about to fail'\nexit 3", "raises-exception"),
    code("%%mino --no-raise-error\nexit 3"),
    code("import subprocess\n\ntry:\n    get_ipython().run_cell_magic('mino', '', 'exit 42')\n"
         "except subprocess.CalledProcessError as error:\n    print('exit status', error.returncode)"),
    md("## Output into Python\n`--out VAR` (and `--err VAR`) store the text instead of showing it."),
    code("%%mino --out listing\nls /usr/bin | head -n 3"),
    code("listing.split()"),
    md("## Sessions keep state\nLater cells reuse the same container, so files and installed tools "
       "persist. Files written to `/workspace` appear next to the notebook."),
    code("%%mino\necho 'kept between cells' > /tmp/state\necho 'written by the sandbox' > from-sandbox.txt"),
    code("%%mino\ncat /tmp/state"),
    code("print(open('from-sandbox.txt').read(), end='')"),
    md("Named sessions are separate containers; `--fresh` gives a one-shot container that is removed "
       "right after the cell."),
    code("%%mino --session scratch\ncat /tmp/state 2>/dev/null || echo 'a separate container: no /tmp/state here'"),
    code("%%mino --fresh\necho \"fresh container; pids limit $(cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || "
         "cat /sys/fs/cgroup/pids.max)\""),
    code("%mino sessions"),
    md("## Secrets\n`--secret NAME` passes a Python variable (or environment variable) as `$NAME`; its "
       "value is masked in the output and never written to the log."),
    code("API_TOKEN = 'tok-1234-abcd'"),
    code("%%mino --secret API_TOKEN\necho \"the cell sees a token of ${#API_TOKEN} characters: $API_TOKEN\""),
    md("## Logs outlive containers\nEach session's output is kept on the host."),
    code("%mino logs default --tail 4"),
    md("## Cleaning up\nStopping removes containers; the kernel also removes them when it shuts down or "
       "restarts (and a watchdog does if the kernel is killed)."),
    code("%mino stop --all"),
    code("%mino sessions"),
]

NOTEBOOK_SOURCES = {"quickstart": QUICKSTART}


def scratch_copy() -> Path:
    """A copy of notebooks/ that UID 1000 may write to, as a user's own directory would be.

    The kernels get a config and state of their own (a first run, like a new user's), so the
    outputs do not depend on the machine's global mino settings.
    """
    work = Path(tempfile.mkdtemp(prefix="mino-notebooks-"))
    os.environ["MINO_CONFIG"] = str(work / "config" / "config.toml")
    os.environ["XDG_CONFIG_HOME"] = str(work / "config")
    os.environ["XDG_STATE_HOME"] = str(work / "state")
    target = work / "notebooks"
    shutil.copytree(NOTEBOOKS, target, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "*.txt"))
    os.chmod(work, 0o755)
    for path in [target, *target.rglob("*")]:
        try:
            os.chown(path, 1000, 1000)
        except PermissionError:
            pass
    return target


def execute(nb, cwd: Path, timeout: int = 300):
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}},
                            allow_errors=False)
    client.execute()
    return nb


def build(name: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = NOTEBOOK_SOURCES[name]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    work = scratch_copy()
    try:
        execute(nb, work)
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    path = NOTEBOOKS / f"{name}.ipynb"
    nbformat.write(nb, path)
    return path


def check(extra: list[str]) -> int:
    """nbval over a scratch copy: a fresh run must reproduce the committed outputs."""
    import subprocess

    work = scratch_copy()
    try:
        command = [sys.executable, "-m", "pytest", "--nbval", str(work), "-p", "no:cacheprovider",
                   "--nbval-sanitize-with", str(NOTEBOOKS / "sanitize.cfg"), "--rootdir", str(work), *extra]
        return subprocess.run(command, cwd=work).returncode
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        return check(argv[1:])
    names = argv or list(NOTEBOOK_SOURCES)
    for name in names:
        print("wrote", build(name).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
