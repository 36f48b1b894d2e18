"""Config, trust and the first-run choice in a real kernel with real Podman."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest import give_to_cell
from tests.kernel import Kernel

pytestmark = pytest.mark.podman

PICKER = "mino network picker"
NOTICE = "mino: no network chosen yet"


@pytest.fixture
def home(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    give_to_cell(project)
    env = {"MINO_CONFIG": str(tmp_path / "global.toml"), "XDG_STATE_HOME": str(tmp_path / "state"),
           "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return project, env


@pytest.fixture
def kernel(engine, base_image, home):
    project, env = home
    k = Kernel(cwd=str(project), env=env)
    k.ok("%load_ext mino_jupyter")
    yield k
    k.shutdown()


def _pickers(reply):
    return [d for d in reply.displays if PICKER in d["data"].get("text/plain", "")]


def test_config_set_get_unset_in_both_scopes(kernel, home, tmp_path):
    project, env = home
    r = kernel.ok("%mino config set network none")
    assert r.stdout.strip() == f'container.network = "none" in {env["MINO_CONFIG"]}'
    assert kernel.ok("%mino config get network").stdout.strip() == '"none"'
    r = kernel.ok("%mino config set container.network_preset registries --local")
    assert r.stdout.strip() == f'container.network_preset = "registries" in {project / ".mino.toml"}'
    show = kernel.ok("%mino config show").stdout
    assert f"project file: {project / '.mino.toml'} (trusted)" in show
    assert f'container.network_preset    "registries"  project {project / ".mino.toml"}' in show
    r = kernel.ok("%%mino\ncat /etc/resolv.conf")  # the project's allowlist applies (loopback resolver)
    assert "nameserver 127.0.0.1" in r.stdout
    kernel.ok("%mino stop --all")
    kernel.ok("%mino config unset network_preset --local")
    r = kernel.ok("%%mino\ncurl -sS -m 3 http://127.0.0.1:9/ 2>&1 | head -c 0; ip -o -4 addr show | wc -l")
    assert r.stdout.strip() == "1"  # the global "none" applies now: loopback only
    assert Path(env["MINO_CONFIG"]).read_text() == '[container]\nnetwork = "none"\n'


def test_invalid_value_is_refused_and_the_file_keeps_its_hash(kernel, home):
    project, env = home
    g = Path(env["MINO_CONFIG"])
    g.write_text("# mine\n[container]\nnetwork = \"bridge\"  # keep\n")
    before = hashlib.sha256(g.read_bytes()).hexdigest()
    for line, message in [("network sideways", 'unknown network mode "sideways"'),
                          ("network_allow pypi.org", 'invalid allow entry "pypi.org"'),
                          ("pids_limit 0", "pids_limit must be between 1 and 4096")]:
        r = kernel.execute(f"%mino config set {line}")
        assert r.error and message in r.error_text and "Traceback" not in r.error_text
    assert hashlib.sha256(g.read_bytes()).hexdigest() == before


def test_broken_toml_is_reported_with_its_line_and_left_alone(kernel, home):
    project, env = home
    broken = '[container]\nnetwork = "none\n'
    (project / ".mino.toml").write_text(broken)
    kernel.ok(f"%mino trust {project / '.mino.toml'}")  # trusted, then read: its errors are shown
    r = kernel.execute("%%mino\necho ran")
    assert r.error and r.stdout == ""  # nothing ran: not on defaults either
    assert f"mino: {project / '.mino.toml'}:2:" in r.error_text and "not valid TOML" in r.error_text
    r = kernel.execute("%mino config set network host --local")
    assert r.error and "mino will not rewrite it" in r.error_text
    assert (project / ".mino.toml").read_text() == broken


def test_a_config_value_that_cannot_be_used_runs_nothing_until_fixed(kernel, home, engine):
    """The seed's strictness: `network = "nnone"` is an error naming the file, line and valid
    values; no container starts; `config set` fixes it and the next cell runs with it."""
    project, env = home
    path = Path(env["MINO_CONFIG"])
    path.write_text('[container]\nnetwork = "nnone"\n')
    before = {c["Id"] for c in engine.list({"io.mino.managed": "true"})}
    r = kernel.execute("%%mino\necho ran")
    assert r.error and r.stdout == ""
    assert f'mino: {path}:2: unknown network mode "nnone"' in r.error_text
    assert "valid modes: bridge, host, none, allowlist" in r.error_text
    assert {c["Id"] for c in engine.list({"io.mino.managed": "true"})} == before  # nothing started
    assert path.read_text() == '[container]\nnetwork = "nnone"\n'  # and nothing rewritten
    shown = kernel.ok("%mino config show").stdout
    assert f'mino: error: {path}:2: unknown network mode "nnone"' in shown
    kernel.ok("%mino config set network none")
    r = kernel.ok(f"%%mino\n{NETNS}; ip -o link | grep -c -v ' lo:' || true")
    assert r.stdout.split()[-1] == "0"  # none: no interface but loopback


NETNS = "readlink /proc/self/ns/net"  # the network namespace's identity


def test_percent_config_is_checked_when_set_and_has_one_writer(kernel, home):
    """`%config MinoMagics.network='bogus'` fails at once; a valid value shows in `config show`;
    a later choice made for this kernel (the panel's "apply to this kernel") is not silently
    replaced by the %config value at the next cell."""
    r = kernel.execute("%config MinoMagics.network = 'bogus'")  # IPython's %config logs the error
    assert 'mino: unknown network mode "bogus" for MinoMagics.network' in r.stderr
    assert "valid modes: bridge, host, none, allowlist" in r.stderr
    r = kernel.execute("%config MinoMagics.network_preset = 'nope'")
    assert 'unknown network preset "nope"' in r.stderr
    kernel.ok("%config MinoMagics.network = 'host'")
    assert "this kernel:  network host (from %config MinoMagics" in kernel.ok("%mino config show").stdout
    kernel.ok("from mino_jupyter.magics import current_manager as _cm\n"
              "print(_cm(get_ipython()).remember_network('none', None, 'session'))")  # what the panel does
    r = kernel.ok("%%mino\nip -o link | grep -c -v ' lo:' || true")
    assert r.stdout.split()[-1] == "0"  # none, as chosen last: not host again


def _in_host_namespace(reply) -> bool:
    return reply.stdout.strip().splitlines()[-1] == os.readlink("/proc/self/ns/net")


def test_untrusted_project_file_is_skipped_until_trusted(kernel, home):
    project, env = home
    (project / ".mino.toml").write_text('[container]\nnetwork = "host"\n')
    r = kernel.ok(f"%%mino\n{NETNS}")
    assert f"mino: {project / '.mino.toml'} is not trusted, so it has no effect" in r.stderr
    assert f"`%mino trust {project / '.mino.toml'}`" in r.stderr
    assert not _in_host_namespace(r)  # bridge: a namespace of its own
    assert "mino: session 'default' uses the host network" not in r.stderr
    r = kernel.ok("%%mino\ntrue")
    assert "not trusted" not in r.stderr  # said once, not at every cell
    r = kernel.ok("%mino trust")
    assert r.stdout.startswith(f"trusted {project / '.mino.toml'}")
    kernel.ok("%mino stop --all")
    r = kernel.ok(f"%%mino\n{NETNS}")
    assert "mino: session 'default' uses the host network" in r.stderr
    assert _in_host_namespace(r)


def test_first_run_headless_is_a_one_line_notice_once(kernel):
    r = kernel.ok("%%mino\necho first")
    assert r.stdout == "first\n"
    assert [line for line in r.stderr.splitlines() if line.startswith(NOTICE)] and not _pickers(r)
    r = kernel.ok("%%mino\necho second")
    assert NOTICE not in r.stderr


def test_first_run_interactive_shows_the_picker_once_and_not_after_a_save(engine, base_image, home):
    project, env = home
    k = Kernel(cwd=str(project), env=env)
    try:
        k.ok("%load_ext mino_jupyter")
        r = k.execute("%%mino\necho ran", allow_stdin=True)
        assert r.error is None and r.stdout == "ran\n"  # it ran at once, with bridge
        assert len(_pickers(r)) == 1 and NOTICE not in r.stderr
        r = k.execute("%%mino\necho again", allow_stdin=True)
        assert not _pickers(r)
        r = k.ok("from mino_jupyter.magics import current_manager as cm\n"
                 "print(cm().remember_network('bridge', None, 'project'))")
        assert f"saved in {project / '.mino.toml'}" in r.stdout
    finally:
        k.shutdown()
    k = Kernel(cwd=str(project), env=env)  # a new kernel: the saved choice counts, bridge included
    try:
        k.ok("%load_ext mino_jupyter")
        r = k.execute("%%mino\necho ran", allow_stdin=True)
        assert r.stdout == "ran\n" and not _pickers(r) and NOTICE not in r.stderr
    finally:
        k.shutdown()


def test_traitlets_defaults(kernel):
    kernel.ok('%config MinoMagics.network = "none"')
    r = kernel.ok("%%mino\nip -o -4 addr show | wc -l")
    assert r.stdout.strip() == "1"
    r = kernel.execute('%config MinoMagics.network = "sideways"\n')
    assert 'unknown network mode "sideways" for MinoMagics.network' in r.stderr  # at once, by %config
    r = kernel.ok("%%mino --session s2\nip -o -4 addr show | wc -l")
    assert r.stdout.strip() == "1"  # the last valid value still holds
