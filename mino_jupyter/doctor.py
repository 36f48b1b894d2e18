"""`mino-jupyter doctor` / `%mino doctor`: one line per check, each failure with its fix."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__, copied, executor, host as host_facts, mounts, policy, storage
from .errors import MinoError
from .paths import state_dir
from .image import base_image_ref, run_probe, verify_image
from .owner import current_owner
from .runtime import Engine, containers_conf_files, discover, podman_binary

PROBE = (
    "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status; "
    "echo \"Pids: $(cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max)\"; "
    "echo \"Nproc: $(ulimit -u)\"; "
    "echo \"Uid: $(id -u)\"; "
    "unshare -r true 2>/dev/null && echo 'Userns: open' || echo 'Userns: refused'; "
    "touch /usr/.mino-probe 2>/dev/null && echo 'Root: writable' || echo 'Root: read-only'"
)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    note: bool = False  # passes, but names what this host cannot do and what follows
    warn: bool = False  # passes, but costs something the fix removes

    def render(self) -> str:
        mark = "note" if self.note else "warn" if self.warn else "ok  " if self.ok else "FAIL"
        line = f"[{mark}] {self.name}: {self.detail}"
        if (self.warn or not self.ok) and self.fix:
            line += f"\n       fix: {self.fix}"
        return line


def parse_probe(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def judge_probe(values: dict[str, str], engine: policy.EngineFacts = policy.ROOTFUL) -> list[str]:
    """What is wrong with a hardened container's view of itself (empty = nothing). Where the
    engine applies no cgroup limits, the process limit is the nproc ulimit instead."""
    problems = []
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        if values.get(key) is None or int(values[key], 16) != 0:
            problems.append(f"{key}={values.get(key)}")
    if values.get("NoNewPrivs") != "1":
        problems.append(f"NoNewPrivs={values.get('NoNewPrivs')}")
    if engine.cgroup_limits and values.get("Pids") != str(policy.PIDS_LIMIT):
        problems.append(f"pids.max={values.get('Pids')}")
    if not engine.cgroup_limits and values.get("Nproc") != str(policy.PIDS_LIMIT):
        problems.append(f"no process limit: the engine applies no pids.max and the nproc ulimit is "
                        f"{values.get('Nproc')}")
    if values.get("Uid") != str(policy.CELL_UID):
        problems.append(f"uid={values.get('Uid')}")
    if values.get("Seccomp") != "2":
        problems.append(f"Seccomp={values.get('Seccomp')} (no filter)")
    if values.get("Userns") != "refused":
        problems.append("user namespaces are open")
    if values.get("Root") != "read-only":
        problems.append("the root filesystem is writable")
    return problems


def run_checks(emit: Callable[[Check], None], env=None) -> bool:
    """Run every check, emitting each as it completes. True when all pass."""
    checks: list[Check] = []

    def add(check: Check) -> Check:
        checks.append(check)
        emit(check)
        return check

    try:
        endpoint = discover(os.environ if env is None else env, os.geteuid())
    except MinoError as exc:
        add(Check("API service", False, exc.message, exc.hint or ""))
        return False
    if not endpoint.local:
        add(Check("podman", True, f"not needed here: the engine is at {endpoint.url} ({endpoint.source})", note=True))
    else:
        try:
            binary = podman_binary()
            version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
            add(Check("podman", True, f"{version} ({binary})"))
        except MinoError as exc:
            add(Check("podman", False, exc.message, exc.hint or ""))
        except (OSError, subprocess.SubprocessError) as exc:
            add(Check("podman", False, f"`podman --version` failed: {exc}", "reinstall podman"))

    notes: list[str] = []
    try:
        engine = Engine.connect(env, notify=notes.append)
    except MinoError as exc:
        add(Check("API service", False, exc.message, exc.hint or ""))
        return False
    started = " (mino started it just now)" if engine.started_service else ""
    add(Check("API service", True, f"{engine.endpoint.url} answers{started}"))

    try:
        info = engine.info()
        host = info.get("host", {})
        rootless = host.get("security", {}).get("rootless")
        cgroup = host.get("cgroupVersion", "?")
        runtime = host.get("ociRuntime", {}).get("name", "?")
        limits = engine.host_limits()
        add(Check("engine", True,
                  f"Podman {engine.version()}, {'rootless' if rootless else 'rootful'}, cgroup {cgroup}, "
                  f"runtime {runtime}, container ulimits nofile={policy.container_ulimits(limits)[0]['hard']} "
                  f"nproc={policy.container_ulimits(limits)[1]['hard']}"))
        if rootless:
            add(_subordinate_ids())
        for gap in policy.unenforced(engine.facts()):
            add(Check("limits", True, gap, note=True))
        if endpoint.local:  # the containers.conf files read here are the engine's
            add(_exec_cleanup(env))
        add(_cell_executor(env))
        add(_files(engine))
    except MinoError as exc:
        add(Check("engine", False, exc.message, exc.hint or ""))

    image = base_image_ref()
    try:
        if not engine.image_exists(image):
            add(Check("base image", False, f"{image} is missing",
                      "build it: `mino-jupyter image build` (add --offline without a registry)"))
        else:
            verify_image(engine, image)
            add(Check("base image", True, f"{image} has bash, capsh, iptables, nft, setsid; developer is UID 1000"))
    except MinoError as exc:
        add(Check("base image", False, exc.message, exc.hint or ""))

    profile = host_facts.seccomp_profile(state_dir(env))
    if checks[-1].ok:
        try:
            if profile and host_facts.engine_elsewhere(engine):  # the engine reads it on its machine
                profile = copied.support_volume(engine, image=image, seccomp_profile=profile, state=state_dir(env),
                                                labels=current_owner().labels(), notice=lambda _said: None,
                                                with_executor=False)[1]
            add(_hardened_container(engine, image, profile))
        except MinoError as exc:
            add(Check("hardened container", False, exc.message, exc.hint or ""))
    else:
        add(Check("hardened container", False, "skipped: no usable base image", "fix the base image first"))
    add(_session_storage(engine, env))
    engine.close()
    return all(c.ok for c in checks)


# A cell that is a Podman exec of its own (any cell when the resident executor is off or cannot
# start, or beside a --bg cell) leaves a record and two conmon processes for exit_command_delay
# seconds, and later execs get slower as the records pile up.
EXEC_CLEANUP_WARN_ABOVE = 30


def _exec_cleanup(env, files: list | None = None) -> Check:
    delay, source = host_facts.exit_command_delay(
        containers_conf_files(env) if files is None else files)
    where = f"set in {source}" if source else "Podman's default"
    if delay <= EXEC_CLEANUP_WARN_ABOVE:
        return Check("exec clean-up", True, f"finished cells' exec records go after {delay} s ({where})")
    return Check("exec clean-up", True,
                 f"exit_command_delay is {delay} s ({where}): each cell that is an exec of its own (without "
                 f"the executor) keeps a record and two conmon processes that long, and execs "
                 f"get slower as they pile up",
                 "put `[engine]` / `exit_command_delay = 10` in a containers.conf drop-in "
                 "(`scripts/setup-host.sh` writes one), then restart the API service", warn=True)


def _files(engine: Engine) -> Check:
    """Whether sessions bind this machine's files or get a copy."""
    elsewhere = host_facts.engine_elsewhere(engine)
    if elsewhere is None:
        return Check("files", True, "the engine runs on this machine: sessions bind the notebook's directory "
                                    "(an overlay)")
    return Check("files", True, f"the engine is not on this machine ({elsewhere}): each session gets a copy of "
                                "the notebook's directory; cells' changes come back with `%mino changes` and "
                                "`%mino apply`", note=True)


