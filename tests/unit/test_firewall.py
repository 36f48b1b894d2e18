import json

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
    assert "policy drop;" in text
    assert "elements = { 10.0.0.1 . 443 }" in text and "elements = { 2001:db8::1 . 80 }" in text
    assert "reject with tcp reset" in text and "reject with icmpx type admin-prohibited" in text
    assert text.index("delete table inet mino") < text.index("table inet mino {")  # atomic replace
    empty = firewall.ruleset(firewall.Resolved())
    assert "set allow4 { type ipv4_addr . inet_service; }" in empty


def _listing(v4, v6, policy="drop", last_rule="reject"):
    objs = [{"metainfo": {}},
            {"chain": {"family": "inet", "table": "mino", "name": "output", "hook": "output", "policy": policy}},
            {"set": {"name": "allow4", "table": "mino", "elem": [{"concat": list(p)} for p in v4]}},
            {"set": {"name": "allow6", "table": "mino", "elem": [{"concat": list(p)} for p in v6]}},
            {"rule": {"chain": "output", "table": "mino", "expr": [{"accept": None}]}},
            {"rule": {"chain": "output", "table": "mino", "expr": [{last_rule: None}]}}]
    return json.dumps({"nftables": objs})


def test_verify_accepts_what_was_asked_and_flags_differences():
    r = firewall.Resolved(frozenset({("10.0.0.1", 443)}), frozenset())
    assert firewall.verify(_listing([("10.0.0.1", 443)], []), r) == []
    assert firewall.verify(_listing([("10.0.0.2", 443)], []), r)[0].startswith("set allow4 holds")
    assert "policy drop" in firewall.verify(_listing([("10.0.0.1", 443)], [], policy="accept"), r)[0]
    assert firewall.verify(_listing([("10.0.0.1", 443)], [], last_rule="accept"), r) == \
        ["the output chain does not end in a reject rule"]
    assert firewall.verify("not json", r)[0].startswith("unreadable")


def test_refused_report():
    text = "\n".join([
        json.dumps({"nftables": [{"counter": {"name": "refused_tcp", "packets": 2}},
                                 {"counter": {"name": "refused_udp", "packets": 1}}]}),
        json.dumps({"nftables": [{"set": {"name": "refused4", "elem": [{"concat": ["10.88.0.1", "tcp", 8081]},
                                                                      {"concat": ["203.0.113.80", "udp", 53]}]}}]}),
        json.dumps({"nftables": [{"set": {"name": "refused6"}}]}),
    ])
    refused = firewall.parse_refused(text)
    assert refused.count == 3
    resolved = firewall.Resolved(hosts=(("pypi.org", "203.0.113.80"),))
    assert firewall.describe_refused(refused, resolved) == (
        "mino: the allowlist refused 3 connection attempt(s) to 10.88.0.1:8081/tcp, "
        "pypi.org (203.0.113.80):53/udp (not allowed; add them with --network-allow HOST:PORT)")
    assert firewall.describe_refused(firewall.Refused(), resolved) is None


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
    assert "while IFS=' ' read -r cmd n" in firewall.AGENT and "@@mino-end" in firewall.AGENT
