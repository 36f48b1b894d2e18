"""The hardening policy, checked on the exact specs and exec bodies it produces."""

import pytest

from mino_jupyter import policy
from mino_jupyter.network import AllowEntry, NetworkPlan
from mino_jupyter.policy import HostLimits, Resources, SessionRequest, StorageMounts

STORAGE = StorageMounts(workspace="/s/ws", workspace_mode="overlay", home="/s/home", tmp="/s/disk/tmp",
                        var_tmp="/s/disk/var-tmp", control="/s/control")


def _spec(network="bridge", **kw):
    return policy.session_spec(SessionRequest(
        name="n", image="img", network=network, labels={"a": "b"}, limits=HostLimits(20000, 96364), **kw))


@pytest.mark.parametrize("hard,expected", [
    (HostLimits(20000, 96364), (20000, 32768)),      # this machine: nofile below the ceiling
    (HostLimits(-1, -1), (65536, 32768)),            # unlimited: the ceilings
    (HostLimits(1024, 512), (1024, 512)),            # small hosts: never above the hard limit
    (HostLimits(1048576, 4194304), (65536, 32768)),
])
def test_ulimits_never_exceed_host_hard_limits(hard, expected):
    nofile, nproc = policy.container_ulimits(hard)
    assert (nofile["hard"], nproc["hard"]) == expected
    assert nofile["soft"] == nofile["hard"] and nproc["soft"] == nproc["hard"]
    assert (nofile["type"], nproc["type"]) == ("nofile", "nproc")
    for value, limit in ((nofile["hard"], hard.nofile), (nproc["hard"], hard.nproc)):
        assert limit < 0 or value <= limit


@pytest.mark.parametrize("network", ["bridge", "host", "none"])
def test_every_mode_is_hardened(network):
    spec = _spec(network, resources=Resources(memory=4 << 30, cpus=1.5, disk=1 << 30, pids=100),
                 seccomp_profile="/state/seccomp/mino-x.json")
    assert spec["cap_drop"] == ["ALL"] and spec["cap_add"] == []
    assert spec["no_new_privileges"] is True
    assert spec["privileged"] is False
    assert spec["resource_limits"] == {"pids": {"limit": 100},
                                       "memory": {"limit": 4 << 30, "swap": 4 << 30},
                                       "cpu": {"quota": 150_000, "period": 100_000}}
    assert spec["read_only_filesystem"] is True
    assert spec["seccomp_profile_path"] == "/state/seccomp/mino-x.json"
    assert spec["user"] == "1001:1001"  # init and its child: not the cell's uid
    assert spec["init"] is True
    assert spec["ipcns"] == {"nsmode": "private"}
    assert spec["netns"] == {"nsmode": network}
    assert spec["work_dir"] == "/workspace"
    assert spec["labels"] == {"a": "b"}


def test_unknown_namespace_mode_is_refused():
    with pytest.raises(ValueError):
        _spec("allowlist")  # allowlist is bridge + firewall, decided above this layer


@pytest.mark.parametrize("resources", [Resources(pids=0), Resources(pids=4097), Resources(memory=1 << 20),
                                       Resources(cpus=0)])
def test_limits_out_of_range_are_refused(resources):
    with pytest.raises(ValueError):
        _spec(resources=resources)


def test_storage_mounts_and_ca_bundle():
    spec = _spec(storage=STORAGE, ca_bundle="/etc/ssl/x.pem")
    by_target = {m["destination"]: m for m in spec["mounts"]}
    assert set(by_target) == {"/workspace", "/home/developer", "/tmp", "/var/tmp", "/run/mino",
                              policy.CONTAINER_CA_BUNDLE}
    assert by_target["/workspace"]["source"] == "/s/ws" and "rw" in by_target["/workspace"]["options"]
    assert by_target["/home/developer"]["source"] == "/s/home"
    assert by_target["/tmp"]["source"] == "/s/disk/tmp"
    assert "ro" in by_target["/run/mino"]["options"] and "ro" in by_target[policy.CONTAINER_CA_BUNDLE]["options"]
    for m in spec["mounts"]:
        assert {"nosuid", "nodev", "rbind"} <= set(m["options"]) and m["type"] == "bind"
    for var in policy.CA_ENV_VARS:
        assert spec["env"][var] == policy.CONTAINER_CA_BUNDLE
    ro = _spec(storage=StorageMounts(**{**STORAGE.__dict__, "workspace": "/nb", "workspace_mode": "ro"}))
    assert "ro" in next(m for m in ro["mounts"] if m["destination"] == "/workspace")["options"]