def _cell_executor(env) -> Check:
    if not executor.enabled(env):
        return Check("cell executor", True, f"off ({executor.DISABLE_ENV}=0): every cell is an exec of its own",
                     note=True)
    try:
        directory = executor.ensure_binary(state_dir(env))
    except MinoError as exc:
        return Check("cell executor", True, exc.message, exc.hint or "", warn=True)
    return Check("cell executor", True, f"cells of a session run through mino-exec ({directory}, mode 0111)")


def _subordinate_ids() -> Check:
    """A rootless user needs subordinate uid and gid ranges (for the image's and PID 1's uids)."""
    problem = host_facts.subordinate_ids_problem()
    if problem:
        return Check("subordinate ids", False, problem.message, problem.hint or "")
    return Check("subordinate ids", True, "ranges in /etc/subuid and /etc/subgid")


def _session_storage(engine: Engine, env) -> Check:
    """Can mino make a session's disk and overlay here? (a small one, made and removed)"""
    import tempfile

    if host_facts.engine_elsewhere(engine):
        return Check("session storage", True, "not used: sessions of an engine elsewhere get a copy in volumes "
                                              "of their own there", note=True)
    try:
        mounter = mounts.for_engine(engine)
    except MinoError as exc:
        return Check("session storage", False, exc.message, exc.hint or "")
    root = state_dir(env) / "doctor"
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=root))
    lower = scratch / "lower"
    lower.mkdir()
    started = time.monotonic()
    try:
        store = storage.SessionStorage.create(scratch / "session", notebook_dir=lower, mode="overlay",
                                              home_lower=lower, disk_bytes=64 << 20, mounter=mounter)
        ok = store.teardown()
        left = [m for m in mounter.mountpoints() if m.startswith(str(scratch) + "/")]  # where the engine sees
    except MinoError as exc:
        return Check("session storage", False, exc.message, exc.hint or "")
    finally:
        storage.remove_tree(scratch)
    if not ok or left:
        return Check("session storage", False, f"a test mount stayed ({', '.join(left) or 'the disk'})",
                     "see `findmnt | grep mino` (rootless: `podman unshare findmnt | grep mino`)")
    if not mounter.loop_disks:
        return Check("session storage", True, f"an overlay mounted in the rootless engine's namespace and removed "
                     f"in {time.monotonic() - started:.2f} s (overlayfs in a user namespace; no session disk)")
    return Check("session storage", True, f"a disk and an overlay mounted and removed in "
                 f"{time.monotonic() - started:.2f} s (loop devices, ext4, overlayfs)")


