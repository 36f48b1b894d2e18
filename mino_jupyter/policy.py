"""The hardening policy: the only module that decides container and exec flags.

Everything here is pure: plain data in, plain data (Podman's REST "SpecGenerator" JSON and exec
bodies) out. The runtime layer posts these dicts as they are; nothing else may add a flag.

Every mino container, in every network mode, gets:

* ``cap_drop: ALL``: no capability in any set (inheritable, permitted, effective, bounding,
  ambient) for anything the cell runs, root or not.
* ``no_new_privileges``: setuid binaries and file capabilities cannot raise privileges.
* ``pids limit 4096``: a fork bomb stops at the cgroup, not at the host.
* ``user 1000:1000`` (``developer``) and ``init``: a real PID 1 reaps zombies and stops at once.
* explicit ulimits no higher than the engine's own hard limits, so the container's init can
  apply them (Podman's defaults exceed them on some hosts and every start then fails).
* owner labels, so the watchdog and the reaper can find what a dead kernel left behind.

The only container that holds any capability is the allowlist firewall container: NET_ADMIN and
nothing else, in the session's network namespace but not its PID or mount namespaces, never
running cell code (see :func:`firewall_spec`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from . import __version__

CELL_UID = 1000
CELL_USER = f"{CELL_UID}:{CELL_UID}"
WORKDIR = "/workspace"
HOME = "/home/developer"
PIDS_LIMIT = 4096
CONTAINER_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Tools that keep their own CA store, pointed at the (host-provided) system bundle.
CA_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS")

# Ceilings for ulimits when the engine's own hard limits are higher (or unlimited).
NOFILE_CEILING = 65536
NPROC_CEILING = 32768
RLIM_INFINITY = -1

NETWORK_MODES = ("bridge", "host", "none")  # how the container's own namespace is set up


@dataclass(frozen=True)
class HostLimits:
    """Hard limits of the process that starts containers (the Podman service); -1 = unlimited."""

    nofile: int
    nproc: int


def container_ulimits(limits: HostLimits) -> list[dict]:
    """Ulimits for every container: never above the host's hard limits, so init can set them."""

    def cap(hard: int, ceiling: int) -> int:
        return ceiling if hard == RLIM_INFINITY or hard < 0 else min(hard, ceiling)

    nofile = cap(limits.nofile, NOFILE_CEILING)
    nproc = cap(limits.nproc, NPROC_CEILING)
    return [
        {"type": "nofile", "soft": nofile, "hard": nofile},
        {"type": "nproc", "soft": nproc, "hard": nproc},
    ]


@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class SessionRequest:
    """Everything that varies between session containers. The rest is fixed policy."""

    name: str
    image: str
    network: str  # "bridge" | "host" | "none": the namespace; allowlist mode is bridge + firewall
    labels: Mapping[str, str]
    limits: HostLimits
    workspace: Sequence[Mount] = ()  # the notebook's directory, and what stays read-only in it
    ca_bundle: str | None = None  # host path of a CA bundle to trust inside
    hosts: Sequence[tuple[str, str]] = ()  # (name, address) for /etc/hosts
    no_dns: bool = False  # allowlist mode: no resolver inside, names come from `hosts`
    pids_limit: int = PIDS_LIMIT  # configuration may only lower it
    volumes: Sequence[tuple[str, str]] = ()  # (named volume, path): package caches of this user
    extra_mounts: Sequence[Mount] = field(default_factory=tuple)


# Inside a read-write workspace these stay read-only when they exist: writing them would let a
# cell run code on the host later (git hooks, a project virtualenv, shell and editor start-up
# files, direnv) or change mino's own project settings.
PROTECTED_IN_WORKSPACE = (".git", ".hg", ".svn", ".venv", "venv", ".envrc", ".mino.toml", ".ipython",
                          ".jupyter", ".vscode", ".idea", ".bashrc", ".profile", ".bash_profile", ".zshrc",
                          ".ssh", ".config", ".local", ".gnupg")


