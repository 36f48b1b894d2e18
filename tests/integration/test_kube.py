"""`mino-jupyter kube` for real: the manifest it writes, run by `podman kube play`, keeps the
promises of a session. No cluster exists here; Podman runs the Pod (init containers first, a
failed one keeps the rest from starting), which is what these tests lean on.

Targets: the Podman bridge gateway (the `gateway` fixture, as in every network test) with
listeners these tests start and count. Each test removes the Pod it made, by its exact name,
also when it fails.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml

from mino_jupyter import firewall, kube, policy
from tests.conftest import ROOTLESS, _unavailable
from tests.kernel import isolated_env
from tests.listeners import TcpListener

pytestmark = pytest.mark.podman

CURL = "curl -sS -m 5 -o /dev/null -w '%{http_code} %{time_total}'"


@pytest.fixture(scope="module")
def play_env(engine, base_image, tmp_path_factory):
    """The environment `podman kube play` runs in. A Pod has no ulimits, so Podman gives its
    containers its own defaults, which on some hosts (this project's CI among them) are above
    the host's hard limits: every start then fails with `error setting rlimit`. The same ulimits
    policy gives every session container, as Podman's defaults (`CONTAINERS_CONF`: Podman 4.3
    reads it after its drop-ins; README, "Kubernetes manifest")."""
    if shutil.which("podman") is None:
        _unavailable("no podman command")
    conf = tmp_path_factory.mktemp("kube") / "ulimits.conf"
    limits = ", ".join(f'"{u["type"]}={u["soft"]}:{u["hard"]}"' for u in policy.container_ulimits(engine.host_limits()))
    conf.write_text(f"[containers]\ndefault_ulimits = [{limits}]\n")
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args, env=None, timeout=120, check=True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done


def render(tmp_path, *argv) -> tuple[str, dict, object]:
    """`mino-jupyter kube ARGV -o FILE` with a configuration of the test's own: (the Pod's name,
    the Pod, the file)."""
    session = f"kubetest-{uuid.uuid4().hex[:8]}"
    target = tmp_path / f"{session}.yaml"
    env = {**os.environ, **isolated_env(tmp_path / "mino-home", network=None)}
    done = subprocess.run([sys.executable, "-m", "mino_jupyter.cli", "kube", "--session", session, *argv,
                           "-o", str(target)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return kube.POD_PREFIX + session, yaml.safe_load(target.read_text().split("---\n", 1)[1]), target


@pytest.fixture(scope="module")
def limits_apply(engine) -> bool:
    return engine.facts().cgroup_limits


def without_limits(manifest) -> None:
    """Rootless Podman on cgroup v1 applies no cgroup limit; `kube play` then fails on the Pod's
    (`cannot set memory limit`) where the API ignores them with a warning. There the Pod runs
    without its `resources` (README); everything else is as written."""
    head, body = manifest.read_text().split("---\n", 1)
    pod = yaml.safe_load(body)
    for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        container.pop("resources")
    manifest.write_text(head + "---\n" + yaml.safe_dump(pod, sort_keys=False))


@contextlib.contextmanager
def played(pod_name, manifest, env, limits=True, *, down=False):
    """`podman kube play --network podman FILE` (the bridge the `gateway` fixture keeps up); the
    Pod and its volumes go afterwards, whatever happened: `podman pod rm -f -t 0 NAME`, or with
    `down`, `podman kube down FILE` first (the README gives both)."""
    if not limits:
        without_limits(manifest)
    try:
        yield podman("kube", "play", "--network", "podman", str(manifest), env=env, check=False)
    finally:
        if down:
            podman("kube", "down", str(manifest), env=env, check=False)
        podman("pod", "rm", "-f", "-t", "0", pod_name, check=False)
        left = podman("volume", "ls", "-q", "--filter", f"name={pod_name}-", check=False).stdout.split()
        for volume in [v for v in left if v.startswith(pod_name + "-")]:
            podman("volume", "rm", "-f", volume, check=False)
        assert left == [], f"volumes left behind by the Pod: {left}"


def in_cell(pod_name, script) -> subprocess.CompletedProcess:
    """`kubectl exec` here: an exec in the cell container, as its own user."""
    return podman("exec", f"{pod_name}-cell", "/bin/bash", "--noprofile", "--norc", "-c", script, check=False)


def status(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\w+):\s+(.*)$", text, re.M))


def installed_table(pod_name) -> str:
    """The Pod's nft table, listed from this machine in its network namespace (root only)."""
    pid = podman("inspect", "-f", "{{.State.Pid}}", f"{pod_name}-cell").stdout.strip()
    return subprocess.run(["nsenter", "-t", pid, "-n", "/usr/sbin/nft", "-j", "list", "table", "inet", "mino"],
                          capture_output=True, text=True, check=True, timeout=30).stdout


