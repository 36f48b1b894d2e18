"""Facts about this machine that a new session needs: gathered here, decided elsewhere.

* the CA bundle to pass in, checked to be what it claims (a regular file, not a link a cell could
  have planted, not writable by others);
* default limits from the machine's size (memory, cores, free disk);
* mino's seccomp profile, derived from the engine's default and written once per content;
* a container's PID namespace and its memory cgroup's OOM-kill count, read from ``/proc`` and
  the cgroup filesystem: what the kernel itself says happened;
* the local engine's ``exit_command_delay``, read from the containers.conf files Podman reads;
* whether the engine is on this machine (its processes ours): only then do mino's binds and
  mounts reach its containers; elsewhere sessions get a copy (:mod:`mino_jupyter.copied`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from pathlib import Path

from . import mounts, policy, seccomp
from .errors import UsageError

HOST_CA_BUNDLES = ("/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt",
                   "/etc/ssl/cert.pem")


def ca_bundle(setting: str | None) -> str | None:
    """The host path of the CA bundle to mount, or None. "auto": the first system bundle."""
    if not setting or setting == "none":
        return None
    if setting == "auto":
        for path in HOST_CA_BUNDLES:
            if os.path.isfile(path):
                return _checked_bundle(path, automatic=True)
        return None
    if not os.path.isfile(setting):
        raise UsageError(f"ca_bundle {setting} does not exist", 'set container.ca_bundle to "auto", "none" or a file')
    return _checked_bundle(setting, automatic=False)


def _checked_bundle(path: str, *, automatic: bool) -> str | None:
    """The bundle's real path, once that path holds a regular file owned by root or by us that
    nobody else may write (Podman mounts by path: it must be what we checked)."""
    real = os.path.realpath(path)
    try:
        st = os.lstat(real)
    except OSError:
        return None
    ok = stat.S_ISREG(st.st_mode) and st.st_uid in (0, os.geteuid()) and not st.st_mode & 0o022
    if ok:
        return real
    if automatic:
        return None
    raise UsageError(f"ca_bundle {path} is not a regular file owned by root or you and writable only by its owner",
                     'fix its owner and mode, or set container.ca_bundle to "auto" or "none"')


def default_resources(disk_free: int) -> policy.Resources:
    """Limits from this machine's size (`disk_free`: where session disks live)."""
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return policy.default_resources(mem_total, os.cpu_count() or 1, disk_free)


def disk_free(where: Path) -> int:
    """Free bytes on the filesystem that holds `where` (its nearest existing ancestor: nothing is
    created to ask)."""
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def seccomp_profile(state: Path) -> str | None:
    """mino's profile (:mod:`mino_jupyter.seccomp`) as a file named by its content's hash."""
    for candidate in seccomp.DEFAULT_PROFILE_PATHS:
        try:
            text = _derived(candidate, os.stat(candidate).st_mtime_ns)
        except (OSError, ValueError):
            continue
        target = state / "seccomp" / f"mino-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
        if _read_no_follow(target) != text:  # made now, or changed since (never trusted by its name)
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        return str(target)
    return None


def _read_no_follow(path: Path) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
        return f.read()


@functools.lru_cache(maxsize=4)
def _derived(path: str, _mtime_ns: int) -> str:
    """Derived once per version of the engine's default profile (every session start asks)."""
    return seccomp.profile_text(json.loads(Path(path).read_text()))


def pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def oom_kills(cgroup_path: str | None) -> int | None:
    """How many processes the kernel's OOM killer ended in a container's memory cgroup."""
    if not cgroup_path:
        return None
    rel = cgroup_path.lstrip("/")
    for path, key in ((f"/sys/fs/cgroup/memory/{rel}/memory.oom_control", "oom_kill"),
                      (f"/sys/fs/cgroup/{rel}/memory.events", "oom_kill")):
        try:
            for line in Path(path).read_text().splitlines():
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


IP = ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip")


def host_addresses() -> list[tuple[str, int]]:
    """Every address of this machine's interfaces, with its prefix length (`ip -j addr`)."""
    import subprocess

    binary = next((p for p in IP if os.access(p, os.X_OK)), None)
    if binary is None:
        raise UsageError("iproute2 (`ip`) is missing; mino needs it to know this machine's addresses",
                         "apt-get install iproute2 (`make setup` does)")
    out = subprocess.run([binary, "-j", "addr", "show"], env=mounts.HELPER_ENV, capture_output=True, text=True,
                         timeout=10, cwd="/").stdout
    return [(a["local"], int(a["prefixlen"])) for link in json.loads(out or "[]")
            for a in link.get("addr_info", []) if a.get("local")]


def nameservers(resolv_conf: str | None) -> list[str]:
    """The name servers a container was given (its resolv.conf, as Podman wrote it)."""
    try:
        text = Path(resolv_conf).read_text() if resolv_conf else ""
    except OSError:
        return []
    return nameservers_in(text)


