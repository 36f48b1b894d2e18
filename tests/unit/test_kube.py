"""A session as a Kubernetes Pod (`mino-jupyter kube`): the exact manifest, checked against the
Kubernetes schemas offline, its firewall verifier run against listings nft printed, and the
command line. Nothing here needs Podman or a cluster (tests/integration/test_kube.py runs it)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess

import kubernetes_validate
import pytest
import yaml

from mino_jupyter import __version__, cli, firewall, kube, policy
from mino_jupyter.errors import UsageError
from mino_jupyter.network import AllowEntry, NetworkPlan
from tests.unit.test_firewall import DATA, FIXTURE_LOCAL, FIXTURE_RESOLVED, _insert, _rules

IMAGE = "registry.example/mino-base:1"
ENTRIES = (AllowEntry("pypi.org", 443), AllowEntry("10.88.0.1", 8080))
ALLOWLIST = NetworkPlan("allowlist", None, ENTRIES, ENTRIES)
ANSWERS = {"pypi.org": ["151.101.0.223", "2a04:4e42::223"]}
RESOLVED = firewall.resolve_entries(ENTRIES, lambda name: ANSWERS.get(name, []))


def _request(plan=ALLOWLIST, resolved=RESOLVED, **kw) -> kube.KubeRequest:
    return kube.KubeRequest(**{"session": "default", "image": IMAGE, "firewall_image": IMAGE, "plan": plan,
                               "resolved": resolved, "resolved_at": "2026-01-02T03:04:05Z", **kw})


PLANS = {
    "allowlist": _request(),
    "bridge": _request(NetworkPlan("bridge"), firewall.Resolved(), cluster_dns=("10.96.0.10",)),
    "none": _request(NetworkPlan("none"), firewall.Resolved()),
}


def _containers(pod):
    return {c["name"]: c for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]}


CELL_SECURITY = {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True, "allowPrivilegeEscalation": False,
                 "privileged": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


# ---------------------------------------------------------------------------- the manifest, exactly

def test_the_allowlist_pod_exactly():
    pod = kube.pod(_request())
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    assert pod["metadata"] == {
        "name": "mino-default",
        "labels": {"io.mino.managed": "true", "io.mino.version": __version__, "io.mino.role": "session",
                   "io.mino.session": "default"},
        # not a valid label value (spaces, parentheses): an annotation under the same key
        "annotations": {"io.mino.network": "allowlist (pypi.org:443,10.88.0.1:8080)",
                        "io.mino.resolved": "names resolved 2026-01-02T03:04:05Z (a snapshot)"},
    }
    spec = pod["spec"]
    assert {k: v for k, v in spec.items() if k not in ("initContainers", "containers", "volumes")} == {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": kube.DEFAULT_DEADLINE,
        "terminationGracePeriodSeconds": 1,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostNetwork": False,
        "hostPID": False,
        "hostIPC": False,
        "shareProcessNamespace": False,
        "hostname": "mino",
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "dnsPolicy": "None",
        "dnsConfig": {"nameservers": ["127.0.0.1"]},  # the loopback name server: no query leaves the Pod
        "hostAliases": [{"ip": "151.101.0.223", "hostnames": ["pypi.org"]},
                        {"ip": "2a04:4e42::223", "hostnames": ["pypi.org"]}],
    }
    assert [c["name"] for c in spec["initContainers"]] == ["firewall", "home"]  # the firewall first
    assert [c["name"] for c in spec["containers"]] == ["cell"]
    volumes = ["workspace", "home", "tmp", "var-tmp", "control"]
    assert spec["volumes"] == [{"name": f"mino-default-{v}", "emptyDir": {}} for v in volumes]


def test_the_cell_container_exactly():
    cell = _containers(kube.pod(_request()))["cell"]
    limits = {"memory": "2Gi", "cpu": "1", "ephemeral-storage": "10Gi"}  # policy.Resources()
    assert cell == {
        "name": "cell",
        "image": IMAGE,
        "command": ["/bin/bash", "--noprofile", "--norc", "-c",
                    "trap '' TERM INT HUP QUIT USR1 USR2; while :; do sleep infinity & wait $!; done"],
        "workingDir": "/workspace",
        "env": [{"name": "HOME", "value": "/home/developer"}, {"name": "LANG", "value": "C.UTF-8"},
                {"name": "TERM", "value": "dumb"}, {"name": "USER", "value": "developer"}],
        "securityContext": CELL_SECURITY,
        "resources": {"limits": limits, "requests": limits},
        "volumeMounts": [
            {"name": "mino-default-workspace", "mountPath": "/workspace"},
            {"name": "mino-default-home", "mountPath": "/home/developer"},
            {"name": "mino-default-tmp", "mountPath": "/tmp"},
            {"name": "mino-default-var-tmp", "mountPath": "/var/tmp"},
            {"name": "mino-default-control", "mountPath": "/run/mino", "readOnly": True},
        ],
    }


def test_the_firewall_init_container_holds_net_admin_alone():
    fw = _containers(kube.pod(_request()))["firewall"]
    assert fw["securityContext"] == {
        "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False,  # added capabilities are effective for root only
        "allowPrivilegeEscalation": False, "privileged": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN"]},  # not NET_BIND_SERVICE: no name server here
    }
    assert fw["image"] == IMAGE and fw["workingDir"] == "/"
    assert fw["resources"]["limits"] == {"memory": "256Mi", "cpu": "500m"}  # policy.HELPER_RESOURCES
    assert "volumeMounts" not in fw  # it writes nothing
    perl, e, program, rules, expected = fw["command"]
    assert (perl, e, program) == ("/usr/bin/perl", "-e", kube.VERIFIER)
    assert rules == firewall.ruleset(RESOLVED, "allowlist", firewall.LocalNetworks())  # the same ruleset
    assert expected == kube.expected_listing(RESOLVED, "allowlist", firewall.LocalNetworks())
    assert "set allow4 { type ipv4_addr . inet_service; elements = { 10.88.0.1 . 8080, 151.101.0.223 . 443 }; }" \
        in rules
    assert "policy drop;" in rules


def test_the_home_init_container_copies_the_image_home_as_the_cell_user():
    home = _containers(kube.pod(_request()))["home"]
    assert home["command"] == ["/bin/bash", "--noprofile", "--norc", "-c",
                               '[ ! -d "$1" ] || exec /bin/cp -a "$1/." "$2/"', "mino-home", "/home/developer",
                               "/mnt/mino-home"]
    assert home["image"] == IMAGE and home["securityContext"] == CELL_SECURITY
    assert home["volumeMounts"] == [{"name": "mino-default-home", "mountPath": "/mnt/mino-home"}]


def test_limits_and_deadline_come_from_the_request():
    pod = kube.pod(_request(resources=policy.Resources(memory=512 * policy.MIB, cpus=0.5, disk=3 * policy.GIB),
                            deadline=90))
    cell = _containers(pod)["cell"]
    assert cell["resources"]["limits"] == {"memory": "512Mi", "cpu": "500m", "ephemeral-storage": "3Gi"}
    assert cell["resources"]["requests"] == cell["resources"]["limits"]
    assert pod["spec"]["activeDeadlineSeconds"] == 90


def test_bridge_refuses_every_private_range_but_the_cluster_dns_port_53():
    pod = kube.pod(PLANS["bridge"])
    spec = pod["spec"]
    assert "dnsPolicy" not in spec and "hostAliases" not in spec  # ClusterFirst: the cluster's DNS
    rules = _containers(pod)["firewall"]["command"][3]
    local = kube.cluster_networks(("10.96.0.10",))
    assert rules == firewall.ruleset(firewall.Resolved(), "bridge", local)
    for network in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "169.254.0.0/16", "fc00::/7",
                    "fe80::/10"):
        assert network in local.v4 + local.v6
    assert local.dns == ("10.96.0.10",)
    assert "set dns4 { type ipv4_addr; elements = { 10.96.0.10 }; }" in rules
    assert pod["metadata"]["labels"]["io.mino.network"] == "bridge"  # a valid label value stays a label


def test_none_is_the_allowlist_ruleset_with_nothing_allowed():
    pod = kube.pod(PLANS["none"])
    containers = _containers(pod)
    assert containers["firewall"]["command"][3] == firewall.ruleset(firewall.Resolved(), "allowlist",
                                                                    firewall.LocalNetworks())
    assert pod["spec"]["dnsConfig"] == {"nameservers": ["127.0.0.1"]} and "hostAliases" not in pod["spec"]
    env = {e["name"]: e["value"] for e in containers["cell"]["env"]}
    assert env["PIP_RETRIES"] == "0" and env["NPM_CONFIG_FETCH_RETRIES"] == "0"  # policy's none


def test_names_that_did_not_resolve_are_said():
    resolved = firewall.resolve_entries(ENTRIES, lambda name: [])
    pod = kube.pod(_request(resolved=resolved))
    assert pod["metadata"]["annotations"]["io.mino.unresolved"] == "pypi.org"
    assert "hostAliases" not in pod["spec"]


# ---------------------------------------------------------------------------- one owner: policy

def test_the_pod_follows_policy_s_hardening(monkeypatch):
    """No second copy of a hardening decision: what policy's spec says, the Pod says."""
    real = policy.session_spec

    def weaker(request):
        spec = real(request)
        return {**spec, "no_new_privileges": False, "read_only_filesystem": False, "cap_add": ["SYS_PTRACE"]}

    monkeypatch.setattr(policy, "session_spec", weaker)
    security = _containers(kube.pod(_request()))["cell"]["securityContext"]
    assert security["allowPrivilegeEscalation"] is True and security["readOnlyRootFilesystem"] is False
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}