def test_a_probe_has_no_writable_place():
    spec = _spec("none")
    assert spec["mounts"] == [] and spec["read_only_filesystem"] is True


def test_allowlist_namespace_has_hosts_and_no_dns():
    spec = _spec(hosts=[("pypi.org", "1.2.3.4"), ("pypi.org", "2001:db8::1")], no_dns=True)
    assert spec["hostadd"] == ["pypi.org:1.2.3.4", "pypi.org:2001:db8::1"]
    assert spec["dns_server"] == ["127.0.0.1"]  # loopback: the firewall's name server, nothing leaves


def test_firewall_container_holds_net_admin_and_bind_only():
    spec = policy.firewall_spec(name="fw", image="img", target_container="abc", labels={},
                                limits=HostLimits(100, 100), command=("/usr/bin/perl", "-e", "1"),
                                seccomp_profile="/p.json")
    assert spec["cap_drop"] == ["ALL"] and spec["cap_add"] == ["NET_ADMIN", "NET_BIND_SERVICE"]
    assert spec["no_new_privileges"] is True and spec["read_only_filesystem"] is True
    assert spec["netns"] == {"nsmode": "container", "value": "abc"}
    assert [m["destination"] for m in spec["mounts"]] == ["/tmp"] and spec["mounts"][0]["type"] == "tmpfs"
    assert "noexec" in spec["mounts"][0]["options"] and "pidns" not in spec
    assert spec["resource_limits"]["memory"]["limit"] == policy.HELPER_RESOURCES.memory
    assert spec["seccomp_profile_path"] == "/p.json"


def test_the_cell_runs_bin_bash_itself_as_the_cell_user():
    body = policy.cell_exec("echo hi", env={"A": "1"})
    assert body["Cmd"] == ["/bin/bash", "--noprofile", "--norc", "-c", "echo hi", "mino-cell"]
    assert body["Env"] == ["A=1", "BASH_ENV="]
    assert body["User"] == "1000:1000" and body["Privileged"] is False
    assert body["WorkingDir"] == "/workspace"
    assert body["Tty"] is False and body["AttachStdin"] is False
    from_file = policy.cell_exec("/run/mino/cell-1.sh", env={}, from_file=True)
    assert from_file["Cmd"] == ["/bin/bash", "--noprofile", "--norc", "/run/mino/cell-1.sh"]


def test_the_executor_is_mounted_read_only_and_started_by_path_with_nothing_in_its_environment():
    spec = _spec(storage=STORAGE, executor="/state/executor/abc-x86_64")
    (mount,) = [m for m in spec["mounts"] if m["destination"] == policy.EXECUTOR_DIR]
    assert mount == {"type": "bind", "source": "/state/executor/abc-x86_64", "destination": "/usr/local/libexec/mino",
                     "options": ["rbind", "ro", "nosuid", "nodev"]}
    assert not [m for m in _spec(storage=STORAGE)["mounts"] if m["destination"] == policy.EXECUTOR_DIR]
    assert policy.executor_exec() == {
        "Cmd": ["/usr/local/libexec/mino/mino-exec"], "Env": [], "User": "1000:1000", "WorkingDir": "/",
        "AttachStdout": True, "AttachStderr": True, "AttachStdin": True, "Tty": False, "Privileged": False}


@pytest.mark.parametrize("make", [lambda: policy.cell_exec("x", env={}), lambda: policy.probe_exec("x")])
def test_no_exec_runs_as_root_or_by_a_relative_name(make):
    body = make()
    assert body["User"] == policy.CELL_USER
    assert body["Cmd"][0].startswith("/")
    assert "BASH_ENV=" in body["Env"]