@dataclass(frozen=True)
class WorkspacePlan:
    mounts: tuple[Mount, ...]
    note: str | None = None  # said to the user when the plan differs from what was asked


def workspace_mounts(workspace: str, *, readonly: bool, home: str | None, existing: Sequence[str]) -> WorkspacePlan:
    """How the notebook's directory is shared. `existing`: names present at its top level.

    A home directory (or `/`, or anything above a home) is never shared read-write: too much of
    the user's machine would be writable from the sandbox.
    """
    root = Mount(workspace, WORKDIR, read_only=readonly)
    wide = workspace == "/" or (home is not None and (workspace == home or home.startswith(workspace.rstrip("/") + "/")))
    if wide and not readonly:
        return WorkspacePlan((Mount(workspace, WORKDIR, read_only=True),),
                             f"{workspace} contains a home directory, so it is shared read-only; open the "
                             "notebook from a project folder to let cells write next to it")
    if readonly:
        return WorkspacePlan((root,))
    guarded = tuple(Mount(f"{workspace.rstrip('/')}/{name}", f"{WORKDIR}/{name}", read_only=True)
                    for name in PROTECTED_IN_WORKSPACE if name in existing)
    return WorkspacePlan((root, *guarded))


def _hardening(limits: HostLimits, pids_limit: int = PIDS_LIMIT) -> dict:
    if not 1 <= pids_limit <= PIDS_LIMIT:
        raise ValueError(f"pids limit must be 1..{PIDS_LIMIT}, not {pids_limit}")
    return {
        "cap_drop": ["ALL"],
        "cap_add": [],
        "no_new_privileges": True,
        "privileged": False,
        "resource_limits": {"pids": {"limit": pids_limit}},
        "r_limits": container_ulimits(limits),
        "init": True,
        # Keep Podman from giving the container a host-wide /dev/shm or devices.
        "ipcns": {"nsmode": "private"},
    }


def _mount(m: Mount) -> dict:
    options = ["rbind", "ro" if m.read_only else "rw", "nosuid", "nodev"]
    return {"type": "bind", "source": m.source, "destination": m.target, "options": options}


def session_spec(req: SessionRequest) -> dict:
    """The libpod SpecGenerator for a session container (its PID 1 only waits for cells)."""
    if req.network not in NETWORK_MODES:
        raise ValueError(f"network namespace mode must be one of {NETWORK_MODES}, not {req.network!r}")
    env = {"HOME": HOME, "LANG": "C.UTF-8", "TERM": "dumb", "USER": "developer"}
    if req.network == "none":
        # Nothing can ever connect: package managers should fail at once instead of retrying.
        env.update({"PIP_RETRIES": "0", "NPM_CONFIG_FETCH_RETRIES": "0"})
    mounts = [_mount(m) for m in req.workspace]
    if req.ca_bundle:
        mounts.append(_mount(Mount(req.ca_bundle, CONTAINER_CA_BUNDLE, read_only=True)))
        env.update({name: CONTAINER_CA_BUNDLE for name in CA_ENV_VARS})
    mounts.extend(_mount(m) for m in req.extra_mounts)
    spec = {
        "name": req.name,
        "image": req.image,
        "command": ["sleep", "infinity"],
        "entrypoint": [],
        "user": CELL_USER,
        "work_dir": WORKDIR,
        "env": env,
        "labels": dict(req.labels),
        "hostname": "mino",
        "netns": {"nsmode": req.network},
        "mounts": mounts,
        "volumes": [{"Name": name, "Dest": dest, "Options": ["nosuid", "nodev"]} for name, dest in req.volumes],
        "hostadd": [f"{name}:{addr}" for name, addr in req.hosts],
        "stop_timeout": 1,
        "remove": False,
        **_hardening(req.limits, req.pids_limit),
    }
    if req.no_dns:
        # The only nameserver is loopback, where nothing answers: names resolve from /etc/hosts,
        # which mino fills with its own answers, and no DNS query leaves the container.
        spec["dns_server"] = ["127.0.0.1"]
        spec["dns_search"] = ["."]
    return spec


