"""The cell executor's binary: built once, static, mode 0111, used only as mino made it."""

import os
import stat

import pytest

from mino_jupyter import executor
from mino_jupyter.errors import MinoError


def test_it_is_built_once_executable_and_unreadable(tmp_path):
    directory = executor.ensure_binary(tmp_path)
    binary = directory / "mino-exec"
    assert directory == executor.binary_dir(tmp_path) and directory.name.endswith(os.uname().machine)
    assert stat.S_IMODE(os.lstat(binary).st_mode) == 0o111 and stat.S_IMODE(os.lstat(directory).st_mode) == 0o755
    built = os.lstat(binary).st_mtime_ns
    assert executor.ensure_binary(tmp_path) == directory and os.lstat(binary).st_mtime_ns == built  # not again


def test_a_file_not_as_mino_made_it_is_replaced(tmp_path):
    binary = executor.ensure_binary(tmp_path) / "mino-exec"
    os.chmod(binary, 0o755)  # readable: the kernel would start it dumpable
    assert not executor._made_by_us(binary.parent)
    executor.ensure_binary(tmp_path)
    assert stat.S_IMODE(os.lstat(binary).st_mode) == 0o111


def test_a_linked_directory_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = executor.binary_dir(tmp_path / "state")
    target.parent.mkdir(parents=True)
    target.symlink_to(elsewhere)
    with pytest.raises(MinoError, match="not a directory mino made"):
        executor.ensure_binary(tmp_path / "state")
    assert list(elsewhere.iterdir()) == []


def test_no_compiler_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(executor, "COMPILER_ENV", {"PATH": str(tmp_path / "nowhere"), "LANG": "C.UTF-8"})
    with pytest.raises(MinoError) as caught:
        executor.ensure_binary(tmp_path / "state")
    assert "no C compiler" in caught.value.message and "gcc and libc6-dev" in caught.value.hint


def test_the_switch(monkeypatch):
    assert executor.enabled({}) and executor.enabled({"MINO_EXECUTOR": "1"})
    assert not executor.enabled({"MINO_EXECUTOR": "0"})
