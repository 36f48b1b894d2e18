import os
import json
from pathlib import Path

import pytest

from mino_jupyter import firewall
from mino_jupyter.network import AllowEntry


def fake_resolver(table):
    return lambda name: table.get(name, [])


def test_resolution_splits_families_and_reports_unresolved():
    entries = (AllowEntry("pypi.org", 443), AllowEntry("v6only.test", 443), AllowEntry("nowhere.test", 443),
               AllowEntry("10.88.0.1", 8080), AllowEntry("2001:db8::5", 22))
    r = firewall.resolve_entries(entries, fake_resolver({"pypi.org": ["151.101.0.223", "2a04:4e42::223"],
                                                         "v6only.test": ["2001:db8::7"]}))
    assert r.v4 == {("151.101.0.223", 443), ("10.88.0.1", 8080)}
    assert r.v6 == {("2a04:4e42::223", 443), ("2001:db8::7", 443), ("2001:db8::5", 22)}
    assert r.hosts == (("pypi.org", "151.101.0.223"), ("pypi.org", "2a04:4e42::223"), ("v6only.test", "2001:db8::7"))
    assert r.unresolved == ("nowhere.test",)


def test_a_hanging_resolver_does_not_hang_us():
    import time

    def slow(name):
        time.sleep(3)
        return ["1.1.1.1"]

    start = time.monotonic()
    r = firewall.resolve_entries((AllowEntry("slow.test", 1),), slow, timeout=0.2)
    assert r.unresolved == ("slow.test",) and time.monotonic() - start < 2


def test_ruleset_denies_by_default_and_rejects():
    r = firewall.Resolved(frozenset({("10.0.0.1", 443)}), frozenset({("2001:db8::1", 80)}))
    text = firewall.ruleset(r)
    assert "type filter hook output priority 0; policy drop;" in text
    assert "type filter hook input priority 0; policy drop;" in text  # no inbound
    assert "elements = { 10.0.0.1 . 443 }" in text and "elements = { 2001:db8::1 . 80 }" in text
    assert "reject with tcp reset" in text and "reject with icmpx type admin-prohibited" in text
    assert text.index("delete table inet mino") < text.index("table inet mino {")  # atomic replace
    assert "ct state established,related accept" not in text  # narrowing cuts open flows
    empty = firewall.ruleset(firewall.Resolved())
    assert "set allow4 { type ipv4_addr . inet_service; }" in empty


def test_bridge_ruleset_refuses_local_networks_but_not_the_internet():
    local = firewall.local_networks([("127.0.0.1", 8), ("192.0.2.2", 24), ("fd00::2", 64), ("203.0.112.9", 24)],
                                    ["10.88.0.0/16", "10.89.0.0/24"], ["10.88.0.1"])
    assert "10.88.0.0/16" in local.v4 and "10.89.0.0/24" in local.v4  # other containers
    assert "192.0.2.0/24" in local.v4  # a private (documentation) subnet this machine is on
    assert "203.0.112.9/32" in local.v4 and "203.0.112.0/24" not in local.v4  # public: only our address
    assert "169.254.0.0/16" in local.v4 and "fe80::/10" in local.v6  # metadata services, link-local
    assert "fd00::/64" in local.v6
    text = firewall.ruleset(firewall.Resolved(), "bridge", local)
    assert "type filter hook output priority 0; policy accept;" in text
    assert "ip daddr @local4 jump refuse" in text and "ip6 daddr @local6 jump refuse" in text
    assert "set dns4 { type ipv4_addr; elements = { 10.88.0.1 }; }" in text
    assert text.index("@dns4 th dport 53 accept") < text.index("@local4 jump refuse")
    assert "type filter hook input priority 0; policy drop;" in text


DATA = Path(__file__).parent / "data"
FIXTURE_LOCAL = firewall.local_networks([("127.0.0.1", 8), ("192.0.2.2", 24), ("fd00::2", 64),
                                         ("fe80::fc:ff:fe00:1", 64)], ["10.88.0.0/16"], ["10.255.255.53"])