def firewall_spec(*, name: str, image: str, target_container: str, labels: Mapping[str, str],
                  limits: HostLimits, command: Sequence[str] = ("sleep", "infinity")) -> dict:
    """The allowlist firewall container: joins the session's network namespace only.

    It holds NET_ADMIN and nothing else, shares no PID, mount, IPC or user namespace with the
    session, runs as root only inside its own filesystem and never runs cell code. The session
    container's processes (every exec included) keep an empty capability set, so nothing the
    cell runs can change the rules it installs.
    """
    spec = {
        "name": name,
        "image": image,
        "command": list(command),
        "stdin": True,  # mino sends it requests through the engine's attach; nothing else can
        "entrypoint": [],
        "user": "0:0",
        "work_dir": "/",
        "env": {"LANG": "C.UTF-8"},
        "labels": dict(labels),
        "netns": {"nsmode": "container", "value": target_container},
        "stop_timeout": 1,
        "remove": False,
        **_hardening(limits),
    }
    spec["cap_add"] = ["NET_ADMIN"]
    return spec


def exec_body(cmd: Sequence[str], *, env: Mapping[str, str] | None = None,
              workdir: str = WORKDIR, user: str = CELL_USER) -> dict:
    """Body of POST /containers/{id}/exec. Never privileged; runs as the cell user by default."""
    return {
        "Cmd": list(cmd),
        "Env": [f"{k}={v}" for k, v in (env or {}).items()],
        "User": user,
        "WorkingDir": workdir,
        "AttachStdout": True,
        "AttachStderr": True,
        "AttachStdin": False,
        "Tty": False,
        "Privileged": False,
    }


# ---------------------------------------------------------------------------- the execs mino makes
# Every process mino starts in a container is built by one of the functions below.

# $1: file that receives the process group id; $2: the script (or its path, see _FILE_WRAPPER).
# `set -m` gives the background job its own process group; `set +m` right after keeps bash
# from printing job notifications. The group id file stays while the group has members.
_WRAPPER = ('set -m; bash -c "$2" mino-cell & pid=$!; set +m; echo $pid > "$1"; wait $pid; rc=$?; '
            'kill -0 -- -$pid 2>/dev/null || rm -f "$1"; exit $rc')
_FILE_WRAPPER = _WRAPPER.replace('bash -c "$2" mino-cell', 'bash "$2"').replace('exit $rc', 'rm -f "$2"; exit $rc')

# $1: the group id file. Prints the last signal it had to send (INT, TERM, KILL) or "none".
_KILLER = r'''
f=$1; pg=
for i in $(seq 20); do pg=$(cat "$f" 2>/dev/null) && [ -n "$pg" ] && break; sleep 0.05; done
[ -n "$pg" ] || { echo none; exit 0; }
used=none
for sig in INT TERM KILL; do
  kill -0 -- "-$pg" 2>/dev/null || break
  kill -"$sig" -- "-$pg" 2>/dev/null
  used=$sig
  for i in 1 2 3 4 5 6; do sleep 0.05; kill -0 -- "-$pg" 2>/dev/null || break; done
done
rm -f "$f"; echo "$used"
'''


def cell_exec(script: str, *, pgid_file: str, env: Mapping[str, str], from_file: bool = False) -> dict:
    """A cell: the script (or, `from_file`, the path of a copied-in script) with bash, as the
    cell user in /workspace, in its own process group whose id goes to `pgid_file`."""
    wrapper = _FILE_WRAPPER if from_file else _WRAPPER
    return exec_body(["bash", "-c", wrapper, "mino", pgid_file, script], env=env)


def stop_exec(pgid_file: str) -> dict:
    """Interrupt or time out a cell: INT, TERM, KILL to its process group, as the cell user."""
    return exec_body(["bash", "-c", _KILLER, "mino-stop", pgid_file], workdir="/")


def probe_exec(script: str) -> dict:
    """A check mino runs in a container of its own (image verification, doctor)."""
    return exec_body(["bash", "-c", script])