def nameservers_in(text: str) -> list[str]:
    import ipaddress

    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(str(ipaddress.ip_address(fields[1].split("%")[0])))
            except ValueError:
                continue
    return found


def seen_from_sessions(kind: policy.EngineFacts, networks: list[dict],
                       engine_addresses: list[tuple[str, int]] | None = None) -> list[str]:
    """The engine's machine as a bridge session reaches it: the bridge gateway (rootful); with
    a rootless engine the bridge lives in the user's own network namespace and the machine is
    its first global address, through slirp4netns (what Podman writes for
    `host.containers.internal`): this machine's, or `engine_addresses` for an engine elsewhere."""
    if kind.rootless:
        return primary_address(engine_addresses)
    return [n["gateway"] for net in networks if net.get("name") == "podman"
            for n in net.get("subnets", []) if n.get("gateway")]


def primary_address(addresses: list[tuple[str, int]] | None = None) -> list[str]:
    """The first global IPv4 address of this machine (or of `addresses`): what rootless Podman
    calls `host.containers.internal`; or nothing."""
    import ipaddress

    for address, _prefix in host_addresses() if addresses is None else addresses:
        ip = ipaddress.ip_address(address)
        if ip.version == 4 and not (ip.is_loopback or ip.is_link_local):
            return [address]
    return []


SUBID_FILES = ("/etc/subuid", "/etc/subgid")
SUBID_NEEDED = 65536  # a Debian rootfs uses IDs up to 65534 (nobody); fewer cannot hold it


def subid_count(text: str, user: str, uid: int) -> int:
    """How many subordinate IDs an /etc/subuid-style file grants `user` (by name or by uid)."""
    total = 0
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (user, str(uid)):
            continue
        try:
            total += max(int(fields[2]), 0)
        except ValueError:
            continue
    return total


def free_subid_start(texts, floor: int = 100000) -> int:
    """The first subordinate ID above every range already granted (so ranges never overlap)."""
    end = floor
    for text in texts:
        for line in text.splitlines():
            fields = line.strip().split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                end = max(end, int(fields[1]) + int(fields[2]))
    return end


def _read_or_none(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        return ""  # no file: nobody has a range
    except OSError:
        return None  # unreadable here: leave the judgement to newuidmap


def subordinate_ids_problem(user: str | None = None, uid: int | None = None, files: tuple[str, ...] = SUBID_FILES,
                            read=None, *, purpose: str = "rootless Podman") -> UsageError | None:
    """None when the user has a full subordinate uid and gid range (rootless Podman maps the
    image's users and the container's PID 1 into it), else the error to show, with a fix that
    proposes a range above every one already granted."""
    import pwd

    uid = os.getuid() if uid is None else uid
    if user is None:
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
    texts = {path: text for path in files if (text := (read or _read_or_none)(path)) is not None}
    start = free_subid_start(texts.values())
    span = f"{start}-{start + SUBID_NEEDED - 1}"
    hint = f"as root: usermod --add-subuids {span} --add-subgids {span} {user}, then `podman system migrate` as that user"
    for path, text in texts.items():
        count = subid_count(text, user, uid)
        if count == 0:
            return UsageError(f"user {user} has no subordinate ID range in {path}, which {purpose} needs", hint)
        if count < SUBID_NEEDED:
            return UsageError(f"user {user} has only {count} subordinate IDs in {path}; {purpose} needs "
                              f"{SUBID_NEEDED}", hint)
    return None


PODMAN_EXIT_COMMAND_DELAY = 300  # containers/common's default, in seconds


def exit_command_delay(files: list[Path]) -> tuple[int, Path | None]:
    """(seconds, the file that set it, None for Podman's default): how long the engine keeps each
    finished exec's record and conmon processes. The last file that sets it wins."""
    import tomlkit

    value, source = PODMAN_EXIT_COMMAND_DELAY, None
    for path in files:
        try:
            engine = tomlkit.parse(path.read_text(encoding="utf-8")).get("engine", {})
        except (OSError, ValueError, tomlkit.exceptions.ParseError):
            continue
        if isinstance(engine.get("exit_command_delay"), int):
            value, source = int(engine["exit_command_delay"]), path
    return value, source


# ---------------------------------------------------------------------------- where the engine is

def engine_elsewhere(engine) -> str | None:
    """None when the engine's containers live on this machine, where mino binds its files and
    mounts into them; else, in a few words, why not (then sessions get a copy,
    :mod:`mino_jupyter.copied`). Only a Podman process of this machine, in our mount namespace
    or rootless (whose namespace mino mounts into), sees the overlays and disks mino mounts here:
    an engine over tcp:// or ssh://, behind a forwarded socket (a virtual machine, ``podman
    machine``) or in another mount namespace would resolve the same paths on its own side, even
    where a share makes some of them look alike."""
    if engine.processes_here():
        return None
    if not engine.endpoint.local:
        return "it is reached over the network"
    if engine.service_pid() is None:
        return "its socket has no process of this machine behind it"
    return "its socket's process is not a Podman of this machine's mount namespace"
