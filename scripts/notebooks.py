"""Write the example notebooks from their sources below, execute them for real, commit outputs.

    .venv/bin/python scripts/notebooks.py            # regenerate every notebook in notebooks/
    .venv/bin/python scripts/notebooks.py quickstart # just one
    .venv/bin/python scripts/notebooks.py --check    # nbval: a fresh run reproduces the outputs
    .venv/bin/python scripts/notebooks.py --check-in-place  # a new user's first run, in place

Each notebook runs in a scratch copy of notebooks/ that the sandbox user (uid 1000) may write
to, like a user's own notebook directory; nbval (in `make test`) then checks that a fresh run
still produces the committed outputs.
"""

from __future__ import annotations

import configparser
import os
import re
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
       "capabilities, no privilege escalation, limits on processes, memory, CPU and disk, an unprivileged "
       "user (`developer`, UID 1000), and by default a bridge network that reaches the internet but "
       "not this machine's services. What a cell writes stays in its session until you take it. "
       "Load the extension once per kernel:"),
    code("%load_ext mino_jupyter"),
    md("## A first cell\nThe cell runs in this kernel's `default` session container, in `/workspace`, "
       "which shows this notebook's directory."),
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
    md("## Sessions keep state\nLater cells reuse the same container, so files and installed tools persist."),
    code("%%mino\necho 'kept between cells' > /tmp/state\ncat /tmp/state"),
    code("%%mino\ncat /tmp/state"),
    md("## What a cell writes waits for you\nA cell sees every file next to the notebook, but what it writes "
       "in `/workspace` stays in the session: nothing it writes can run on your machine later (a "
       "`pandas.py` the kernel would import, a git hook) until you take it. `%mino changes` shows what "
       "changed; `%mino apply` copies plain data next to the notebook. Code, dotfiles and executables "
       "are applied only when you name them."),
    code("%%mino\nrm -f results.csv\nprintf 'x,y\\n1,2\\n' > results.csv\nprintf 'print(\"hi\")\\n' > helper.py"),
    code("%mino changes"),
    code("%mino apply"),
    code("print(open('results.csv').read(), end='')"),
    md("## Installing packages\nThe `python` and `node` images add pip and npm to the base image (built "
       "on first use, or ahead with `mino-jupyter image build python node`). `pip install` goes into the "
       "session's own virtualenv, so the package stays for the session's later cells."),
    code("%%mino --image python --session py\npip install -q six\n"
         "python3 -c 'import six; print(\"six imported inside the sandbox from\", six.__file__.split(\"/lib/\")[0])'"),
    code("%%mino --session py\npython3 -c 'import six; print(\"still installed:\", six.__name__)'"),
    md("Named sessions are separate containers; `--fresh` gives a one-shot container that is removed "
       "right after the cell. Limits are set per new session (`--memory`, `--cpus`, `--disk`) or in the "
       "configuration."),
    code("%%mino --session scratch\ncat /tmp/state 2>/dev/null || echo 'a separate container: no /tmp/state here'"),
    code("%%mino --fresh --memory 1g\necho \"fresh container; memory limit $(( $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes "
         "2>/dev/null || cat /sys/fs/cgroup/memory.max) >> 20 )) MiB\""),
    code("%mino sessions"),
    md("## Secrets\n`--secret NAME` passes a Python variable (or environment variable) as `$NAME`; its "
       "value is masked in this and every later output of the session, and never written to the log. "
       "Anything an earlier cell left running in a session could read it, so `--fresh` gives a secret "
       "a container of its own."),
    code("API_TOKEN = 'tok-1234-abcd'"),
    code("%%mino --fresh --secret API_TOKEN\necho \"the cell sees a token of ${#API_TOKEN} characters: $API_TOKEN\""),
    md("## Logs outlive containers\nEach session's output is kept on the host."),
    code("%mino logs default --tail 4"),
    md("## Cleaning up\nStopping removes containers; the kernel also removes them, with their disks, when it "
       "shuts down or restarts (and a watchdog does if the kernel is killed). This notebook also removes "
       "the file it applied, so the folder is as it was."),
    code("%mino stop --all\nimport os\nos.remove('results.csv')"),
    code("%mino sessions"),
]

