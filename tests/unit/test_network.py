"""Network resolution: precedence, combinations, entries. Every message word for word."""

import pytest

from mino_jupyter.errors import UsageError
from mino_jupyter.network import (AllowEntry, NetworkChoice, NetworkPlan, NetworkResolutionInput,
                                  parse_allow_entry, parse_allow_list, resolve)

PRESETS = {
    "dev": (AllowEntry("github.com", 443), AllowEntry("pypi.org", 443)),
    "registries": (AllowEntry("pypi.org", 443), AllowEntry("registry.npmjs.org", 443)),
}
FLAGS = "cell flags"


def choice(source=FLAGS, network=None, preset=None, allow=None):
    return NetworkChoice(source, network, preset, tuple(allow) if allow else None)


def run(flags=None, session=None, project=None, global_=None):
    return resolve(NetworkResolutionInput(flags or choice(), session, project, global_), PRESETS)


# ---------------------------------------------------------------- precedence (the README table)
SESSION = choice("session 'default'", network="none")
PROJECT = choice("project /p/.mino.toml", network="host")
GLOBAL = choice("global /g/config.toml", preset="dev")


@pytest.mark.parametrize("layers,mode,source", [
    (dict(), "bridge", "default"),
    (dict(global_=GLOBAL), "allowlist", "global /g/config.toml"),
    (dict(project=PROJECT, global_=GLOBAL), "host", "project /p/.mino.toml"),
    (dict(session=SESSION, project=PROJECT, global_=GLOBAL), "none", "session 'default'"),
    (dict(flags=choice(network="bridge"), session=SESSION, project=PROJECT, global_=GLOBAL), "bridge", FLAGS),
    (dict(flags=choice(), session=SESSION), "none", "session 'default'"),  # silent flags fall through
    (dict(project=choice("project p"), global_=GLOBAL), "allowlist", "global /g/config.toml"),  # empty file
])
def test_precedence_flags_session_project_global_default(layers, mode, source):
    plan = run(**layers).plan
    assert (plan.mode, plan.source) == (mode, source)


def test_highest_layer_decides_alone():
    # The project says "host"; the global preset is not mixed in (no override, no warning).
    res = run(project=PROJECT, global_=GLOBAL)
    assert res.plan == NetworkPlan("host") and res.warnings == ()


# ---------------------------------------------------------------- combinations within a layer
def test_preset_and_allow_entries_combine():
    plan = run(choice(preset="registries", allow=["localhost:8000", "pypi.org:443"])).plan
    assert plan.mode == "allowlist" and plan.preset == "registries"
    assert plan.allow == (AllowEntry("pypi.org", 443), AllowEntry("registry.npmjs.org", 443),
                          AllowEntry("localhost", 8000))
    assert plan.extra == (AllowEntry("localhost", 8000), AllowEntry("pypi.org", 443))
    assert plan.describe() == "allowlist (registries +2)"


def test_allow_entries_alone():
    plan = run(choice(allow=["10.88.0.1:8080,[::1]:9"])).plan
    assert plan.describe() == "allowlist (10.88.0.1:8080,[::1]:9)"


def test_host_with_preset_warns_and_the_allowlist_wins():
    res = run(choice(network="host", preset="dev"))
    assert res.plan.mode == "allowlist"
    assert res.warnings == ("--network host overridden by --network-preset dev",)
    res = run(choice(network="host", allow=["a.b:1"]))
    assert res.warnings == ("--network host overridden by --network-allow",)


def test_host_override_from_a_config_file_warns_too():
    res = run(project=choice("project /p/.mino.toml", network="host", preset="registries"))
    assert res.plan.mode == "allowlist"
    assert res.warnings == ("network host overridden by network_preset registries (project /p/.mino.toml)",)


