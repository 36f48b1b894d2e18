"""The runtime layer: Podman through its REST API service (podman-py's client).

It finds the API socket, starts the service itself when nothing answers (and says so), and turns
every way of not reaching Podman into one :class:`PodmanUnavailable` with a hint. It posts the
specs that :mod:`mino_jupyter.policy` builds and adds none of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import resource
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Mapping

from . import ssh as ssh_engine
from .errors import ImageMissing, MinoError, PodmanUnavailable
from .paths import state_dir
from .policy import EngineFacts, HostLimits

ROOTFUL_SOCKET = "/run/podman/podman.sock"
SERVICE_START_TIMEOUT = 15.0
PING_TIMEOUT = 3.0
STDOUT, STDERR = 1, 2

Notify = Callable[[str], None]


# --------------------------------------------------------------------------- discovery (pure)

@dataclass(frozen=True)
class Endpoint:
    url: str  # unix:///path or tcp://host:port or ssh://... (as the user gave it)
    source: str  # where it came from, for messages
    socket_path: str | None  # local unix socket we may start a service on, else None
    may_autostart: bool
    problem: str | None = None  # why the default socket's directory cannot be used (one line)
    # The engine runs on this machine behind a unix socket: its process, /proc and namespaces are
    # ours to read (limits, mounts, the session's network namespace). False for tcp:// and ssh://.
    local: bool = True
    ssh: ssh_engine.Target | None = None  # an ssh:// engine: mino forwards a local socket to it


RUNTIME_DIR_HINT = ("unset XDG_RUNTIME_DIR (Podman then uses /run/user/$(id -u) or /tmp/podman-run-$(id -u)), "
                    "or `sudo install -d -m 700 -o $USER /run/user/$(id -u)` and "
                    "`export XDG_RUNTIME_DIR=/run/user/$(id -u)`; on systemd hosts `loginctl enable-linger $USER` "
                    "keeps it between logins")


def _private_dir_problem(path: str, uid: int, *, must_exist: bool) -> str | None:
    """None when `path` is a directory of `uid` that nobody else may write (or may be made)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} does not exist" if must_exist else None
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    if not os.path.isdir(path):
        return f"{path} is not a directory"
    if st.st_uid != uid:
        try:
            import pwd
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = f"uid {st.st_uid}"
        return f"{path} belongs to {owner}, not to you (uid {uid})"
    if st.st_mode & 0o022:
        return f"{path} may be written by others (mode {st.st_mode & 0o777:o})"
    return None


def runtime_dir(env: Mapping[str, str], uid: int) -> tuple[str, str | None]:
    """Podman's own rule for a rootless user's runtime directory (``GetRuntimeDir``):
    ``$XDG_RUNTIME_DIR``; else ``/run/user/UID`` when it is the user's own; else
    ``$TMPDIR/podman-run-UID``. Returns the directory and, when it cannot be used, why."""
    given = env.get("XDG_RUNTIME_DIR", "").strip()
    if given:
        problem = _private_dir_problem(given, uid, must_exist=True)
        return given, (f"XDG_RUNTIME_DIR={given} cannot hold the Podman socket: "
                       f"{problem.removeprefix(given + ' ')}" if problem else None)
    run_user = f"/run/user/{uid}"
    if os.path.isdir(run_user) and _private_dir_problem(run_user, uid, must_exist=True) is None:
        return run_user, None
    fallback = os.path.join(env.get("TMPDIR") or "/tmp", f"podman-run-{uid}")
    problem = _private_dir_problem(fallback, uid, must_exist=False)
    return fallback, (f"no runtime directory for the Podman socket: XDG_RUNTIME_DIR is not set, "
                      f"{run_user} is missing and {problem}" if problem else None)


def discover(env: Mapping[str, str], uid: int) -> Endpoint:
    """Which Podman API endpoint to use, as Podman itself finds it.

    ``CONTAINER_HOST`` wins and is used as given (never auto-started: the user chose it). Else
    the rootful socket for root, the rootless one in the user's runtime directory
    (:func:`runtime_dir`) for everyone else; mino may start the service on those.
    """
    explicit, source, identity = env.get("CONTAINER_HOST", "").strip(), "CONTAINER_HOST", None
    if not explicit and env.get("CONTAINER_CONNECTION", "").strip():
        name = env["CONTAINER_CONNECTION"].strip()
        explicit, identity = ssh_engine.connection(name, containers_conf_files(env, uid, user=True),
                                                   connections_file(env))
        source = f"the Podman connection {name}"
    if explicit:
        parsed = urllib.parse.urlparse(explicit)
        if parsed.scheme in ("ssh", "http+ssh"):
            target = ssh_engine.parse(explicit, env.get("CONTAINER_SSHKEY") or identity)
            return Endpoint(explicit, source, None, may_autostart=False, local=False, ssh=target)
        path = parsed.path if parsed.scheme == "unix" else None
        return Endpoint(explicit, source, path, may_autostart=False, local=parsed.scheme == "unix")
    if uid == 0:
        return Endpoint(f"unix://{ROOTFUL_SOCKET}", "rootful default", ROOTFUL_SOCKET, may_autostart=True)
    directory, problem = runtime_dir(env, uid)
    path = f"{directory}/podman/podman.sock"
    return Endpoint(f"unix://{path}", "rootless default (the runtime directory)", path, may_autostart=True,
                    problem=problem)


