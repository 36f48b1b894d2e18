"""Config files: locations, validation, comment-preserving edits, trust, merging."""

from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path

import pytest

from mino_jupyter import config
from mino_jupyter.errors import UsageError
from mino_jupyter.network import AllowEntry, NetworkChoice

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
    ("memory", "lots", 'container.memory must be a size like "4g" or "512m", not "lots"'),
    ("memory", "1m", 'container.memory must be at least 64m, not "1m"'),
    ("disk", "-3g", 'container.disk must be a size like "4g" or "512m", not "-3g"'),
    ("cpus", "0", 'container.cpus must be a number of cores like "2" or "0.5", not "0"'),
    ("workspace", "shared", 'unknown workspace mode "shared"'),
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
    assert loaded.global_ is None
    (error,) = loaded.errors  # nothing runs on it: not on defaults either
    assert error.message.startswith(f"{path}:3:") and "not valid TOML" in error.message
    assert "no cell runs until it is fixed" in error.message and "never rewrites" in error.hint
    with pytest.raises(UsageError):
        loaded.require_usable()
    with pytest.raises(UsageError) as e:
        config.set_key("network", "bridge", local=False, cwd=tmp_path, env=env)
    assert "mino will not rewrite it" in e.value.message
    assert path.read_text() == '[container]\nnetwork = "none"\nimage = \n'


def test_unknown_keys_are_errors_with_their_lines(tmp_path, env):
    """A typo'd key would otherwise run cells on the default network instead of the one written."""
    path = Path(config.global_path(env))
    path.parent.mkdir(parents=True)
    path.write_text('# mine\n[container]\nnetwrk = "none"\n[extra]\n')
    loaded = config.load(tmp_path, env)
    messages = [e.message for e in loaded.errors]
    assert f'{path}:4: unknown section or key "extra" (settings go under [container])' in messages
    assert f'{path}:3: unknown config key "netwrk"' in messages
    with pytest.raises(UsageError) as e:
        loaded.require_usable()
    assert "and 1 more problem(s): `%mino config show` lists them" in e.value.message


@pytest.mark.parametrize("line,message,valid", [
    ('network = "nnone"', 'unknown network mode "nnone"', "valid modes: bridge, host, none, allowlist"),
    ('pids_limit = 0', "container.pids_limit must be between 1 and 4096, not 0", ""),
    ('memory = "lots"', 'container.memory must be a size like "4g" or "512m", not "lots"', ""),
    ('workspace = "shared"', 'unknown workspace mode "shared"', "valid modes: overlay, ro, rw"),
])
def test_a_value_that_cannot_be_used_stops_everything_and_names_file_line_and_valid_values(
        tmp_path, env, line, message, valid):
    """The seed refuses to run on `network = "nnone"`; dropping the value with a warning would run
    the cell on bridge, more than the user wrote down."""
    path = Path(config.global_path(env))
    path.parent.mkdir(parents=True)
    path.write_text(f'[container]\nimage = "base"\n{line}\n')
    loaded = config.load(tmp_path, env)
    with pytest.raises(UsageError) as e:
        loaded.require_usable()
    assert e.value.message == f"{path}:3: {message}"
    assert valid in e.value.hint and "%mino config set KEY VALUE" in e.value.hint
    assert loaded.global_.values == {"image": "base"}  # the usable rest is still read (config show)


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
    assert loaded.project.path == path and loaded.project.values == {"network": "host"}
    assert loaded.untrusted == ()


# ---------------------------------------------------------------- trust
def test_an_untrusted_project_file_has_no_effect_at_all(tmp_path, env):
    f = tmp_path / ".mino.toml"
    f.write_text('[container]\nnetwork = "host"\nimage = "evil:1"\npids_limit = 1\nworkspace = "rw"\n')
    loaded = config.load(tmp_path, env, PRESETS)
    assert loaded.project is None and loaded.untrusted == (f,)
    assert config.merged(loaded, "pids_limit", 4096) == (4096, "default")  # not even a "stricter" value
    assert not loaded.explicit_network()
    (warning,) = loaded.warnings
    assert warning == (f"mino: {f} is not trusted, so it has no effect; review it, then `%mino trust {f}` "
                       f"(or `mino-jupyter trust {f}`)")
    config.trust_project(None, tmp_path, env)
    trusted = config.load(tmp_path, env, PRESETS)
    assert trusted.project.values["network"] == "host" and trusted.warnings == ()
    f.write_text('[container]\nnetwork = "host"\nimage = "evil:2"\n')  # changed: ask again
    assert config.load(tmp_path, env, PRESETS).project is None


def test_an_untrusted_file_does_not_hide_a_trusted_one_above(tmp_path, env):
    parent = tmp_path / ".mino.toml"
    parent.write_text('[container]\nnetwork = "none"\n')
    config.record_trust(parent, env=env)
    nb = tmp_path / "notebooks"
    nb.mkdir()
    (nb / ".mino.toml").write_text('[container]\nnetwork = "bridge"\n')  # planted next to the notebook
    loaded = config.load(nb, env, PRESETS)
    assert loaded.project.path == parent and loaded.project.values == {"network": "none"}
    assert loaded.untrusted == (nb / ".mino.toml",)


def test_a_symlinked_project_file_is_never_trusted(tmp_path, env):
    other = tmp_path / "other"
    other.mkdir()
    (other / ".mino.toml").write_text('[container]\nnetwork = "host"\n')
    config.record_trust(other / ".mino.toml", env=env)  # another project's trusted file
    parent = tmp_path / ".mino.toml"
    parent.write_text('[container]\nnetwork = "none"\n')
    config.record_trust(parent, env=env)
    nb = tmp_path / "nb"
    nb.mkdir()
    (nb / ".mino.toml").symlink_to(other / ".mino.toml")
    loaded = config.load(nb, env, PRESETS)
    assert loaded.project.path == parent and loaded.project.values == {"network": "none"}
    assert any("is a symlink, so it has no effect" in w for w in loaded.warnings)
    with pytest.raises(UsageError, match="it is a symlink"):
        config.trust_project(nb / ".mino.toml", nb, env)
    with pytest.raises(UsageError, match="is a symlink"):
        config.set_key("network", "none", local=True, cwd=nb, env=env)
    assert (nb / ".mino.toml").is_symlink()  # nothing written through the link


def test_trust_is_bound_to_the_path_as_well_as_the_content(tmp_path, env):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    text = '[container]\nnetwork = "host"\n'
    (a / ".mino.toml").write_text(text)
    (b / ".mino.toml").write_text(text)
    config.record_trust(a / ".mino.toml", env=env)
    assert config.load(a, env).project is not None
    assert config.load(b, env).project is None  # same content, other place: not trusted


def test_a_project_file_that_is_not_a_regular_file_is_ignored(tmp_path, env):
    import os

    os.mkfifo(tmp_path / ".mino.toml")
    loaded = config.load(tmp_path, env, PRESETS)  # must not block on the FIFO
    assert loaded.project is None
    assert any("is not a regular file, so it has no effect" in w for w in loaded.warnings)


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