@pytest.mark.parametrize("workspace,requested,expected", [
    ("/home/u", "rw", "overlay"), ("/home", "rw", "overlay"), ("/", "rw", "overlay"),
    ("/home/u/proj", "rw", "rw"), ("/home/u", "ro", "ro"), ("/home/u", "overlay", "overlay"),
])
def test_a_home_directory_is_never_shared_read_write(workspace, requested, expected):
    mode, note = policy.workspace_mode(requested, workspace, "/home/u")
    assert mode == expected
    assert (note is not None) == (requested != expected)


def test_default_resources_follow_the_machine():
    r = policy.default_resources(mem_total=24 << 30, cpu_count=2, disk_free=80 << 30)
    assert (r.memory, r.cpus, r.disk, r.pids) == (12 << 30, 1.0, 10 << 30, 4096)
    small = policy.default_resources(mem_total=512 << 20, cpu_count=1, disk_free=1 << 30)
    assert (small.memory, small.cpus, small.disk) == (512 << 20, 1.0, 512 << 20)


# ---------------------------------------------------------------- the whole session, engine-free
OWNER = {"io.mino.owner": "tok", "io.mino.owner-pid": "1"}
FACTS = policy.HostFacts(limits=HostLimits(20000, 32768), storage=STORAGE,
                         ca_bundle="/etc/ssl/certs/ca-certificates.crt", caches={"pip": "/c/pip"},
                         project="p1", seccomp_profile="/s.json", kernel_id="k1")


@pytest.mark.parametrize("plan,namespace,no_dns", [
    (NetworkPlan("bridge"), "bridge", False),
    (NetworkPlan("host"), "host", False),
    (NetworkPlan("none"), "none", False),
    (NetworkPlan("allowlist", "registries", (AllowEntry("pypi.org", 443),)), "bridge", True),
])
def test_session_request_decides_the_whole_container(plan, namespace, no_dns):
    settings = policy.SessionSettings(image="img", resources=Resources(pids=100), toolchain="python")
    shape = policy.session_request("s1", plan, settings, FACTS, OWNER, fresh=False,
                                   hosts=(("pypi.org", "1.2.3.4"),) if no_dns else (), container_name="mino-x-s1")
    spec = policy.session_spec(shape.request)
    assert spec["netns"] == {"nsmode": namespace}
    assert ("dns_server" in spec) is no_dns
    assert spec["hostadd"] == (["pypi.org:1.2.3.4"] if no_dns else [])
    assert spec["resource_limits"]["pids"]["limit"] == 100
    assert spec["seccomp_profile_path"] == "/s.json"
    assert spec["labels"] == {**policy.MANAGED, "io.mino.version": policy.__version__, **OWNER,
                              "io.mino.role": "session", "io.mino.session": "s1",
                              "io.mino.network": plan.describe(), "io.mino.kernel-id": "k1",
                              "io.mino.project": "p1"}
    assert shape.network_labels["io.mino.role"] == "firewall"
    assert {"source": "/c/pip", "destination": "/home/developer/.cache/pip", "type": "bind",
            "options": ["rbind", "rw", "nosuid", "nodev"]} in spec["mounts"]
    assert "volumes" not in spec


def test_session_request_fresh_role_and_no_cache():
    shape = policy.session_request("fresh-1", NetworkPlan("none"), policy.SessionSettings(
        image="img", package_cache=False, toolchain="python"), FACTS, OWNER, fresh=True, container_name="c")
    spec = policy.session_spec(shape.request)
    assert spec["labels"]["io.mino.role"] == "fresh"
    assert not any(m["destination"].endswith(".cache/pip") for m in spec["mounts"])


def test_labels_refuse_unknown_roles():
    with pytest.raises(ValueError):
        policy.labels("admin", OWNER)


# ---------------------------------------------------------------------------- rootless engines

ROOTLESS_V1 = policy.EngineFacts(rootless=True, cgroup_limits=False, cgroup_version="v1")
ROOTLESS_V2 = policy.EngineFacts(rootless=True, cgroup_limits=True, cgroup_version="v2")