FIXTURE_RESOLVED = firewall.Resolved(frozenset({("10.88.0.1", 8080)}), frozenset({("2001:db8::1", 443)}))


def _recorded(mode):
    """What nft 1.0.6 listed after installing firewall.ruleset(FIXTURE_RESOLVED, mode, FIXTURE_LOCAL)."""
    return json.loads((DATA / f"nft-{mode}.json").read_text())


def _rules(doc, chain):
    return [o for o in doc["nftables"] if "rule" in o and o["rule"]["chain"] == chain]


@pytest.mark.parametrize("mode", ["bridge", "allowlist"])
def test_verify_accepts_exactly_what_was_installed(mode):
    assert firewall.verify(json.dumps(_recorded(mode)), FIXTURE_RESOLVED, mode, FIXTURE_LOCAL) == []


def _mutated(mode, change):
    doc = _recorded(mode)
    change(doc)
    return firewall.verify(json.dumps(doc), FIXTURE_RESOLVED, mode, FIXTURE_LOCAL)


def _insert(chain, expr, at=0):
    def change(doc):
        first = _rules(doc, chain)[0]
        doc["nftables"].insert(doc["nftables"].index(first) + at, {"rule": {**first["rule"], "expr": expr}})
    return change


@pytest.mark.parametrize("mode", ["bridge", "allowlist"])
@pytest.mark.parametrize("name,change", [
    ("an extra tcp accept", _insert("output", [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}},
                                                           "right": "tcp"}}, {"accept": None}])),
    ("udp 53 allowed", _insert("output", [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}},
                                                     "right": 53}}, {"accept": None}], at=2)),
    ("an inbound accept", _insert("input", [{"accept": None}], at=1)),
    ("a rule removed", lambda doc: doc["nftables"].remove(_rules(doc, "refuse")[-1])),
    ("rules swapped", lambda doc: (lambda r: r[0]["rule"].update(expr=r[1]["rule"]["expr"]))(_rules(doc, "output"))),
    ("output policy accept", lambda doc: next(o for o in doc["nftables"] if o.get("chain", {}).get("name") == "input")
     ["chain"].update(policy="accept")),
    ("reject became drop", lambda doc: _rules(doc, "refuse")[2]["rule"]["expr"].__setitem__(2, {"drop": None})),
    ("allow4 holds more", lambda doc: next(o for o in doc["nftables"] if o.get("set", {}).get("name") == "allow4")
     ["set"]["elem"].append({"concat": ["1.2.3.4", 22]})),
    ("local4 lost a network", lambda doc: next(o for o in doc["nftables"] if o.get("set", {}).get("name") == "local4")
     ["set"]["elem"].pop()),
])
def test_verify_catches_every_difference(mode, name, change):
    assert _mutated(mode, change), name


def test_verify_reads_garbage_as_a_problem():
    assert firewall.verify("not json", firewall.Resolved())[0].startswith("unreadable")


def test_refused_report():
    text = "\n".join([
        json.dumps({"nftables": [{"counter": {"name": "refused_tcp", "packets": 2}},
                                 {"counter": {"name": "refused_udp", "packets": 1}}]}),
        json.dumps({"nftables": [{"set": {"name": "refused4", "elem": [{"concat": ["10.88.0.1", "tcp", 8081]},
                                                                      {"concat": ["203.0.113.80", "udp", 53]}]}}]}),
        json.dumps({"nftables": [{"set": {"name": "refused6"}}]}),
        json.dumps({"asked": ["example.com", "nowhere.test"]}),
    ])
    refused = firewall.parse_refused(text)
    assert refused.count == 3 and refused.asked == ("example.com", "nowhere.test")
    resolved = firewall.Resolved(hosts=(("pypi.org", "203.0.113.80"),), unresolved=("nowhere.test",))
    assert firewall.describe_refused(refused, resolved) == [
        "mino: the allowlist refused 3 connection attempt(s) to 10.88.0.1:8081/tcp, "
        "pypi.org (203.0.113.80):53/udp (not allowed; add them with --network-allow HOST:PORT)",
        "mino: example.com is not on this session's allowlist, so it does not resolve here; "
        "add --network-allow example.com:443 (or the port it uses)"]
    assert firewall.describe_refused(refused, resolved, "bridge")[0].startswith(
        "mino: bridge refused 3 connection attempt(s) to this machine or its local networks: 10.88.0.1:8081/tcp")
    assert firewall.describe_refused(firewall.Refused(), resolved) == []