def test_the_pod_is_hardened_and_its_allowlist_holds(play_env, limits_apply, gateway, tmp_path):
    allowed, refused = TcpListener(gateway), TcpListener(gateway)
    try:
        pod_name, pod, manifest = render(tmp_path, "--network-allow", f"{gateway}:{allowed.port}",
                                         "--network-allow", "pypi.org:443")
        aliases = {a["ip"] for a in pod["spec"].get("hostAliases", [])}
        assert aliases, "pypi.org did not resolve on this machine: no hostAliases to test"
        with played(pod_name, manifest, play_env, limits_apply) as play:
            assert play.returncode == 0, play.stderr
            r = in_cell(pod_name, f"""
                cat /proc/self/status
                {CURL} http://{gateway}:{allowed.port}/; echo " allowed=$?"
                {CURL} http://{gateway}:{refused.port}/; echo " refused=$?"
                getent ahosts pypi.org | awk '{{print "alias", $1}}' | sort -u
                getent hosts example.com; echo "other-name=$?"
                /usr/sbin/nft list ruleset >/dev/null 2>&1; echo "nft=$?"
                touch /etc/mino-x 2>/dev/null; echo "root-write=$?"
                touch /workspace/a ~/b /tmp/c /var/tmp/d && echo writable
                kill -TERM 1; kill -INT 1; kill -KILL 1; sleep 0.3; echo "pid1=$(cat /proc/1/comm)"
            """)
            assert r.returncode == 0, r.stderr
            fields = status(r.stdout)
            for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert fields[cap] == "0000000000000000", (cap, fields[cap])
            assert fields["NoNewPrivs"] == "1"
            assert fields["Uid"].split() == ["1000"] * 4 and fields["Gid"].split() == ["1000"] * 4
            lines = r.stdout.splitlines()
            code, seconds, rc = next(l for l in lines if "allowed=" in l).split()
            assert (code, rc) == ("200", "allowed=0") and allowed.hits == 1
            code, seconds, rc = next(l for l in lines if "refused=" in l).split()
            assert (code, rc) == ("000", "refused=7") and float(seconds) < 1.0  # rejected at once
            assert refused.hits == 0
            assert {l.split()[1] for l in lines if l.startswith("alias ")} == aliases  # /etc/hosts, from hostAliases
            assert "other-name=2" in lines  # not allowed: no address, and no query left the Pod
            assert "nft=1" in lines  # no capability to read (or change) the rules
            assert "root-write=1" in lines and "writable" in lines
            assert "pid1=bash" in lines  # a cell cannot stop its container
            readme = podman("exec", f"{pod_name}-cell", "grep", "-E", "^(Cap|NoNewPrivs|Uid)", "/proc/self/status")
            assert {k: v for k, v in status(readme.stdout).items()} == \
                {k: v for k, v in fields.items() if k.startswith(("Cap", "NoNewPrivs", "Uid"))}
            if not ROOTLESS:
                # The installed table is exactly what mino's own sessions verify.
                v4 = {(gateway, allowed.port)} | {(a, 443) for a in aliases if ":" not in a}
                v6 = {(str(ipaddress.ip_address(a)), 443) for a in aliases if ":" in a}
                assert firewall.verify(installed_table(pod_name), firewall.Resolved(frozenset(v4), frozenset(v6)),
                                       "allowlist") == []
    finally:
        allowed.close(), refused.close()


def test_a_firewall_that_does_not_verify_keeps_the_cell_from_starting(play_env, limits_apply, gateway, tmp_path):
    listener = TcpListener(gateway)
    try:
        pod_name, pod, manifest = render(tmp_path, "--network-allow", f"{gateway}:{listener.port}")
        # The same manifest with one rule more than mino's model (an open output chain).
        text = manifest.read_text()
        fw = next(c for c in pod["spec"]["initContainers"] if c["name"] == "firewall")
        rules = fw["command"][3]
        opened = rules.replace("policy drop;\n", "policy drop;\n    meta l4proto tcp accept\n", 1)
        assert opened != rules
        fw["command"][3] = opened
        manifest.write_text(text.split("---\n", 1)[0] + "---\n" + yaml.safe_dump(pod, sort_keys=False))
        with played(pod_name, manifest, play_env, limits_apply) as play:
            assert play.returncode != 0
            assert "init container" in play.stderr and "exited with code 1" in play.stderr, play.stderr
            state = podman("inspect", "-f", "{{.State.Status}} {{.State.StartedAt}}", f"{pod_name}-cell").stdout
            assert state.startswith("created "), state  # never started
            assert listener.hits == 0
    finally:
        listener.close()


def test_bridge_refuses_this_machine_and_lets_the_cluster_dns_answer(play_env, limits_apply, gateway, tmp_path):
    resolv = open("/etc/resolv.conf").read()
    servers = [s for s in re.findall(r"^nameserver\s+(\S+)", resolv, re.M) if not ipaddress.ip_address(s).is_loopback]
    if not servers:  # Podman then gives Pods a resolver of its own: stand in with an address nobody uses
        servers = ["192.0.2.53"]
    listener = TcpListener(gateway)
    try:
        pod_name, pod, manifest = render(tmp_path, "--network", "bridge", "--cluster-dns", ",".join(servers))
        with played(pod_name, manifest, play_env, limits_apply, down=True) as play:
            assert play.returncode == 0, play.stderr  # the bridge ruleset verified on a real kernel
            r = in_cell(pod_name, f"{CURL} http://{gateway}:{listener.port}/; echo \" local=$?\"\n"
                                  "cat /etc/resolv.conf\n"
                                  "getent hosts pypi.org >/dev/null; echo \"dns=$?\"")
            lines = r.stdout.splitlines()
            code, seconds, rc = next(l for l in lines if "local=" in l).split()
            assert (code, rc) == ("000", "local=7") and listener.hits == 0
            if servers != ["192.0.2.53"] and any(f"nameserver {s}" in lines for s in servers):
                assert "dns=0" in lines, r.stdout  # port 53 of the cluster DNS stays open
    finally:
        listener.close()
