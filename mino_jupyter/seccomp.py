"""mino's seccomp profile: Podman's default, minus new namespaces for cell processes.

What it refuses, and why:

- ``unshare`` (EPERM) and ``clone`` with any namespace flag. An unprivileged process that
  makes a new *user* namespace gets a full capability set inside it (``unshare -r`` makes it
  "root"), and with that it can make mount, network, IPC, UTS, PID, cgroup and time
  namespaces of its own. That is no escape by itself: the capabilities count only inside the
  new namespace, and the container's own limits (cap-drop ALL, no-new-privileges, uid 1000)
  still hold outside it. But it opens the whole kernel attack surface reachable only with
  CAP_SYS_ADMIN / CAP_NET_ADMIN "in a user namespace": mounting filesystems, netfilter and
  packet sockets, and a long record of privilege-escalation bugs there. A notebook cell has
  no use for it, so it gets none of it.
- ``setns`` (EPERM): joining an existing namespace is the other half of the same door.
- ``ptrace``, ``process_vm_readv``, ``process_vm_writev``, ``pidfd_getfd`` (EPERM): reaching into
  another process. Every process of a session runs as the same uid, so without this a process
  an earlier cell left could trace a later cell (change its exit code, its output) or read its
  memory; the session's executor is closed to them already (it is not dumpable), this is the
  second lock. The cost: no ``strace`` or ``gdb`` inside a cell.
- ``clone3`` (ENOSYS): seccomp can inspect only register arguments, and clone3 passes its
  flags in a struct in memory, so its flags cannot be checked. ENOSYS ("not implemented")
  makes glibc, musl, Go, Node and Python fall back to ``clone``, whose flags are checked.

``clone`` itself stays allowed when its flags hold none of the namespace bits (``fork``,
``vfork``, threads, ``posix_spawn``, ``subprocess``, ``multiprocessing``). A ``clone`` with a
namespace bit matches no rule and so gets the profile's default action (Podman's is ENOSYS).
The flags are argument 0, except on s390/s390x, where the kernel takes the stack first and
the flags second. CLONE_NEWTIME (0x80) lies in the exit-signal byte of the legacy ``clone``
flags, so the kernel never reads it as a namespace flag there; it is in the mask anyway, as a
belt to the braces (no valid exit signal has that bit set).

What stays: everything else of Podman's default, unchanged and in its order: every other
rule, ``defaultAction``, ``defaultErrnoRet``, ``archMap`` and any other key. The refused names
are taken out of every rule that allows them (the unconditional allow list and the
capability-conditional ones); rules that refuse them are left as they are. mino's own rules,
each with a ``comment``, are appended at the end.

Pure: a profile dict in, a profile dict out; reading and writing files is the caller's job.
"""

from __future__ import annotations

import copy
import json

DEFAULT_PROFILE_PATHS = ("/usr/share/containers/seccomp.json", "/etc/containers/seccomp.json")

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

NAMESPACE_FLAGS = (CLONE_NEWTIME | CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC
                   | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET)

TRACING = ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd")
REFUSED = ("clone", "clone3", "setns", "unshare") + TRACING

ENOSYS = 38
EPERM = 1

# Actions under which the syscall goes ahead (LOG runs it, then logs it).
_ALLOWING = {"SCMP_ACT_ALLOW", "SCMP_ACT_LOG"}
_S390 = ["s390", "s390x"]


def _rule(names: list[str], action: str, comment: str, *, args: list | None = None,
          includes: dict | None = None, excludes: dict | None = None,
          errno_ret: int | None = None) -> dict:
    rule = {
        "names": names,
        "action": action,
        "args": args or [],
        "comment": comment,
        "includes": includes or {},
        "excludes": excludes or {},
    }
    if errno_ret is not None:
        rule["errnoRet"] = errno_ret
    return rule


def _clone_flags_arg(index: int) -> list[dict]:
    # SCMP_CMP_MASKED_EQ: (arg & value) == valueTwo, i.e. none of the namespace bits set.
    return [{"index": index, "value": NAMESPACE_FLAGS, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]


def _mino_rules() -> list[dict]:
    return [
        _rule(["clone"], "SCMP_ACT_ALLOW",
              "mino: clone only without namespace flags (processes and threads, no new namespaces)",
              args=_clone_flags_arg(0), excludes={"arches": list(_S390)}),
        _rule(["clone"], "SCMP_ACT_ALLOW",
              "mino: clone only without namespace flags; s390 passes the flags as argument 1",
              args=_clone_flags_arg(1), includes={"arches": list(_S390)}),
        _rule(["clone3"], "SCMP_ACT_ERRNO",
              "mino: clone3 flags cannot be inspected; ENOSYS makes libc fall back to clone",
              errno_ret=ENOSYS),
        _rule(["unshare", "setns"], "SCMP_ACT_ERRNO",
              "mino: no new or joined namespaces (a user namespace would open its kernel attack surface)",
              errno_ret=EPERM),
        _rule(list(TRACING), "SCMP_ACT_ERRNO",
              "mino: no reaching into another process of the session (all run as one uid)",
              errno_ret=EPERM),
    ]


def _check(default: object) -> None:
    if not isinstance(default, dict):
        raise ValueError(f"not a seccomp profile: expected a JSON object, got {type(default).__name__}")
    syscalls = default.get("syscalls")
    if not isinstance(syscalls, list):
        raise ValueError('not a seccomp profile: it has no "syscalls" list')
    for i, rule in enumerate(syscalls):
        if not isinstance(rule, dict):
            raise ValueError(f"not a seccomp profile: syscalls[{i}] is not an object")
        names = rule.get("names")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f'not a seccomp profile: syscalls[{i}]["names"] is not a list of names')


def derive(default: dict) -> dict:
    """Podman's default profile in, mino's profile out (the input is not modified)."""
    _check(default)
    out = copy.deepcopy(default)
    kept = []
    for rule in out["syscalls"]:
        if rule.get("action") not in _ALLOWING:
            kept.append(rule)
            continue
        if rule.get("name") in REFUSED:  # the old one-name form
            continue
        names = rule.get("names")
        if names is not None and any(n in REFUSED for n in names):
            rule["names"] = [n for n in names if n not in REFUSED]
            if not rule["names"] and not rule.get("name"):
                continue  # nothing left to allow
        kept.append(rule)
    out["syscalls"] = kept + _mino_rules()
    return out


def profile_text(default: dict) -> str:
    """The derived profile as stable text, so its file can be named after a hash of it."""
    return json.dumps(derive(default), sort_keys=True, indent=1)