def test_rewrite_hosts_replaces_only_allowlisted_names():
    current = "127.0.0.1\tlocalhost\n10.88.0.1\thost.containers.internal\n1.2.3.4\tpypi.org\n"
    text = firewall.rewrite_hosts(current, {"pypi.org"}, [("pypi.org", "5.6.7.8")])
    assert text == ("127.0.0.1\tlocalhost\n10.88.0.1\thost.containers.internal\n"
                    "5.6.7.8\tpypi.org\t# mino allowlist\n")
    again = firewall.rewrite_hosts(text, {"pypi.org"}, [("pypi.org", "9.9.9.9")])
    assert again.count("pypi.org") == 1 and "9.9.9.9" in again


def test_agent_protocol_framing():
    assert firewall.install_request("table inet mino {}\n") == b"install 19\ntable inet mino {}\n"
    assert firewall.split_answer(b'{"nftables": []}\n@@mino-end 0\n') == (0, '{"nftables": []}\n')
    assert firewall.split_answer(b"Error: syntax\n@@mino-end 1\n") == (1, "Error: syntax\n")
    assert "\\@\\@mino-end" in firewall.AGENT  # perl: @ escaped in strings
    assert firewall.agent_command("allowlist")[-1] == "dns" and firewall.agent_command("bridge")[-1] != "dns"
    assert firewall.agent_command("bridge")[0] == "/usr/bin/perl"


def test_names_are_resolved_again_only_after_the_refresh_interval():
    from mino_jupyter import session_firewall
    from mino_jupyter.network import NetworkPlan

    now = [1000.0]
    fw = session_firewall.SessionFirewall(None, session_container="c", plan=NetworkPlan("allowlist"),
                                          resolver=lambda n: [], notice=lambda m: None, hosts_path=None,
                                          local=firewall.LocalNetworks(), clock=lambda: now[0])
    fw.resolved_at = now[0]
    now[0] += session_firewall.RESOLVE_REFRESH
    assert not fw.due()  # exactly the interval: not yet
    now[0] += 0.001
    assert fw.due()


# ---------------------------------------------------------------------- rules from this machine
class _Nft:
    """HostRules with nft answering from a script (what it was asked is kept)."""

    def __init__(self, answers):
        from mino_jupyter import session_firewall

        self.rules = session_firewall.HostRules(-1)
        self.asked = []

        def nft(*args, stdin=b""):
            self.asked.append((args, stdin))
            return answers[args[:2]] if args[:2] in answers else (0, b"", b"")
        self.rules.nft = nft

    def exchange(self, request):
        self.rules.send(request)
        return self.rules.read_until(firewall.END)


def test_host_rules_speak_the_agent_s_protocol():
    listing = b'{"nftables": [{"table": {"name": "mino"}}]}\n'
    ok = _Nft({("-j", "list"): (0, listing, b"")})
    out, _ = ok.exchange(firewall.install_request("table inet mino {}\n"))
    assert firewall.split_answer(out) == (0, listing.decode())
    assert ok.asked[0] == (("-f", "-"), b"table inet mino {}\n")  # the rules on stdin, never in argv

    failing = _Nft({("-f", "-"): (1, b"", b"Error: syntax error\n")})
    out, err = failing.exchange(firewall.install_request("table inet mino {\n"))
    assert firewall.split_answer(out)[0] == 1 and b"syntax error" in err
    assert len(failing.asked) == 1  # nothing listed after a failed install


