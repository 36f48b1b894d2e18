"""The hardening policy: the only module that decides container and exec flags.

Everything here is pure: plain data in, plain data (Podman's REST "SpecGenerator" JSON and exec
bodies) out. The runtime layer posts these dicts as they are; nothing else may add a flag, a
mount, a volume, a label or an exec.

Every mino container, in every network mode, gets:

* ``cap_drop: ALL``: no capability in any set (inheritable, permitted, effective, bounding,
  ambient) for anything the cell runs, root or not.
* ``no_new_privileges``: setuid binaries and file capabilities cannot raise privileges.
* a **seccomp profile** derived from Podman's default that refuses new namespaces (``unshare``,
  ``setns``, ``clone`` with namespace flags, ``clone3``): no user namespace, so no capability set
  inside one and none of the kernel's userns attack surface; and reaching into another process
  (``ptrace``, ``process_vm_readv``/``writev``, ``pidfd_getfd``), since every process of a
  session shares one uid (see :mod:`mino_jupyter.seccomp`).
* **limits**: pids 4096 (a fork bomb stops at the cgroup), memory with no swap on top, CPU
  quota, and disk: the root filesystem is read-only and everything writable (workspace upper
  layer, home, /tmp) is on the session's own size-limited disk (see :mod:`mino_jupyter.storage`).
* ``user 1001:1001`` for the container's init and main process, ``1000:1000`` (``developer``)
  for every exec: the cell's uid differs from PID 1's, so a cell cannot signal its container's
  init to stop it, and no process mino starts where cell code lives runs as uid 0.
* ``init``: a real PID 1 reaps zombies and stops at once.
* explicit ulimits no higher than the engine's own hard limits, so the container's init can
  apply them (Podman's defaults exceed them on some hosts and every start then fails).
* owner labels (:func:`labels`), so the watchdog and the reaper find what a dead kernel left.

The only container that holds any capability is a session's firewall container: NET_ADMIN
(and NET_BIND_SERVICE for its loopback name server) and nothing else, in the session's network
namespace but not its PID or mount namespaces, never running cell code (:func:`firewall_spec`).

Every exec mino makes is built by a named function at the end of this module: programs by
absolute path, ``--noprofile --norc``, no ``BASH_ENV``, so nothing a cell writes in its home or
``PATH`` stands in for them. A session's cells go through its resident executor
(:func:`executor_exec`), mounted read-only from mino's state directory at
:data:`EXECUTOR_DIR` (mode 0111: the cell, which shares its uid, can neither read nor trace it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from . import __version__

CELL_UID = 1000
CELL_USER = f"{CELL_UID}:{CELL_UID}"
INIT_UID = 1001  # the container's init and main process: not the cell's uid
INIT_USER = f"{INIT_UID}:{INIT_UID}"
WORKDIR = "/workspace"
HOME = "/home/developer"
CONTROL_DIR = "/run/mino"  # read-only inside: files mino hands its own execs
BASH = "/bin/bash"
EXECUTOR_DIR = "/usr/local/libexec/mino"  # read-only inside: the cell executor, mode 0111
EXECUTOR = f"{EXECUTOR_DIR}/mino-exec"
PIDS_LIMIT = 4096
CONTAINER_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
# Tools that keep their own CA store, pointed at the (host-provided) system bundle.
CA_ENV_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS")

# Ceilings for ulimits when the engine's own hard limits are higher (or unlimited).
NOFILE_CEILING = 65536
NPROC_CEILING = 32768
RLIM_INFINITY = -1

NETWORK_MODES = ("bridge", "host", "none")  # how the container's own namespace is set up
WORKSPACE_MODES = ("overlay", "ro", "rw")
CPU_PERIOD = 100_000  # microseconds
GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class HostLimits:
    """Hard limits of the process that starts containers (the Podman service); -1 = unlimited."""

    nofile: int
    nproc: int


@dataclass(frozen=True)
class EngineFacts:
    """What kind of engine the containers run on (from its ``/info``)."""

    rootless: bool = False
    cgroup_limits: bool = True  # it applies the memory, CPU and pids limits
    cgroup_version: str = "v1"

    @property
    def cell_uid_mapped(self) -> bool:
        """The cell's uid is the kernel user's own on this machine (rootless ``keep-id``)."""
        return self.rootless


ROOTFUL = EngineFacts()
# Podman's create warning when it starts a container without the cgroup limits asked for.
CGROUP_LIMITS_IGNORED = "Resource limits are not supported and ignored"


def unenforced(engine: EngineFacts) -> tuple[str, ...]:
    """The limits this engine cannot apply, each with what holds instead (shown once per kernel,
    in `doctor`, and in the README's rootless section)."""
    gaps = []
    if not engine.cgroup_limits:
        gaps.append(f"memory and CPU limits are not applied: rootless Podman on cgroup {engine.cgroup_version} "
                    "ignores cgroup limits (cgroup v2 with delegated controllers applies them); "
                    f"the {PIDS_LIMIT}-process limit holds through the nproc ulimit")
    if engine.rootless:
        gaps.append("the disk limit is not applied: without root mino cannot mount a session disk, so "
                    "what a cell writes goes to mino's state directory (~/.local/state/mino by default) without a cap")
    return tuple(gaps)


def unexplained_warnings(warnings: Sequence[str], engine: EngineFacts) -> list[str]:
    """Podman's create warnings that :func:`unenforced` does not already report: each one may
    weaken a promise, so none is dropped."""
    return [w for w in warnings if not (CGROUP_LIMITS_IGNORED in w and not engine.cgroup_limits)]


def container_ulimits(limits: HostLimits, nproc_ceiling: int = NPROC_CEILING) -> list[dict]:
    """Ulimits for every container: never above the host's hard limits, so init can set them."""

    def cap(hard: int, ceiling: int) -> int:
        return ceiling if hard == RLIM_INFINITY or hard < 0 else min(hard, ceiling)

    nofile = cap(limits.nofile, NOFILE_CEILING)
    nproc = cap(limits.nproc, nproc_ceiling)
    return [
        {"type": "nofile", "soft": nofile, "hard": nofile},
        {"type": "nproc", "soft": nproc, "hard": nproc},
    ]


# ---------------------------------------------------------------------------- resources

@dataclass(frozen=True)
class Resources:
    """What one container may use. Memory and disk in bytes; cpus in cores (fractions allowed)."""

    memory: int = 2 * GIB
    cpus: float = 1.0
    disk: int = 10 * GIB
    pids: int = PIDS_LIMIT


HELPER_RESOURCES = Resources(memory=256 * MIB, cpus=0.5, disk=0, pids=64)  # firewall and probes


def default_resources(mem_total: int, cpu_count: int, disk_free: int) -> Resources:
    """Defaults from the host's size: half its memory (at least 512 MiB), half its cores (at
    least one), and a disk of 10 GiB or half the free space where sessions live, if less."""
    return Resources(memory=max(512 * MIB, mem_total // 2 // MIB * MIB),
                     cpus=float(max(1, cpu_count // 2)),
                     disk=max(256 * MIB, min(10 * GIB, disk_free // 2 // MIB * MIB)))


def _limits(resources: Resources) -> dict:
    if not 1 <= resources.pids <= PIDS_LIMIT:
        raise ValueError(f"pids limit must be 1..{PIDS_LIMIT}, not {resources.pids}")
    if resources.memory < 16 * MIB or resources.cpus <= 0:
        raise ValueError(f"memory {resources.memory} / cpus {resources.cpus} out of range")
    return {
        "pids": {"limit": resources.pids},
        # swap = memory: the limit is the limit, nothing is pushed to swap on top of it.
        "memory": {"limit": resources.memory, "swap": resources.memory},
        "cpu": {"quota": int(resources.cpus * CPU_PERIOD), "period": CPU_PERIOD},
    }


# ---------------------------------------------------------------------------- mounts

@dataclass(frozen=True)
class Mount:
    source: str
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class StorageMounts:
    """Host paths prepared by :mod:`mino_jupyter.storage` for one session."""

    workspace: str  # the overlay (or, ro/rw, the notebook's directory itself)
    workspace_mode: str  # overlay | ro | rw
    home: str
    tmp: str
    var_tmp: str
    control: str


@dataclass(frozen=True)
class CopiedStorage:
    """A session on an engine elsewhere, whose processes are not this machine's (another
    machine, another mount namespace): nothing of this machine is bound in. The workspace and the home are
    volumes of the container's own (removed with it): mino copies the notebook's directory into
    the first through the engine's archive API before the container starts, and reads it back
    for `%mino changes` and `apply`; the home starts as the image's. /tmp and /var/tmp are
    size-limited tmpfs (counted in the memory limit). The cell executor comes from mino's
    support volume on the engine (:data:`SUPPORT_VOLUME_PREFIX`), read-only."""

    read_only: bool = False  # `--workspace ro`: the copy is mounted read-only
    tmp_bytes: int = 256 * MIB
    support_volume: str | None = None  # holds the executor (and the seccomp profile the engine reads)


SUPPORT_VOLUME_PREFIX = "mino-support-"

# A lease, for sessions on an engine elsewhere: the kernel may lose the engine (its machine
# sleeps, the network drops) and then neither it nor its watchdog can remove the containers.
# Their main process (the init's user, never the cell's) then ends the container itself when
# the kernel has not renewed the lease for LEASE seconds; renewing is writing a new number in
# LEASE_DIR through the engine's archive API (a tmpfs the cell cannot write). Bash builtins
# only in the loop's test, so a cell that uses up the process limit cannot fake a renewal.
LEASE_DIR = "/run/mino-lease"
LEASE_FILE = "seq"
LEASE_SCRIPT = f"""lease=$1; last=; renewed=$SECONDS
while :; do
  cur=; {{ read -r cur; }} 2>/dev/null < {LEASE_DIR}/{LEASE_FILE}
  if [[ -n $cur && $cur != "$last" ]]; then last=$cur; renewed=$SECONDS; fi
  (( SECONDS - renewed < lease )) || exit 0
  sleep 2
done"""


def copied_storage_spec(s: CopiedStorage) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) of a copied session: anonymous volumes go with their container."""
    options = ["nosuid", "nodev"]
    volumes = [
        {"Name": "", "Dest": WORKDIR, "Options": options + (["ro"] if s.read_only else [])},
        {"Name": "", "Dest": HOME, "Options": list(options)},  # filled from the image at first start
    ]
    if s.support_volume:
        volumes.append({"Name": s.support_volume, "Dest": EXECUTOR_DIR, "Options": options + ["ro"]})
    tmpfs = [{"type": "tmpfs", "source": "tmpfs", "destination": target,
              "options": ["rw", "nosuid", "nodev", "mode=1777", f"size={s.tmp_bytes}"]}
             for target in ("/tmp", "/var/tmp")]
    return volumes, tmpfs


def storage_mounts(s: StorageMounts) -> list[Mount]:
    """/workspace, the home, /tmp and /var/tmp on the session's disk; /run/mino read-only."""
    return [
        Mount(s.workspace, WORKDIR, read_only=s.workspace_mode == "ro"),
        Mount(s.home, HOME),
        Mount(s.tmp, "/tmp"),
        Mount(s.var_tmp, "/var/tmp"),
        Mount(s.control, CONTROL_DIR, read_only=True),
    ]


def _mount(m: Mount) -> dict:
    options = ["rbind", "ro" if m.read_only else "rw", "nosuid", "nodev"]
    return {"type": "bind", "source": m.source, "destination": m.target, "options": options}


def workspace_mode(requested: str, workspace: str, home: str | None) -> tuple[str, str | None]:
    """The workspace mode actually used, and a note when it differs from the request.

    A home directory (or `/`, or anything above a home) is never shared read-write: too much of
    the user's machine would be writable from the sandbox; it gets the overlay instead.
    """
    if requested not in WORKSPACE_MODES:
        raise ValueError(f"workspace mode must be one of {WORKSPACE_MODES}, not {requested!r}")
    wide = workspace == "/" or (home is not None and (workspace == home or home.startswith(workspace.rstrip("/") + "/")))
    if wide and requested == "rw":
        return "overlay", (f"{workspace} contains a home directory, so it is never shared read-write; cells "
                           "write to an overlay instead (`%mino changes` shows what they wrote)")
    return requested, None


RW_WARNING = ("mino: session '{name}' shares {workspace} read-write: a cell can change any file "
              "there, including Python modules the kernel imports from that directory (a cell that writes "
              "pandas.py runs code on this machine at the next `import pandas`) and git hooks; "
              "the default overlay keeps cells' writes apart until `%mino apply`")


# ---------------------------------------------------------------------------- containers

@dataclass(frozen=True)
class SessionRequest:
    """Everything that varies between session containers. The rest is fixed policy."""

    name: str
    image: str
    network: str  # "bridge" | "host" | "none": the namespace; allowlist mode is bridge + firewall
    labels: Mapping[str, str]
    limits: HostLimits
    storage: StorageMounts | CopiedStorage | None = None  # None: a throwaway probe with no writable place
    ca_bundle: str | None = None  # host path of a CA bundle to trust inside (bound, or for copied storage, copied in)
    hosts: Sequence[tuple[str, str]] = ()  # (name, address) for /etc/hosts
    no_dns: bool = False  # allowlist mode: names come from `hosts` or the firewall's name server
    resources: Resources = Resources()
    caches: Sequence[Mount] = ()  # package caches of this project (host directories)
    seccomp_profile: str | None = None  # host path of mino's profile
    engine: EngineFacts = ROOTFUL
    executor: str | None = None  # host directory of mino's cell executor (mounted read-only)
    lease: int | None = None  # seconds without a renewal after which the container ends itself


def lease_command(seconds: int) -> list[str]:
    if seconds < 4:
        raise ValueError(f"a lease is at least 4 seconds, not {seconds}")
    return [BASH, "--noprofile", "--norc", "-c", LEASE_SCRIPT, "mino-lease", str(seconds)]


def lease_mount() -> dict:
    """Root's (the engine writes the lease as the container's user, its init's): no cell writes it."""
    return {"type": "tmpfs", "source": "tmpfs", "destination": LEASE_DIR,
            "options": ["rw", "nosuid", "nodev", "noexec", "mode=0755", "size=16k"]}


def _hardening(limits: HostLimits, resources: Resources, seccomp_profile: str | None,
               engine: EngineFacts = ROOTFUL, *, runs_cells: bool = True) -> dict:
    # Where the engine cannot apply the pids limit (rootless Podman on cgroup v1 ignores every
    # cgroup limit and says so in a warning), the process limit is the nproc ulimit instead: it
    # counts the cell's uid in the container's own user namespace (keep-id gives every session
    # one), so a fork loop stops at the same number. Not for the firewall: it runs as the
    # rootless user namespace's root, whose count is everything that user runs there.
    nproc_ceiling = resources.pids if (runs_cells and not engine.cgroup_limits) else NPROC_CEILING
    spec = {
        "cap_drop": ["ALL"],
        "cap_add": [],
        "no_new_privileges": True,
        "privileged": False,
        "resource_limits": _limits(resources),
        "r_limits": container_ulimits(limits, nproc_ceiling),
        "init": True,
        "read_only_filesystem": True,
        # Keep Podman from giving the container a host-wide /dev/shm or devices.
        "ipcns": {"nsmode": "private"},
        # Under memory pressure on the host, the sandbox goes first.
        "oom_score_adj": 500,
    }
    if seccomp_profile:
        spec["seccomp_profile_path"] = seccomp_profile
    return spec


def session_spec(req: SessionRequest) -> dict:
    """The libpod SpecGenerator for a session container (its PID 1 only waits for cells)."""
    if req.network not in NETWORK_MODES:
        raise ValueError(f"network namespace mode must be one of {NETWORK_MODES}, not {req.network!r}")
    env = {"HOME": HOME, "LANG": "C.UTF-8", "TERM": "dumb", "USER": "developer"}
    if req.network == "none":
        # Nothing can ever connect: package managers should fail at once instead of retrying.
        env.update({"PIP_RETRIES": "0", "NPM_CONFIG_FETCH_RETRIES": "0"})
    copied = isinstance(req.storage, CopiedStorage)
    volumes: list[dict] = []
    if copied:
        volumes, mounts = copied_storage_spec(req.storage)
    else:
        mounts = [_mount(m) for m in storage_mounts(req.storage)] if req.storage else []
    if req.ca_bundle:
        if not copied:  # else mino copies the file in before the container starts
            mounts.append(_mount(Mount(req.ca_bundle, CONTAINER_CA_BUNDLE, read_only=True)))
        env.update({name: CONTAINER_CA_BUNDLE for name in CA_ENV_VARS})
    mounts.extend(_mount(m) for m in req.caches)
    if req.executor and not copied:
        mounts.append(_mount(Mount(req.executor, EXECUTOR_DIR, read_only=True)))
    spec = {
        "name": req.name,
        "image": req.image,
        "command": ["sleep", "infinity"],
        "entrypoint": [],
        "user": INIT_USER,
        "work_dir": WORKDIR,
        "env": env,
        "labels": dict(req.labels),
        "hostname": "mino",
        "netns": {"nsmode": req.network},
        "mounts": mounts,
        **({"volumes": volumes} if volumes else {}),
        "hostadd": [f"{name}:{addr}" for name, addr in req.hosts],
        "stop_timeout": 1,
        "remove": False,
        **_hardening(req.limits, req.resources, req.seccomp_profile, req.engine),
    }
    if req.lease:
        # The main process keeps the lease; a container whose lease ran out removes itself
        # (with its anonymous volumes) as it ends.
        spec.update({"command": lease_command(req.lease), "remove": True})
        spec["mounts"].append(lease_mount())
    if req.engine.rootless:
        # The cell (uid 1000) is the kernel's user on this machine: what it writes in the
        # workspace and caches is theirs, and it is no one else's uid. PID 1 (1001) and
        # everything else map to the user's subordinate range.
        spec["userns"] = {"nsmode": "keep-id", "value": f"uid={CELL_UID},gid={CELL_UID}"}
    if req.no_dns:
        # The only nameserver is loopback, served by the firewall container's name server, which
        # answers nothing and remembers what was asked: names resolve from /etc/hosts, which
        # mino fills with its own answers, and no DNS query leaves the container.
        spec["dns_server"] = ["127.0.0.1"]
        spec["dns_search"] = ["."]
    return spec


def firewall_spec(*, name: str, image: str, target_container: str, labels: Mapping[str, str],
                  limits: HostLimits, command: Sequence[str], seccomp_profile: str | None = None,
                  engine: EngineFacts = ROOTFUL, lease: int | None = None) -> dict:
    """A session's firewall container: joins the session's network namespace only.

    It holds NET_ADMIN (rules) and NET_BIND_SERVICE (the loopback name server of allowlist
    sessions, port 53) and nothing else, shares no PID, mount, IPC or user namespace with the
    session, runs as root only inside its own read-only filesystem and never runs cell code. The
    session's processes (every exec included) keep an empty capability set, so nothing the cell
    runs can change the rules it installs.
    """
    spec = {
        "name": name,
        "image": image,
        "command": list(command),
        "stdin": True,  # mino sends it requests through the engine's attach; nothing else can
        "entrypoint": [],
        "user": "0:0",
        "work_dir": "/",
        "env": {"LANG": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        "labels": dict(labels),
        "netns": {"nsmode": "container", "value": target_container},
        # Its one writable place: the ruleset it installs, in memory, small.
        "mounts": [{"type": "tmpfs", "source": "tmpfs", "destination": "/tmp",
                    "options": ["rw", "nosuid", "nodev", "noexec", "size=8m"]}],
        "stop_timeout": 1,
        "remove": False,
        **_hardening(limits, HELPER_RESOURCES, seccomp_profile, engine, runs_cells=False),
    }
    spec["cap_add"] = ["NET_ADMIN", "NET_BIND_SERVICE"]
    if lease:
        # Its agent keeps the session's lease (and ends on its stdin's end): it goes as it ends,
        # so the session's own removal never waits for it.
        spec["remove"] = True
        spec["mounts"].append(lease_mount())
    if engine.rootless:
        # Pinned to the rootless user namespace, which owns the session's network namespace
        # (a containers.conf `userns = "keep-id"` would otherwise give it one that cannot even
        # mount its sysfs); never the session's own.
        spec["userns"] = {"nsmode": "host"}
    return spec


def inspection_spec(*, name: str, image: str, labels: Mapping[str, str], limits: HostLimits,
                    engine: EngineFacts = ROOTFUL) -> dict:
    """A container that is created and never started: the engine reads the image's files
    through it (the home a session's overlay starts from). As the cell user, so the engine
    reports the files' real owners; nothing ever runs in it."""
    spec = session_spec(SessionRequest(name=name, image=image, network="none", labels=labels, limits=limits,
                                       engine=engine))
    spec["user"] = CELL_USER
    return spec


SUPPORT_DIR = "/run/mino-support"  # where a loader mounts mino's support volume


def loader_spec(*, name: str, image: str, labels: Mapping[str, str], limits: HostLimits,
                engine: EngineFacts = ROOTFUL, volumes_from: str | None = None,
                support_volume: str | None = None) -> dict:
    """A container that is created and never started: mino writes files into volumes through it
    (the archive API), and the engine makes them the container user's. With `volumes_from` (a
    created session): that session's copied workspace, as the cell user, so cells own their
    files (the session's own user is its init's). With `support_volume`: mino's volume, at
    :data:`SUPPORT_DIR`, as root, so no cell can change what is in it. Nothing ever runs in it."""
    if (volumes_from is None) == (support_volume is None):
        raise ValueError("a loader is for a session's volumes or for the support volume")
    spec = inspection_spec(name=name, image=image, labels=labels, limits=limits, engine=engine)
    if volumes_from is not None:
        spec["volumes_from"] = [volumes_from]
    else:
        spec["user"] = "0:0"
        spec["volumes"] = [{"Name": support_volume, "Dest": SUPPORT_DIR, "Options": ["nosuid", "nodev"]}]
    return spec


# ---------------------------------------------------------------------------- the execs mino makes
# Every process mino starts in a container is built by one of the functions below.

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


def cell_exec(script: str, *, env: Mapping[str, str], from_file: bool = False) -> dict:
    """A cell: the script (or, `from_file`, the path of a script under /run/mino) run by
    ``/bin/bash`` itself, as the cell user in /workspace. The exec'd bash is the leader of its
    own session and process group (the engine starts it so), which mino signals from outside
    (:mod:`mino_jupyter.procs`). The cell keeps the image's PATH for the commands it runs."""
    argv = [BASH, "--noprofile", "--norc", script] if from_file else \
        [BASH, "--noprofile", "--norc", "-c", script, "mino-cell"]
    return exec_body(argv, env={**env, "BASH_ENV": ""})


def executor_exec() -> dict:
    """The session's resident cell executor (:mod:`mino_jupyter.executor`): by absolute path from
    its read-only mount, as the cell user, with nothing in its environment (each cell's comes in
    its request) and its stdin kept open for requests."""
    body = exec_body([EXECUTOR], env={}, workdir="/")
    body["AttachStdin"] = True
    return body


def kill_all_exec(signal: str = "KILL") -> dict:
    """The last resort where no freezer stops a cell that keeps changing pid (rootless on cgroup
    v1), and the way to stop cells where the engine's processes are not this machine's:
    kill(-1) as the cell's uid, which the kernel delivers to every process of that uid in the
    container's PID namespace at once (a process in the middle of a fork dies with its child).
    It ends what earlier cells left running too; mino says so."""
    if signal not in ("INT", "TERM", "KILL"):
        raise ValueError(f"signal must be INT, TERM or KILL, not {signal!r}")
    return exec_body(["/bin/kill", f"-{signal}", "-1"])  # procps kill: no "--" before -1


RESOLVE_SCRIPT = 'for n; do printf "@@mino-name %s\\n" "$n"; getent ahosts -- "$n" || :; done'


def resolve_exec(names: Sequence[str]) -> dict:
    """Names resolved on an engine's own machine (``getent``, in a container of mino's image that
    runs nothing else): the names travel as arguments, never in the script."""
    return exec_body([BASH, "--noprofile", "--norc", "-c", RESOLVE_SCRIPT, "mino-resolve", *names],
                     env={"BASH_ENV": ""})


def addresses_exec() -> dict:
    """The addresses of the network namespace it runs in (a host-network helper: the engine's
    machine), from the kernel's own tables: nothing resolves or connects."""
    return exec_body(["/bin/cat", "/proc/net/fib_trie", "/proc/net/if_inet6"])


def probe_exec(script: str) -> dict:
    """A check mino runs in a container of its own (image verification, doctor)."""
    return exec_body([BASH, "--noprofile", "--norc", "-c", script], env={"BASH_ENV": ""})


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
    workspace: str = "overlay"  # overlay | ro | rw
    resources: Resources = Resources()
    package_cache: bool = True
    toolchain: str | None = None  # "python" or "node" when the image is one of mino's toolchains


@dataclass(frozen=True)
class HostFacts:
    """What mino found and prepared on this host for a new session (gathered, not decided)."""

    limits: HostLimits
    storage: StorageMounts | CopiedStorage | None = None
    ca_bundle: str | None = None  # a checked host path, or None
    caches: Mapping[str, str] | None = None  # cache name ("pip", "npm") -> host directory
    project: str | None = None  # the project's key (its caches are its own)
    seccomp_profile: str | None = None
    kernel_id: str | None = None
    engine: EngineFacts = ROOTFUL
    executor: str | None = None  # host directory of the cell executor, None: one exec per cell
    lease: int | None = None  # an engine elsewhere: the containers end themselves without renewals


# The package caches of each toolchain: (cache name, path in the container).
PACKAGE_CACHES = {
    "python": (("pip", f"{HOME}/.cache/pip"),),
    "node": (("npm", f"{HOME}/.npm"),),
}


def package_caches(toolchain: str | None, enabled: bool) -> tuple[tuple[str, str], ...]:
    return PACKAGE_CACHES.get(toolchain or "", ()) if enabled else ()


@dataclass(frozen=True)
class SessionShape:
    """A session's container, whole: what is posted, and the labels its firewall shares."""

    request: SessionRequest
    network_labels: Mapping[str, str]


def session_request(name: str, plan, settings: SessionSettings, facts: HostFacts,
                    owner: Mapping[str, str], *, fresh: bool, hosts: Sequence[tuple[str, str]] = (),
                    container_name: str) -> SessionShape:
    """Everything about a new session's container, decided from plain data. `plan` is the
    :class:`mino_jupyter.network.NetworkPlan`; `hosts` are the allowlist's resolved names."""
    identity = {
        "io.mino.session": name,
        "io.mino.network": plan.describe(),
        **({"io.mino.kernel-id": facts.kernel_id} if facts.kernel_id else {}),
    }
    allowlist = plan.mode == "allowlist"
    container_labels = {**identity, **({"io.mino.project": facts.project} if facts.project else {})}
    caches = tuple(Mount(facts.caches[cache], path) for cache, path in
                   package_caches(settings.toolchain, settings.package_cache) if facts.caches and cache in facts.caches)
    request = SessionRequest(
        name=container_name,
        image=settings.image,
        network="bridge" if allowlist else plan.mode,
        labels=labels("fresh" if fresh else "session", owner, container_labels),
        limits=facts.limits,
        storage=facts.storage,
        ca_bundle=facts.ca_bundle,
        hosts=tuple(hosts),
        no_dns=allowlist,
        resources=settings.resources,
        caches=caches,
        seccomp_profile=facts.seccomp_profile,
        engine=facts.engine,
        executor=facts.executor,
        lease=facts.lease,
    )
    return SessionShape(request, labels("firewall", owner, identity))
