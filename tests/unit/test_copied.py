"""A copied workspace (an engine elsewhere): the tar mino sends,
and the tar the engine sends back, which the cell wrote: every name, link and byte hostile."""

import io
import os
import stat
import tarfile

import pytest

from mino_jupyter import changes, copied
from mino_jupyter.copied import CopyError, pack, unpack


def _members(data) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=data) as tar:
        return {m.name: m for m in tar.getmembers()}


def _tar(*members: tuple) -> io.BytesIO:
    """(name, kind, data-or-linkname[, mode]) -> a tar stream."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, *mode in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = mode[0] if mode else 0o644
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = payload
                tar.addfile(info)
            elif kind == tarfile.REGTYPE:
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            else:
                tar.addfile(info)
    out.seek(0)
    return out


def test_pack_keeps_files_dirs_and_links_as_links_and_leaves_out_mino_s_own(tmp_path):
    nb = tmp_path / "nb"
    (nb / "sub").mkdir(parents=True)
    (nb / "sub" / "a.txt").write_text("a")
    (nb / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(nb / "run.sh", 0o4755)
    (nb / "link").symlink_to("/etc/passwd")
    os.mkfifo(nb / "fifo")
    (nb / "state").mkdir()
    (nb / "state" / "secret").write_text("kernel logs")
    data, files, size, manifest = pack(nb, limit=1 << 20, protected=[nb / "state"])
    members = _members(data)
    assert set(members) == {"sub", "sub/a.txt", "run.sh", "link"} == set(manifest)
    assert manifest["link"] == ("symlink", "/etc/passwd") and manifest["sub"] == ("dir",)
    assert manifest["run.sh"][0] == "file" and manifest["run.sh"][2] is True
    assert members["link"].issym() and members["link"].linkname == "/etc/passwd"
    assert members["run.sh"].mode == 0o755  # never setuid
    assert members["sub/a.txt"].uid == 1000 and size == len("a") + len("#!/bin/sh\n")


def test_pack_refuses_a_directory_larger_than_the_disk(tmp_path):
    (tmp_path / "big").write_bytes(b"x" * 2048)
    with pytest.raises(CopyError, match="more than the session's disk"):
        pack(tmp_path, limit=1024)


def test_unpack_writes_files_dirs_and_links_and_skips_devices(tmp_path):
    dest = tmp_path / "snap"
    dest.mkdir()
    unpack(_tar(("", tarfile.DIRTYPE, None), ("/d", tarfile.DIRTYPE, None), ("/d/f", tarfile.REGTYPE, b"x", 0o6755),
                ("/l", tarfile.SYMTYPE, "/etc/passwd"), ("/dev", tarfile.CHRTYPE, None),
                ("/fifo", tarfile.FIFOTYPE, None)), dest, limit=1 << 20)
    assert (dest / "d" / "f").read_bytes() == b"x"
    assert stat.S_IMODE(os.stat(dest / "d" / "f").st_mode) == 0o755  # no setuid, setgid
    assert os.readlink(dest / "l") == "/etc/passwd"
    assert sorted(os.listdir(dest)) == ["d", "l"]


def test_unpack_never_writes_through_a_link_or_outside(tmp_path):
    """A link planted first, then a file "through" it; absolute and .. names; a hard link to a
    file of this machine: nothing outside the snapshot is written or read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "secret").write_bytes(b"the user's")
    dest = tmp_path / "snap"
    dest.mkdir()
    unpack(_tar(("a", tarfile.SYMTYPE, str(outside)), ("a/planted", tarfile.REGTYPE, b"evil"),
                ("../escaped", tarfile.REGTYPE, b"evil"), ("/../../escaped2", tarfile.REGTYPE, b"evil"),
                ("stolen", tarfile.LNKTYPE, str(tmp_path / "secret")),
                ("up", tarfile.LNKTYPE, "../secret")), dest, limit=1 << 20)
    assert os.listdir(outside) == []
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "escaped2").exists()
    assert (dest / "stolen").read_bytes() == b"" and (dest / "up").read_bytes() == b""


def test_unpack_a_later_member_wins_and_a_hard_link_is_a_copy(tmp_path):
    dest = tmp_path / "snap"
    dest.mkdir()
    unpack(_tar(("f", tarfile.REGTYPE, b"one"), ("f", tarfile.SYMTYPE, "/x"), ("f", tarfile.REGTYPE, b"two"),
                ("g", tarfile.LNKTYPE, "f"), ("d", tarfile.REGTYPE, b"file first"), ("d", tarfile.DIRTYPE, None),
                ("d/in", tarfile.REGTYPE, b"in")), dest, limit=1 << 20)
    assert (dest / "f").read_bytes() == b"two" and (dest / "g").read_bytes() == b"two"
    assert os.stat(dest / "f").st_ino != os.stat(dest / "g").st_ino
    assert (dest / "d" / "in").read_bytes() == b"in"


