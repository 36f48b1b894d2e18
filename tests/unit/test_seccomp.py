"""The seccomp profile: Podman's default minus new namespaces, everything else kept."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from mino_jupyter import seccomp

TRACING = {"ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd"}
REFUSED = {"unshare", "setns", "clone", "clone3"} | TRACING
ALLOWING = {"SCMP_ACT_ALLOW", "SCMP_ACT_LOG"}
NS_BITS = {
    "CLONE_NEWNS": 0x20000, "CLONE_NEWCGROUP": 0x2000000, "CLONE_NEWUTS": 0x4000000,
    "CLONE_NEWIPC": 0x8000000, "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x80,
}
SIGCHLD = 17
CLONE_THREAD_FLAGS = 0x3D0F00  # what glibc's pthread_create passes: VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|SETTLS|...
REAL = Path("/usr/share/containers/seccomp.json")


def _rule(names, action="SCMP_ACT_ALLOW", **extra):
    return {"names": list(names), "action": action, "args": [], "comment": "", "includes": {}, "excludes": {},
            **extra}


def synthetic() -> dict:
    """Shaped like Podman's: an unconditional allow list, capability-conditional pairs, odd corners."""
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 38,
        "archMap": [{"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}],
        "someFutureKey": {"kept": True},
        "syscalls": [
            _rule(["bdflush", "vm86"], "SCMP_ACT_ERRNO", errnoRet=1),
            _rule(["read", "clone", "write", "unshare", "clone3", "setns", "mount", "fork"]),
            _rule(["personality"], args=[{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]),
            _rule(["bpf", "setns", "unshare"], includes={"caps": ["CAP_SYS_ADMIN"]}),
            _rule(["bpf", "setns"], "SCMP_ACT_ERRNO", excludes={"caps": ["CAP_SYS_ADMIN"]}, errnoRet=1),
            _rule(["clone3"], includes={"caps": ["CAP_SYS_ADMIN"]}),  # empty once cleaned: dropped
            {"name": "unshare", "action": "SCMP_ACT_ALLOW", "args": []},  # the old one-name form
            {"name": "getpid", "action": "SCMP_ACT_ALLOW", "args": []},
            _rule(["clone"], "SCMP_ACT_LOG"),
            _rule(["s390_runtime_instr"], includes={"arches": ["s390", "s390x"]}),
        ],
    }


def _profiles():
    yield pytest.param(synthetic, id="synthetic")
    yield pytest.param(lambda: {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [_rule(["read", "write"])]},
                       id="no-namespace-rules")
    yield pytest.param(lambda: {"syscalls": []}, id="empty")
    yield pytest.param(_real, id="podman-default", marks=pytest.mark.skipif(not REAL.exists(), reason=f"{REAL} absent"))


def _real() -> dict:
    return json.loads(REAL.read_text())


PROFILES = list(_profiles())


def _names(rule: dict) -> list[str]:
    return list(rule.get("names") or []) + ([rule["name"]] if rule.get("name") else [])


def _applies(rule: dict, arch: str, caps: set[str]) -> bool:
    inc, exc = rule.get("includes") or {}, rule.get("excludes") or {}
    if inc.get("arches") and arch not in inc["arches"]:
        return False
    if exc.get("arches") and arch in exc["arches"]:
        return False
    if inc.get("caps") and not set(inc["caps"]) <= caps:
        return False
    if exc.get("caps") and set(exc["caps"]) & caps:
        return False
    return True


def _args_match(rule: dict, argv: list[int]) -> bool:
    for cond in rule.get("args") or []:
        value, op = argv[cond["index"]], cond["op"]
        if op == "SCMP_CMP_MASKED_EQ" and value & cond["value"] != cond.get("valueTwo", 0):
            return False
        if op == "SCMP_CMP_EQ" and value != cond["value"]:
            return False
        if op == "SCMP_CMP_NE" and value == cond["value"]:
            return False
    return True


def _allowed(profile: dict, name: str, arch: str, caps: set[str], argv: list[int]) -> bool:
    """Whether some allowing rule matches this call (the refusals are checked separately)."""
    return any(rule["action"] in ALLOWING and name in _names(rule) and _applies(rule, arch, caps)
               and _args_match(rule, argv) for rule in profile["syscalls"])


def _allowing_uses(profile: dict) -> dict[str, list[str]]:
    """name -> the allowing rules (without their names) that name it, in order."""
    uses: dict[str, list[str]] = {}
    for rule in profile["syscalls"]:
        if rule.get("action") in ALLOWING:
            rest = json.dumps({k: v for k, v in rule.items() if k not in ("names", "name")}, sort_keys=True)
            for name in _names(rule):
                uses.setdefault(name, []).append(rest)
    return uses


def _mino_rules(out: dict, name: str) -> list[dict]:
    return [r for r in out["syscalls"] if name in _names(r) and r.get("comment", "").startswith("mino:")]


@pytest.mark.parametrize("make", PROFILES)
def test_no_unconditional_allow_for_namespace_syscalls(make):
    out = seccomp.derive(make())
    for rule in out["syscalls"]:
        if rule["action"] in ALLOWING:
            assert not (set(_names(rule)) & {"unshare", "setns", "clone3"}), rule
            if "clone" in _names(rule):
                assert rule["args"] and rule["comment"].startswith("mino:"), rule


@pytest.mark.parametrize("make", PROFILES)
def test_clone_allowed_only_without_namespace_bits_on_both_arch_groups(make):
    out = seccomp.derive(make())
    rules = _mino_rules(out, "clone")
    assert len(rules) == 2
    mask = sum(NS_BITS.values())
    by_index = {r["args"][0]["index"]: r for r in rules}
    assert set(by_index) == {0, 1}
    for index, rule in by_index.items():
        assert rule["action"] == "SCMP_ACT_ALLOW"
        assert rule["args"] == [{"index": index, "value": mask, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]
    assert by_index[0]["excludes"] == {"arches": ["s390", "s390x"]} and by_index[0]["includes"] == {}
    assert by_index[1]["includes"] == {"arches": ["s390", "s390x"]} and by_index[1]["excludes"] == {}

    for arch, flag_index in (("amd64", 0), ("arm64", 0), ("x86", 0), ("s390x", 1), ("s390", 1)):
        for caps in (set(), {"CAP_SYS_ADMIN"}):
            def call(flags):
                argv = [0] * 6
                argv[flag_index] = flags
                return _allowed(out, "clone", arch, caps, argv)

            assert call(SIGCHLD), (arch, caps)
            assert call(CLONE_THREAD_FLAGS), (arch, caps)
            for bit_name, bit in NS_BITS.items():
                assert not call(SIGCHLD | bit), (arch, caps, bit_name)
                assert not call(CLONE_THREAD_FLAGS | bit), (arch, caps, bit_name)


@pytest.mark.parametrize("make", PROFILES)
def test_clone3_is_enosys_and_unshare_setns_are_eperm(make):
    out = seccomp.derive(make())
    (clone3,) = _mino_rules(out, "clone3")
    assert (clone3["action"], clone3["errnoRet"], clone3["args"]) == ("SCMP_ACT_ERRNO", 38, [])
    for name in ("unshare", "setns"):
        (rule,) = _mino_rules(out, name)
        assert (rule["action"], rule["errnoRet"], rule["args"]) == ("SCMP_ACT_ERRNO", 1, [])
        assert rule["includes"] == {} and rule["excludes"] == {}
    (tracing,) = [r for r in out["syscalls"] if r.get("comment", "").startswith("mino:") and "ptrace" in r["names"]]
    assert (sorted(tracing["names"]), tracing["action"], tracing["errnoRet"]) == (sorted(TRACING), "SCMP_ACT_ERRNO", 1)
    for name in ("unshare", "setns", "clone3", *TRACING):
        for arch in ("amd64", "s390x"):
            for caps in (set(), {"CAP_SYS_ADMIN"}):
                assert not _allowed(out, name, arch, caps, [0] * 6), (name, arch, caps)


@pytest.mark.parametrize("make", PROFILES)
def test_every_other_syscall_keeps_exactly_its_allowing_rules(make):
    default = make()
    before, after = _allowing_uses(default), _allowing_uses(seccomp.derive(default))
    assert {n: u for n, u in before.items() if n not in REFUSED} == {n: u for n, u in after.items() if n not in REFUSED}
    assert set(after) - set(before) <= REFUSED


@pytest.mark.parametrize("make", PROFILES)
def test_everything_else_is_kept_in_order(make):
    default = make()
    out = seccomp.derive(default)
    assert {k: v for k, v in out.items() if k != "syscalls"} == {k: v for k, v in default.items() if k != "syscalls"}
    added = [r for r in out["syscalls"] if r.get("comment", "").startswith("mino:")]
    assert out["syscalls"][-len(added):] == added and len(added) == 5
    assert all(r["comment"] for r in added)

    expected = []
    for rule in default["syscalls"]:
        if rule.get("action") in ALLOWING:
            if rule.get("name") in REFUSED:
                continue
            if "names" in rule:
                rule = {**rule, "names": [n for n in rule["names"] if n not in REFUSED]}
                if not rule["names"]:
                    continue
        expected.append(rule)
    assert out["syscalls"][:-len(added)] == expected


def test_refusing_rules_naming_the_syscalls_are_left_alone():
    out = seccomp.derive(synthetic())
    refusal = _rule(["bpf", "setns"], "SCMP_ACT_ERRNO", excludes={"caps": ["CAP_SYS_ADMIN"]}, errnoRet=1)
    assert refusal in out["syscalls"]
    assert _rule(["bdflush", "vm86"], "SCMP_ACT_ERRNO", errnoRet=1) == out["syscalls"][0]
    assert out["syscalls"][1]["names"] == ["read", "write", "mount", "fork"]
    assert _rule(["bpf"], includes={"caps": ["CAP_SYS_ADMIN"]}) in out["syscalls"]
    assert not any(r.get("names") == [] for r in out["syscalls"])


@pytest.mark.parametrize("make", PROFILES)
def test_input_is_not_modified_and_text_is_deterministic(make):
    default = make()
    snapshot = copy.deepcopy(default)
    first = seccomp.profile_text(default)
    assert default == snapshot
    assert seccomp.profile_text(default) == first
    assert seccomp.profile_text(copy.deepcopy(default)) == first
    reordered = dict(reversed(list(default.items())))
    assert seccomp.profile_text(reordered) == first
    assert json.loads(first) == seccomp.derive(default)
    assert first == json.dumps(seccomp.derive(default), sort_keys=True, indent=1)


@pytest.mark.skipif(not REAL.exists(), reason=f"{REAL} absent")
def test_real_default_really_had_these_in_its_unconditional_allow():
    """Guards the premise: the test above would pass vacuously on a profile without them."""
    unconditional = set()
    for rule in _real()["syscalls"]:
        conditional = rule.get("args") or any((rule.get("includes") or {}).values())
        if rule["action"] == "SCMP_ACT_ALLOW" and not conditional:
            unconditional |= set(_names(rule))
    assert REFUSED <= unconditional


@pytest.mark.parametrize("bad", [
    None, [], "seccomp", 3, {}, {"syscalls": None}, {"syscalls": {"names": ["read"]}},
    {"defaultAction": "SCMP_ACT_ALLOW"},
    {"syscalls": ["read"]}, {"syscalls": [{"names": "clone", "action": "SCMP_ACT_ALLOW"}]},
])
def test_not_a_profile_raises_value_error(bad):
    with pytest.raises(ValueError, match="not a seccomp profile"):
        seccomp.derive(bad)
    with pytest.raises(ValueError):
        seccomp.profile_text(bad)


def test_default_profile_paths():
    assert seccomp.DEFAULT_PROFILE_PATHS == ("/usr/share/containers/seccomp.json", "/etc/containers/seccomp.json")


def test_the_profile_file_is_checked_at_every_use_not_trusted_by_its_name(tmp_path):
    """A file already at the profile's name is what mino wrote only if its content says so (a cell
    could have rewritten it, were the state directory ever reachable)."""
    from mino_jupyter import host

    path = host.seccomp_profile(tmp_path)
    if path is None:
        import pytest
        pytest.skip("no engine default profile on this machine")
    good = open(path).read()
    open(path, "w").write(good.replace("SCMP_ACT_ERRNO", "SCMP_ACT_ALLOW"))
    assert host.seccomp_profile(tmp_path) == path and open(path).read() == good
