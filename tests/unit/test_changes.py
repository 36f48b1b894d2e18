"""The workspace's changes: listing an overlay's upper layer, and applying it to the notebook's
directory, with every entry of the upper layer treated as hostile."""

import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from mino_jupyter import changes
from mino_jupyter.changes import Change, apply, diff, display_path, list_changes, render, risk_of
from mino_jupyter.errors import UsageError

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts and trusted.* xattrs need root")
SECRET = b"the user's private key material"


@pytest.fixture
def layers(tmp_path):
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    lower.mkdir()
    return upper, lower


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
def no_hang():
    """Opening a FIFO for reading would block: fail instead of hanging."""
    def boom(*_):
        raise AssertionError("blocked (a FIFO was opened)")
    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(5)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def put(root: Path, rel: str, data: str | bytes = "x\n", mode: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def whiteout(root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def opaque(root: Path, rel: str) -> Path:
    path = root / rel
    path.mkdir(parents=True, exist_ok=True)
    os.setxattr(path, "trusted.overlay.opaque", b"y")
    return path


def listed(upper, lower):
    return {c.path: (c.status, c.kind) for c in list_changes(upper, lower)}


def everything_in(root: Path) -> bytes:
    """All bytes of every regular file under root (no symlink followed)."""
    data = b""
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                data += path.read_bytes()
    return data


def names_in(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def outcome(outcomes, path):
    (found,) = [o for o in outcomes if o.path == path]
    return found


# ---------------------------------------------------------------------------- listing

def test_added_and_modified_files(layers):
    upper, lower = layers
    put(lower, "data/a.csv", "1\n")
    put(upper, "data/a.csv", "2,3\n")
    put(upper, "data/new.csv", "n\n")
    put(upper, "top.json", "{}", mode=0o600)
    found = list_changes(upper, lower)
    assert [c.path for c in found] == ["data/a.csv", "data/new.csv", "top.json"]
    assert found[0] == Change("data/a.csv", "modified", "file", 4, False, None)
    assert found[1] == Change("data/new.csv", "added", "file", 2, False, None)
    assert found[2].status == "added" and found[2].size == 2


def test_identical_bytes_are_not_a_change(layers):
    upper, lower = layers
    put(lower, "same.csv", "a" * 200_000)
    put(upper, "same.csv", "a" * 200_000, mode=0o755)  # a chmod copies up: still not a change
    put(lower, "late.csv", "a" * 199_999 + "b")
    put(upper, "late.csv", "a" * 200_000)  # same size, last chunk differs
    assert listed(upper, lower) == {"late.csv": ("modified", "file")}


def test_applied_files_are_no_longer_changes(layers):
    upper, lower = layers
    put(upper, "out/result.csv", "1,2\n")
    put(lower, "old.txt", "before\n")
    put(upper, "old.txt", "after\n")
    assert all(o.applied for o in apply(upper, lower))
    assert (lower / "out/result.csv").read_text() == "1,2\n"
    assert (lower / "old.txt").read_text() == "after\n"
    assert list_changes(upper, lower) == []


def test_new_directories(layers):
    upper, lower = layers
    (upper / "empty").mkdir()
    (upper / "full/deeper").mkdir(parents=True)
    put(upper, "full/deeper/x.csv")
    (lower / "existing").mkdir()
    (upper / "existing").mkdir()  # copied up, nothing in it: not a change
    assert listed(upper, lower) == {"empty": ("added", "dir"), "full/deeper/x.csv": ("added", "file")}


def test_deep_nesting_is_listed_as_one_directory(layers, monkeypatch):
    upper, lower = layers
    monkeypatch.setattr(changes, "MAX_DEPTH", 3)
    put(upper, "a/b/c/d/e/x.csv")
    put(upper, "a/y.csv")
    assert listed(upper, lower) == {"a/b/c/d": ("added", "dir"), "a/y.csv": ("added", "file")}
    assert not outcome(apply(upper, lower, ["a/b/c"]), "a/b/c/d").applied


@needs_root
def test_whiteouts_are_deletions(layers):
    upper, lower = layers
    put(lower, "old.csv")
    put(lower, "tree/a.csv")
    put(lower, "tree/sub/b.csv")
    os.symlink("old.csv", lower / "alias")
    whiteout(upper, "old.csv")
    whiteout(upper, "tree")
    whiteout(upper, "alias")
    whiteout(upper, "never-existed")  # no lower counterpart: nothing to delete
    assert listed(upper, lower) == {"old.csv": ("deleted", "file"), "tree": ("deleted", "dir"),
                                    "alias": ("deleted", "symlink")}
    assert all(c.size == 0 and not c.executable for c in list_changes(upper, lower))


@needs_root
def test_opaque_directory_hides_lower_entries(layers):
    upper, lower = layers
    put(lower, "d/a.csv", "old\n")
    put(lower, "d/b.csv")
    put(lower, "d/sub/c.csv")
    put(lower, "d/gone/g.csv")
    put(lower, "plain/p.csv")
    opaque(upper, "d")
    put(upper, "d/a.csv", "new\n")
    (upper / "d/sub").mkdir()  # re-created inside the opaque dir: its lower content is hidden too
    (upper / "plain").mkdir()  # an ordinary copied-up directory hides nothing
    assert listed(upper, lower) == {"d/a.csv": ("modified", "file"), "d/b.csv": ("deleted", "file"),
                                    "d/gone": ("deleted", "dir"), "d/sub/c.csv": ("deleted", "file")}


def test_a_rootless_overlay_marks_opaque_directories_in_user_xattrs_and_only_those_count(layers):
    """Rootless overlays (userxattr) mark a replaced directory with user.overlay.opaque, which
    only overlayfs can set there. Each kind of overlay is read with its own mark: a rootful
    upper layer's user.overlay.opaque is something a cell could have set, and means nothing."""
    from mino_jupyter import mounts

    upper, lower = layers
    put(lower, "d/kept.csv")
    put(lower, "e/kept.csv")
    for name in ("d", "e"):
        (upper / name).mkdir()
        os.setxattr(upper / name, "user.overlay.opaque", b"y")
    put(upper, "e/new.csv")
    rootless = {c.path: (c.status, c.kind) for c in list_changes(upper, lower, mounts.Namespaced.opaque_xattr)}
    assert rootless == {"d/kept.csv": ("deleted", "file"), "e/kept.csv": ("deleted", "file"),
                        "e/new.csv": ("added", "file")}
    rootful = {c.path: (c.status, c.kind) for c in list_changes(upper, lower, mounts.Local.opaque_xattr)}
    assert rootful == {"e/new.csv": ("added", "file")}


@needs_root
def test_opaque_directory_without_lower_counterpart(layers):
    upper, lower = layers
    opaque(upper, "fresh")
    assert listed(upper, lower) == {"fresh": ("added", "dir")}


def test_special_files_are_listed_from_lstat_only(layers, no_hang, monkeypatch):
    upper, lower = layers
    os.mkfifo(upper / "pipe")
    os.symlink("/etc/passwd", upper / "link")
    monkeypatch.chdir(upper)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind("sock")
    sock.close()
    put(lower, "pipe")  # a FIFO over a lower file: its kind decides, never its content
    found = {c.path: c for c in list_changes(upper, lower)}
    assert {p: (c.status, c.kind, c.size) for p, c in found.items()} == {
        "pipe": ("added", "fifo", 0), "link": ("added", "symlink", 0), "sock": ("added", "socket", 0)}


def test_same_symlink_is_not_a_change(layers):
    upper, lower = layers
    os.symlink("target", lower / "l")
    os.symlink("target", upper / "l")
    os.symlink("elsewhere", lower / "m")
    os.symlink("/etc/shadow", upper / "m")
    assert listed(upper, lower) == {"m": ("modified", "symlink")}


def test_non_utf8_names(layers):
    upper, lower = layers
    raw = os.fsencode(upper) + b"/caf\xe9.csv"
    with open(raw, "wb") as f:
        f.write(b"1\n")
    (change,) = list_changes(upper, lower)
    assert change.path == os.fsdecode(b"caf\xe9.csv")
    assert display_path(change.path) == '"caf\\xe9.csv"'
    assert "caf" in render([change])
    (done,) = apply(upper, lower, [display_path(change.path)])
    assert done.applied
    assert os.path.exists(os.fsencode(lower) + b"/caf\xe9.csv")


# ---------------------------------------------------------------------------- risk

@pytest.mark.parametrize("path,kind,executable,reason", [
    ("data/out.csv", "file", False, None),
    ("results.json", "file", False, None),
    ("table.parquet", "file", False, None),
    ("plot.png", "file", False, None),
    ("notes.txt", "file", False, None),
    ("analysis.ipynb", "file", False, changes.TOOLING),  # its cells run in your kernel when you run them
    ("Makefile", "file", False, changes.TOOLING),
    ("build/rules.mk", "file", False, changes.TOOLING),
    ("package.json", "file", False, changes.TOOLING),
    ("pyproject.toml", "file", False, changes.TOOLING),
    ("requirements-dev.txt", "file", False, changes.TOOLING),
    ("--", "file", False, changes.OPTION),
    ("-rf.csv", "file", False, changes.OPTION),
    ("README.md", "file", False, None),
    ("python_notes.txt", "file", False, None),
    ("mypy.ini", "file", False, None),
    ("data", "dir", False, None),
    ("data", "dir", True, None),  # an x bit on a directory means nothing
    (".git/hooks/pre-commit", "file", False, changes.DOTFILE),
    (".envrc", "file", False, changes.DOTFILE),
    (".venv/bin/python", "file", True, changes.DOTFILE),
    (".ipython/profile_default/startup/00.py", "file", False, changes.DOTFILE),
    (".jupyter/jupyter_server_config.json", "file", False, changes.DOTFILE),
    (".vscode/tasks.json", "file", False, changes.DOTFILE),
    (".mino.toml", "file", False, changes.DOTFILE),
    (".bashrc", "file", False, changes.DOTFILE),
    ("sub/.profile", "file", False, changes.DOTFILE),
    ("a/.hidden/b.csv", "file", False, changes.DOTFILE),
    (".git", "dir", False, changes.DOTFILE),
    ("analysis.py", "file", False, changes.PYTHON),
    ("pkg/mod.pyc", "file", False, changes.PYTHON),
    ("old.pyo", "file", False, changes.PYTHON),
    ("win.pyd", "file", False, changes.PYTHON),
    ("native.so", "file", False, changes.PYTHON),
    ("fast.cpython-311-x86_64-linux-gnu.so", "file", False, changes.PYTHON),
    ("fast.abi3.so", "file", False, changes.PYTHON),
    ("evil.pth", "file", False, changes.PYTHON),
    ("app.pyz", "file", False, changes.PYTHON),
    ("dist/pkg.egg", "file", False, changes.PYTHON),
    ("pkg-1.0-py3-none-any.whl", "file", False, changes.PYTHON),
    ("LOUD.PY", "file", False, changes.PYTHON),
    ("pkg/__pycache__/x.cpython-311.pyc", "file", False, changes.PYTHON),
    ("pkg/__pycache__/anything", "file", False, changes.PYTHON),
    ("__pycache__", "dir", False, changes.PYTHON),
    ("sitecustomize", "file", False, changes.PYTHON),
    ("sitecustomize.txt", "file", False, changes.PYTHON),
    ("usercustomize.json", "file", False, changes.PYTHON),
    ("sitecustomize/__init__", "file", False, changes.PYTHON),
    ("pkg-1.0.dist-info/entry_points.txt", "file", False, changes.PYTHON),
    ("pkg.egg-info/entry_points.txt", "file", False, changes.PYTHON),
    ("run.py", "file", True, changes.PYTHON),  # Python first: the more specific reason
    ("ipython_config.json", "file", False, changes.JUPYTER),
    ("jupyter_server_config.json", "file", False, changes.JUPYTER),
    ("ipython_kernel_config.py", "file", False, changes.PYTHON),
    ("run.sh", "file", True, changes.TOOLING),
    ("bin/tool", "file", True, changes.EXECUTABLE),
    ("run.sh", "file", False, changes.TOOLING),
    ("tool", "symlink", True, None),
    ("pipe", "fifo", False, None),
    (".pipe", "fifo", False, changes.DOTFILE),
])
def test_risk_of(path, kind, executable, reason):
    assert risk_of(path, kind, executable) == reason


def test_risk_reasons_speak_to_the_user():
    assert "import" in changes.PYTHON
    assert "git hooks" in changes.DOTFILE and "direnv" in changes.DOTFILE
    assert changes.EXECUTABLE.startswith("an executable")


def test_listing_carries_the_risk(layers):
    upper, lower = layers
    put(upper, "analysis.py")
    put(upper, "run", mode=0o755)
    put(upper, ".envrc")
    put(lower, "tool", "old\n", mode=0o755)
    put(upper, "tool", "new\n", mode=0o644)  # the x bit dropped: still replaces an executable
    found = {c.path: c for c in list_changes(upper, lower)}
    assert found["analysis.py"].risk == changes.PYTHON
    assert found["run"].risk == changes.EXECUTABLE and found["run"].executable
    assert found["tool"].risk == changes.EXECUTABLE and not found["tool"].executable
    assert found[".envrc"].risk == changes.DOTFILE


# ---------------------------------------------------------------------------- applying: defaults

def test_default_applies_plain_files_only(layers):
    upper, lower = layers
    put(upper, "out.csv", "1\n", mode=0o600)
    put(upper, "analysis.py", "import os\n")
    put(upper, "run.sh", "#!/bin/sh\n", mode=0o755)
    put(upper, ".envrc", "export X=1\n")
    put(upper, "pkg/__pycache__/m.cpython-311.pyc", b"\x00")
    os.symlink("/etc/passwd", upper / "link")
    (upper / "empty").mkdir()
    results = {o.path: o for o in apply(upper, lower)}
    assert results["out.csv"].applied and results["out.csv"].message == "applied"
    assert stat.S_IMODE((lower / "out.csv").stat().st_mode) == 0o644
    assert results["analysis.py"].message == (
        "not applied: Python the kernel can import from this directory; name it to apply it: "
        "%mino apply analysis.py")
    assert results["run.sh"].message.startswith("not applied: a file tools run")
    assert results[".envrc"].message.startswith("not applied: a dotfile or dot-directory")
    assert results["link"].message == "not applied: a symlink is never applied"
    assert results["empty"].message.startswith("not applied: a directory is never applied")
    assert not any(o.applied for p, o in results.items() if p != "out.csv")
    assert names_in(lower) == {"out.csv"}


@needs_root
def test_default_never_deletes(layers):
    upper, lower = layers
    put(lower, "keep.csv", "precious\n")
    whiteout(upper, "keep.csv")
    (result,) = apply(upper, lower)
    assert not result.applied
    assert result.message == "not applied: a deletion is applied only when named on its own: %mino apply keep.csv"
    assert (lower / "keep.csv").read_text() == "precious\n"


def test_replacing_a_file_does_not_write_through_hard_links(layers, tmp_path):
    upper, lower = layers
    outside = put(tmp_path, "outside.txt", "outside\n")
    os.link(outside, lower / "out.csv")
    put(upper, "out.csv", "new\n")
    assert apply(upper, lower)[0].applied
    assert (lower / "out.csv").read_text() == "new\n"
    assert outside.read_text() == "outside\n"


@pytest.mark.parametrize("make", ["dir", "symlink", "fifo"])
def test_target_that_is_not_a_regular_file_is_left(layers, tmp_path, make, no_hang):
    upper, lower = layers
    victim = put(tmp_path, "victim.txt", "victim\n")
    if make == "dir":
        put(lower, "out.csv/inside.txt", "inside\n")
    elif make == "symlink":
        os.symlink(victim, lower / "out.csv")
    else:
        os.mkfifo(lower / "out.csv")
    put(upper, "out.csv", "hostile\n")
    result = outcome(apply(upper, lower, ["out.csv"]), "out.csv")
    assert not result.applied
    assert result.message.startswith("not applied: out.csv in the notebook's directory is a")
    assert victim.read_text() == "victim\n"
    assert b"hostile" not in everything_in(lower)
    assert not [n for n in names_in(lower) if "mino-apply" in n]


# ---------------------------------------------------------------------------- applying: security

def test_symlinked_parent_in_lower_is_never_followed(layers, tmp_path):
    upper, lower = layers
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, lower / "out")
    put(upper, "out/x.csv", "data\n")
    for paths in (None, ["out/x.csv"], ["out"]):
        result = outcome(apply(upper, lower, paths), "out/x.csv")
        assert not result.applied
        assert result.message == "not applied: out in the notebook's directory is a symlink"
    assert list(elsewhere.iterdir()) == []


def test_file_in_lower_where_a_directory_is_needed(layers):
    upper, lower = layers
    put(lower, "out", "a file\n")
    put(upper, "out/x.csv")
    result = outcome(apply(upper, lower, ["out/x.csv"]), "out/x.csv")
    assert result.message == "not applied: out in the notebook's directory is a file"
    assert (lower / "out").read_text() == "a file\n"


def test_upper_symlink_to_a_secret_is_never_copied(layers, secret):
    upper, lower = layers
    os.symlink(secret, upper / "data.csv")
    os.symlink(secret.parent, upper / "dirlink")
    for paths in (None, ["data.csv"], ["dirlink"]):
        assert not any(o.applied for o in apply(upper, lower, paths))
    assert SECRET not in everything_in(lower)
    assert names_in(lower) == set()


def test_upper_file_swapped_for_a_symlink_after_listing(layers, secret, monkeypatch):
    upper, lower = layers
    put(upper, "data.csv", "harmless\n")
    stale = list_changes(upper, lower)
    (upper / "data.csv").unlink()
    os.symlink(secret, upper / "data.csv")
    monkeypatch.setattr(changes, "list_changes", lambda *_: stale)  # the race, made certain
    for paths in (None, ["data.csv"]):
        (result,) = apply(upper, lower, paths)
        assert not result.applied
        assert result.message == "not applied: data.csv is no longer a regular file in the workspace"
    assert SECRET not in everything_in(lower)
    assert names_in(lower) == set()


def test_upper_parent_swapped_for_a_symlink_after_listing(layers, tmp_path, monkeypatch):
    upper, lower = layers
    put(upper, "sub/x.csv", "harmless\n")
    stale = list_changes(upper, lower)
    put(tmp_path, "outside/x.csv", SECRET)
    (upper / "sub/x.csv").unlink()
    (upper / "sub").rmdir()
    os.symlink(tmp_path / "outside", upper / "sub")
    monkeypatch.setattr(changes, "list_changes", lambda *_: stale)
    (result,) = apply(upper, lower, ["sub/x.csv"])
    assert result.message == "not applied: sub in the workspace is a symlink"
    assert SECRET not in everything_in(lower)
    assert names_in(lower) == set()  # not even the parent directory was created


def test_upper_file_swapped_for_a_fifo_after_listing(layers, monkeypatch, no_hang):
    upper, lower = layers
    put(upper, "data.csv")
    stale = list_changes(upper, lower)
    (upper / "data.csv").unlink()
    os.mkfifo(upper / "data.csv")
    monkeypatch.setattr(changes, "list_changes", lambda *_: stale)
    (result,) = apply(upper, lower, ["data.csv"])
    assert not result.applied and "no longer a regular file" in result.message
    assert names_in(lower) == set()


@pytest.mark.parametrize("swap", ["symlink", "fifo"])
def test_swap_between_lstat_and_open_is_caught_on_the_fd(layers, secret, monkeypatch, no_hang, swap):
    """The cell wins the race after our lstat: O_NOFOLLOW and the fstat of the fd still refuse."""
    upper, lower = layers
    decoy = put(upper.parent, "decoy.csv")
    if swap == "symlink":
        os.symlink(secret, upper / "data.csv")
    else:
        os.mkfifo(upper / "data.csv")
    real = changes._lstat

    def stale_lstat(dir_fd, name):
        st = real(dir_fd, name)
        return os.stat(decoy) if name == "data.csv" and st is not None else st
    monkeypatch.setattr(changes, "_lstat", stale_lstat)
    monkeypatch.setattr(changes, "list_changes", lambda *_: [Change("data.csv", "added", "file", 5, False, None)])
    (result,) = apply(upper, lower, ["data.csv"])
    assert not result.applied
    assert SECRET not in everything_in(lower)
    assert names_in(lower) == set()


def test_copy_stops_at_the_size_the_file_had_when_opened(layers, monkeypatch):
    upper, lower = layers
    source = put(upper, "big.csv", "1,2\n")
    real = changes._open_source

    def then_grow(*args):
        opened = real(*args)
        with open(source, "ab") as f:  # the cell keeps writing after we opened it
            f.write(b"more" * 1000)
        return opened
    monkeypatch.setattr(changes, "_open_source", then_grow)
    assert apply(upper, lower)[0].applied
    assert (lower / "big.csv").read_bytes() == b"1,2\n"


@pytest.mark.parametrize("upper_mode,lower_mode", [
    (0o644, 0o644),
    (0o600, 0o644),
    (0o755, 0o755),
    (0o700, 0o755),
    (0o4755, 0o755),  # never setuid
    (0o6777, 0o755),  # never setgid, sticky or world-writable
    (0o1644, 0o644),
])
def test_named_python_file_is_applied_with_a_warning(layers, upper_mode, lower_mode):
    upper, lower = layers
    put(upper, "analysis.py", "print('hi')\n", mode=upper_mode)
    (result,) = apply(upper, lower, ["analysis.py"])
    assert result.applied
    assert result.message == "applied with a warning: Python the kernel can import from this directory"
    assert stat.S_IMODE((lower / "analysis.py").stat().st_mode) == lower_mode
    assert (lower / "analysis.py").read_text() == "print('hi')\n"


def test_an_executable_is_applied_only_when_named_itself(layers):
    upper, lower = layers
    put(upper, "bin/run", "#!/bin/sh\n", mode=0o4755)
    put(upper, "bin/other", "#!/bin/sh\n", mode=0o755)
    results = {o.path: o for o in apply(upper, lower, ["bin", "bin/run"])}
    assert results["bin/run"].message == f"applied with a warning: {changes.EXECUTABLE}"
    assert stat.S_IMODE((lower / "bin/run").stat().st_mode) == 0o755  # never setuid
    assert results["bin/other"].message.startswith(f"not applied: {changes.EXECUTABLE}; name it")
    assert not (lower / "bin/other").exists()


@pytest.mark.parametrize("name", ["results", "results/", "./results"])
def test_directory_name_applies_what_is_under_it(layers, name):
    upper, lower = layers
    put(upper, "results/a.csv", "a\n")
    put(upper, "results/deep/b.py", "b\n")
    put(upper, "resultsx.csv", "not under results\n")
    results = {o.path: o for o in apply(upper, lower, [name])}
    assert set(results) == {"results/a.csv", "results/deep/b.py"}
    # Naming a directory takes its plain data; code under it still has to be named on its own.
    assert results["results/deep/b.py"].message.startswith("not applied: Python the kernel can import")
    assert names_in(lower) == {"results", "results/a.csv"}


def test_naming_a_directory_never_applies_dotfiles_or_bytecode_under_it(layers):
    upper, lower = layers
    put(upper, "pkg/.git/config", "[core]\n\tfsmonitor = evil\n")
    put(upper, "pkg/.envrc", "evil\n")
    put(upper, "pkg/__pycache__/mod.cpython-311.pyc", "evil\n")
    put(upper, "pkg/data.csv", "ok\n")
    results = {o.path: o for o in apply(upper, lower, ["pkg"])}
    assert results["pkg/data.csv"].applied
    assert [p for p, o in results.items() if o.applied] == ["pkg/data.csv"]
    assert names_in(lower) == {"pkg", "pkg/data.csv"}


def test_apply_keeps_within_its_budget_and_keeps_holes(layers):
    upper, lower = layers
    big = upper / "big.dat"
    with open(big, "wb") as f:  # 2 GiB, almost all hole, as a cell's `truncate -s 2G` makes it
        f.seek(2 << 30)
        f.write(b"head")
    for i in (1, 2, 3):
        os.link(big, upper / f"big{i}.dat")
    put(upper, "data.csv", "x" * (3 << 20))
    results = {o.path: o for o in apply(upper, lower, None, budget=4 << 20)}
    assert results["data.csv"].applied  # 3 MiB of data
    copies = [p for p in ("big.dat", "big1.dat", "big2.dat", "big3.dat") if results[p].applied]
    st = (lower / copies[0]).stat()
    assert st.st_size == (2 << 30) + 4 and st.st_blocks * 512 < (1 << 20)  # holes stayed holes
    assert (lower / copies[0]).read_bytes()[-4:] == b"head"
    elsewhere = lower.parent / "elsewhere"
    elsewhere.mkdir()
    over = {o.path: o for o in apply(upper, elsewhere, ["data.csv"], budget=1 << 20)}
    assert not over["data.csv"].applied and "past 1 MiB of disk" in over["data.csv"].message
    assert not (elsewhere / "data.csv").exists()


def test_unknown_names_write_nothing(layers):
    upper, lower = layers
    put(upper, "good.csv")
    with pytest.raises(UsageError) as caught:
        apply(upper, lower, ["good.csv", "nope.csv", "../etc/passwd"])
    assert "nope.csv" in caught.value.message and "../etc/passwd" in caught.value.message
    assert "%mino changes" in caught.value.hint
    assert names_in(lower) == set()


@pytest.mark.parametrize("name", ["", "/", ".", "upper", "good"])
def test_names_that_are_not_changes(layers, name):
    upper, lower = layers
    put(upper, "good.csv")
    with pytest.raises(UsageError):
        apply(upper, lower, [name])
    assert names_in(lower) == set()


def test_named_special_files_are_refused(layers, no_hang):
    upper, lower = layers
    os.mkfifo(upper / "pipe")
    os.symlink("/etc/passwd", upper / "link")
    (upper / "empty").mkdir()
    results = {o.path: o.message for o in apply(upper, lower, ["pipe", "link", "empty"])}
    assert results == {"pipe": "not applied: a FIFO is never applied",
                       "link": "not applied: a symlink is never applied",
                       "empty": "not applied: a directory is never applied, only the files in it"}
    assert names_in(lower) == set()


def test_failure_leaves_no_temporary_file_or_new_directory(layers, monkeypatch):
    upper, lower = layers
    put(upper, "new/deep/a.csv")
    put(upper, "b.csv")

    def full(*_):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(changes, "_copy", full)
    results = {o.path: o for o in apply(upper, lower)}
    assert results["new/deep/a.csv"].message == "not applied: No space left on device"
    assert not results["b.csv"].applied  # reported, and the others still tried
    assert names_in(lower) == set()


def test_escaped_name_can_be_named(layers):
    upper, lower = layers
    put(upper, "a\nM 1 B fake.csv", "x\n")
    (change,) = list_changes(upper, lower)
    assert "\n" not in render([change])
    (result,) = apply(upper, lower, [display_path(change.path)])
    assert result.applied and "\n" not in result.message


# ---------------------------------------------------------------------------- deletions

@needs_root
def test_named_deletions(layers, tmp_path):
    upper, lower = layers
    target = put(tmp_path, "target.txt", "kept\n")
    put(lower, "old.csv")
    put(lower, "full/a.csv")
    (lower / "empty").mkdir()
    os.symlink(target, lower / "alias")
    for name in ("old.csv", "full", "empty", "alias"):
        whiteout(upper, name)
    results = {o.path: o for o in apply(upper, lower, ["old.csv", "full", "empty", "alias"])}
    assert results["old.csv"].applied and not (lower / "old.csv").exists()
    assert results["empty"].applied and not (lower / "empty").exists()
    assert results["alias"].applied and not os.path.lexists(lower / "alias")
    assert target.read_text() == "kept\n"
    assert not results["full"].applied and "not empty" in results["full"].message
    assert (lower / "full/a.csv").exists()
    assert listed(upper, lower) == {"full": ("deleted", "dir")}


@needs_root
def test_deletion_under_a_named_directory_needs_its_own_name(layers):
    upper, lower = layers
    put(lower, "d/old.csv")
    whiteout(upper, "d/old.csv")
    put(upper, "d/new.csv")
    results = {o.path: o for o in apply(upper, lower, ["d"])}
    assert results["d/new.csv"].applied
    assert not results["d/old.csv"].applied and (lower / "d/old.csv").exists()


@needs_root
def test_deletion_through_a_symlinked_parent_is_refused(layers, tmp_path, monkeypatch):
    upper, lower = layers
    elsewhere = tmp_path / "elsewhere"
    put(elsewhere, "f.csv", "keep\n")
    put(lower, "d/f.csv")
    whiteout(upper, "d/f.csv")
    assert listed(upper, lower) == {"d/f.csv": ("deleted", "file")}
    stale = list_changes(upper, lower)
    (lower / "d/f.csv").unlink()
    (lower / "d").rmdir()
    os.symlink(elsewhere, lower / "d")
    monkeypatch.setattr(changes, "list_changes", lambda *_: stale)
    (result,) = apply(upper, lower, ["d/f.csv"])
    assert result.message == "not applied: d in the notebook's directory is a symlink"
    assert (elsewhere / "f.csv").read_text() == "keep\n"


# ---------------------------------------------------------------------------- diff

def test_diff_of_a_modified_text_file(layers):
    upper, lower = layers
    put(lower, "notes.txt", "one\ntwo\n")
    put(upper, "notes.txt", "one\nthree")
    (change,) = list_changes(upper, lower)
    text = diff(change, upper, lower)
    assert text.startswith("--- a/notes.txt\n+++ b/notes.txt\n")
    assert "-two\n" in text and "+three\n\\ No newline at end of file\n" in text


def test_diff_of_an_added_file(layers):
    upper, lower = layers
    put(upper, "new.md", "# hi\n")
    (change,) = list_changes(upper, lower)
    assert diff(change, upper, lower).endswith("+# hi\n")


def test_diff_escapes_terminal_control(layers):
    upper, lower = layers
    put(upper, "x.txt", "ok\x1b]0;owned\x07\rfake\u202ecod\n")
    (change,) = list_changes(upper, lower)
    text = diff(change, upper, lower)
    assert "\x1b" not in text and "\r" not in text and "\u202e" not in text
    assert "\\x1b" in text and "\\u202e" in text


@pytest.mark.parametrize("data", [b"a\x00b\n", b"\xff\xfe\n", b"x" * 70_000])
def test_no_diff_for_binary_or_large_files(layers, data):
    upper, lower = layers
    put(upper, "blob", data)
    (change,) = list_changes(upper, lower)
    assert diff(change, upper, lower) is None


def test_no_diff_when_the_old_side_is_too_large(layers):
    upper, lower = layers
    put(lower, "f.txt", "x" * 100)
    put(upper, "f.txt", "y\n")
    (change,) = list_changes(upper, lower)
    assert diff(change, upper, lower, limit=50) is None
    assert diff(change, upper, lower, limit=100) is not None


def test_no_diff_for_non_files(layers, secret):
    upper, lower = layers
    os.symlink(secret, upper / "link")
    (change,) = list_changes(upper, lower)
    assert diff(change, upper, lower) is None
    forged = Change("link", "added", "file", 10, False, None)  # a stale or forged listing
    assert diff(forged, upper, lower) is None


# ---------------------------------------------------------------------------- showing

def test_render():
    assert render([]) == "no changes"
    rows = render([
        Change("data/out.csv", "added", "file", 1536, False, None),
        Change("analysis.py", "modified", "file", 12, False, changes.PYTHON),
        Change("old.csv", "deleted", "file", 0, False, None),
        Change("link", "added", "symlink", 0, False, None),
    ]).splitlines()
    assert rows == [
        "A    1.5 KiB  data/out.csv",
        f"M       12 B  analysis.py  [risky: {changes.PYTHON}]",
        "D          -  old.csv  [a file; name it to delete it]",
        "A          -  link  [a symlink: never applied]",
    ]


@pytest.mark.parametrize("path,shown", [
    ("data/out.csv", "data/out.csv"),
    ("with space.csv", "with space.csv"),
    ("a\nb", '"a\\nb"'),
    ("\x1b[31mred", '"\\x1b[31mred"'),
    ('quote".csv', '"quote\\".csv"'),
    ("back\\slash", '"back\\\\slash"'),
    ("caf\udce9", '"caf\\xe9"'),
    ("caf\u0085", '"caf\\u0085"'),
    ("rtl\u202etxt.exe", '"rtl\\u202etxt.exe"'),
    ("café.csv", "café.csv"),
])
def test_display_path(path, shown):
    assert display_path(path) == shown



def test_apply_never_writes_into_minos_own_directories(layers):
    """A notebook opened from the home directory has mino's state below it: a cell that rewrites
    mino's seccomp profile (plain data by its name) must not get it applied, by default or named."""
    upper, lower = layers
    put(lower, "state/mino/seccomp/mino-1.json", '{"defaultAction": "SCMP_ACT_ERRNO"}')
    put(upper, "state/mino/seccomp/mino-1.json", '{"defaultAction": "SCMP_ACT_ALLOW"}')
    put(upper, "state/mino/new.csv")
    put(upper, "results.csv")
    protected = [lower / "state" / "mino"]
    for paths in (None, ["state/mino/seccomp/mino-1.json", "state/mino/new.csv"]):
        outcomes = {o.path: (o.applied, o.message) for o in apply(upper, lower, paths, protected=protected)}
        assert not outcomes["state/mino/seccomp/mino-1.json"][0]
        assert "is mino's own state or configuration" in outcomes["state/mino/seccomp/mino-1.json"][1]
        assert not outcomes["state/mino/new.csv"][0]
    assert (lower / "state/mino/seccomp/mino-1.json").read_text() == '{"defaultAction": "SCMP_ACT_ERRNO"}'
    assert not (lower / "state/mino/new.csv").exists()
    assert (lower / "results.csv").exists()  # everything else applies as before