NETWORK = [
    md("# Network modes and presets\n\n"
       "| mode | what the cell reaches |\n|---|---|\n"
       "| `bridge` (default) | the internet; not this machine's services, its local networks or other containers |\n"
       "| `host` | everything this machine reaches, its local services included |\n"
       "| `none` | nothing (loopback only) |\n"
       "| allowlist | only the listed `host:port` destinations; everything else is refused at once |\n\n"
       "No mode but `host` accepts connections from outside the container. The destinations here are "
       "local test servers started by this notebook (never outside addresses), plus the package "
       "registries where a preset allows them."),
    code("%load_ext mino_jupyter"),
    code("%%mino\necho 'bridge: interfaces with an address:' $(ip -o -4 addr show | awk '{print $2}')"),
    md("Two local servers: one on the Podman bridge gateway (this machine, as containers see it; the "
       "bridge exists while a bridge container runs), one on this machine's loopback. Each counts its visitors."),
    code("from mino_jupyter.demo import LocalServer\n\n"
         "gateway_server = LocalServer()                # e.g. 10.88.0.1:PORT\n"
         "loopback_server = LocalServer('127.0.0.1')   # this machine only\n"
         "other_server = LocalServer()                  # used to show a refusal"),
    md("## bridge\nThe internet answers; this machine's services do not, on any of its addresses, and mino "
       "says what was refused."),
    code("%%mino -e GW={gateway_server.url} -e LOOP={loopback_server.url}\n"
         "curl -s -o /dev/null -w 'the internet (pypi.org over HTTPS): %{http_code}\\n' https://pypi.org/simple/six/\n"
         "curl -sS -m 3 \"$GW\" 2>/dev/null || echo \"this machine's server: refused (curl exit $?)\"\n"
         "curl -sS -m 3 \"$LOOP\" 2>/dev/null || echo \"this machine's loopback: not reachable (curl exit $?)\""),
    code("print('gateway server visits:', gateway_server.hits)"),
    md("To reach one service on this machine, name it: `--network bridge --network-allow "
       "host.containers.internal:PORT` opens exactly that port and nothing else."),
    code("%%mino --session local --network bridge --network-allow host.containers.internal:{gateway_server.port} "
         "-e PORT={gateway_server.port}\n"
         "curl -sS http://host.containers.internal:$PORT/"),
    md("## host\nShares this machine's network, so its local services are reachable. mino says so once per session."),
    code("%%mino --session host-demo --network host -e LOOP={loopback_server.url}\ncurl -sS \"$LOOP\""),
    md("## none\nNo interface but loopback."),
    code("%%mino --fresh --network none -e GW={gateway_server.url}\n"
         "echo 'interfaces with an address:' $(ip -o -4 addr show | awk '{print $2}')\n"
         "curl -sS -m 3 \"$GW\" 2>/dev/null || echo \"no network (curl exit $?)\""),
    md("## Presets\nNamed allowlists. Files in `~/.config/mino/presets/` add or replace presets."),
    code("%mino presets"),
    md("`dev` allows code hosting, package registries and AI APIs. Names are resolved by mino on the "
       "host; inside, only allowlisted names resolve, no DNS query leaves the container, and mino says "
       "which other name a cell asked for."),
    code("%%mino --session dev --network-preset dev\n"
         "curl -s -o /dev/null -w 'pypi.org over HTTPS: %{http_code}\\n' https://pypi.org/simple/six/\n"
         "getent hosts example.com || echo 'example.com: does not resolve inside'"),
    md("## A custom allowlist\n`--network-allow HOST:PORT` (repeatable, comma-separated) alone or on top of a "
       "preset. The allowed server answers; the other is refused at once, and mino says what was refused."),
    code("%%mino --session lab --network-allow {gateway_server.address} -e OK={gateway_server.url} -e NO={other_server.url}\n"
         "curl -sS \"$OK\"\ncurl -sS -m 5 \"$NO\" 2>/dev/null || echo \"refused (curl exit $?)\""),
    code("print('gateway server visits:', gateway_server.hits, '| other server visits:', other_server.hits)"),
    md("The firewall is installed from outside the cell's processes, which hold no capability:"),
    code("%%mino --session lab\niptables -F 2>&1 | tail -1\nnft flush ruleset 2>&1 | head -1\n"
         "ip link set eth0 down 2>&1 || true"),
    md("## Host plus a preset\nThe allowlist wins, with a warning."),
    code("%%mino --fresh --network host --network-preset registries\necho 'ran with the registries allowlist'"),
    md("`none` with an allowlist is an error, and nothing runs:"),
    code("%%mino --network none --network-preset dev\necho never", "raises-exception"),
    code("%mino stop --all\nfor server in (gateway_server, loopback_server, other_server):\n    server.close()"),
]