def test_host_rules_report_lists_and_empties_the_refused_sets_only_after_a_refusal():
    quiet = _Nft({("-j", "reset"): (0, b'{"nftables": [{"counter": {"name": "refused_tcp", "packets": 0}}]}', b"")})
    out, _ = quiet.exchange(firewall.REPORT_REQUEST)
    assert firewall.parse_refused(firewall.split_answer(out)[1]) == firewall.Refused()
    assert len(quiet.asked) == 1
    refused = _Nft({("-j", "reset"): (0, b'{"nftables": [{"counter": {"name": "refused_tcp", "packets": 2}}]}', b""),
                    ("-j", "list"): (0, b'{"nftables": [{"set": {"name": "refused4", "elem": '
                                        b'[{"concat": ["10.0.0.1", "tcp", 22]}]}}]}', b"")})
    out, _ = refused.exchange(firewall.REPORT_REQUEST)
    got = firewall.parse_refused(firewall.split_answer(out)[1])
    assert got.count == 2 and got.destinations == (("10.0.0.1", "tcp", 22),)
    assert [a for a, _ in refused.asked].count(("flush", "set", "inet", "mino", "refused4")) == 1


@pytest.mark.parametrize("key", [None, "/tmp/netns-1", "/run/netns/../../proc/self/ns/net", "/run/netns/missing"])
def test_a_namespace_file_that_is_not_podman_s_is_never_entered(key):
    from mino_jupyter import session_firewall

    assert session_firewall.open_netns(key, os.getpid()) is None


def test_the_library_takes_only_mino_s_own_nft_commands():
    from mino_jupyter import libnft

    assert libnft.command(("-f", "-"), b"table inet mino {}\n") == (b"table inet mino {}\n", False)
    assert libnft.command(("-j", "reset", "counters", "table", "inet", "mino"), b"") == \
        (b"reset counters table inet mino", True)
    assert libnft.command(("flush", "set", "inet", "mino", "refused4"), b"") == (b"flush set inet mino refused4", False)
    for odd in ((), ("-j",), ("-a", "list", "ruleset"), ("list", "tables;", "flush", "ruleset"), ("-f", "/etc/x")):
        assert libnft.command(odd, b"") is None, odd  # nft itself runs those, as before


def test_the_library_never_runs_outside_the_namespace_it_was_given(monkeypatch):
    """A thread that could not enter (setns refused, or another namespace after it) runs nothing:
    in the kernel's own namespace a session's ruleset would be this machine's firewall."""
    from mino_jupyter import libnft

    ran = []

    class Library:
        def __init__(self, entered):
            self.entered = entered

        def setns(self, fd, kind):
            return 0 if self.entered else -1

        def run(self, command, json):
            ran.append(command)
            return 0, b"", b""

    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    other = os.open("/proc/self/ns/uts", os.O_RDONLY)  # not a network namespace: never "inside" it
    try:
        monkeypatch.setattr(libnft, "_library", lambda: Library(False))
        assert libnft.run(own, ("-j", "list", "ruleset")) is None
        monkeypatch.setattr(libnft, "_library", lambda: Library(True))
        assert libnft.run(other, ("-j", "list", "ruleset")) is None
        assert ran == []
        assert libnft.run(own, ("-j", "list", "ruleset")) == (0, b"", b"")  # entered and checked: it runs
        assert ran == [b"list ruleset"]
    finally:
        os.close(own), os.close(other)