@pytest.mark.parametrize("extra", [{"new_flag": True}, {"resource_limits": {"pids": {"limit": 1}, "memory":
                                   {"limit": 1 << 30, "swap": 1 << 30}, "cpu": {"quota": 1, "period": 2},
                                   "blockio": {}}}, {"ipcns": {"nsmode": "host"}}])
def test_a_policy_key_the_pod_cannot_say_stops_the_rendering(monkeypatch, extra):
    real = policy.session_spec
    monkeypatch.setattr(policy, "session_spec", lambda request: {**real(request), **extra})
    with pytest.raises(ValueError):
        kube.pod(_request())


# ---------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("request_, words", [
    (_request(NetworkPlan("host")), "--network host cannot be rendered as a Pod"),
    (_request(NetworkPlan("bridge")), "--network bridge needs --cluster-dns"),
    (_request(cluster_dns=("10.96.0.10",)), "--cluster-dns is for --network bridge, not allowlist"),
    (_request(NetworkPlan("bridge"), cluster_dns=("10.96.0.x",)), '--cluster-dns "10.96.0.x" is not an IP address'),
    (_request(session="Default"), 'session name "Default" cannot name a Pod'),
    (_request(session="my_session"), 'session name "my_session" cannot name a Pod'),
    (_request(session="a" * (kube.MAX_SESSION_NAME + 1)), "cannot name a Pod"),
    (_request(session="-a"), "cannot name a Pod"),
    (_request(deadline=0), "deadline must be a positive number"),
])
def test_what_a_pod_cannot_mean_is_refused_in_one_line(request_, words):
    with pytest.raises(UsageError) as raised:
        kube.pod(request_)
    assert words in raised.value.message and "\n" not in raised.value.message
    assert raised.value.hint


