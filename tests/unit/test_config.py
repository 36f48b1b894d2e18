"""Config files: locations, validation, comment-preserving edits, trust, merging."""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import pytest

from mino_jupyter import config
from mino_jupyter.errors import UsageError
from mino_jupyter.network import AllowEntry, NetworkChoice, NetworkPlan

PRESETS = {"dev": (AllowEntry("github.com", 443), AllowEntry("pypi.org", 443)),
           "registries": (AllowEntry("pypi.org", 443),)}

COMMENTED = """\
# mino global settings -- hand-written, keep my comments!
[container]   # the only section mino reads
# which image new sessions use
image = "localhost/mino-base:0.1.0"    # pinned

# network: be careful
# network = "host"

[notes]
free = "text"   # mino leaves other sections alone
"""


@pytest.fixture
def env(tmp_path):
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"),
            "XDG_STATE_HOME": str(tmp_path / "state")}


def test_global_path_order(tmp_path):
    assert config.global_path({"MINO_CONFIG": "/x/c.toml", "XDG_CONFIG_HOME": "/y"}) == Path("/x/c.toml")
    assert config.global_path({"XDG_CONFIG_HOME": "/y", "HOME": "/h"}) == Path("/y/mino/config.toml")
    assert config.global_path({"HOME": "/h"}) == Path("/h/.config/mino/config.toml")


def test_project_file_is_found_walking_up(tmp_path):
    (tmp_path / ".mino.toml").write_text("")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert config.find_project(deep) == tmp_path / ".mino.toml"


def test_set_and_unset_change_only_that_key(tmp_path, env):
    path = Path(config.global_path(env))
    path.parent.mkdir(parents=True)
    path.write_text(COMMENTED)
    config.set_key("network", "none", local=False, cwd=tmp_path, env=env)
    text = path.read_text()
    assert text.replace('network = "none"\n', "") == COMMENTED
    config.set_key("container.network_allow", "pypi.org:443,[::1]:8080", local=False, cwd=tmp_path, env=env)
    assert 'network_allow = ["pypi.org:443", "[::1]:8080"]' in path.read_text()
    config.unset_key("network", local=False, cwd=tmp_path, env=env)
    config.unset_key("network_allow", local=False, cwd=tmp_path, env=env)
    assert path.read_text() == COMMENTED  # byte for byte after the round trip
    config.set_key("image", "other:1", local=False, cwd=tmp_path, env=env)
    assert path.read_text() == COMMENTED.replace('"localhost/mino-base:0.1.0"', '"other:1"')


@pytest.mark.parametrize("key,raw,message", [
    ("network", "bridged", 'unknown network mode "bridged"'),
    ("network_preset", "nope", 'unknown network preset "nope"'),
    ("network_allow", "pypi.org", 'invalid allow entry "pypi.org"'),
    ("pids_limit", "9000", "container.pids_limit must be between 1 and 4096, not 9000"),
    ("pids_limit", "ten", 'container.pids_limit must be an integer, not "ten"'),
    ("workdir_readonly", "maybe", 'container.workdir_readonly must be true or false, not "maybe"'),
    ("ca_bundle", "/no/such/file.pem", 'ca_bundle "/no/such/file.pem" is not a file'),
    ("colour", "blue", 'unknown config key "colour"'),
])
def test_invalid_values_are_refused_and_the_file_is_untouched(tmp_path, env, key, raw, message):
    path = Path(config.global_path(env))
    path.parent.mkdir(parents=True)
    path.write_text(COMMENTED)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(UsageError) as e:
        config.set_key(key, raw, local=False, cwd=tmp_path, env=env, presets=PRESETS)
    assert message in e.value.message and e.value.hint
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_broken_toml_is_reported_with_line_and_never_rewritten(tmp_path, env):
    path = Path(config.global_path(env))
    path.parent.mkdir(parents=True)
    path.write_text('[container]\nnetwork = "none"\nimage = \n')
    loaded = config.load(tmp_path, env)
    assert loaded.global_ is None  # falls back to defaults for that file
    assert loaded.warnings[0].startswith(f"mino: {path}:3:")
    assert "not valid TOML" in loaded.warnings[0] and "left untouched" in loaded.warnings[0]
    with pytest.raises(UsageError) as e:
        config.set_key("network", "bridge", local=False, cwd=tmp_path, env=env)
    assert "mino will not rewrite it" in e.value.message
    assert path.read_text() == '[container]\nnetwork = "none"\nimage = \n'


def test_unknown_keys_are_reported(tmp_path, env):
    path = Path(config.global_path(env))
    path.parent.mkdir(parents=True)
    path.write_text('[container]\nnetwrk = "none"\n[extra]\n')
    warnings = config.load(tmp_path, env).warnings
    assert any('unknown section or key "extra"' in w for w in warnings)
    assert any('unknown config key "netwrk"' in w for w in warnings)


def _writer(args):
    path, key, value, env = args
    for _ in range(20):
        config.set_key(key, value, local=False, cwd=Path("/"), env=env)
    return True


def test_two_writers_at_once_lose_nothing(tmp_path, env):
    path = Path(config.global_path(env))
    path.parent.mkdir(parents=True)
    path.write_text(COMMENTED)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_writer, [(path, "network", "none", env), (path, "pids_limit", "100", env)])
    text = path.read_text()
    assert 'network = "none"' in text and "pids_limit = 100" in text
    for line in COMMENTED.splitlines():
        assert line in text  # every original line, comments included, survived
    assert not list(path.parent.glob(".config.toml.*"))  # no temporary files left


