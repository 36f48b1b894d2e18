"""The hardening policy, checked on the specs it produces for every mode."""

import pytest

from mino_jupyter import policy
from mino_jupyter.policy import HostLimits, Mount, SessionRequest


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
    spec = _spec(network)
    assert spec["cap_drop"] == ["ALL"] and spec["cap_add"] == []
    assert spec["no_new_privileges"] is True
    assert spec["privileged"] is False
    assert spec["resource_limits"]["pids"]["limit"] == 4096
    assert spec["user"] == "1000:1000"
    assert spec["init"] is True
    assert spec["netns"] == {"nsmode": network}
    assert spec["work_dir"] == "/workspace"
    assert spec["labels"] == {"a": "b"}


def test_unknown_namespace_mode_is_refused():
    with pytest.raises(ValueError):
        _spec("allowlist")  # allowlist is bridge + firewall, decided above this layer


def test_workspace_and_ca_bundle_mounts():
    spec = _spec(workspace=(Mount("/nb", "/workspace", read_only=True),), ca_bundle="/etc/ssl/x.pem")
    ws, ca = spec["mounts"]
    assert ws["source"] == "/nb" and ws["destination"] == "/workspace" and "ro" in ws["options"]
    assert {"nosuid", "nodev"} <= set(ws["options"])
    assert ca["destination"] == policy.CONTAINER_CA_BUNDLE and "ro" in ca["options"]
    for var in policy.CA_ENV_VARS:
        assert spec["env"][var] == policy.CONTAINER_CA_BUNDLE


def test_allowlist_namespace_has_hosts_and_no_dns():
    spec = _spec(hosts=[("pypi.org", "1.2.3.4"), ("pypi.org", "2001:db8::1")], no_dns=True)
    assert spec["hostadd"] == ["pypi.org:1.2.3.4", "pypi.org:2001:db8::1"]
    assert spec["dns_server"] == ["127.0.0.1"]  # loopback: nothing answers, nothing leaves


def test_firewall_container_holds_net_admin_only():
    spec = policy.firewall_spec(name="fw", image="img", target_container="abc", labels={},
                                limits=HostLimits(100, 100))
    assert spec["cap_drop"] == ["ALL"] and spec["cap_add"] == ["NET_ADMIN"]
    assert spec["no_new_privileges"] is True
    assert spec["netns"] == {"nsmode": "container", "value": "abc"}
    assert "mounts" not in spec and "pidns" not in spec


def test_exec_is_never_privileged_and_runs_as_the_cell_user():
    body = policy.exec_body(["true"], env={"A": "1"})
    assert body["Privileged"] is False
    assert body["User"] == "1000:1000"
    assert body["Env"] == ["A=1"]
    assert body["WorkingDir"] == "/workspace"
    assert body["Tty"] is False and body["AttachStdin"] is False


def test_workspace_keeps_host_code_paths_read_only():
    plan = policy.workspace_mounts("/p/nb", readonly=False, home="/home/u", existing=["a.ipynb", ".git", ".venv", "data"])
    assert plan.note is None
    assert plan.mounts == (Mount("/p/nb", "/workspace"), Mount("/p/nb/.git", "/workspace/.git", read_only=True),
                           Mount("/p/nb/.venv", "/workspace/.venv", read_only=True))
    assert policy.workspace_mounts("/p/nb", readonly=True, home=None, existing=[".git"]).mounts == (
        Mount("/p/nb", "/workspace", read_only=True),)


@pytest.mark.parametrize("workspace", ["/home/u", "/home", "/"])
def test_a_home_directory_is_never_shared_read_write(workspace):
    plan = policy.workspace_mounts(workspace, readonly=False, home="/home/u", existing=[".bashrc"])
    assert plan.mounts == (Mount(workspace, "/workspace", read_only=True),)
    assert "shared read-only" in plan.note


# ---------------------------------------------------------------- the whole session, engine-free
from mino_jupyter.network import AllowEntry, NetworkPlan  # noqa: E402

OWNER = {"io.mino.owner": "tok", "io.mino.owner-pid": "1"}
FACTS = policy.HostFacts(limits=HostLimits(20000, 32768), workspace="/p/nb", home="/home/u",
                         present=("data.csv",), ca_bundle="/etc/ssl/certs/ca-certificates.crt", kernel_id="k1")


@pytest.mark.parametrize("plan,namespace,no_dns", [
    (NetworkPlan("bridge"), "bridge", False),
    (NetworkPlan("host"), "host", False),
    (NetworkPlan("none"), "none", False),
    (NetworkPlan("allowlist", "registries", (AllowEntry("pypi.org", 443),)), "bridge", True),
])
def test_session_request_decides_the_whole_container(plan, namespace, no_dns):
    settings = policy.SessionSettings(image="img", pids_limit=100, toolchain="python")
    shape = policy.session_request("s1", plan, settings, FACTS, OWNER, fresh=False,
                                   hosts=(("pypi.org", "1.2.3.4"),) if no_dns else (), container_name="mino-x-s1")
    spec = policy.session_spec(shape.request)
    assert spec["netns"] == {"nsmode": namespace}
    assert ("dns_server" in spec) is no_dns
    assert spec["hostadd"] == (["pypi.org:1.2.3.4"] if no_dns else [])
    assert spec["resource_limits"]["pids"]["limit"] == 100
    assert spec["labels"] == {**policy.MANAGED, "io.mino.version": policy.__version__, **OWNER,
                              "io.mino.role": "session", "io.mino.session": "s1",
                              "io.mino.network": plan.describe(), "io.mino.kernel-id": "k1"}
    assert shape.network_labels["io.mino.role"] == "firewall"
    assert {k: v for k, v in shape.network_labels.items() if k != "io.mino.role"} == \
        {k: v for k, v in spec["labels"].items() if k != "io.mino.role"}
    assert spec["volumes"] == [{"Name": "mino-cache-pip", "Dest": "/home/developer/.cache/pip",
                                "Options": ["nosuid", "nodev"]}]
    assert spec["mounts"][0]["source"] == "/p/nb"


def test_session_request_fresh_role_and_no_cache():
    shape = policy.session_request("fresh-1", NetworkPlan("none"), policy.SessionSettings(image="img", package_cache=False,
                                   toolchain="node"), FACTS, OWNER, fresh=True, container_name="c")
    spec = policy.session_spec(shape.request)
    assert spec["labels"]["io.mino.role"] == "fresh" and spec["volumes"] == []


def test_labels_refuse_unknown_roles():
    with pytest.raises(ValueError):
        policy.labels("admin", OWNER)
