"""A copied workspace (an engine that does not see this machine's files): the tar mino sends,
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
    data, files, size = pack(nb, limit=1 << 20, protected=[nb / "state"])
    members = _members(data)
    assert set(members) == {"sub", "sub/a.txt", "run.sh", "link"}
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


def test_a_complete_copy_lists_deletions_but_not_what_was_never_copied(tmp_path):
    lower, upper = tmp_path / "nb", tmp_path / "snap"
    for d in (lower, upper):
        (d / "sub").mkdir(parents=True)
        (d / "same.txt").write_text("same")
        (d / "sub" / "kept").write_text("k")
    (lower / "changed.txt").write_text("old")
    (upper / "changed.txt").write_text("new!")
    (lower / "gone.txt").write_text("bye")
    (lower / "sub" / "gone-too").write_text("bye")
    (upper / "added.txt").write_text("hi")
    os.mkfifo(lower / "fifo")  # never copied in: not deleted
    (lower / "state").mkdir()  # mino's own: never copied in
    (lower / "state" / "log").write_text("x")
    found = {(c.path, c.status) for c in changes.list_changes(upper, lower, None, [lower / "state"])}
    assert found == {("changed.txt", "modified"), ("gone.txt", "deleted"), ("sub/gone-too", "deleted"),
                     ("added.txt", "added")}
    # and applied like an overlay's: the deletion only when named
    outcomes = changes.apply(upper, lower, ["gone.txt", "changed.txt"], opaque_xattr=None, protected=[lower / "state"])
    assert all(o.applied for o in outcomes)
    assert not (lower / "gone.txt").exists() and (lower / "changed.txt").read_text() == "new!"
    assert (lower / "state" / "log").exists()


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
    assert files.upper is None
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
