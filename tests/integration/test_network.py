"""Network modes against real Podman, real nftables and real listeners.

Targets are only loopback, the Podman bridge gateway and a network these tests create. Every
listener counts its hits, so "refused" is checked where the packet would have arrived too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid

import pytest

from mino_jupyter import libnft, session_firewall as firewall_mod
from mino_jupyter.firewall import NFT
from mino_jupyter.errors import FirewallError, UsageError
from mino_jupyter.network import NetworkChoice
from mino_jupyter.sessions import CellOptions, SessionManager
from tests.conftest import give_to_cell
from tests.kernel import Capture, isolated_env
from tests.listeners import TcpListener, UdpListener

pytestmark = pytest.mark.podman


@pytest.fixture
def manager(engine, base_image, tmp_path):
    notices = []
    m = SessionManager(cwd=lambda: tmp_path, notice=notices.append, watchdog=False,
                       env={**os.environ, **isolated_env(tmp_path / "mino-home")})
    m.notices = notices
    yield m
    token = m.owner.token
    m.shutdown()
    assert engine.list({"io.mino.owner": token}) == []


def run(manager, script, **opts):
    sink = Capture()
    network = NetworkChoice("cell flags", opts.pop("network", None), opts.pop("preset", None),
                            tuple(opts.pop("allow")) if "allow" in opts else None)
    result, session = manager.run_cell(script, CellOptions(network=network, **opts), sink)
    return result.exit_code, "".join(sink.out), "".join(sink.err)


CURL = "curl -sS -m 5 -o /dev/null -w '%{http_code}' "


# ---------------------------------------------------------------- allowlist basics
def test_allowed_port_answers_and_other_port_is_refused_fast(manager, gateway):
    allowed, other = TcpListener(gateway), TcpListener(gateway)
    try:
        code, out, err = run(manager, f"{CURL} http://{gateway}:{allowed.port}/; echo\n"
                                      f"{CURL} http://{gateway}:{other.port}/; echo \" exit=$?\"",
                             allow=[f"{gateway}:{allowed.port}"])
        first, second = out.splitlines()
        assert first == "200" and allowed.hits == 1
        assert second.endswith("exit=7") and other.hits == 0  # refused: curl's "couldn't connect"
        assert "Couldn't connect to server" in err
        assert (f"mino: the allowlist refused 1 connection attempt(s) to {gateway}:{other.port}/tcp "
                "(not allowed; add them with --network-allow HOST:PORT)") in manager.notices
        # The next cell: a name that is not allowed (asked of the session's own name server on
        # loopback) is named; nothing refused this time, so no refusal line comes again.
        from tests.conftest import ROOTLESS

        before = len(manager.notices)
        run(manager, "getent hosts not-allowed.invalid; true", allow=[f"{gateway}:{allowed.port}"])
        assert manager.notices[before:] == [
            "mino: not-allowed.invalid is not on this session's allowlist, so it does not resolve here; "
            "add --network-allow not-allowed.invalid:443 (or the port it uses)"]
        # rootful and local: the counters are read from this machine (no exec in the firewall container)
        assert (manager.sessions["default"].firewall.counters is not None) is (not ROOTLESS)
    finally:
        allowed.close(), other.close()


def test_capabilities_are_zero_in_allowlist_mode_and_the_firewall_is_invisible(manager, gateway):
    code, out, _ = run(manager, "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb)' /proc/self/status; grep NoNewPrivs /proc/self/status;"
                                "ps -eo user,args", allow=[f"{gateway}:9"])
    caps = [line.split()[1] for line in out.splitlines() if line.startswith("Cap")]
    assert caps and all(int(c, 16) == 0 for c in caps)
    assert "NoNewPrivs:\t1" in out
    assert not any(line.startswith("root") for line in out.splitlines()[6:]), out  # no root process here


def test_tampering_fails_and_the_allowlist_still_holds(manager, gateway):
    allowed, other = TcpListener(gateway), TcpListener(gateway)
    try:
        code, out, err = run(manager, "iptables -F; echo iptables=$?; ip6tables -F; echo ip6tables=$?\n"
                                      "nft flush ruleset; echo nft=$?; ip link set eth0 down; echo link=$?\n"
                                      "ip route del default; echo route=$?\n"
                                      f"{CURL} http://{gateway}:{allowed.port}/; echo\n"
                                      f"{CURL} http://{gateway}:{other.port}/; echo \" exit=$?\"",
                             allow=[f"{gateway}:{allowed.port}"])
        lines = out.splitlines()
        for tool in ("iptables", "ip6tables", "nft", "link", "route"):
            value = next(line for line in lines if line.startswith(tool + "="))
            assert value != f"{tool}=0", value
        assert lines[-2] == "200" and allowed.hits == 1
        assert lines[-1].endswith("exit=7") and other.hits == 0
    finally:
        allowed.close(), other.close()


def test_ipv6_egress_is_refused(manager, gateway, engine):
    """The bridge's IPv6 link-local address is this machine too: only an explicit allow entry
    reaches it; plain bridge and an allowlist without it refuse it."""
    if engine.facts().rootless:
        pytest.skip("host limit: a rootless session's bridge lives in the user's own network namespace, so its "
                    "IPv6 link-local address is not this machine (and slirp4netns forwards no IPv6 here)")
    link_local = _bridge_link_local()
    if link_local is None:
        pytest.fail("the podman0 bridge has no usable IPv6 link-local address on this host")
    listener = TcpListener(link_local, scope="podman0")
    try:
        target = f"http://[{link_local}%25eth0]:{listener.port}/"
        # A new interface's link-local address is unusable until duplicate detection is done.
        ready = "for i in $(seq 50); do ip -6 addr show dev eth0 | grep -q tentative || break; sleep 0.1; done\n"
        code, out, _ = run(manager, ready + f"{CURL} -g '{target}'", session="v6-open", network="bridge",
                           allow=[f"[{link_local}]:{listener.port}"])
        assert out == "200" and listener.hits == 1, "control: an explicit allow entry must reach it"
        for session, flags in (("v6-bridge", {"network": "bridge"}), ("v6-allow", {"allow": [f"{gateway}:9"]})):
            code, out, err = run(manager, ready + f"{CURL} -g '{target}'; echo \" exit=$?\"", session=session, **flags)
            assert out.strip().endswith("exit=7") and listener.hits == 1, (session, out, err)
            assert any(f"[{link_local}]:{listener.port}/tcp" in n for n in manager.notices), manager.notices
            manager.notices.clear()
    finally:
        listener.close()


def _bridge_link_local():
    for _ in range(50):
        out = subprocess.run(["ip", "-6", "-o", "addr", "show", "dev", "podman0", "scope", "link"],
                             capture_output=True, text=True).stdout
        if out and "tentative" not in out:
            return out.split()[3].split("/")[0]
        time.sleep(0.1)
    return None


def test_udp_to_port_53_never_arrives(manager, gateway):
    import fcntl

    if os.geteuid() != 0 and int(open("/proc/sys/net/ipv4/ip_unprivileged_port_start").read()) > 53:
        pytest.skip("host limit: without root, nothing on this machine can listen on port 53 to count what "
                    "arrives there (the rule itself is checked in the rootful run and in tests/unit)")

    # One port 53 on the gateway for the whole machine: a concurrent run waits for it.
    lock = open("/tmp/mino-test-gateway-udp53.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    udp = UdpListener(gateway, 53)
    try:
        run(manager, f"echo probe > /dev/udp/{gateway}/53", session="udp-host", network="host")
        assert _wait(lambda: udp.hits == 1), "control: host mode must deliver the datagram"
        run(manager, f"echo probe > /dev/udp/{gateway}/53", session="udp-bridge", network="bridge")
        time.sleep(0.5)
        assert udp.hits == 1, "a datagram to this machine's port 53 left a bridge container"
        code, out, err = run(manager, f"echo probe > /dev/udp/{gateway}/53; echo rc=$?\n"
                                      "getent hosts pypi.org; getent hosts example.com; echo lookups=$?",
                             session="udp-allow", allow=[f"{gateway}:9"])
        time.sleep(0.5)
        assert udp.hits == 1, "a datagram to port 53 left the allowlisted container"
        assert "rc=1" in out and "lookups=2" in out
    finally:
        udp.close()
        lock.close()


def test_names_resolve_only_to_mino_answers(manager, gateway):
    # pypi.org resolves on this host (its registry is reachable); inside, only allowlisted names do.
    assert socket.getaddrinfo("pypi.org", 443), "pypi.org must resolve on the host for this test"
    code, out, _ = run(manager, "cat /etc/resolv.conf; getent hosts pypi.org || echo no-pypi",
                       allow=[f"{gateway}:9"])
    assert "nameserver 127.0.0.1" in out and "no-pypi" in out
    code, out, _ = run(manager, "getent hosts pypi.org || echo no-pypi", session="reg", preset="registries")
    host_answers = {info[4][0] for info in socket.getaddrinfo("pypi.org", 443)}
    assert out.split()[0] in host_answers and out.split()[1] == "pypi.org"


def test_registries_preset_reaches_pypi_over_verified_https(manager):
    code, out, err = run(manager, f"{CURL} https://pypi.org/simple/six/; echo", preset="registries")
    assert out.strip() == "200", err


def test_host_mode_reaches_host_loopback_and_bridge_does_not(manager):
    listener = TcpListener("127.0.0.1")
    try:
        code, out, _ = run(manager, f"{CURL} http://127.0.0.1:{listener.port}/", session="h", network="host")
        assert out == "200" and listener.hits == 1
        assert "mino: session 'h' uses the host network: cells reach everything this machine reaches, " \
               "its local services included" in manager.notices
        code, out, _ = run(manager, f"{CURL} http://127.0.0.1:{listener.port}/; echo \" exit=$?\"", session="b")
        assert out.strip().endswith("exit=7") and listener.hits == 1
    finally:
        listener.close()


def test_bridge_rules_come_from_this_machine_on_a_local_rootful_engine(manager, engine, gateway, monkeypatch):
    """Rootful and local: a bridge session's rules are set by this machine's nft in Podman's own
    namespace for it (no firewall container), and hold. The namespace is entered only when it is
    the container's (another process's pid: refused). When nft here fails, the firewall container
    does it, said once. Rootless: the firewall container, always."""
    from tests.conftest import ROOTLESS

    listener = TcpListener(gateway)
    try:
        code, out, _ = run(manager, f"{CURL} http://{gateway}:{listener.port}/; echo \" exit=$?\"")
        assert out.strip().endswith("exit=7") and listener.hits == 0
        session = manager.sessions["default"]
        roles = sorted(c["Labels"]["io.mino.role"] for c in engine.list({"io.mino.owner": manager.owner.token}))
        assert session.firewall.from_host is (not ROOTLESS)
        assert roles == (["session"] if not ROOTLESS else ["firewall", "session"])
        if ROOTLESS:
            return
        info = engine.inspect(session.container_id)
        key, pid = info["NetworkSettings"]["SandboxKey"], info["State"]["Pid"]
        fd = firewall_mod.open_netns(key, pid)
        assert fd is not None
        try:  # the library answers as nft does there, from a thread that entered it; this one never moves
            ours = os.readlink("/proc/thread-self/ns/net")
            listing = ("-j", "list", "table", "inet", "mino")
            via_nft = subprocess.run([firewall_mod.HostRules.NSENTER, f"--net=/proc/self/fd/{fd}", NFT, *listing],
                                     capture_output=True, pass_fds=(fd,), check=True).stdout
            code, via_library, _ = libnft.run(fd, listing)
            assert code == 0 and json.loads(via_library) == json.loads(via_nft)
            assert os.readlink("/proc/thread-self/ns/net") == ours
            assert subprocess.run([NFT, "list", "table", "inet", "mino"], capture_output=True).returncode == 1, \
                "a session's rules landed in this machine's own namespace"
            own = os.open("/proc/self/ns/net", os.O_RDONLY)
            try:
                assert libnft.run(own, listing)[0] == 1  # this machine has no such table: no wrong namespace
            finally:
                os.close(own)
        finally:
            os.close(fd)
        assert firewall_mod.open_netns(key, os.getpid()) is None  # the kernel's own namespace is not it

        monkeypatch.setattr(firewall_mod.HostRules, "nft", lambda self, *a, stdin=b"": (1, b"", b"Error: no way\n"))
        code, out, _ = run(manager, f"{CURL} http://{gateway}:{listener.port}/; echo \" exit=$?\"", session="other")
        assert out.strip().endswith("exit=7") and listener.hits == 0
        assert not manager.sessions["other"].firewall.from_host
        assert sum("this machine's nft could not set a session's rules (nft failed (exit 1): Error: no way)" in n
                   for n in manager.notices) == 1
        assert "firewall" in [c["Labels"]["io.mino.role"] for c in engine.list({"io.mino.owner": manager.owner.token})]
    finally:
        listener.close()


def test_none_mode_has_no_network(manager, gateway):
    listener = TcpListener(gateway)
    try:
        code, out, _ = run(manager, f"{CURL} http://{gateway}:{listener.port}/; echo \" exit=$?\"; ip -o -4 addr show | wc -l",
                           network="none")
        assert out.splitlines()[0].endswith("exit=7") and listener.hits == 0
        assert out.splitlines()[1] == "1"  # loopback only
    finally:
        listener.close()


def test_host_plus_preset_warns_and_enforces_the_allowlist(manager, gateway):
    """The gateway listener is reachable in host mode (the control) and refused under the
    allowlist that overrides host: the allowlist really applies, not only its warning."""
    listener = TcpListener(gateway)
    try:
        code, out, _ = run(manager, f"{CURL} http://{gateway}:{listener.port}/", session="plain-host", network="host")
        assert out == "200" and listener.hits == 1, "control: host mode reaches the gateway listener"
        code, out, _ = run(manager, f"{CURL} http://{gateway}:{listener.port}/ ; echo \" exit=$?\"",
                           network="host", preset="registries")
        assert "mino: --network host overridden by --network-preset registries" in manager.notices
        assert out.strip().endswith("exit=7") and listener.hits == 1
    finally:
        listener.close()


def test_changing_a_sessions_allowlist_replaces_its_rules(manager, gateway):
    a, b = TcpListener(gateway), TcpListener(gateway)
    try:
        run(manager, "true", allow=[f"{gateway}:{a.port}"])
        code, out, _ = run(manager, f"{CURL} http://{gateway}:{b.port}/; echo \" exit=$?\"")
        assert out.strip().endswith("exit=7") and b.hits == 0
        code, out, _ = run(manager, f"{CURL} http://{gateway}:{b.port}/; echo; {CURL} http://{gateway}:{a.port}/; echo \" exit=$?\"",
                           allow=[f"{gateway}:{b.port}"])
        assert out.splitlines()[0] == "200" and b.hits == 1
        assert out.splitlines()[1].endswith("exit=7") and a.hits == 0
        assert manager.sessions["default"].plan.describe() == f"allowlist ({gateway}:{b.port})"
    finally:
        a.close(), b.close()


def test_the_panels_apply_changes_entries_live_as_cell_flags_do(manager, gateway):
    """"apply to this kernel" with only other allow entries: the rules change in place; the
    container, its processes and its /tmp stay (a file there was lost when it restarted)."""
    a, b = TcpListener(gateway), TcpListener(gateway)
    try:
        manager.remember_network("allowlist", None, "session", (f"{gateway}:{a.port}",))
        run(manager, "echo kept > /tmp/state")
        container = manager.sessions["default"].container_id
        message = manager.remember_network("allowlist", None, "session", (f"{gateway}:{b.port}",))
        assert "restarts" not in message
        code, out, _ = run(manager, f"cat /tmp/state; {CURL} http://{gateway}:{b.port}/; echo; "
                                    f"{CURL} http://{gateway}:{a.port}/; echo \" exit=$?\"")
        assert manager.sessions["default"].container_id == container
        assert out.splitlines()[:2] == ["kept", "200"] and b.hits == 1
        assert out.splitlines()[2].endswith("exit=7") and a.hits == 0
    finally:
        a.close(), b.close()


def test_re_resolution_updates_rules_and_hosts(engine, base_image, gateway, tmp_path, monkeypatch):
    """A name's answers change between cells: rules and /etc/hosts follow, from outside."""
    if engine.facts().rootless:
        pytest.skip("host limit: a rootless session reaches this machine at one address only (through "
                    "slirp4netns); this test needs two (the rootful run has them)")
    net = f"mino-test-{uuid.uuid4().hex[:6]}"
    subnet_octet = 200 + uuid.uuid4().int % 50
    engine.create_network({"name": net, "driver": "bridge",
                           "subnets": [{"subnet": f"10.{subnet_octet}.7.0/24", "gateway": f"10.{subnet_octet}.7.1"}]})
    second_gateway = f"10.{subnet_octet}.7.1"
    answers = {"svc.mino.test": [gateway]}
    m = SessionManager(cwd=lambda: tmp_path, notice=lambda n: None, watchdog=False,
                       resolver=lambda name: answers.get(name, []),
                       env={**os.environ, **isolated_env(tmp_path / "mino-home")})
    from mino_jupyter import policy
    from mino_jupyter.owner import current_owner

    holder = None
    try:
        # A container on the test network brings its bridge (and so its gateway address) up.
        holder = engine.run(policy.session_spec(policy.SessionRequest(
            name=f"{net}-holder", image=base_image, network="bridge",
            labels=policy.labels("test", current_owner().labels()),
            limits=engine.host_limits())) | {"networks": {net: {}}})
        listener = TcpListener("0.0.0.0")
        try:
            code, out, _ = run(m, f"{CURL} http://svc.mino.test:{listener.port}/; getent hosts svc.mino.test",
                               allow=[f"svc.mino.test:{listener.port}"])
            assert out.startswith("200") and gateway in out and listener.hits == 1
            answers["svc.mino.test"] = [second_gateway]
            monkeypatch.setattr(firewall_mod, "RESOLVE_REFRESH", 0.0)
            code, out, _ = run(m, f"getent hosts svc.mino.test; curl -sS -m 5 http://svc.mino.test:{listener.port}/\n"
                                  f"{CURL} http://{gateway}:{listener.port}/; echo \" exit=$?\"")
            lines = out.splitlines()
            assert lines[0].split() == [second_gateway, "svc.mino.test"]
            assert lines[1] == listener.token and listener.hits == 2
            assert lines[2].endswith("exit=7") and listener.hits == 2  # the old answer is refused now
        finally:
            listener.close()
    finally:
        m.shutdown()
        if holder:
            engine.remove(holder)
        engine.remove_network(net)