def client_url(url: str) -> str:
    """podman-py wants http+unix:// for unix sockets."""
    if url.startswith("unix://"):
        return "http+unix://" + url[len("unix://"):]
    return url


def connections_file(env) -> Path:
    """Where Podman 5 keeps `podman system connection` entries."""
    if env.get("PODMAN_CONNECTIONS_CONF"):
        return Path(env["PODMAN_CONNECTIONS_CONF"])
    home = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")).expanduser() / ".config")
    return home / "containers" / "podman-connections.json"


def containers_conf_files(env, uid: int | None = None, *, user: bool | None = None) -> list[Path]:
    """The containers.conf files a local Podman 4 reads, lowest precedence first: the
    ``CONTAINERS_CONF`` file alone when set; else the distribution's, the admin's and its
    drop-ins, then (rootless only, or `user`: connections are kept there for root too) the
    user's file and drop-ins."""
    env = os.environ if env is None else env
    if env.get("CONTAINERS_CONF"):
        return [Path(env["CONTAINERS_CONF"])]
    files = [Path("/usr/share/containers/containers.conf"), Path("/etc/containers/containers.conf")]
    files += sorted(Path("/etc/containers/containers.conf.d").glob("*.conf"))
    if user if user is not None else (os.getuid() if uid is None else uid) != 0:
        home = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME", "~")).expanduser() / ".config")
        files.append(home / "containers" / "containers.conf")
        files += sorted((home / "containers" / "containers.conf.d").glob("*.conf"))
    return files


# --------------------------------------------------------------------------- limits

def _read_proc_limits(pid: int) -> HostLimits | None:
    try:
        text = Path(f"/proc/{pid}/limits").read_text()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        for key, label in (("nofile", "Max open files"), ("nproc", "Max processes")):
            if line.startswith(label):
                hard = line[len(label):].split()[1]
                found[key] = -1 if hard == "unlimited" else int(hard)
    if len(found) == 2:
        return HostLimits(**found)
    return None


def _own_limits() -> HostLimits:
    def hard(which: int) -> int:
        value = resource.getrlimit(which)[1]
        return -1 if value == resource.RLIM_INFINITY else value

    return HostLimits(nofile=hard(resource.RLIMIT_NOFILE), nproc=hard(resource.RLIMIT_NPROC))


