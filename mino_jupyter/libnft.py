"""This machine's nftables library, called in a session's network namespace without starting ``nft``.

Every cell of a bridge session on a local rootful engine ends with one request for what its
firewall refused (:class:`mino_jupyter.session_firewall.HostRules`). As ``nsenter --net=FD nft``
that costs two execs, about 4.5 ms here (a third of a warm cell); the same command through
libnftables costs about 0.3 ms. It is the library the ``nft`` binary is linked against, so the
commands, their output and their errors are the same.

How it stays contained:

* A **new thread per command** enters the namespace with ``setns(fd, CLONE_NEWNET)`` (a network
  namespace is per thread) and makes its libnftables context there, so its netlink socket is
  the session's. The thread then ends: it is never switched back, so no later work of this
  process can run in a cell's namespace by a failed switch back. It holds its own duplicate
  of the fd and blocks every signal.
* The namespace is the file descriptor :func:`~mino_jupyter.session_firewall.open_netns` checked
  when the session started; nothing is looked up by path here. After ``setns`` the thread checks
  that its namespace is that one before anything runs (in the kernel's own namespace, a ruleset
  would be this machine's firewall).
* The library is loaded by absolute path from this machine's library directories (root's files);
  its commands are mino's own (argv-like words or the ruleset mino generated).
* One command at a time (a lock): libnftables keeps some state per process.

Anything unusual (no library, a failed ``setns``) returns None and the caller runs ``nft`` as
before; a command that does not end in time fails (it could still land later), and the library
is not used again in this process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sysconfig
import threading

CLONE_NEWNET = 0x40000000
OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON: what `nft -j` sets
TIMEOUT = 30.0  # seconds, as HostRules' nft


def _candidates() -> list[str]:
    arch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [f"/usr/lib/{arch}", f"/lib/{arch}"] if arch else []
    return [f"{d}/libnftables.so.1" for d in dirs + ["/usr/lib64", "/usr/lib"]]


class _Library:
    def __init__(self, path: str):
        lib = ctypes.CDLL(path, use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib = lib
        libc = ctypes.CDLL(None, use_errno=True)
        libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        self.setns = libc.setns

    def run(self, command: bytes, json: bool) -> tuple[int, bytes, bytes]:
        lib = self.lib
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise OSError("nft_ctx_new failed")
        try:
            lib.nft_ctx_output_set_flags(ctx, OUTPUT_JSON if json else 0)
            lib.nft_ctx_buffer_output(ctx)
            lib.nft_ctx_buffer_error(ctx)
            rc = lib.nft_run_cmd_from_buffer(ctx, command)
            out = lib.nft_ctx_get_output_buffer(ctx) or b""
            err = lib.nft_ctx_get_error_buffer(ctx) or b""
            return (0 if rc == 0 else 1), out, err
        finally:
            lib.nft_ctx_free(ctx)


_lock = threading.Lock()
_loaded: _Library | None = None
_unusable = False


def _library() -> _Library | None:
    global _loaded, _unusable
    if _loaded is None and not _unusable:
        for path in _candidates():
            if os.path.isfile(path):
                try:
                    _loaded = _Library(path)
                    break
                except (OSError, AttributeError):
                    continue
        _unusable = _loaded is None
    return _loaded


def command(args: tuple[str, ...], stdin: bytes) -> tuple[bytes, bool] | None:
    """The library's form of an ``nft`` command line mino runs: ``-j WORDS...`` or ``-f -``
    (the ruleset on stdin); None for anything else."""
    if args == ("-f", "-"):
        return stdin, False
    json = bool(args) and args[0] == "-j"
    words = args[1:] if json else args
    if not words or any(w.startswith("-") or not w.replace("_", "").isalnum() for w in words):
        return None
    return " ".join(words).encode(), json


def _inside(netns_fd: int) -> bool:
    """This thread's network namespace is the one ``netns_fd`` names (checked before anything
    runs: a ruleset run in the kernel's namespace would be this machine's firewall)."""
    mine, wanted = os.stat("/proc/thread-self/ns/net"), os.fstat(netns_fd)
    return (mine.st_dev, mine.st_ino) == (wanted.st_dev, wanted.st_ino)


def run(netns_fd: int, args: tuple[str, ...], stdin: bytes = b"") -> tuple[int, bytes, bytes] | None:
    """``nft ARGS`` in the network namespace ``netns_fd``, through the library; None when the
    library cannot do it here (the caller then runs ``nft``). A command that does not end
    within :data:`TIMEOUT` raises ConnectionError (it may still land: nothing else may run
    beside it, so the library is not used again and the caller fails closed)."""
    global _unusable
    wanted = command(args, stdin)
    if wanted is None or netns_fd < 0:
        return None
    with _lock:
        lib = None if _unusable else _library()
        if lib is None:
            return None
        answer: list = []
        own = os.dup(netns_fd)  # the thread's own: a session closing its fd meanwhile cannot swap the namespace

        def enter_and_run() -> None:
            try:
                # No signal lands here (a kernel interrupt would cut the library's netlink exchange).
                signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
                if lib.setns(own, CLONE_NEWNET) != 0 or not _inside(own):
                    return  # not (surely) in the session's namespace: nothing runs
                answer.append(lib.run(*wanted))
            except OSError:
                pass
            finally:
                os.close(own)

        thread = threading.Thread(target=enter_and_run, name="mino-nft", daemon=True)
        thread.start()
        thread.join(TIMEOUT)
        if thread.is_alive():
            _unusable = True
            raise ConnectionError(f"nftables did not answer within {TIMEOUT:g} s")
        return answer[0] if answer else None