CONFIG = [
    md("# Configuration, the first-run choice and the panel\n\n"
       "Settings live under `[container]` in a global file (`~/.config/mino/config.toml`) and in a "
       "project's `.mino.toml`. This notebook works in a scratch project with a configuration of its "
       "own (your real settings are left alone), like a first run. In the saved outputs, `<scratch>` "
       "stands for that scratch directory."),
    code("import os, tempfile\n\n"
         "scratch = tempfile.mkdtemp(prefix='mino-config-demo-')\n"
         "os.environ.update(MINO_CONFIG=f'{scratch}/config/config.toml', XDG_CONFIG_HOME=f'{scratch}/config',\n"
         "                  XDG_STATE_HOME=f'{scratch}/state')\n"
         "notebook_dir = os.getcwd()\n"
         "os.makedirs(f'{scratch}/project')\n"
         "os.chdir(f'{scratch}/project')"),
    code("%load_ext mino_jupyter"),
    md("With no network chosen anywhere, the first cell runs with bridge right away. In a notebook "
       "frontend a picker appears to choose and remember a network; headless runs get a one-line notice."),
    code("%%mino\necho 'ran with bridge'"),
    code("%mino config show"),
    md("`set` edits the global file; `--local` the project's `.mino.toml` (created next to the "
       "notebook when there is none, and trusted because you wrote it)."),
    code("%mino config set network_preset registries --local"),
    code("print(open('.mino.toml').read(), end='')"),
    code("%mino config get network_preset"),
    md("Edits change only the key edited: comments and formatting elsewhere stay byte for byte."),
    code("global_file = os.environ['MINO_CONFIG']\n"
         "os.makedirs(os.path.dirname(global_file), exist_ok=True)\n"
         "with open(global_file, 'w') as f:\n"
         "    f.write('# my mino settings\\n[container]   # keep this comment\\n# image = \"later\"\\n')"),
    code("%mino config set memory 2g"),
    code("print(open(global_file).read(), end='')"),
    md("Invalid values are refused before anything is written:"),
    code("%mino config set network sideways", "raises-exception"),
    code("%mino config unset network_preset --local\nprint(open('.mino.toml').read(), end='')"),
    md("## Trust\nA `.mino.toml` that came with a cloned repository could ask for the host network. Until "
       "you trust its content at its place, it has no effect at all, and it hides no trusted file further up."),
    code("with open('.mino.toml', 'w') as f:\n    f.write('[container]\\nnetwork = \"host\"\\n')"),
    code("%%mino --session cloned\necho 'interfaces with an address:' $(ip -o -4 addr show | awk '{print $2}')"),
    code("%mino trust"),
    code("%mino stop cloned"),
    code("%%mino --session cloned\necho 'now with the project network'"),
    md("## The panel\n`%mino panel` shows a network picker, the sessions with their logs and stop "
       "buttons, and a trust button when needed. In a terminal or a text view it reads as a summary."),
    code("%mino panel"),
    md("Cleaning up: unloading the extension removes the sessions and their disks; then go back and "
       "remove the scratch project and configuration."),
    code("%unload_ext mino_jupyter\nimport shutil\nos.chdir(notebook_dir)\nshutil.rmtree(scratch)"),
]

