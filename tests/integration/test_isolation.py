"""Every network mode keeps its promise: bridge reaches no local service, nothing comes in, a
narrowed allowlist cuts what was open, package caches stay within their project.

Targets: loopback, the Podman bridge gateway, this machine's own addresses, and containers
these tests create. Listeners count what arrives, so "refused" is checked at the target too.
"""

from __future__ import annotations

import os
import uuid

import pytest

import json
import subprocess

from mino_jupyter import policy
from mino_jupyter.network import NetworkChoice
from mino_jupyter.owner import current_owner
from mino_jupyter.sessions import CellOptions, SessionManager
from tests.kernel import Capture, isolated_env
from tests.listeners import StreamingListener, TcpListener

pytestmark = pytest.mark.podman

CURL = "curl -sS -m 5 -o /dev/null -w '%{http_code}' "


def _manager(directory, home, notices=None):
    directory.mkdir(parents=True, exist_ok=True)
    m = SessionManager(cwd=lambda: directory, notice=(notices.append if notices is not None else lambda n: None),
                       watchdog=False, env={**os.environ, **isolated_env(home)})
    return m


@pytest.fixture
def manager(engine, base_image, tmp_path):
    notices = []
    m = _manager(tmp_path / "nb", tmp_path / "mino-home", notices)
    m.notices = notices
    yield m
    token = m.owner.token
    m.shutdown()
    assert engine.list({"io.mino.owner": token}) == []


def run(m, script, network=None, preset=None, allow=None, **opts):
    sink = Capture()
    choice = NetworkChoice("cell flags", network, preset, tuple(allow) if allow else None)
    result, _ = m.run_cell(script, CellOptions(network=choice, **opts), sink)
    return result.exit_code, "".join(sink.out), "".join(sink.err)


def _host_addresses():
    """This machine's addresses a container could try (its loopback excepted: that is the
    container's own there)."""
    found = []
    links = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True).stdout)
    for address in [a["local"] for link in links for a in link.get("addr_info", [])]:
        if address.startswith("127.") or address == "::1":
            continue
        found.append(f"[{address}%25eth0]" if address.startswith("fe80") else (f"[{address}]" if ":" in address else address))
    return found


# ---------------------------------------------------------------- bridge: not this machine
def test_bridge_reaches_the_internet_but_no_service_on_this_machine(manager, gateway):
    listener = TcpListener("0.0.0.0")
    try:
        targets = [gateway, *_host_addresses()]
        script = "\n".join(f"{CURL} -g http://{t}:{listener.port}/; echo \" {t} exit=$?\"" for t in targets)
        code, out, err = run(manager, script, network="bridge")
        lines = out.strip().splitlines()
        assert len(lines) == len(targets)
        for line in lines:
            assert line.startswith("000") and line.endswith("exit=7"), line  # refused at once
        assert listener.hits == 0
        assert any(n.startswith("mino: bridge refused") and f"{gateway}:{listener.port}/tcp" in n
                   for n in manager.notices), manager.notices
        # What bridge is for still works: names through Podman's resolver, a registry over HTTPS.
        code, out, err = run(manager, f"getent hosts pypi.org >/dev/null && echo dns-ok; {CURL} https://pypi.org/simple/six/",
                             network="bridge")
        assert out.split() == ["dns-ok", "200"], (out, err)
    finally:
        listener.close()


def test_an_allow_entry_opens_exactly_one_local_service_in_bridge_mode(manager, gateway):
    wanted, other = TcpListener("0.0.0.0"), TcpListener("0.0.0.0")
    try:
        code, out, err = run(manager, f"{CURL} http://host.containers.internal:{wanted.port}/; echo\n"
                                      f"{CURL} http://{gateway}:{other.port}/; echo \" exit=$?\"\n"
                                      f"{CURL} https://pypi.org/simple/six/",
                             network="bridge", allow=[f"host.containers.internal:{wanted.port}"])
        first, second, third = out.splitlines()
        assert first == "200" and wanted.hits == 1
        assert second.endswith("exit=7") and other.hits == 0
        assert third == "200"  # still bridge: the internet stays open
        assert manager.sessions["default"].plan.describe() == f"bridge (+host.containers.internal:{wanted.port})"
    finally:
        wanted.close(), other.close()


def _container_ip(engine, cid):
    info = engine.inspect(cid)
    networks = info["NetworkSettings"].get("Networks") or {}
    return next(iter(networks.values()))["IPAddress"]


LISTEN = ("nohup perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>8000,Listen=>5,ReuseAddr=>1) or die;"
          " while($c=$s->accept){open F,\">>/tmp/tcp-hits\";print F \"hit\\n\";close F;"
          "print $c \"HTTP/1.0 200 OK\\r\\n\\r\\nhi\\n\";close $c}' >/dev/null 2>&1 &\n"
          "nohup perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>8001,Proto=>\"udp\") or die;"
          " while($s->recv($m,100)){open F,\">>/tmp/udp-hits\";print F \"hit\\n\";close F}' >/dev/null 2>&1 &\n"
          "sleep 0.5")