def test_setting_globally_never_copies_project_values(tmp_path, env):
    (tmp_path / ".mino.toml").write_text('[container]\nnetwork = "host"\nimage = "proj:1"\n')
    config.set_key("pids_limit", "50", local=False, cwd=tmp_path, env=env)
    assert Path(config.global_path(env)).read_text() == "[container]\npids_limit = 50\n"


def test_local_set_creates_a_trusted_project_file(tmp_path, env):
    path, _ = config.set_key("network", "host", local=True, cwd=tmp_path, env=env)
    assert path == tmp_path / ".mino.toml"
    loaded = config.load(tmp_path, env, PRESETS)
    assert loaded.project_trusted and loaded.project.values == {"network": "host"}


# ---------------------------------------------------------------- trust
def test_untrusted_project_values_that_weaken_are_skipped(tmp_path, env):
    (tmp_path / ".mino.toml").write_text('[container]\nnetwork = "host"\nimage = "evil:1"\npids_limit = 64\n'
                                         'ca_bundle = "none"\nworkdir_readonly = true\n')
    loaded = config.load(tmp_path, env, PRESETS)
    assert not loaded.project_trusted
    assert loaded.project.values == {"pids_limit": 64, "workdir_readonly": True}
    assert set(loaded.skipped) == {"network", "image", "ca_bundle"}
    (warning,) = loaded.warnings
    assert warning.startswith(f"mino: {tmp_path / '.mino.toml'} is not trusted, so ")
    assert 'network="host"' in warning and "`%mino trust`" in warning
    config.record_trust(tmp_path / ".mino.toml", env=env)
    trusted = config.load(tmp_path, env, PRESETS)
    assert trusted.project_trusted and trusted.project.values["network"] == "host"
    (tmp_path / ".mino.toml").write_text('[container]\nnetwork = "host"\nimage = "evil:2"\n')  # changed: ask again
    assert not config.load(tmp_path, env, PRESETS).project_trusted


@pytest.mark.parametrize("project,global_,applied", [
    ('network = "none"', None, True),                                   # stricter than the default
    ('network_preset = "registries"', None, True),                      # allowlist < bridge default
    ('network = "bridge"', None, True),                                 # the same as the default
    ('network = "host"', None, False),                                  # weaker than the default
    ('network = "bridge"', 'network = "none"', False),                  # weaker than the global choice
    ('network_preset = "dev"', 'network_preset = "registries"', False),  # more destinations
    ('network_preset = "registries"', 'network_preset = "dev"', True),   # a subset
    ('network_allow = ["evil.example:443"]', 'network = "none"', False),
])
def test_untrusted_network_applies_only_when_at_least_as_strict(tmp_path, env, project, global_, applied):
    (tmp_path / ".mino.toml").write_text(f"[container]\n{project}\n")
    if global_:
        g = Path(config.global_path(env))
        g.parent.mkdir(parents=True)
        g.write_text(f"[container]\n{global_}\n")
    loaded = config.load(tmp_path, env, PRESETS)
    assert (loaded.skipped == {}) is applied
    assert loaded.explicit_network()


def test_strictness_order():
    none, allow, bridge, host = (NetworkPlan("none"), NetworkPlan("allowlist", allow=(AllowEntry("a.b", 1),)),
                                 NetworkPlan("bridge"), NetworkPlan("host"))
    assert config.at_least_as_strict(none, allow) and config.at_least_as_strict(allow, bridge)
    assert config.at_least_as_strict(bridge, host) and not config.at_least_as_strict(host, bridge)


def test_trust_hash_is_of_the_content(tmp_path, env):
    f = tmp_path / ".mino.toml"
    f.write_text("[container]\n")
    digest = config.record_trust(f, env=env)
    assert digest == hashlib.sha256(b"[container]\n").hexdigest()
    assert config.is_trusted(f, "[container]\n", env)
    assert not config.is_trusted(f, "[container]\n#\n", env)


def test_explicit_network_tracks_presence_not_value(tmp_path, env):
    assert not config.load(tmp_path, env).explicit_network()
    config.set_key("network", "bridge", local=False, cwd=tmp_path, env=env)  # the default, set explicitly
    assert config.load(tmp_path, env).explicit_network()


def test_describe_names_sources(tmp_path, env):
    config.set_key("image", "g:1", local=False, cwd=tmp_path, env=env)
    config.set_key("network", "none", local=True, cwd=tmp_path, env=env)
    rows = {k: (v, s) for k, v, s in config.describe(config.load(tmp_path, env, PRESETS))}
    assert rows["container.image"] == ('"g:1"', f"global {config.global_path(env)}")
    assert rows["container.network"] == ('"none"', f"project {tmp_path / '.mino.toml'}")
    assert rows["container.pids_limit"] == ("-", "default")


def test_network_choice_from_file():
    fc = config.FileConfig(Path("/p/.mino.toml"), {"network_preset": "dev", "network_allow": ["a.b:1"]})
    assert config.network_choice(fc, "project") == NetworkChoice("project /p/.mino.toml", None, "dev", ("a.b:1",))