def test_rootful_specs_have_no_user_namespace_and_the_usual_nproc():
    spec = _spec()
    assert "userns" not in spec
    assert {r["type"]: r["hard"] for r in spec["r_limits"]}["nproc"] == 32768


def test_rootless_session_maps_the_cell_to_the_kernel_user_and_nothing_else_changes():
    rootful, rootless = _spec(), _spec(engine=ROOTLESS_V2)
    assert rootless.pop("userns") == {"nsmode": "keep-id", "value": "uid=1000,gid=1000"}
    assert rootless == rootful  # same hardening; v2 applies the cgroup limits, so nproc stays


def test_where_the_engine_ignores_cgroup_limits_the_nproc_ulimit_is_the_process_limit():
    spec = _spec(engine=ROOTLESS_V1, resources=Resources(pids=300))
    assert {r["type"]: (r["soft"], r["hard"]) for r in spec["r_limits"]}["nproc"] == (300, 300)
    assert spec["resource_limits"]["pids"] == {"limit": 300}  # still asked for: an engine that can, applies it
    # never above the engine's own hard limit
    low = policy.session_spec(SessionRequest(name="n", image="i", network="none", labels={},
                                             limits=HostLimits(1024, 200), engine=ROOTLESS_V1))
    assert {r["type"]: r["hard"] for r in low["r_limits"]}["nproc"] == 200


def test_rootless_firewall_is_pinned_to_the_rootless_namespace_without_the_cells_nproc():
    spec = policy.firewall_spec(name="fw", image="img", target_container="abc", labels={},
                                limits=HostLimits(20000, 96364), command=("/usr/bin/perl",), engine=ROOTLESS_V1)
    assert spec["userns"] == {"nsmode": "host"}
    # it runs as the rootless namespace's root: an nproc of 64 would count all of the user's processes there
    assert {r["type"]: r["hard"] for r in spec["r_limits"]}["nproc"] == 32768
    assert "userns" not in policy.firewall_spec(name="fw", image="img", target_container="abc", labels={},
                                                limits=HostLimits(1, 1), command=("x",))


def test_the_inspection_container_uses_the_engines_mapping():
    spec = policy.inspection_spec(name="i", image="img", labels={}, limits=HostLimits(10, 10), engine=ROOTLESS_V1)
    assert spec["userns"]["nsmode"] == "keep-id" and spec["user"] == "1000:1000"


def test_what_an_engine_cannot_apply_is_named_with_what_holds_instead():
    assert policy.unenforced(policy.ROOTFUL) == ()
    v1 = policy.unenforced(ROOTLESS_V1)
    assert len(v1) == 2
    assert v1[0].startswith("memory and CPU limits are not applied: rootless Podman on cgroup v1")
    assert "the 4096-process limit holds through the nproc ulimit" in v1[0]
    assert v1[1].startswith("the disk limit is not applied")
    assert policy.unenforced(ROOTLESS_V2) == (v1[1],)


def test_no_podman_warning_is_dropped_unless_a_notice_already_names_it():
    ignored = "Resource limits are not supported and ignored on cgroups V1 rootless systems"
    other = "Path /x does not exist, cannot mount it"
    assert policy.unexplained_warnings([ignored, other], ROOTLESS_V1) == [other]
    # an engine that claims to apply limits but warns: the warning is shown
    assert policy.unexplained_warnings([ignored], policy.ROOTFUL) == [ignored]


@pytest.mark.parametrize("host,expected", [
    ({"security": {"rootless": False}, "cgroupVersion": "v1"}, policy.ROOTFUL),
    ({"security": {"rootless": True}, "cgroupVersion": "v1"}, ROOTLESS_V1),
    ({"security": {"rootless": True}, "cgroupVersion": "v2", "cgroupControllers": ["cpu", "memory", "pids"]},
     ROOTLESS_V2),
    ({"security": {"rootless": True}, "cgroupVersion": "v2", "cgroupControllers": ["memory", "pids"]},
     policy.EngineFacts(rootless=True, cgroup_limits=False, cgroup_version="v2")),
])
def test_engine_facts_come_from_its_info(host, expected):
    from mino_jupyter.runtime import engine_facts

    facts = engine_facts({"host": host})
    assert (facts.rootless, facts.cgroup_limits) == (expected.rootless, expected.cgroup_limits)