SECURITY = [
    md("# Security tour: what the hardening means, seen from inside\n\n"
       "Every mino container drops all capabilities, sets no-new-privileges, has no way to make new "
       "namespaces, limits processes, memory, CPU and disk, and runs cells as `developer` (UID 1000). "
       "Here is what a cell can see and do."),
    code("%load_ext mino_jupyter"),
    md("## No capabilities, in any set"),
    code("%%mino\ngrep -E '^Cap' /proc/self/status\ncapsh --decode=$(awk '/^CapBnd/ {print $2}' /proc/self/status)"),
    md("## No way to gain privileges\nNo-new-privileges is set, so setuid programs cannot raise privileges; "
       "the seccomp profile refuses new user namespaces, where a process would get a capability set of "
       "its own."),
    code("%%mino\ngrep -E '^(NoNewPrivs|Seccomp):' /proc/self/status\nid\n"
         "su -c id root </dev/null 2>&1 | head -1 || true\n"
         "mount -t tmpfs none /mnt 2>&1 | head -1\n"
         "unshare -r id 2>&1 | head -1"),
    md("## The container stays up\nIts init runs as another user, so a cell cannot stop it; and a cell's "
       "processes never outlive an interrupt or a timeout, `setsid` or not."),
    code("%%mino --no-raise-error\nps -o user:10,pid,args -p 1\nkill -TERM 1"),
    md("## Limits, from the cgroup itself\nMemory (no swap on top), CPU time and processes per session; "
       "a disk of its own for everything the cell writes. Set per new session or in the configuration."),
    code("%%mino --session limited --memory 1g --cpus 1 --disk 2g\n"
         "echo \"memory $(( $(cat /sys/fs/cgroup/memory/memory.limit_in_bytes) >> 20 )) MiB, "
         "memory+swap $(( $(cat /sys/fs/cgroup/memory/memory.memsw.limit_in_bytes) >> 20 )) MiB\"\n"
         "echo \"cpu $(cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us)/$(cat /sys/fs/cgroup/cpu/cpu.cfs_period_us) us\"\n"
         "echo \"processes $(cat /sys/fs/cgroup/pids/pids.max)\"\n"
         "df -h /workspace /tmp ~ | awk 'NR > 1 {print $6, $2}'\n"
         "touch /usr/x 2>&1 || true"),
    md("## The process limit stops a fork bomb\nA bounded fork bomb in a one-shot container: children "
       "are created until the cgroup's limit of 4096 processes is reached."),
    code("%%mino --fresh\nperl -e '\n"
         "  for my $n (1 .. 5000) {\n"
         "    my $pid = fork();\n"
         "    if (!defined $pid) {\n"
         "      my $why = \"$!\";\n"
         "      open(my $f, \"<\", -e \"/sys/fs/cgroup/pids.current\" ? \"/sys/fs/cgroup/pids.current\" : \"/sys/fs/cgroup/pids/pids.current\");\n"
         "      my $current = <$f>; chomp $current;\n"
         "      print \"fork refused: $why; processes in the container: $current\\n\"; last;\n"
         "    }\n"
         "    if ($pid == 0) { sleep 2; exit 0 }\n"
         "  }'"),
    md("## The firewall cannot be touched from inside\nThe rules are installed from a separate "
       "container; the cell's processes hold no NET_ADMIN."),
    code("%%mino --session fw --network-preset registries\n"
         "iptables -F 2>&1 | tail -1\nnft flush ruleset 2>&1 | head -1\nip link set eth0 down 2>&1\n"
         "curl -s --retry 3 --retry-all-errors -o /dev/null -w 'pypi.org still allowed: %{http_code}\\n' "
         "https://pypi.org/simple/six/"),
    md("## Only the notebook's directory is shared, and writes wait\nThe container has its own filesystem; "
       "of the host it sees only `/workspace`, this notebook's directory, and what a cell writes there "
       "stays in the session until `%mino apply`."),
    code("%%mino\nls / | tr '\\n' ' '; echo\nls /root >/dev/null 2>&1 || echo '/root: permission denied'\n"
         "echo 'import os' > sitecustomize.py && echo 'wrote sitecustomize.py'"),
    code("import os\nprint('on this machine:', os.path.exists('sitecustomize.py'))"),
    code("%mino changes"),
    code("%mino stop --all"),
]