def test_none_with_preset_is_an_error_naming_both():
    with pytest.raises(UsageError) as e:
        run(choice(network="none", preset="dev"))
    assert e.value.message == ("--network none conflicts with --network-preset dev (cell flags): "
                               "no network cannot allow destinations")
    with pytest.raises(UsageError) as e:
        run(choice(network="none", allow=["a.b:1"]))
    assert e.value.message.startswith("--network none conflicts with --network-allow")


def test_unknown_mode_lists_valid_modes():
    with pytest.raises(UsageError) as e:
        run(choice(network="bridged"))
    assert e.value.message == 'unknown network mode "bridged" (cell flags)'
    assert e.value.hint == "valid modes: bridge, host, none, allowlist"


def test_unknown_preset_lists_available_presets():
    with pytest.raises(UsageError) as e:
        run(choice(preset="devv"))
    assert e.value.message == 'unknown network preset "devv" (cell flags)'
    assert e.value.hint.startswith("available presets: dev, registries")


def test_allowlist_mode_needs_entries():
    with pytest.raises(UsageError) as e:
        run(choice(network="allowlist"))
    assert e.value.message == "--network allowlist needs --network-preset or --network-allow (cell flags)"
    assert run(choice(network="allowlist", preset="dev")).plan.mode == "allowlist"


def test_plan_round_trips_as_a_session_choice():
    plan = run(choice(preset="registries", allow=["x.y:1"])).plan
    again = run(session=plan.as_choice("session 's'")).plan
    assert again == plan


# ---------------------------------------------------------------- entries
@pytest.mark.parametrize("text,entry", [
    ("pypi.org:443", AllowEntry("pypi.org", 443)),
    ("PyPI.org.:443", AllowEntry("pypi.org", 443)),
    ("localhost:1", AllowEntry("localhost", 1)),
    ("10.88.0.1:65535", AllowEntry("10.88.0.1", 65535)),
    ("[2001:db8::1]:443", AllowEntry("2001:db8::1", 443)),
    ("[::1]:80", AllowEntry("::1", 80)),
    ("my-host.example:22", AllowEntry("my-host.example", 22)),
])
def test_valid_entries(text, entry):
    assert parse_allow_entry(text) == entry
    assert parse_allow_entry(str(entry)) == entry


@pytest.mark.parametrize("text,reason", [
    ("pypi.org", "missing :PORT"),
    ("pypi.org:", "missing PORT after ':'"),
    (":443", "missing HOST before the port"),
    ("pypi.org:0", "port 0 is out of range 1-65535"),
    ("pypi.org:65536", "port 65536 is out of range 1-65535"),
    ("pypi.org:+443", 'port "+443" is not a number'),
    ("pypi.org:44 3", "it contains whitespace"),
    ("pypi.org:https", 'port "https" is not a number'),
    ("*.pypi.org:443", "wildcards are not supported; list each host"),
    ("bad_host:443", '"bad_host" is not a valid hostname'),
    ("-bad.org:443", '"-bad.org" is not a valid hostname'),
    ("1.2.3.999:80", '"1.2.3.999" is not an IPv4 address'),
    ("2001:db8::1:443", "IPv6 addresses go in brackets, e.g. [2001:db8::1]:443"),
    ("[2001:db8::1]", "missing :PORT after the IPv6 address"),
    ("[zz::1]:1", '"zz::1" is not an IPv6 address'),
    ("[::1:80", "missing ']' after the IPv6 address"),
    ("", "it is empty"),
    ("pypi.org:4４3", 'port "4４3" is not a number'),
])
def test_invalid_entries_quote_the_entry_and_state_the_rule(text, reason):
    with pytest.raises(UsageError) as e:
        parse_allow_entry(text)
    assert e.value.message == f'invalid allow entry "{text}": {reason}'
    assert e.value.hint.startswith("expected HOST:PORT")


def test_allow_list_splits_commas_and_deduplicates():
    assert parse_allow_list(["a.b:1, c.d:2,", "a.b:1"]) == (AllowEntry("a.b", 1), AllowEntry("c.d", 2))