def test_the_longest_session_name_still_names_every_volume():
    pod = kube.pod(_request(session="a" * kube.MAX_SESSION_NAME))
    assert all(len(v["name"]) <= 63 for v in pod["spec"]["volumes"]) and len(pod["metadata"]["name"]) <= 63
    kubernetes_validate.validate(pod, kube.CHECKED_KUBERNETES[-1], strict=True)


# ---------------------------------------------------------------------------- YAML and schemas

@pytest.mark.parametrize("mode", sorted(PLANS))
@pytest.mark.parametrize("version", kube.CHECKED_KUBERNETES)
def test_the_manifest_is_a_valid_pod(mode, version):
    text = kube.render(PLANS[mode])
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    assert documents == [kube.pod(PLANS[mode])]  # the YAML says exactly the Pod
    kubernetes_validate.validate(documents[0], version, strict=True)  # strict: no field it does not know


def test_the_schema_check_would_catch_a_wrong_field():
    pod = kube.pod(_request())
    pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalaton"] = False
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, kube.CHECKED_KUBERNETES[-1], strict=True)


def test_the_yaml_says_what_a_cluster_must_allow_and_keeps_long_text_readable():
    text = kube.render(_request())
    head = text.split("---\n", 1)[0]
    assert all(line.startswith("# ") for line in head.splitlines())
    assert "privileged" in head and "NetworkPolicy" in head and "2026-01-02T03:04:05Z" in head
    assert "\n    - |\n      table inet mino\n" in text  # the ruleset as a literal block
    assert "&id" not in text and "*id" not in text  # no YAML aliases between containers


# ---------------------------------------------------------------------------- the verifier

PERL = shutil.which("perl")
needs_perl = pytest.mark.skipif(PERL is None, reason="no perl on this machine (the firewall image has perl-base)")


