"""Session storage decisions that need no engine: caches and deletion."""

import os
from pathlib import Path


def test_project_caches_made_for_another_user_namespace_mode_are_made_again(tmp_path):
    """A cache written under one uid mapping cannot be written under the other (rootful uid
    1000 vs rootless keep-id): each records the mode it was made for and is remade when it
    differs, never shared across modes."""
    from mino_jupyter import storage

    class Rootless:  # the rootless mounter's facts, without an engine
        loop_disks = False
        cell_uid = os.geteuid()

    caches, project = tmp_path / "caches", tmp_path / "project"
    project.mkdir()
    made = storage.project_caches(caches, project, ("pip",), 1 << 20, Rootless())
    Path(made["pip"], "wheel.whl").write_text("cached")
    again = storage.project_caches(caches, project, ("pip",), 1 << 20, Rootless())
    assert again == made and Path(made["pip"], "wheel.whl").exists()  # same mode: kept
    root = caches / storage.project_key(project)
    assert (root / "userns").read_text() == f"cell-uid={os.geteuid()} disk=0"
    (root / "userns").write_text(storage.LEGACY_CACHE_USERNS)  # as if made rootful
    remade = storage.project_caches(caches, project, ("pip",), 1 << 20, Rootless())
    assert remade == made and not Path(made["pip"], "wheel.whl").exists()
    assert (root / "userns").read_text() == f"cell-uid={os.geteuid()} disk=0"


def test_deleting_a_tree_a_cell_made_unreadable_never_follows_its_links(tmp_path):
    """Without root, rmtree stops at a mode-000 directory; mino makes directories traversable
    through O_PATH descriptors first, and a link in the tree is never followed."""
    from mino_jupyter import storage

    outside = tmp_path / "outside"
    outside.mkdir(mode=0o500)
    tree = tmp_path / "tree"
    (tree / "a" / "locked" / "deep").mkdir(parents=True)
    (tree / "a" / "locked" / "deep" / "f").write_text("x")
    os.symlink(outside, tree / "a" / "link")
    os.chmod(tree / "a" / "locked", 0)
    storage._make_traversable(tree)
    assert (outside.stat().st_mode & 0o777) == 0o500  # the link's target is untouched
    assert storage.remove_tree(tree) and not tree.exists() and outside.is_dir()


def test_image_home_fallback_filter_keeps_links_and_refuses_what_tar_filter_refuses(tmp_path):
    """Pythons before 3.11.4 (Debian 12's 3.11.2) have no tarfile filters: mino's own check
    keeps symbolic links as tar_filter does (a venv's bin/python -> /usr/bin/python3 is resolved
    only in the container) and refuses devices, escaping names and setuid bits."""
    import stat
    import tarfile

    from mino_jupyter import storage

    def member(name, kind=tarfile.REGTYPE, linkname="", mode=0o644):
        m = tarfile.TarInfo(name)
        m.type, m.linkname, m.mode = kind, linkname, mode
        return m

    keep = storage._home_filter_fallback
    assert keep(member("developer/.venv/bin/python", tarfile.SYMTYPE, "/usr/bin/python3"), str(tmp_path))
    assert keep(member("developer/x", tarfile.SYMTYPE, "../../etc"), str(tmp_path))
    assert keep(member("developer/dev", tarfile.CHRTYPE), str(tmp_path)) is None
    assert keep(member("../escape"), str(tmp_path)) is None
    assert keep(member("/abs"), str(tmp_path)) is None
    assert keep(member("developer/h", tarfile.LNKTYPE, "../../etc/shadow"), str(tmp_path)) is None
    assert keep(member("developer/s", mode=0o4755), str(tmp_path)).mode & stat.S_ISUID == 0


def test_deleting_what_is_already_gone_is_fine(tmp_path, monkeypatch):
    from mino_jupyter import storage

    monkeypatch.setattr(storage.os, "geteuid", lambda: 1000)  # the rootless path, which walks first
    assert storage.remove_tree(tmp_path / "never-made")


def test_caches_a_session_is_starting_with_stay_mounted(tmp_path, monkeypatch):
    """The reaper judges caches from the containers that exist; a session that mounted its
    project's caches and has not made its container yet holds them (a reaper once unmounted them
    between the two, and the container's start failed on the missing directory)."""
    from mino_jupyter import storage

    unmounted = []
    monkeypatch.setattr(storage, "is_mounted", lambda path: True)
    monkeypatch.setattr(storage, "unmount", lambda path: unmounted.append(path))
    notebook = tmp_path / "nb"
    notebook.mkdir()
    with storage.caches_in_use(tmp_path / "caches", notebook):
        storage.release_caches(tmp_path / "caches", in_use=set())
        assert unmounted == []
    storage.release_caches(tmp_path / "caches", in_use=set())
    assert len(unmounted) == 1