def hosts_read_exec() -> dict:
    return exec_body(["cat", "/etc/hosts"], workdir="/")


def hosts_write_exec(text: str) -> dict:
    """Replace /etc/hosts (allowlist names). Root in the session container holds no capability;
    it only owns /etc/hosts."""
    return exec_body(["sh", "-c", 'printf "%s" "$1" > /etc/hosts', "mino-hosts", text], workdir="/", user="0:0")


# ---------------------------------------------------------------------------- labels

MANAGED = {"io.mino.managed": "true"}  # every container mino starts; what the reaper lists
ROLES = ("session", "fresh", "firewall", "verify", "doctor", "test")


def labels(role: str, owner: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The one label set of every mino container: managed and version (what the reaper lists),
    its owner (pid, start time, boot id, host: what the watchdog and reaper judge), its role, and
    what identifies it to the user (session name, network, kernel id)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    return {**MANAGED, "io.mino.version": __version__, **owner, "io.mino.role": role, **(extra or {})}


# ---------------------------------------------------------------------------- a session, whole

@dataclass(frozen=True)
class SessionSettings:
    """What the user chose for a new session: cell flags and configuration, merged."""

    image: str
    workspace_readonly: bool = False
    pids_limit: int = PIDS_LIMIT
    package_cache: bool = True
    toolchain: str | None = None  # "python" or "node" when the image is one of mino's toolchains


@dataclass(frozen=True)
class HostFacts:
    """What mino found on this host for a new session (gathered, not decided)."""

    limits: HostLimits
    workspace: str  # the notebook's directory, real path
    home: str | None = None  # the kernel user's home, real path
    present: tuple[str, ...] = ()  # names at the top of the workspace
    ca_bundle: str | None = None  # a checked host path, or None
    kernel_id: str | None = None


# (volume, path in the container) of each toolchain's package cache, shared by this user's sessions.
PACKAGE_CACHES = {
    "python": (("mino-cache-pip", f"{HOME}/.cache/pip"),),
    "node": (("mino-cache-npm", f"{HOME}/.npm"),),
}


@dataclass(frozen=True)
class SessionShape:
    """A session's container, whole: what is posted, and what the user is told about it."""

    request: SessionRequest
    network_labels: Mapping[str, str]  # the labels the session's firewall container shares
    readonly: bool  # the workspace as it is actually mounted
    note: str | None = None


def session_request(name: str, plan, settings: SessionSettings, facts: HostFacts,
                    owner: Mapping[str, str], *, fresh: bool, hosts: Sequence[tuple[str, str]] = (),
                    container_name: str) -> SessionShape:
    """Everything about a new session's container, decided from plain data. `plan` is the
    :class:`mino_jupyter.network.NetworkPlan`; `hosts` are the allowlist's resolved names."""
    shared = workspace_mounts(facts.workspace, readonly=settings.workspace_readonly, home=facts.home,
                              existing=facts.present)
    identity = {
        "io.mino.session": name,
        "io.mino.network": plan.describe(),
        **({"io.mino.kernel-id": facts.kernel_id} if facts.kernel_id else {}),
    }
    allowlist = plan.mode == "allowlist"
    volumes = PACKAGE_CACHES.get(settings.toolchain or "", ()) if settings.package_cache else ()
    request = SessionRequest(
        name=container_name,
        image=settings.image,
        network="bridge" if allowlist else plan.mode,
        labels=labels("fresh" if fresh else "session", owner, identity),
        limits=facts.limits,
        workspace=shared.mounts,
        ca_bundle=facts.ca_bundle,
        hosts=tuple(hosts),
        no_dns=allowlist,
        pids_limit=settings.pids_limit,
        volumes=volumes,
    )
    readonly = settings.workspace_readonly or shared.note is not None
    return SessionShape(request, labels("firewall", owner, identity), readonly, shared.note)


def cache_volume_labels(name: str) -> dict[str, str]:
    return {**MANAGED, "io.mino.version": __version__, "io.mino.cache": name}