def test_a_copied_session_binds_nothing_of_this_machine():
    """An engine elsewhere: the workspace and home are the container's own volumes, /tmp is
    size-limited tmpfs, the executor comes read-only from mino's support volume, the CA bundle
    is copied in (its variables still point at it), the seccomp profile is the engine's path."""
    spec = _spec(storage=policy.CopiedStorage(read_only=False, tmp_bytes=64 << 20, support_volume="mino-support-x"),
                 ca_bundle="/etc/ssl/x.pem", executor="/state/executor/abc", seccomp_profile="/vol/seccomp.json")
    assert all(m["type"] == "tmpfs" for m in spec["mounts"])
    assert {m["destination"]: m["options"] for m in spec["mounts"]} == {
        t: ["rw", "nosuid", "nodev", "mode=1777", f"size={64 << 20}"] for t in ("/tmp", "/var/tmp")}
    assert spec["volumes"] == [
        {"Name": "", "Dest": "/workspace", "Options": ["nosuid", "nodev"]},
        {"Name": "", "Dest": "/home/developer", "Options": ["nosuid", "nodev"]},
        {"Name": "mino-support-x", "Dest": policy.EXECUTOR_DIR, "Options": ["nosuid", "nodev", "ro"]}]
    assert all(spec["env"][var] == policy.CONTAINER_CA_BUNDLE for var in policy.CA_ENV_VARS)
    assert spec["seccomp_profile_path"] == "/vol/seccomp.json" and spec["read_only_filesystem"] is True
    ro = _spec(storage=policy.CopiedStorage(read_only=True))
    assert ro["volumes"][0]["Options"] == ["nosuid", "nodev", "ro"] and len(ro["volumes"]) == 2


def test_loaders_never_run_and_own_files_as_the_cell_or_as_root():
    kw = dict(name="l", image="img", labels={}, limits=HostLimits(20000, 96364))
    cells = policy.loader_spec(**kw, volumes_from="abc")
    assert cells["user"] == policy.CELL_USER and cells["volumes_from"] == ["abc"] and cells["cap_drop"] == ["ALL"]
    support = policy.loader_spec(**kw, support_volume="mino-support-x")
    assert support["user"] == "0:0" and support["volumes"][0]["Name"] == "mino-support-x"
    assert support["netns"] == {"nsmode": "none"}
    with pytest.raises(ValueError):
        policy.loader_spec(**kw)
    with pytest.raises(ValueError):
        policy.loader_spec(**kw, volumes_from="abc", support_volume="x")


@pytest.mark.parametrize("signal_name", ["INT", "TERM", "KILL"])
def test_the_kill_of_every_cell_process_runs_as_the_cell_user(signal_name):
    body = policy.kill_all_exec(signal_name)
    assert body["Cmd"] == ["/bin/kill", f"-{signal_name}", "-1"] and body["User"] == policy.CELL_USER
    with pytest.raises(ValueError):
        policy.kill_all_exec("HUP; rm -rf /")


def test_a_leased_session_and_its_firewall_end_themselves_and_go():
    spec = _spec(storage=policy.CopiedStorage(), lease=30)
    assert spec["command"] == [policy.BASH, "--noprofile", "--norc", "-c", policy.LEASE_SCRIPT, "mino-lease", "30"]
    assert spec["remove"] is True and spec["user"] == policy.INIT_USER  # never the cell's uid
    lease_dir = next(m for m in spec["mounts"] if m["destination"] == policy.LEASE_DIR)
    assert lease_dir["type"] == "tmpfs" and "mode=0755" in lease_dir["options"]  # root's: no cell writes it
    assert _spec()["command"] == ["sleep", "infinity"] and _spec()["remove"] is False
    fw = policy.firewall_spec(name="f", image="i", target_container="s", labels={}, limits=HostLimits(20000, 96364),
                              command=["x"], lease=30)
    assert fw["remove"] is True and any(m["destination"] == policy.LEASE_DIR for m in fw["mounts"])
    with pytest.raises(ValueError):
        policy.lease_command(1)
