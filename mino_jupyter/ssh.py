"""A Podman engine on another machine, reached over ssh: mino's own forward, supervised.

``CONTAINER_HOST=ssh://[USER@]HOST[:PORT]/path/to/podman.sock`` (Podman's own form), or
``CONTAINER_CONNECTION=NAME`` naming a ``podman system connection`` (``[engine.service_destinations]``
in containers.conf: its ``uri`` and ``identity``), or ``CONTAINER_SSHKEY`` for the key, as Podman reads
them. mino does not hand the ssh URL to podman-py (which never pings it and waits up to 300 s on a
dead host, and whose raw attach cannot go over it): it runs the system's ``ssh`` with the user's
keys, agent and ``~/.ssh/config`` (or ``MINO_SSH_CONFIG``), forwarding a unix socket in a private
directory of this machine to the remote API socket, and talks to that socket like a local one.

* **Fail fast**: ``BatchMode`` (never a password prompt nobody can answer), a connect timeout, and a
  ``/_ping`` through the forward: a closed port, an unknown host, a refused key or a remote socket
  that does not answer is one line, within :data:`OPEN_TIMEOUT` seconds.
* **Supervised**: the forward ends with the kernel (a shell between them kills ``ssh`` when the
  kernel's end of a pipe closes, whatever killed the kernel), and a forward that died (the network
  dropped) is opened again at the next request.
* Nothing of the URL reaches a shell or becomes an ssh option: the destination comes after ``--``
  and must not start with ``-``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from .errors import PodmanUnavailable

SSH = "/usr/bin/ssh"
CONNECT_TIMEOUT = 4  # seconds for ssh's own connection (a silent host)
OPEN_TIMEOUT = 5.0  # seconds from starting ssh until the remote API answered /_ping
HINT = ("check `ssh {where}` works without a prompt (keys or an agent; `podman system connection list`), "
        "and that Podman's API service runs there (`systemctl --user enable --now podman.socket`, or "
        "`podman system service --time=0` on that machine)")
# The shell between the kernel and ssh: ssh ends when the kernel's end of the pipe on the shell's
# stdin closes (the kernel exited, or was killed); the shell ends with ssh (its status is ssh's),
# and takes its watcher with it, so no stale pid is ever signalled. (An asynchronous list reads
# /dev/null unless told otherwise: the watcher reads the pipe as fd 3.)
KEEPER = ('ssh="$1"; shift; exec 3<&0; "$ssh" "$@" </dev/null 3<&- & pid=$!; '
          '(read -r _ <&3; kill "$pid" 2>/dev/null) & watcher=$!; exec 3<&-; '
          'wait "$pid"; status=$?; kill "$watcher" 2>/dev/null; exit "$status"')


@dataclass(frozen=True)
class Target:
    """Where the remote API socket is."""

    url: str  # as the user gave it (messages, the watchdog)
    destination: str  # [user@]host
    port: int | None
    socket: str  # the API socket's path on that machine
    identity: str | None = None  # a private key file (CONTAINER_SSHKEY, or the connection's)

    @property
    def where(self) -> str:
        return self.destination + (f" -p {self.port}" if self.port else "")


def parse(url: str, identity: str | None = None) -> Target:
    """An ``ssh://`` URL as Podman writes it; one clear line for anything else."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("ssh", "http+ssh"):
        raise PodmanUnavailable(f"{url} is not an ssh:// URL", "e.g. ssh://user@host/run/user/1000/podman/podman.sock")
    host = parsed.hostname or ""
    if not host or host.startswith("-") or any(c.isspace() for c in parsed.netloc):
        raise PodmanUnavailable(f"no usable host in {url}", "e.g. ssh://user@host/run/podman/podman.sock")
    if not parsed.path or parsed.path == "/":
        raise PodmanUnavailable(f"{url} does not say where the Podman socket is on {host}",
                                "add its path, e.g. ssh://user@host/run/user/1000/podman/podman.sock "
                                "(`podman info --format '{{.Host.RemoteSocket.Path}}'` there shows it)")
    try:
        port = parsed.port
    except ValueError:
        raise PodmanUnavailable(f"the port in {url} is not a number", "e.g. ssh://user@host:2222/run/podman/podman.sock") from None
    user = urllib.parse.unquote(parsed.username) if parsed.username else None
    if user is not None and (not user or user.startswith("-")):
        raise PodmanUnavailable(f"no usable user name in {url}", "e.g. ssh://user@host/run/podman/podman.sock")
    return Target(url=url, destination=f"{user}@{host}" if user else host, port=port, socket=parsed.path,
                  identity=identity)


