
import pytest

from mino_jupyter import presets
from mino_jupyter.errors import ConfigError
from mino_jupyter.network import AllowEntry

DEV = ["github.com:443", "github.com:22", "api.github.com:443", "registry.npmjs.org:443", "crates.io:443",
       "static.crates.io:443", "index.crates.io:443", "pypi.org:443", "files.pythonhosted.org:443",
       "api.anthropic.com:443", "api.openai.com:443"]
REGISTRIES = ["registry.npmjs.org:443", "crates.io:443", "static.crates.io:443", "index.crates.io:443",
              "pypi.org:443", "files.pythonhosted.org:443"]


def test_builtin_presets_hold_exactly_the_documented_entries():
    found = presets.load([(presets.builtin_dir(), True)])
    assert sorted(found) == ["dev", "registries"]
    assert [str(e) for e in found["dev"].allow] == DEV
    assert [str(e) for e in found["registries"].allow] == REGISTRIES
    assert all(p.description and p.builtin for p in found.values())


def test_user_presets_add_and_shadow(tmp_path):
    user = tmp_path / "presets"
    user.mkdir()
    (user / "registries.toml").write_text('description = "mine"\nallow = ["pypi.org:443"]\n')
    (user / "lab.toml").write_text('description = "lab"\nallow = ["10.88.0.1:8080"]\n')
    found = presets.load([(presets.builtin_dir(), True), (user, False)])
    assert found["registries"].allow == (AllowEntry("pypi.org", 443),)
    assert found["registries"].shadows and found["registries"].shadows.endswith("registries.toml")
    assert found["lab"].allow == (AllowEntry("10.88.0.1", 8080),)
    text = presets.render(found)
    assert "registries: mine [" in text and "shadows" in text
    assert "dev: " in text and "github.com:22" in text


@pytest.mark.parametrize("content,expected", [
    ('description = "x"\nallow = ["pypi.org:443"\n', ":2:0: not valid TOML: unexpected end of file"),
    ('description = "x"\nallow = [pypi.org:443]\n', ":2:"),
    ('description = "x"\nallow = ["pypi.org:443", "bad entry"]\n', ':2: invalid allow entry "bad entry"'),
    ('description = "x"\nallow = "pypi.org:443"\n', ":2: allow must be a list"),
    ('description = "x"\nalow = ["pypi.org:443"]\n', ':2: unknown key "alow"'),
])
def test_malformed_preset_names_file_and_line(tmp_path, content, expected):
    bad = tmp_path / "broken.toml"
    bad.write_text(content)
    with pytest.raises(ConfigError) as e:
        presets.load([(tmp_path, False)])
    assert e.value.message.startswith(str(bad))
    assert expected in e.value.message
