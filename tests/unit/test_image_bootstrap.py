"""The rootless offline build (mmdebstrap in a user namespace): its pure parts, without running it."""

import pytest

from mino_jupyter import host, image
from mino_jupyter.errors import ImageBuildError

SUBUID = "alice:100000:65536\n# comment\n1002:165536:65536\n"


def test_mmdebstrap_command_is_unshare_minbase_to_a_tarball():
    cmd = image.mmdebstrap_command("/usr/bin/mmdebstrap", "http://deb.example/debian", "/tmp/x/rootfs.tar")
    assert cmd == ["/usr/bin/mmdebstrap", "--mode=unshare", "--variant=minbase", image.SUITE,
                   "/tmp/x/rootfs.tar", "http://deb.example/debian"]


def test_subids_are_found_by_name_or_by_uid():
    assert host.subid_count(SUBUID, "alice", 1001) == 65536
    assert host.subid_count(SUBUID, "bob", 1002) == 65536  # by uid
    assert host.subid_count(SUBUID, "carol", 1003) == 0
    assert host.subid_count("alice:1:2:3\nalice:x:y\n", "alice", 1001) == 0  # malformed lines ignored
    assert host.subid_count("alice:100000:1000\nalice:200000:64536\n", "alice", 1001) == 65536  # ranges add up


def test_check_subids_passes_with_a_full_range_in_both_files():
    image.check_subids("alice", 1001, files=("/etc/subuid", "/etc/subgid"), read=lambda path: SUBUID)


@pytest.mark.parametrize("missing", ["/etc/subuid", "/etc/subgid"])
def test_check_subids_names_the_file_without_a_range(missing):
    files = {"/etc/subuid": SUBUID, "/etc/subgid": SUBUID, missing: "alice:100000:65536\n"}
    with pytest.raises(ImageBuildError) as err:
        image.check_subids("bob", 1002, files=("/etc/subuid", "/etc/subgid"), read=files.__getitem__)
    assert missing in err.value.message and "bob" in err.value.message
    # the hint proposes a range above every range already granted, for both kinds of ID
    assert "usermod --add-subuids 231072-296607 --add-subgids 231072-296607 bob" in err.value.hint


def test_check_subids_refuses_a_range_too_small_for_a_rootfs():
    with pytest.raises(ImageBuildError, match="only 1000 subordinate IDs in /etc/subuid"):
        image.check_subids("alice", 1001, read=lambda path: "alice:100000:1000\n")


def test_check_subids_leaves_unreadable_files_to_newuidmap():
    image.check_subids("alice", 1001, read=lambda path: None)


def test_free_subid_start_is_above_every_range():
    assert host.free_subid_start([""]) == 100000
    assert host.free_subid_start([SUBUID, "x:300000:10\n"]) == 300010


def test_bootstrap_as_a_normal_user_runs_mmdebstrap_and_imports_its_tarball(monkeypatch, tmp_path):
    """The flow around the command: subuid check first, the tarball streamed to the engine."""
    calls = []

    def fake_stream(cmd, progress, *, failure, show=None):
        calls.append(cmd)
        open(cmd[4], "wb").write(b"tar bytes")
        assert show("I: extracting archives...") and not show("some dpkg chatter")

    class FakeEngine:
        def import_image(self, ref, chunks):
            calls.append((ref, b"".join(chunks)))

    monkeypatch.setattr(image.os, "geteuid", lambda: 1001)
    monkeypatch.setattr(image, "_find_tool", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(image, "check_subids", lambda user, uid: calls.append(("subids", uid)))
    monkeypatch.setattr(image, "_stream_command", fake_stream)
    monkeypatch.setattr(image.tempfile, "tempdir", str(tmp_path))
    lines = []
    assert image.bootstrap(FakeEngine(), mirror="http://m/debian", progress=lines.append, ref="localhost/b:1") == "localhost/b:1"
    assert calls[0] == ("subids", 1001)
    assert calls[1][:4] == ["/usr/bin/mmdebstrap", "--mode=unshare", "--variant=minbase", image.SUITE]
    assert calls[1][5] == "http://m/debian"
    assert calls[2] == ("localhost/b:1", b"tar bytes")
    assert any("mmdebstrap" in line for line in lines)


def test_bootstrap_without_mmdebstrap_says_what_to_install(monkeypatch):
    monkeypatch.setattr(image.os, "geteuid", lambda: 1001)
    monkeypatch.setattr(image, "_find_tool", lambda name: None)
    with pytest.raises(ImageBuildError, match="mmdebstrap is not installed") as err:
        image.bootstrap(object(), mirror="http://m/debian", progress=print)
    assert err.value.hint == "apt-get install mmdebstrap uidmap"