def test_unpack_stops_at_the_disk_budget_hard_links_included(tmp_path):
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(CopyError, match="more than"):
        unpack(_tar(("f", tarfile.REGTYPE, b"x" * 600), *[(f"l{i}", tarfile.LNKTYPE, "f") for i in range(3)]),
               dest, limit=1024)


def test_unpack_refuses_what_is_not_a_tar(tmp_path):
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(CopyError, match="not a readable tar"):
        unpack(io.BytesIO(b"\x00" * 10 + b"garbage" * 100), dest, limit=1 << 20)


def _round_trip(tmp_path, notebook_files: dict, workspace_after: dict):
    """The notebook's directory packed, then the workspace as the cell left it (path -> bytes,
    or None for a directory) read back over it; the snapshot, what it says was deleted."""
    nb = tmp_path / "nb"
    nb.mkdir()
    for path, data in notebook_files.items():
        (nb / path).parent.mkdir(parents=True, exist_ok=True)
        (nb / path).write_bytes(data) if data is not None else (nb / path).mkdir(exist_ok=True)
    _data, _n, _size, base = pack(nb, limit=1 << 20)
    snap = tmp_path / "snap"
    snap.mkdir()
    members = [(p, tarfile.DIRTYPE, None) if d is None else (p, tarfile.REGTYPE, d) for p, d in workspace_after.items()]
    deleted = unpack(_tar(*members), snap, limit=1 << 20, base=base)
    return nb, snap, deleted


def test_a_read_back_holds_only_what_the_cells_changed_and_says_what_they_deleted(tmp_path):
    nb, snap, deleted = _round_trip(
        tmp_path,
        {"same.txt": b"same", "changed.txt": b"old", "gone.txt": b"bye", "sub/kept": b"k", "sub/gone-too": b"x",
         "tree/a": b"a", "tree/b": b"b"},
        {"same.txt": b"same", "changed.txt": b"new!", "sub": None, "sub/kept": b"k", "added.txt": b"hi",
         "newdir": None})
    assert sorted(str(p.relative_to(snap)) for p in snap.rglob("*")) == ["added.txt", "changed.txt", "newdir"]
    assert deleted == ["gone.txt", "sub/gone-too", "tree"]  # the topmost of a deleted tree
    found = {(c.path, c.status) for c in changes.list_changes(snap, nb, None, deleted)}
    assert found == {("changed.txt", "modified"), ("added.txt", "added"), ("newdir", "added"),
                     ("gone.txt", "deleted"), ("sub/gone-too", "deleted"), ("tree", "deleted")}


def test_a_file_edited_here_since_the_copy_is_never_reverted(tmp_path):
    """The cell did not touch it: it is not in the read-back, so no apply brings the old one back;
    a file made here since is not a deletion."""
    nb, snap, deleted = _round_trip(tmp_path, {"notes.txt": b"v1", "data.csv": b"1"},
                                    {"notes.txt": b"v1", "data.csv": b"2"})
    (nb / "notes.txt").write_bytes(b"v2, edited here meanwhile")
    (nb / "made-here.txt").write_bytes(b"new here")
    found = changes.list_changes(snap, nb, None, deleted)
    assert [(c.path, c.status) for c in found] == [("data.csv", "modified")]
    changes.apply(snap, nb, None, opaque_xattr=None, deleted=deleted)
    assert (nb / "notes.txt").read_bytes() == b"v2, edited here meanwhile" and (nb / "data.csv").read_bytes() == b"2"
    assert (nb / "made-here.txt").exists()


def test_a_deletion_is_applied_only_when_named(tmp_path):
    nb, snap, deleted = _round_trip(tmp_path, {"gone.txt": b"bye", "keep.txt": b"k"}, {"keep.txt": b"k"})
    outcomes = changes.apply(snap, nb, None, opaque_xattr=None, deleted=deleted)
    assert (nb / "gone.txt").exists() and not any(o.applied for o in outcomes)
    changes.apply(snap, nb, ["gone.txt"], opaque_xattr=None, deleted=deleted)
    assert not (nb / "gone.txt").exists()


def test_a_hard_link_to_an_unchanged_file_is_a_new_file_with_its_bytes(tmp_path):
    nb = tmp_path / "nb"
    nb.mkdir()
    (nb / "a").write_bytes(b"content")
    base = pack(nb, limit=1 << 20)[3]
    snap = tmp_path / "snap"
    snap.mkdir()
    unpack(_tar(("a", tarfile.REGTYPE, b"content"), ("b", tarfile.LNKTYPE, "a")), snap, limit=1 << 20, base=base)
    assert sorted(os.listdir(snap)) == ["b"] and (snap / "b").read_bytes() == b"content"