def command(target: Target, local_socket: str, config: str | None = None) -> list[str]:
    """The ssh command line: a forward only, never a prompt, never a remote command."""
    cmd = [SSH, "-N", "-T",
           "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT}",
           "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3", "-o", "StreamLocalBindUnlink=yes",
           "-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "ClearAllForwardings=no"]
    if config:
        cmd += ["-F", config]
    if target.identity:
        cmd += ["-i", target.identity, "-o", "IdentitiesOnly=yes"]
    if target.port:
        cmd += ["-p", str(target.port)]
    return cmd + ["-L", f"{local_socket}:{target.socket}", "--", target.destination]


def connection(name: str, files: list[Path], connections_json: Path | None = None) -> tuple[str, str | None]:
    """(uri, identity) of a `podman system connection` entry: Podman 5's podman-connections.json
    (what `podman system connection add` and `podman machine init` write), else the last
    containers.conf that has it (Podman 4, and hand-made entries)."""
    import json

    import tomlkit

    try:
        data = json.loads(connections_json.read_text(encoding="utf-8")) if connections_json else {}
        entry = (((data.get("Connection") or {}).get("Connections") or {}).get(name)) if isinstance(data, dict) else None
        if isinstance(entry, dict) and entry.get("URI"):
            return str(entry["URI"]), str(entry["Identity"]) if entry.get("Identity") else None
    except (OSError, ValueError, AttributeError):
        pass
    found = None
    for path in files:
        try:
            data = tomlkit.parse(path.read_text(encoding="utf-8")).unwrap()
        except (OSError, ValueError, tomlkit.exceptions.ParseError):
            continue
        entry = ((data.get("engine") or {}).get("service_destinations") or {}).get(name)
        if isinstance(entry, dict) and entry.get("uri"):
            found = (str(entry["uri"]), str(entry["identity"]) if entry.get("identity") else None)
    if found is None:
        raise PodmanUnavailable(f'no Podman connection named "{name}" (CONTAINER_CONNECTION)',
                                "`podman system connection list` shows the names; unset CONTAINER_CONNECTION "
                                "to use this machine's Podman")
    return found


PREFIX = "mino-ssh-"
STALE_AFTER = 60.0  # seconds: a forward's directory this old with no ssh answering on it was left


def _sweep(tmp: Path) -> None:
    """Remove the directories of forwards that ended without closing (their kernel was killed):
    ours, older than a minute, and their socket does not accept a connection."""
    import socket

    for directory in tmp.glob(PREFIX + "*"):
        try:
            st = directory.lstat()
            if not directory.is_dir() or directory.is_symlink() or st.st_uid != os.geteuid() \
                    or time.time() - st.st_mtime < STALE_AFTER:
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                s.connect(str(directory / "api.sock"))
        except OSError:
            shutil.rmtree(directory, ignore_errors=True)


class Forward:
    """One ssh forward: a local unix socket in a private directory to the remote API socket."""

    def __init__(self, target: Target, env: Mapping[str, str]):
        self.target = target
        self.env = dict(env)
        _sweep(Path(tempfile.gettempdir()))
        self.directory = tempfile.mkdtemp(prefix=PREFIX)  # 0700: the socket is nobody else's
        self.socket = os.path.join(self.directory, "api.sock")
        self._proc: subprocess.Popen | None = None
        self._errors = os.path.join(self.directory, "ssh.err")
        self._opening = threading.Lock()  # threads that find it dead at once start one ssh, not one each
        self.generation = 0  # how many times ssh was started: a request knows whether it went through this one

    def revive(self, ping: Callable[[str], str | None]) -> None:
        """Open it again if its ssh ended; a thread that waited while another one did uses that."""
        with self._opening:
            if not self.alive():
                self._open(ping)

    def open(self, ping: Callable[[str], str | None], timeout: float = OPEN_TIMEOUT) -> None:
        """Start ssh and wait until the remote API answers `ping` through it (None: it did); one
        line when it does not."""
        with self._opening:
            self._open(ping, timeout)

    def _open(self, ping: Callable[[str], str | None], timeout: float = OPEN_TIMEOUT) -> None:
        self._stop()
        self.generation += 1
        os.makedirs(self.directory, mode=0o700, exist_ok=True)  # a failed open removed it
        if not os.access(SSH, os.X_OK):
            raise PodmanUnavailable(f"{self.target.url} needs ssh, and {SSH} is not installed",
                                    "install the OpenSSH client (`apt-get install openssh-client`)")
        config = self.env.get("MINO_SSH_CONFIG") or None
        with open(self._errors, "wb") as errors:
            self._proc = subprocess.Popen(
                ["/bin/sh", "-c", KEEPER, "sh", *command(self.target, self.socket, config)],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=errors, env=self.env, cwd="/",
                close_fds=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._fail(f"ssh ended: {self._said() or f'exit {self._proc.returncode}'}")
            if os.path.exists(self.socket):
                problem = ping(self.socket)
                if problem is None:
                    return
            time.sleep(0.05)
        said = self._said()
        self._fail(f"no answer from its Podman API socket {self.target.socket} within {timeout:.0f} s"
                   + (f" ({said})" if said else ""))

    def _fail(self, why: str) -> None:
        self.close()
        raise PodmanUnavailable(f"cannot reach the Podman API at {self.target.url}: {why}",
                                HINT.format(where=self.target.where))

    def _said(self) -> str:
        try:
            lines = [line.strip() for line in Path(self._errors).read_text(errors="replace").splitlines()
                     if line.strip() and not line.startswith("Warning: Permanently added")]
        except OSError:
            return ""
        return lines[-1][:300] if lines else ""

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.stdin.close()  # the keeper kills ssh
        except OSError:
            pass
        try:
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        try:
            os.unlink(self.socket)
        except OSError:
            pass

    def close(self) -> None:
        self._stop()
        shutil.rmtree(self.directory, ignore_errors=True)