def _is_podman(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("podman")
    except OSError:
        return False


def _same_ns(pid: int, kind: str) -> bool:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino == os.stat(f"/proc/self/ns/{kind}").st_ino


def _podman_holding(path: str | None, proc: Path = Path("/proc")) -> int | None:
    """A Podman process of this machine that holds the listening socket at `path` (a service
    that systemd started with the socket it listens on)."""
    if not path:
        return None
    inode = None
    try:
        for line in (proc / "net" / "unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[7] == path and fields[5] == "01":  # listening
                inode = fields[6]
    except OSError:
        return None
    if inode is None:
        return None
    wanted = f"socket:[{inode}]"
    for entry in proc.iterdir():
        if not entry.name.isdigit() or not _is_podman(int(entry.name)):
            continue
        try:
            if any(os.readlink(fd) == wanted for fd in (entry / "fd").iterdir()):
                return int(entry.name)
        except OSError:
            continue
    return None


def _socket_peer_pid(path: str) -> int | None:
    """The pid of the process serving a unix socket (SO_PEERCRED), when it is local."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(path)
            creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, _uid, _gid = struct.unpack("3i", creds)
            return pid or None
    except OSError:
        return None


def min_limits(a: HostLimits, b: HostLimits | None) -> HostLimits:
    if b is None:
        return a

    def lower(x: int, y: int) -> int:
        if x < 0:
            return y
        if y < 0:
            return x
        return min(x, y)

    return HostLimits(nofile=lower(a.nofile, b.nofile), nproc=lower(a.nproc, b.nproc))


# --------------------------------------------------------------------------- the engine

CGROUP_CONTROLLERS = frozenset({"memory", "pids", "cpu"})


def engine_facts(info: Mapping) -> EngineFacts:
    """From the engine's ``/info``: rootless, and whether the memory, CPU and process limits are
    applied (rootful always; rootless only on cgroup v2 with those controllers delegated)."""
    host = info.get("host") or {}
    rootless = bool((host.get("security") or {}).get("rootless"))
    applies = (not rootless) or (host.get("cgroupVersion") == "v2"
                                 and CGROUP_CONTROLLERS <= set(host.get("cgroupControllers") or ()))
    return EngineFacts(rootless=rootless, cgroup_limits=applies, cgroup_version=str(host.get("cgroupVersion") or "?"))


def frames(read: Callable[[int], bytes]) -> Iterator[tuple[int, bytes]]:
    """Podman's multiplexed stream: frames of an 8-byte header (stream, 3 bytes padding, length)
    and a payload. The one parser for execs, attaches and logs; ends at a short read."""
    while True:
        header = read(8)
        if len(header) < 8:
            return
        kind, size = struct.unpack(">BxxxL", header)
        payload = read(size) if size else b""
        if len(payload) < size:
            return
        if payload:
            yield (kind if kind in (STDOUT, STDERR) else STDOUT), payload


class ExecStream:
    """A running exec: iterate ``(stream, bytes)`` frames from a background reader thread.

    Reading happens on a thread so the caller's thread stays free to take KeyboardInterrupt and
    to enforce deadlines; the queue is bounded, so a slow consumer slows the producer instead of
    piling output up in memory.
    """

    _EOF = object()

    def __init__(self, engine: "Engine", exec_id: str, response):
        self.engine = engine
        self.exec_id = exec_id
        self._response = response
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._pump, name=f"mino-exec-{exec_id[:8]}", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        raw = self._response.raw
        try:
            for frame in frames(lambda n: _read_exact(raw, n)):
                self._queue.put(frame)
        except Exception:  # the connection was torn down (closing, engine gone): end of stream
            pass
        finally:
            self._queue.put(self._EOF)

    def get(self, timeout: float | None) -> tuple[int, bytes] | None:
        """Next frame; None at the end of the stream. Raises queue.Empty on timeout."""
        item = self._queue.get(timeout=timeout)
        if item is self._EOF:
            self._queue.put(self._EOF)  # stay at EOF for later callers
            return None
        return item

    def idle(self) -> bool:
        """True when no frame is waiting right now."""
        return self._queue.empty()

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        while (item := self.get(None)) is not None:
            yield item

    def close(self) -> None:
        try:
            self._response.close()
        except Exception:
            pass

    def exit_code(self, wait: float = 5.0) -> int | None:
        """The exec's exit code once it has ended (None if it is still running after `wait`)."""
        deadline = time.monotonic() + wait
        while True:
            info = self.engine.exec_inspect(self.exec_id)
            if not info:
                return None  # forgotten by the engine: the exit code is unknown
            if not info.get("Running") and info.get("ExitCode") is not None:
                return int(info["ExitCode"])
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)


class Attached:
    """A hijacked attach to a container's main process: write its stdin, read its framed output."""

    def __init__(self, sock: socket.socket, leftover: bytes = b""):
        self.sock = sock
        self._buf = leftover

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the attached process closed its output")
            self._buf += chunk
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def read_until(self, marker: bytes, timeout: float = 30.0) -> tuple[bytes, bytes]:
        """(stdout, stderr) up to and including the line that starts with `marker` on stdout."""
        self.sock.settimeout(timeout)
        out, err = bytearray(), bytearray()
        for kind, payload in frames(self._read):
            (err if kind == STDERR else out).extend(payload)
            if kind != STDERR:
                at = out.find(marker)
                if at >= 0 and out.find(b"\n", at) >= 0:
                    return bytes(out), bytes(err)
        raise ConnectionError("the attached process closed its output")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _json_items(response) -> Iterator[dict]:
    """Podman's streamed progress: one JSON document per line."""
    for line in response.iter_lines():
        if line:
            yield json.loads(line)


def _read_exact(raw, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = raw.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


class Engine:
    """A connected Podman API service."""

    def __init__(self, endpoint: Endpoint, client, started_service: bool = False):
        self.endpoint = endpoint
        self.client = client
        self.api = client.api
        self.started_service = started_service
        self.forward: ssh_engine.Forward | None = None  # an ssh:// engine's forward (its own socket)
        self._processes_here: bool | None = None
        self.limits_probed = False
        self.support: dict[tuple, tuple] = {}
        self.addresses: list[tuple[str, int]] | None = None  # copied.engine_addresses's answer  # copied.support_volume's answers (engines elsewhere)
        self._limits: HostLimits | None = None
        self._facts: EngineFacts | None = None
        self._thread = threading.local()  # per thread: sessions may start on two at once (a spare)

    # ----------------------------------------------------------------- connecting
    @classmethod
    def connect(cls, env: Mapping[str, str] | None = None, *, autostart: bool = True,
                notify: Notify | None = None) -> "Engine":
        env = os.environ if env is None else env
        endpoint = discover(env, os.geteuid())
        try:
            import podman  # noqa: F401
        except ImportError as exc:  # pragma: no cover - dependency of the package
            raise PodmanUnavailable("the podman Python package (podman-py) is not installed",
                                    "pip install podman") from exc
        if endpoint.ssh is not None:
            return cls._through_ssh(endpoint, env)
        problem = _ping(endpoint)
        started = False
        if problem is not None and endpoint.problem:
            raise PodmanUnavailable(endpoint.problem, RUNTIME_DIR_HINT)
        if problem is not None:
            if not (autostart and endpoint.may_autostart):
                raise PodmanUnavailable(
                    f"cannot reach the Podman API at {endpoint.url} ({endpoint.source}): {problem}",
                    _unreachable_hint(endpoint),
                )
            log = start_service(endpoint)
            problem = _wait_for_service(endpoint, SERVICE_START_TIMEOUT)
            if problem is not None:
                raise PodmanUnavailable(
                    f"started the Podman API service at {endpoint.url} but it does not answer: {problem}",
                    f"see its log {log}; `podman info` shows what Podman itself says",
                )
            started = True
            if notify:
                notify(f"mino: started the Podman API service at {endpoint.url} (log: {log})")
        from podman import PodmanClient

        client = PodmanClient(base_url=client_url(endpoint.url), timeout=60)
        return cls(endpoint, client, started)

    @classmethod
    def _through_ssh(cls, endpoint: Endpoint, env: Mapping[str, str]) -> "Engine":
        """An ssh:// engine through mino's own forward (:mod:`mino_jupyter.ssh`): the client, and
        every raw connection (attach, exec), use the forwarded socket like a local one."""
        from podman import PodmanClient

        forward = ssh_engine.Forward(endpoint.ssh, env)
        forward.open(ping=_ping_unix)
        client = PodmanClient(base_url=client_url(f"unix://{forward.socket}"), timeout=60)
        engine = cls(replace(endpoint, socket_path=forward.socket), client)
        engine.forward = forward
        return engine

    @property
    def api_url(self) -> str:
        """Where this process talks to the engine: the endpoint, or the ssh forward's socket."""
        return f"unix://{self.forward.socket}" if self.forward is not None else self.endpoint.url

    @property
    def warnings(self) -> Callable[[str, list[str]], None] | None:
        """Who hears Podman's warnings when this thread creates a container: (name, warnings)."""
        return getattr(self._thread, "warnings", None)

    @warnings.setter
    def warnings(self, hear: Callable[[str, list[str]], None] | None) -> None:
        self._thread.warnings = hear

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
        if self.forward is not None:
            self.forward.close()

    # ----------------------------------------------------------------- plumbing
    def request(self, method: str, path: str, *, what: str, ok_missing: bool = False, ok_exists: bool = False,
                 **kwargs):
        from podman.errors import APIError

        forward = self.forward
        through = forward.generation if forward is not None else 0
        try:
            try:
                response = getattr(self.api, method)(path, **kwargs)
            except APIError:
                if forward is None or (forward.alive() and forward.generation == through):
                    raise
                # the ssh forward died (the network dropped): once more, through the one ssh that
                # replaces it (started here, or by another thread that found it dead too)
                forward.revive(ping=_ping_unix)
                response = getattr(self.api, method)(path, **kwargs)
        except APIError as exc:
            raise PodmanUnavailable(
                f"lost the Podman API at {self.endpoint.url} while trying to {what}: {exc}",
                _unreachable_hint(self.endpoint),
            ) from exc
        if ok_missing and (response.status_code == 404 or (
                response.status_code >= 400 and "no such" in _api_message(response).lower())):
            return None  # also a container removed while we looked ("does not exist in database")
        if ok_exists and response.status_code >= 400 and (
                response.status_code == 409 or "already exists" in _api_message(response).lower()):
            return None
        if response.status_code >= 400:
            raise MinoError(f"Podman could not {what}: {_api_message(response)}",
                            "`mino-jupyter doctor` checks the whole stack")
        return response

    # ----------------------------------------------------------------- facts
    def version(self) -> str:
        data = self.request("get", "/version", what="report its version").json()
        return data.get("Version") or data.get("Components", [{}])[0].get("Version", "?")

    def info(self) -> dict:
        return self.request("get", "/info", what="report host information").json()

    def facts(self) -> EngineFacts:
        """Rootless or not, and whether it applies cgroup limits: asked once per connection."""
        if self._facts is None:
            self._facts = engine_facts(self.info())
        return self._facts

    def service_pid(self) -> int | None:
        """The API service's process on this machine (its namespaces are the containers'), or
        None when the engine is not a local unix socket."""
        return _socket_peer_pid(self.endpoint.socket_path) if self.endpoint.local and self.endpoint.socket_path else None

    def processes_here(self) -> bool:
        """Are the engine's containers' processes this machine's (the pids it reports are ours to
        read in /proc and to signal)? Only when its socket's peer is a Podman process here, in
        our mount namespace or rootless (whose namespace mino enters). A forwarded socket's peer
        (ssh, a virtual machine's proxy) is not Podman; tcp:// and ssh:// engines have no peer.
        Every pid the engine reports is used on this machine only when this holds: elsewhere it
        names some other process of this machine."""
        if self._processes_here is None:
            pid = self.service_pid()
            if pid and not _is_podman(pid):  # socket activation: the peer is systemd, which passed the socket on
                pid = _podman_holding(self.endpoint.socket_path)
            here = False
            if pid:
                try:
                    here = _same_ns(pid, "pid") and (self.facts().rootless or _same_ns(pid, "mnt"))
                except OSError:
                    here = False
            self._processes_here = here
        return self._processes_here

    def host_limits(self) -> HostLimits:
        """Hard limits containers may ask for: the service's own (when local) and ours."""
        if self._limits is None:
            limits = _own_limits()
            pid = self.service_pid()
            if pid:
                limits = min_limits(limits, _read_proc_limits(pid))
            self._limits = limits
        return self._limits

    def learn_limits(self, limits: HostLimits) -> None:
        """What a probe through the engine found it allows (an engine elsewhere, whose
        process's limits cannot be read here): every later spec asks for no more."""
        self._limits = limits
        self.limits_probed = True

    def image_exists(self, ref: str) -> bool:
        response = self.request("get", f"/images/{_quote(ref)}/exists",
                                 what=f"look up image {ref}", ok_missing=True)
        return response is not None

    def image_inspect(self, ref: str) -> dict | None:
        response = self.request("get", f"/images/{_quote(ref)}/json",
                                 what=f"inspect image {ref}", ok_missing=True)
        return None if response is None else response.json()

    def require_image(self, ref: str) -> None:
        if not self.image_exists(ref):
            raise ImageMissing(f"image {ref} is not present in Podman's local storage",
                               "build it with `mino-jupyter image build` (works offline), "
                               "or pull it with `podman pull`")

    def pull(self, ref: str, timeout: float = 120) -> Iterator[dict]:
        """Pull an image; yields Podman's JSON progress items (an "error" item on failure)."""
        response = self.request("post", "/images/pull", params={"reference": ref, "quiet": "false"},
                                stream=True, timeout=(10, timeout), what=f"pull {ref}")
        return _json_items(response)

    def import_image(self, ref: str, chunks: Iterator[bytes]) -> None:
        """Import a root filesystem tarball (streamed) as image `ref`."""
        self.request("post", "/images/import", params={"reference": ref}, data=chunks,
                     headers={"Content-Type": "application/x-tar"}, timeout=(10, 600), what=f"import {ref}")

    def build(self, params: Mapping[str, str], context: bytes) -> Iterator[dict]:
        """Build from a tar context; yields Podman's JSON progress items."""
        response = self.request("post", "/build", params=dict(params), data=context,
                                headers={"Content-Type": "application/x-tar"}, stream=True,
                                timeout=(10, 1800), what=f"build {params.get('t')}")
        return _json_items(response)

    def tag(self, source: str, target: str) -> None:
        repo, _, tag = target.rpartition(":")
        self.request("post", f"/images/{_quote(source)}/tag", params={"repo": repo, "tag": tag},
                     what=f"tag {target}")

    def untag(self, ref: str) -> None:
        repo, _, tag = ref.rpartition(":")
        self.request("post", f"/images/{_quote(ref)}/untag", params={"repo": repo, "tag": tag},
                     what=f"untag {ref}", ok_missing=True)

    def remove_image(self, ref: str) -> None:
        self.request("delete", f"/images/{_quote(ref)}", params={"force": "true"},
                     what=f"remove {ref}", ok_missing=True)

    # ----------------------------------------------------------------- volumes and networks
    def network(self, name: str) -> dict:
        return self.request("get", f"/networks/{_quote(name)}/json", what=f"inspect network {name}").json()

    def networks(self) -> list[dict]:
        return self.request("get", "/networks/json", what="list networks").json()

    def create_network(self, spec: dict) -> None:
        self.request("post", "/networks/create", data=json.dumps(spec),
                     headers={"Content-Type": "application/json"}, what=f"create network {spec.get('name')}")

    def volume(self, name: str) -> dict | None:
        response = self.request("get", f"/volumes/{_quote(name)}/json", what=f"inspect volume {name}",
                                ok_missing=True)
        return None if response is None else response.json()

    def create_volume(self, name: str, labels: Mapping[str, str]) -> bool:
        """True if made now, False if a volume of that name was there already."""
        response = self.request("post", "/volumes/create", data=json.dumps({"Name": name, "Label": dict(labels)}),
                                headers={"Content-Type": "application/json"}, what=f"create volume {name}",
                                ok_exists=True)
        return response is not None

    def remove_unused_volumes(self, labels: Mapping[str, str | None]) -> list[str]:
        """Volumes carrying these labels that no container uses (the engine refuses the others)."""
        wanted = [k if v is None else f"{k}={v}" for k, v in labels.items()]
        found = self.request("get", "/volumes/json", params={"filters": json.dumps({"label": wanted})},
                             what="list volumes").json()
        removed = []
        for volume in found:
            try:
                self.request("delete", f"/volumes/{_quote(volume['Name'])}", what=f"remove volume {volume['Name']}",
                             ok_missing=True)
                removed.append(volume["Name"])
            except MinoError:
                continue  # in use
        return removed

    def remove_network(self, name: str) -> None:
        self.request("delete", f"/networks/{_quote(name)}", what=f"remove network {name}", ok_missing=True)

    # ----------------------------------------------------------------- containers
    def create(self, spec: dict) -> str:
        response = self.request("post", "/containers/create", data=json.dumps(spec),
                                 headers={"Content-Type": "application/json"},
                                 what=f"create container {spec.get('name')}")
        reply = response.json()
        if reply.get("Warnings") and self.warnings:
            self.warnings(str(spec.get("name")), [str(w) for w in reply["Warnings"]])
        return reply["Id"]

    def start(self, cid: str) -> None:
        self.request("post", f"/containers/{cid}/start", what=f"start container {cid[:12]}")

    def kill(self, cid: str) -> None:
        """SIGKILL the container's init: everything in its PID namespace ends (missing is fine)."""
        self.request("post", f"/containers/{cid}/kill", params={"signal": "KILL"},
                     what=f"kill container {cid[:12]}", ok_missing=True)

    def run(self, spec: dict) -> str:
        """Create and start; remove again if the start fails (nothing half-made is left)."""
        cid = self.create(spec)
        try:
            self.start(cid)
        except BaseException:
            self.remove(cid)
            raise
        return cid

    def inspect(self, cid: str) -> dict | None:
        response = self.request("get", f"/containers/{cid}/json", what=f"inspect {cid[:12]}",
                                 ok_missing=True)
        return None if response is None else response.json()

    def remove(self, cid: str, timeout: int = 0) -> None:
        """Force-remove (stop with `timeout` seconds of grace first), with the containers that
        depend on it (an allowlist session's firewall container). Missing is fine."""
        for attempt in range(5):
            try:
                self.request("delete", f"/containers/{cid}",
                             # `volumes` (libpod's name; `v` is the Docker API's and libpod ignores it):
                             # the container's anonymous volumes go with it
                             params={"force": "true", "volumes": "true", "depend": "true", "timeout": str(timeout)},
                             what=f"remove container {cid[:12]}", ok_missing=True)
                return
            except MinoError as exc:
                # A dependent container that exits while Podman stops it ("container state
                # improper"), or that another removal (a parallel sweep) is taking away meanwhile
                # ("dependency exists"): once more, when it is gone.
                if not ("state improper" in exc.message or "dependency exists" in exc.message) or attempt == 4:
                    raise
                time.sleep(0.1 * (attempt + 1))

    def list(self, labels: Mapping[str, str | None]) -> list[dict]:
        """Containers (running or not) carrying all these labels (None = any value)."""
        wanted = [k if v is None else f"{k}={v}" for k, v in labels.items()]
        response = self.request("get", "/containers/json",
                                 params={"all": "true", "filters": json.dumps({"label": wanted})},
                                 what="list containers")
        return response.json()

    def get_archive(self, cid: str, path: str) -> bytes | None:
        """A tar of a path in a (created or running) container; None when the path is missing.
        The engine reads it from the container's filesystem; nothing runs inside."""
        response = self.request("get", f"/containers/{cid}/archive", params={"path": path},
                                what=f"read {path} from {cid[:12]}", ok_missing=True)
        return None if response is None else response.content

    @contextlib.contextmanager
    def archive_stream(self, cid: str, path: str):
        """Like :meth:`get_archive`, as a stream (a file-like object) that is never held whole
        in memory; None when the path is missing."""
        response = self.request("get", f"/containers/{cid}/archive", params={"path": path}, stream=True,
                                what=f"read {path} from {cid[:12]}", ok_missing=True)
        try:
            if response is not None:
                response.raw.decode_content = True
            yield None if response is None else response.raw
        finally:
            if response is not None:
                response.close()

    def put_archive(self, cid: str, path: str, data) -> None:
        """Unpack a tar (bytes or a file object) at a directory of a created or running
        container. The engine writes the files with the container's user as their owner."""
        self.request("put", f"/containers/{cid}/archive", params={"path": path}, data=data,
                     headers={"Content-Type": "application/x-tar"}, what=f"copy files to {path} in {cid[:12]}")

    # ----------------------------------------------------------------- exec
    def exec_create(self, cid: str, body: dict) -> str:
        response = self.request("post", f"/containers/{cid}/exec", data=json.dumps(body),
                                headers={"Content-Type": "application/json"},
                                what=f"start a process in {cid[:12]}")
        return response.json()["Id"]

    def exec_attach(self, exec_id: str) -> ExecStream:
        """Start a created exec and stream its output."""
        started = self.request("post", f"/exec/{exec_id}/start",
                               data=json.dumps({"Detach": False, "Tty": False}),
                               headers={"Content-Type": "application/json"},
                               stream=True, timeout=(10, None), what="start a process")
        return ExecStream(self, exec_id, started)

    def exec_start(self, cid: str, body: dict) -> ExecStream:
        return self.exec_attach(self.exec_create(cid, body))

    def attach(self, cid: str, timeout: float = 10.0) -> Attached:
        """Attach to a running container's stdin/stdout/stderr over a raw connection (HTTP upgrade).

        Works for unix:// and tcp:// endpoints; raises MinoError otherwise (callers fall back).
        """
        return self._upgrade(f"containers/{cid}/attach?stdin=true&stdout=true&stderr=true&stream=true",
                             None, f"attach to {cid[:12]}", timeout, blocking=False)

    def exec_hijack(self, exec_id: str, timeout: float = 10.0) -> Attached:
        """Start an exec created with AttachStdin and keep its stdin: a raw two-way connection."""
        return self._upgrade(f"exec/{exec_id}/start", {"Detach": False, "Tty": False}, "start a process", timeout,
                             blocking=True)

    def _upgrade(self, path: str, body: dict | None, what: str, timeout: float, *, blocking: bool) -> Attached:
        """POST to an API path that upgrades to a raw stream (unix:// and tcp:// engines).
        `blocking`: reads then wait as long as it takes (a reader thread's), else `timeout`."""
        url = urllib.parse.urlparse(self.api_url)
        data = b"" if body is None else json.dumps(body).encode()
        try:
            if url.scheme == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(url.path)
            elif url.scheme == "tcp":
                sock = socket.create_connection((url.hostname, url.port or 80), timeout=timeout)
            else:
                raise MinoError(f"cannot {what}: a raw connection needs a unix:// or tcp:// engine, not {url.scheme}://")
            sock.sendall(f"POST {self.api.path_prefix}{path} HTTP/1.1\r\nHost: d\r\nConnection: Upgrade\r\n"
                         f"Upgrade: tcp\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                         .encode() + data)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(4096)
                if not chunk:
                    raise MinoError(f"cannot {what}: the engine closed the connection")
                head += chunk
        except OSError as exc:
            raise MinoError(f"cannot {what}: {exc}") from exc
        header, _, leftover = head.partition(b"\r\n\r\n")
        status = header.split(b"\r\n", 1)[0]
        if b" 101 " not in status and b" 200 " not in status:
            sock.close()
            raise MinoError(f"cannot {what}: {status.decode(errors='replace')}")
        if blocking:
            sock.settimeout(None)
        return Attached(sock, leftover)

    def exec_inspect(self, exec_id: str) -> dict:
        """An exec's state; {} once Podman has forgotten it (exit_command_delay seconds after it
        ended: a stop that took longer than that, for one)."""
        response = self.request("get", f"/exec/{exec_id}/json", what="read an exec's state", ok_missing=True)
        return {} if response is None else response.json()

    def exec_run(self, cid: str, body: dict) -> tuple[int, bytes, bytes]:
        """Run to completion; returns (exit code, stdout, stderr)."""
        stream = self.exec_start(cid, body)
        out, err = [], []
        for kind, data in stream:
            (err if kind == STDERR else out).append(data)
        code = stream.exit_code()
        stream.close()
        return (-1 if code is None else code), b"".join(out), b"".join(err)


# --------------------------------------------------------------------------- the service

def _ping_unix(path: str) -> str | None:
    """None when an API service answers /_ping on this unix socket, else a short reason."""
    if not os.path.exists(path):
        return "no socket there"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(PING_TIMEOUT)
            s.connect(path)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: d\r\n\r\n")
            reply = s.recv(64)
    except OSError as exc:
        return exc.strerror or str(exc)
    if not reply.startswith(b"HTTP/1.") or b" 200" not in reply[:16]:
        return f"unexpected answer {reply[:32]!r}" if reply else "the connection closed without an answer"
    return None


def _ping(endpoint: Endpoint) -> str | None:
    """None when the API answers, else a short reason."""
    if endpoint.url.startswith("unix://"):
        return _ping_unix(endpoint.socket_path or "")
    parsed = urllib.parse.urlparse(endpoint.url)
    if parsed.scheme == "tcp":
        import http.client

        try:
            conn = http.client.HTTPConnection(parsed.hostname or "", parsed.port or 80,
                                              timeout=PING_TIMEOUT)
            conn.request("GET", "/_ping")
            status = conn.getresponse().status
            conn.close()
        except OSError as exc:
            return exc.strerror or str(exc)
        return None if status == 200 else f"HTTP {status} from /_ping"
    if parsed.scheme in ("ssh", "http+ssh"):
        return None  # answered through mino's forward (Engine._through_ssh), never directly
    return f"unsupported scheme {parsed.scheme!r} (valid: unix://, tcp://, ssh://)"


def _wait_for_service(endpoint: Endpoint, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    problem = _ping(endpoint)
    while problem is not None and time.monotonic() < deadline:
        time.sleep(0.1)
        problem = _ping(endpoint)
    return problem


NO_ENGINE_HINT = ("on your own Linux machine: install Podman (`apt-get install podman`, `dnf install podman`), "
                  "then `mino-jupyter doctor`; or clone the repository and run `make demo`. Hosted notebook "
                  "services such as Binder cannot run containers: read the saved outputs there")


def podman_binary() -> str:
    path = shutil.which("podman")
    if not path:
        raise PodmanUnavailable("no container engine here: podman is not installed and no Podman API "
                                "socket answers", NO_ENGINE_HINT)
    return path


def start_service(endpoint: Endpoint) -> Path:
    """Start `podman system service` on the endpoint's socket, detached from us."""
    binary = podman_binary()
    assert endpoint.socket_path
    log = state_dir() / "podman-service.log"
    try:
        Path(endpoint.socket_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.path.exists(endpoint.socket_path) and _ping(endpoint) is not None:
            os.unlink(endpoint.socket_path)  # stale socket from a dead service
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab")
    except OSError as exc:
        raise PodmanUnavailable(f"cannot start the Podman API service at {endpoint.url}: "
                                f"{exc.strerror or exc} ({exc.filename or endpoint.socket_path})",
                                RUNTIME_DIR_HINT if os.geteuid() != 0 else
                                "run `mino-jupyter doctor`, or start it yourself: "
                                f"`podman system service --time=0 {endpoint.url} &`") from None
    with out:
        # cwd "/": the service (and every conmon it starts) must not sit in the caller's
        # directory, which may be a notebook folder that is deleted later; conmon then fails
        # with "Failed to get working directory" and no container starts.
        subprocess.Popen(
            [binary, "system", "service", "--time=0", endpoint.url],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd="/",
            start_new_session=True, close_fds=True,
        )
    return log


def _unreachable_hint(endpoint: Endpoint) -> str:
    if not endpoint.may_autostart:
        return (f"check that a Podman service listens on {endpoint.url}, or unset CONTAINER_HOST "
                f"to use the local default")
    return (f"start it with `podman system service --time=0 {endpoint.url} &`, "
            "or run `mino-jupyter doctor`")


def _api_message(response) -> str:
    try:
        data = response.json()
        message = data.get("message") or data.get("cause") or response.text
    except ValueError:
        message = response.text
    return re.sub(r"\s+", " ", str(message)).strip()[:400]