def _hardened_container(engine: Engine, image: str, profile: str | None) -> Check:
    started = time.monotonic()
    try:
        probe = run_probe(engine, image, PROBE, role="doctor", network="bridge", seccomp_profile=profile)
    except MinoError as exc:
        return Check("hardened container", False, f"does not start: {exc.message}",
                     "run `scripts/setup-host.sh` (OCI runtime and ulimits), then `podman info`")
    gone = engine.inspect(probe.container) is None
    values = parse_probe(probe.out.decode(errors="replace"))
    kind = engine.facts()
    problems = judge_probe(values, kind) if probe.code == 0 else [
        f"probe exit {probe.code}: {probe.err.decode(errors='replace').strip()}"]
    if not gone:
        problems.append("container was not removed")
    if problems:
        return Check("hardened container", False, "; ".join(problems),
                     f"mino {__version__} policy is not applied by this engine; please report it")
    limit = f"pids.max={values['Pids']}" if kind.cgroup_limits else f"nproc ulimit={values['Nproc']}"
    return Check("hardened container", True,
                 f"started and removed in {time.monotonic() - started:.1f} s; inside: CapEff=CapBnd=0, "
                 f"NoNewPrivs=1, seccomp on, no user namespaces, read-only root, {limit}, "
                 f"uid={values['Uid']}")