def test_firewall_failure_runs_nothing(engine, base_image, gateway, tmp_path):
    """An image without nft for the firewall: the cell fails, its first line never runs."""
    tag = f"localhost/mino-test-nonft:{uuid.uuid4().hex[:8]}"  # its own: concurrent runs never share it
    build = subprocess.run(["podman", "build", "-q", "-t", tag, "-f", "-", str(tmp_path)],
                           input=f"FROM {base_image}\nUSER 0\nRUN rm -f /usr/sbin/nft\nUSER 1000\n",
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    os_dir = tmp_path / "ws"
    os_dir.mkdir()
    give_to_cell(os_dir)
    m = SessionManager(cwd=lambda: os_dir, notice=lambda n: None, watchdog=False,
                       env={**os.environ, **isolated_env(tmp_path / "mino-home")})
    m.firewall_image = tag
    try:
        with pytest.raises(FirewallError) as e:
            run(m, "touch ran-anyway", allow=[f"{gateway}:9"])
        assert e.value.message.startswith("the allowlist firewall could not be installed, so nothing ran: nft failed")
        assert not (os_dir / "ran-anyway").exists()
        assert engine.list({"io.mino.owner": m.owner.token}) == []
        assert "default" not in m.sessions
    finally:
        m.shutdown()
        subprocess.run(["podman", "rmi", "-f", tag], capture_output=True)


def test_mode_change_of_a_live_session_is_refused(manager):
    run(manager, "true")
    with pytest.raises(UsageError) as e:
        run(manager, "true", network="none")
    assert e.value.message == "session 'default' uses network bridge, not none"


def _wait(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()