class _Channel:
    """A firewall container's channel (or this machine's counters) answering from a script."""

    def __init__(self, answers, fail=False):
        self.answers, self.fail, self.asked, self.closed = answers, fail, [], False
        self._last = b""

    def send(self, data):
        if self.fail:
            raise ConnectionError("gone")
        self.asked.append(data)
        self._last = data

    def read_until(self, marker):
        return self.answers[self._last], b""

    def close(self):
        self.closed = True


COUNTED = b'{"nftables": [{"counter": {"name": "refused_tcp", "packets": 1}}, {"set": {"name": "refused4", ' \
          b'"elem": [{"concat": ["10.0.0.1", "tcp", 22]}]}}]}\n{"asked": []}\n@@mino-end 0\n'
ASKED = b'{"asked": ["example.com"]}\n@@mino-end 0\n'


def _allowlist_firewall(container, counters):
    from mino_jupyter import session_firewall
    from mino_jupyter.network import NetworkPlan

    fw = session_firewall.SessionFirewall(None, session_container="c", plan=NetworkPlan("allowlist"),
                                          resolver=lambda n: [], notice=lambda m: None, hosts_path=None,
                                          local=firewall.LocalNetworks())
    fw.channel, fw.counters = container, counters
    return fw


def test_an_allowlist_report_takes_counters_from_this_machine_and_names_from_the_container():
    container = _Channel({firewall.ASKED_REQUEST: ASKED})
    counters = _Channel({firewall.REPORT_REQUEST: COUNTED})
    lines = _allowlist_firewall(container, counters).report()
    assert container.asked == [firewall.ASKED_REQUEST]  # no nft run in the firewall container
    assert any("refused 1 connection attempt(s) to 10.0.0.1:22/tcp" in line for line in lines)
    assert any(line.startswith("mino: example.com is not on this session's allowlist") for line in lines)


def test_counters_this_machine_cannot_read_come_from_the_container_and_the_session_goes_on():
    container = _Channel({firewall.REPORT_REQUEST: COUNTED.replace(b'"asked": []', b'"asked": ["example.com"]')})
    counters = _Channel({}, fail=True)
    fw = _allowlist_firewall(container, counters)
    lines = fw.report()
    assert container.asked == [firewall.REPORT_REQUEST] and counters.closed and fw.counters is None
    assert fw.channel is container and not container.closed  # the firewall container's channel stays
    assert len(lines) == 2


def test_refusals_are_still_told_when_the_names_cannot_be_had():
    container = _Channel({}, fail=True)
    lines = _allowlist_firewall(container, _Channel({firewall.REPORT_REQUEST: COUNTED})).report()
    assert lines and "refused 1 connection attempt(s)" in lines[0]


def test_a_report_after_close_says_nothing_and_raises_nothing():
    from mino_jupyter import session_firewall

    fw = _allowlist_firewall(_Channel({}), session_firewall.HostRules(-1))
    counters = fw.counters
    fw.close()
    assert fw.report() == []
    with pytest.raises(ConnectionError):  # a closed namespace is never handed to nsenter (fd -1)
        counters.nft("-j", "list", "ruleset")


def test_a_library_command_that_does_not_end_fails_and_the_library_is_not_used_again(monkeypatch):
    import threading

    from mino_jupyter import libnft

    release, ran = threading.Event(), []

    class Stuck:
        def setns(self, fd, kind):
            return 0

        def run(self, command, json):
            ran.append(command)
            release.wait(5)
            return 0, b"", b""

    monkeypatch.setattr(libnft, "_unusable", False)
    monkeypatch.setattr(libnft, "_library", lambda: Stuck())
    monkeypatch.setattr(libnft, "TIMEOUT", 0.2)
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        with pytest.raises(ConnectionError):  # it may still land: the caller fails closed
            libnft.run(own, ("-f", "-"), b"table inet mino {}\n")
        assert libnft.run(own, ("-j", "list", "ruleset")) is None  # nft from now on, never beside it
        assert ran == [b"table inet mino {}\n"]
    finally:
        release.set()
        os.close(own)