HITS = "echo tcp=$(cat /tmp/tcp-hits 2>/dev/null | wc -l) udp=$(cat /tmp/udp-hits 2>/dev/null | wc -l)"


@pytest.mark.parametrize("flags", [{"network": "bridge"}, {"allow": ["{gateway}:9"]}])
def test_nothing_comes_in_from_other_containers(engine, base_image, manager, gateway, flags):
    flags = {k: ([v[0].format(gateway=gateway)] if isinstance(v, list) else v) for k, v in flags.items()}
    run(manager, LISTEN, session="listening", **flags)
    session = manager.sessions["listening"]
    address = _container_ip(engine, session.container_id)
    outsider = engine.run(policy.session_spec(policy.SessionRequest(
        name=f"mino-test-outsider-{uuid.uuid4().hex[:6]}", image=base_image, network="bridge",
        labels=policy.labels("test", current_owner().labels()), limits=engine.host_limits())))
    try:
        code, out, err = engine.exec_run(outsider, policy.probe_exec(
            f"curl -sS -m 3 http://{address}:8000/; echo tcp-exit=$?; echo probe > /dev/udp/{address}/8001; sleep 0.5"))
        assert b"tcp-exit=28" in out or b"tcp-exit=7" in out, (out, err)  # dropped: no answer at all
    finally:
        engine.remove(outsider)
    code, out, _ = run(manager, HITS, session="listening")
    assert out.strip() == "tcp=0 udp=0"
    code, out, _ = run(manager, f"curl -sS -m 3 http://127.0.0.1:8000/ >/dev/null; echo probe > /dev/udp/127.0.0.1/8001; "
                                f"sleep 0.3; {HITS}", session="listening")
    assert out.strip() == "tcp=1 udp=1", "control: the listeners work from the session's own loopback"


def test_another_kernels_session_is_out_of_reach(engine, base_image, manager, gateway, tmp_path):
    other = _manager(tmp_path / "other-nb", tmp_path / "other-home")
    try:
        sink = Capture()
        other.run_cell(LISTEN, CellOptions(), sink)
        address = _container_ip(engine, other.sessions["default"].container_id)
        code, out, err = run(manager, f"{CURL} http://{address}:8000/; echo \" exit=$?\"", network="bridge")
        assert out.strip().endswith("exit=7"), (out, err)
        sink = Capture()
        other.run_cell(HITS, CellOptions(), sink)
        assert "".join(sink.out).strip() == "tcp=0 udp=0"
    finally:
        other.shutdown()


# ---------------------------------------------------------------- allowlist: narrowing cuts open flows
def test_removing_an_entry_cuts_a_flow_that_is_already_open(manager, gateway):
    stream = StreamingListener(gateway)
    spare = TcpListener(gateway)
    try:
        run(manager, f"nohup curl -sN http://{gateway}:{stream.port}/ > /tmp/stream 2>/tmp/stream.err &\n"
                     "for i in $(seq 50); do [ -s /tmp/stream ] && break; sleep 0.1; done",
            allow=[f"{gateway}:{stream.port}", f"{gateway}:{spare.port}"])
        sent_before = stream.sent
        assert sent_before > 0
        code, out, _ = run(manager, "a=$(stat -c %s /tmp/stream); sleep 1; b=$(stat -c %s /tmp/stream); sleep 1\n"
                                    "c=$(stat -c %s /tmp/stream); echo $a $b $c",
                           allow=[f"{gateway}:{spare.port}"])
        a, b, c = (int(x) for x in out.split())
        assert b == c, f"the session still receives the removed destination's stream: {a} {b} {c}"
        assert stream.sent > sent_before  # the listener kept sending ...
        if not manager.engine.facts().rootless:  # through slirp4netns the listener's peer is slirp4netns
            assert stream.unacknowledged() >= 5 * 20, stream.unacknowledged()  # ... nothing of the last seconds arrived
    finally:
        stream.close(), spare.close()


# ---------------------------------------------------------------- caches belong to a project
@pytest.fixture
def python_image(engine):
    from mino_jupyter import image as images

    ref = images.VARIANTS["python"].ref
    if not engine.image_exists(ref):
        from tests.conftest import _unavailable

        _unavailable(f"{ref} is missing; `make test` builds it (setup --toolchains)")
    return ref


def test_package_caches_are_per_project(engine, python_image, tmp_path):
    home = tmp_path / "mino-home"  # one user, two projects
    a, b = _manager(tmp_path / "project-a", home), _manager(tmp_path / "project-b", home)
    try:
        def cell(m, script, session):
            sink = Capture()
            result, _ = m.run_cell(script, CellOptions(image="python", session=session,
                                                       network=NetworkChoice("cell flags", "none")), sink)
            return "".join(sink.out)

        marker = uuid.uuid4().hex
        assert cell(a, f"echo {marker} > ~/.cache/pip/planted && echo planted", "s1") == "planted\n"
        assert cell(b, "cat ~/.cache/pip/planted 2>/dev/null || echo absent", "s1") == "absent\n"
        assert cell(a, "cat ~/.cache/pip/planted", "s2") == f"{marker}\n"  # the project's own cache persists
    finally:
        a.shutdown(), b.shutdown()