NOTEBOOK_SOURCES = {"quickstart": QUICKSTART, "network-presets": NETWORK, "config-and-panel": CONFIG,
                    "security-tour": SECURITY}


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


# The sanitizer sections that match scratch directories: committed outputs show `<scratch>`
# instead of a temporary path (the same regexes let nbval match a fresh run's real paths).
SCRATCH_SECTIONS = ("scratch-dirs", "config-demo-dirs")


def _without_scratch_paths(text: str) -> str:
    sanitizers = configparser.ConfigParser(interpolation=None)
    sanitizers.read(NOTEBOOKS / "sanitize.cfg")
    for section in SCRATCH_SECTIONS:
        text = re.sub(sanitizers[section]["regex"], sanitizers[section]["replace"], text)
    return text


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
        for output in cell.get("outputs", []):
            # A widget's live view needs its kernel; the committed notebook keeps its text form.
            output.get("data", {}).pop("application/vnd.jupyter.widget-view+json", None)
            if "text" in output:
                output["text"] = _without_scratch_paths(output["text"])
            for kind, value in output.get("data", {}).items():
                if kind.startswith("text/") and isinstance(value, str):
                    output["data"][kind] = _without_scratch_paths(value)
    nb.metadata.pop("widgets", None)
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


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_symlink(), p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(root.rglob("*")) if ".ipynb_checkpoints" not in p.parts}


def check_in_place() -> int:
    """A new user's first run, in place (what `make lab` opens): every example notebook runs
    without an error from the repository's own notebooks/ directory, with an empty configuration
    of its own, and leaves that directory exactly as it was."""
    work = Path(tempfile.mkdtemp(prefix="mino-first-run-"))
    os.environ["MINO_CONFIG"] = str(work / "config" / "config.toml")
    os.environ["XDG_CONFIG_HOME"] = str(work / "config")
    os.environ["XDG_STATE_HOME"] = str(work / "state")
    before = _tree(NOTEBOOKS)
    failed = []
    try:
        for name in NOTEBOOK_SOURCES:
            nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
            try:
                execute(nb, NOTEBOOKS)
                print(f"ran in place: notebooks/{name}.ipynb")
            except Exception as exc:  # noqa: BLE001 - reported, then the run fails
                failed.append(name)
                print(f"FAILED in place: notebooks/{name}.ipynb: {str(exc)[-2000:]}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    after = _tree(NOTEBOOKS)
    if after != before:
        changed = sorted(set(after) ^ set(before) | {k for k in after if k in before and after[k] != before[k]})
        print(f"FAILED: running the notebooks in place changed notebooks/: {changed}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["--check"]:
        return check(argv[1:])
    if argv[:1] == ["--check-in-place"]:
        return check_in_place()
    names = argv or list(NOTEBOOK_SOURCES)
    for name in names:
        print("wrote", build(name).relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