def _fake_nft(tmp_path, listing: str, install_rc: int = 0):
    """An nft stand-in: `-f FILE` reads its ruleset and exits install_rc; `-j list ...` prints
    `listing`."""
    (tmp_path / "listing.json").write_text(listing)
    script = tmp_path / "nft"
    script.write_text(f"#!/bin/sh\nif [ \"$1\" = -f ]; then cat \"$2\" > {tmp_path}/installed; exit {install_rc}; fi\n"
                      f"cat {tmp_path}/listing.json\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _verify(tmp_path, listing: str, resolved, mode, local, install_rc=0):
    nft = _fake_nft(tmp_path, listing, install_rc)
    program = kube.VERIFIER.replace(kube.NFT, str(nft))
    rules = firewall.ruleset(resolved, mode, local)
    done = subprocess.run([PERL, "-e", program, rules, kube.expected_listing(resolved, mode, local)],
                          capture_output=True, text=True, timeout=30, env={"PATH": os.environ.get("PATH", "")})
    if install_rc == 0:
        assert (tmp_path / "installed").read_text() == rules  # nft got the ruleset, whole
    return done


@needs_perl
@pytest.mark.parametrize("mode", ["bridge", "allowlist"])
def test_the_verifier_accepts_what_nft_listed_for_the_ruleset(tmp_path, mode):
    listing = (DATA / f"nft-{mode}.json").read_text()
    done = _verify(tmp_path, listing, FIXTURE_RESOLVED, mode, FIXTURE_LOCAL)
    assert done.returncode == 0, done.stderr
    rules = sum(len(c.rules) for c in firewall.chains(mode))
    assert done.stdout == f"mino firewall: installed and verified: 3 chains, {rules} rules, 8 sets\n"


def _changed(mode, change):
    doc = json.loads((DATA / f"nft-{mode}.json").read_text())
    change(doc)
    return json.dumps(doc)


def _set(doc, name):
    return next(o for o in doc["nftables"] if o.get("set", {}).get("name") == name)["set"]


CHANGES = [
    ("an extra tcp accept", _insert("output", [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                                                          "right": "tcp"}}, {"accept": None}])),
    ("an inbound accept", _insert("input", [{"accept": None}], at=1)),
    ("a rule removed", lambda doc: doc["nftables"].remove(_rules(doc, "refuse")[-1])),
    ("rules swapped", lambda doc: (lambda r: r[0]["rule"].update(expr=r[1]["rule"]["expr"]))(_rules(doc, "output"))),
    ("input policy accept", lambda doc: next(o for o in doc["nftables"] if o.get("chain", {}).get("name") == "input")
     ["chain"].update(policy="accept")),
    ("reject became drop", lambda doc: _rules(doc, "refuse")[2]["rule"]["expr"].__setitem__(2, {"drop": None})),
    ("a port changed", lambda doc: _set(doc, "allow4")["elem"][0]["concat"].__setitem__(1, 8081)),
    ("allow4 holds more", lambda doc: _set(doc, "allow4")["elem"].append({"concat": ["1.2.3.4", 22]})),
    ("local4 lost a network", lambda doc: _set(doc, "local4")["elem"].pop()),
    ("dns4 holds another server", lambda doc: _set(doc, "dns4").update(elem=["10.255.255.54"])),
    ("a set mino did not make", lambda doc: doc["nftables"].append(
        {"set": {"family": "inet", "name": "extra", "table": "mino", "type": "ipv4_addr", "handle": 99}})),
]


@needs_perl
@pytest.mark.parametrize("mode", ["bridge", "allowlist"])
@pytest.mark.parametrize("name,change", CHANGES)
def test_the_verifier_fails_hard_on_every_difference(tmp_path, mode, name, change):
    done = _verify(tmp_path, _changed(mode, change), FIXTURE_RESOLVED, mode, FIXTURE_LOCAL)
    assert done.returncode == 1, name
    assert "the installed table differs from what mino asked for" in done.stderr, done.stderr
    assert done.stderr.rstrip().endswith("the cell does not start")


@needs_perl
@pytest.mark.parametrize("listing,words", [("not json", "unreadable nft listing"),
                                           ('{"nftables": [] } trailing', "unreadable nft listing"),
                                           ('{"nftables": []}', "differs")])
def test_the_verifier_fails_on_a_listing_it_cannot_read_or_an_empty_table(tmp_path, listing, words):
    done = _verify(tmp_path, listing, FIXTURE_RESOLVED, "allowlist", FIXTURE_LOCAL)
    assert done.returncode == 1 and words in done.stderr, done.stderr


@needs_perl
def test_the_verifier_fails_when_nft_cannot_install(tmp_path):
    done = _verify(tmp_path, (DATA / "nft-allowlist.json").read_text(), FIXTURE_RESOLVED, "allowlist",
                   FIXTURE_LOCAL, install_rc=1)
    assert done.returncode == 1 and "nft could not install the ruleset (exit 1)" in done.stderr