def test_a_huge_extended_header_ends_the_read_before_it_is_held(tmp_path):
    """The engine writes a file's xattrs into its PAX header, which tarfile reads whole."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("f")
        info.pax_headers = {"SCHILY.xattr.user.big": "x" * (copied.MAX_HEADER + 10)}
        tar.addfile(info, io.BytesIO(b""))
    out.seek(0)
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(CopyError, match="header of"):
        unpack(out, dest, limit=1 << 30)


def test_every_entry_costs_against_the_budget(tmp_path):
    dest = tmp_path / "snap"
    dest.mkdir()
    with pytest.raises(CopyError, match="more than"):
        unpack(_tar(*[(f"d{i}", tarfile.DIRTYPE, None) for i in range(20)]), dest, limit=10 * copied.ENTRY_COST)


def test_members_are_not_held_while_reading(tmp_path, monkeypatch):
    seen = []
    real_next = tarfile.TarFile.next

    def next_(self):
        seen.append(len(self.members))
        return real_next(self)
    monkeypatch.setattr(tarfile.TarFile, "next", next_)
    dest = tmp_path / "snap"
    dest.mkdir()
    unpack(_tar(*[(f"f{i}", tarfile.REGTYPE, b"x") for i in range(50)]), dest, limit=1 << 20)
    assert max(seen) <= 1


def test_a_read_write_workspace_cannot_be_copied():
    assert copied.workspace_mode("overlay") == "overlay" and copied.workspace_mode("ro") == "ro"
    with pytest.raises(Exception, match="--workspace rw cannot share"):
        copied.workspace_mode("rw")


def test_copied_files_keep_the_last_snapshot_when_the_container_is_gone(tmp_path):
    class Gone:
        def archive_stream(self, *_):
            import contextlib
            return contextlib.nullcontext(None)

    files = copied.CopiedFiles(tmp_path / "s", tmp_path, "overlay", 1 << 20)
    assert files.upper is None and not files.holds_changes()
    (tmp_path / "s" / copied.SNAPSHOT).mkdir()
    (tmp_path / "s" / copied.SNAPSHOT / "kept").write_text("k")
    files.refresh(Gone(), "abc")
    assert (files.upper / "kept").read_text() == "k"
    assert sorted(os.listdir(tmp_path / "s")) == [copied.SNAPSHOT]


class _LimitedEngine:
    """Refuses to start a container that asks for more than its machine allows, as runc says it."""

    def __init__(self, allows: dict, own=(20000, 96364)):
        from mino_jupyter.policy import HostLimits, ROOTFUL

        self.allows, self.limits_probed, self.started, self.removed = allows, False, [], 0
        self._limits, self._facts = HostLimits(*own), ROOTFUL
        self.specs = {}

    def host_limits(self):
        return self._limits

    def facts(self):
        return self._facts

    def learn_limits(self, limits):
        self._limits, self.limits_probed = limits, True

    def create(self, spec):
        self.specs[spec["name"]] = spec
        return spec["name"]

    def start(self, cid):
        from mino_jupyter.errors import MinoError

        asked = {r["type"]: r["hard"] for r in self.specs[cid]["r_limits"]}
        for kind, number in (("nproc", 6), ("nofile", 7)):
            if asked[kind] > self.allows.get(kind, 1 << 30):
                raise MinoError(f"Podman could not start container: error setting rlimit type {number}: "
                                "operation not permitted")
        self.started.append(cid)

    def remove(self, cid):
        self.removed += 1


def test_an_engine_elsewhere_is_asked_for_its_limits_once():
    engine = _LimitedEngine({"nofile": 5000, "nproc": 3000})
    limits = copied.probe_limits(engine, image="img", labels={})
    assert (limits.nofile, limits.nproc) == (5000, 2048)  # halved until it starts
    assert len(engine.started) == 1 and engine.removed == len(engine.specs)  # every probe container goes
    assert all(s["command"] == ["true"] and s["netns"] == {"nsmode": "none"} for s in engine.specs.values())
    assert copied.probe_limits(engine, image="img", labels={}) == limits and len(engine.specs) == 7  # once


def test_an_engine_that_allows_less_than_the_floor_is_said_in_its_own_words():
    from mino_jupyter.errors import MinoError

    engine = _LimitedEngine({"nofile": 100})
    with pytest.raises(MinoError, match="rlimit type 7"):
        copied.probe_limits(engine, image="img", labels={})
    assert engine.removed == len(engine.specs)
