"""Facts about this machine that a new session needs: gathered here, decided elsewhere.

* the CA bundle to pass in, checked to be what it claims (a regular file, not a link a cell could
  have planted, not writable by others);
* default limits from the machine's size (memory, cores, free disk);
* mino's seccomp profile, derived from the engine's default and written once per content;
* a container's PID namespace and its memory cgroup's OOM-kill count, read from ``/proc`` and
  the cgroup filesystem: what the kernel itself says happened;
* the local engine's ``exit_command_delay``, read from the containers.conf files Podman reads;
* whether the engine sees this machine's files where a session needs them (an engine on another
  machine, or in another mount namespace, does not: its bind mounts would be its own files).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import stat
from pathlib import Path

from . import mounts, policy, seccomp
from .errors import MinoError, UsageError

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


def seen_from_sessions(kind: policy.EngineFacts, networks: list[dict]) -> list[str]:
    """This machine's address as a bridge session reaches it: the bridge gateway (rootful); with
    a rootless engine the bridge lives in the user's own network namespace and this machine is
    its first global address, through slirp4netns (what Podman writes for
    `host.containers.internal`)."""
    if kind.rootless:
        return primary_address()
    return [n["gateway"] for net in networks if net.get("name") == "podman"
            for n in net.get("subnets", []) if n.get("gateway")]


def primary_address() -> list[str]:
    """This machine's first global IPv4 address (what rootless Podman calls
    `host.containers.internal`), or nothing."""
    import ipaddress

    for address, _prefix in host_addresses():
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


# ---------------------------------------------------------------------------- the engine's view of our files

def engine_files_problem(engine, state: Path, notebook_dir: Path, image: str, labels: dict) -> str | None:
    """None when the engine sees this machine's files where sessions need them: mino's state
    directory (the sessions' disks, overlays, the executor, the seccomp profile) and the notebook's
    directory; else what it sees instead, in a few words. Asked once per engine connection and
    pair of directories.

    Every session binds paths of this machine into its container, and the engine resolves them on
    *its* machine: an engine elsewhere (tcp://, ssh://, a forwarded unix socket) or in another
    mount namespace would give the cell its own files at those paths (or none), silently. The
    default local engine, its service in our mount namespace (or rootless, whose namespace mino
    mounts into), sees ours by construction; any other is asked: a container that is created and
    never started binds both directories, and mino reads back through the engine a token it just
    wrote in the first and the second's stat (its mtime to the nanosecond, which must be this
    machine's before or after the look: a file saved there meanwhile moves it). The notebook's
    directory is only looked at. Only a yes is kept: the next session asks again after a no.
    """
    key = (str(state), str(notebook_dir))
    if key in engine.files_seen:
        return None
    pid = engine.service_pid() if engine.endpoint.may_autostart else None  # the default socket, not one named
    if pid and (engine.facts().rootless or _same_mounts(pid)):
        engine.files_seen[key] = None
        return None
    probe = state / "engine-probe"
    probe.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = hashlib.sha256(os.urandom(32)).hexdigest()
    token_file = probe / f"token-{token[:16]}"
    token_file.write_text(token)
    try:
        before = _mtime_ns(notebook_dir)
        try:
            cid = engine.create(policy.files_probe_spec(
                name=f"mino-probe-{os.getpid()}-{token[:8]}", image=image, labels=policy.labels("verify", labels),
                limits=engine.host_limits(), directories=[str(probe), str(notebook_dir)], engine=engine.facts()))
        except MinoError as exc:  # "statfs ...: no such file or directory": not there at all
            return f"it has no {probe} or {notebook_dir} ({exc.message[:120]})"
        try:
            data = engine.get_archive(cid, f"{policy.PROBE_DIR}/0/{token_file.name}")
            seen = engine.path_stat(cid, f"{policy.PROBE_DIR}/1")
        finally:
            engine.remove(cid)
        if data is None or tar_member(data) != token.encode():
            return f"its {probe} is another directory than this machine's"
        if seen is None or not seen.get("isDir") or _stat_mtime_ns(seen) not in (before, _mtime_ns(notebook_dir)):
            return f"its {notebook_dir} is another directory than this machine's"
    finally:
        token_file.unlink(missing_ok=True)
    engine.files_seen[key] = None
    return None


def _same_mounts(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat("/proc/self/ns/mnt").st_ino
    except OSError:
        return False


def tar_member(data: bytes, limit: int = 256) -> bytes | None:
    """The first regular file of a tar (up to `limit` bytes), or None."""
    import io
    import tarfile

    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            member = next((m for m in tar.getmembers() if m.isfile()), None)
            return tar.extractfile(member).read(limit) if member is not None else None
    except (tarfile.TarError, OSError):
        return None


def _mtime_ns(path: Path) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)$")


def _stat_mtime_ns(seen: dict) -> int | None:
    """The engine's mtime (RFC 3339, nanoseconds, in the engine's own time zone) as ns since the epoch."""
    import datetime

    match = _RFC3339.match(str(seen.get("mtime", "")))
    if not match:
        return None
    whole, fraction, zone = match.groups()
    stamp = datetime.datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    return int(stamp.timestamp()) * 10**9 + int((fraction or "").ljust(9, "0"))