def test_expected_listing_orders_set_literals_as_verify_does():
    """The canonical text sorts set literals (nft lists them in its own order), nothing else."""
    assert kube.canonical({"b": 1, "a": {"set": ["udp", "tcp"]}, "c": ["y", "x"], "d": None}) == \
        '{"a":{"set":["tcp","udp"]},"b":1,"c":["y","x"],"d":null}'
    with pytest.raises(ValueError):
        kube.canonical('quote " inside')


# ---------------------------------------------------------------------------- the command line

@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No configuration but the test's own; run from an empty directory."""
    monkeypatch.setenv("MINO_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path


def _main(capsys, *argv):
    code = cli.main(["kube", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_writes_the_pod_to_stdout(isolated, capsys):
    code, out, err = _main(capsys, "--session", "s1", "--network-allow", "10.88.0.1:8080", "--memory", "1g",
                           "--cpus", "1.5", "--disk", "2g", "--timeout", "90.5")
    assert code == 0 and err == ""
    pod, = [d for d in yaml.safe_load_all(out) if d]
    assert pod["metadata"]["name"] == "mino-s1"
    assert pod["spec"]["activeDeadlineSeconds"] == 91
    cell = _containers(pod)["cell"]
    assert cell["resources"]["limits"] == {"memory": "1Gi", "cpu": "1500m", "ephemeral-storage": "2Gi"}
    assert cell["image"] == f"localhost/mino-base:{__version__}"  # --image base, the default
    assert _containers(pod)["firewall"]["image"] == f"localhost/mino-base:{__version__}"
    assert "10.88.0.1 . 8080" in _containers(pod)["firewall"]["command"][3]
    kubernetes_validate.validate(pod, kube.CHECKED_KUBERNETES[-1], strict=True)


def test_the_command_takes_the_network_from_the_configuration(isolated, capsys):
    (isolated / "config.toml").write_text('[container]\nnetwork_allow = ["10.88.0.1:9000"]\nmemory = "3g"\n')
    code, out, err = _main(capsys)
    pod = yaml.safe_load(out.split("---\n", 1)[1])
    assert code == 0 and "10.88.0.1 . 9000" in _containers(pod)["firewall"]["command"][3]
    assert _containers(pod)["cell"]["resources"]["limits"]["memory"] == "3Gi"
    code, out, err = _main(capsys, "--network", "none")  # flags come first
    assert code == 0 and "10.88.0.1 . 9000" not in out


def test_the_command_writes_a_file_and_never_overwrites_without_force(isolated, capsys):
    target = isolated / "work" / "pod.yaml"
    code, out, err = _main(capsys, "--network", "none", "-o", str(target))
    assert code == 0 and out == "" and "wrote" in err and target.read_text().startswith("# mino-jupyter")
    target.write_text("mine\n")
    code, out, err = _main(capsys, "--network", "none", "-o", str(target))
    assert code == 1 and target.read_text() == "mine\n"
    assert err.startswith(f"mino: {target} exists") and "--force" in err
    code, out, err = _main(capsys, "--network", "none", "-o", str(target), "--force")
    assert code == 0 and target.read_text().startswith("# mino-jupyter")


@pytest.mark.parametrize("argv,words", [
    (["--network", "host"], "--network host cannot be rendered as a Pod"),
    ([], "--network bridge needs --cluster-dns"),
    (["--network", "none", "--timeout", "0"], "--timeout must be a positive number"),
    (["--network", "none", "--memory", "lots"], 'container.memory must be a size like "4g"'),
    (["--network", "none", "--session", "My_Session"], "cannot name a Pod"),
    (["--netwrok", "none"], "unrecognized arguments: --netwrok"),
    (["--network-allow", "example.com"], 'invalid allow entry "example.com"'),
])
def test_bad_input_is_one_line_and_a_hint(isolated, capsys, argv, words):
    code, out, err = _main(capsys, *argv)
    assert code == 1 and out == ""
    first, hint = err.rstrip("\n").split("\n")
    assert words in first and hint.startswith("  hint: ")


def test_the_session_options_are_the_cell_s_own_declarations():
    """Declared once (commands.cell_parser): the kube command takes the same options, types and
    choices, so a size or a network entry means the same in both."""
    from mino_jupyter.commands import cell_parser

    def actions(parser):
        return {a.option_strings[-1]: a for a in parser._actions if a.option_strings}

    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    kube_actions, cell_actions = actions(sub.choices["kube"]), actions(cell_parser())
    for option in cli.KUBE_SESSION_OPTIONS:
        mine, theirs = kube_actions[option], cell_actions[option]
        assert (mine.dest, mine.type, mine.default, mine.metavar, mine.nargs, type(mine)) == \
            (theirs.dest, theirs.type, theirs.default, theirs.metavar, theirs.nargs, type(theirs)), option
