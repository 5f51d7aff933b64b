"""Atomic writes: a failure mid-write (disk full, crash) leaves the previous output intact."""

import errno
import os

import pytest

from tnd import io


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_failed_file_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    io.atomic_write_bytes(target, b"old checkpoint")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        io.atomic_write_bytes(target, b"new checkpoint that never fully lands")
    assert target.read_bytes() == b"old checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_failed_directory_write_keeps_the_old_directory(tmp_path):
    target = tmp_path / "models" / "student"
    with io.atomic_dir(target) as out:
        (out / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target) as out:
            (out / "weights").write_text("half")
            raise RuntimeError("crash while saving")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["student"]


def test_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "out"
    with io.atomic_dir(target) as out:
        (out / "a").write_text("1")
    with io.atomic_dir(target) as out:
        (out / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]


def test_outputs_get_normal_permissions(tmp_path):
    io.atomic_write_text(tmp_path / "f.json", "{}")
    with io.atomic_dir(tmp_path / "d") as out:
        (out / "x").write_text("")
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == io.FILE_MODE
    assert (tmp_path / "d").stat().st_mode & 0o777 == io.DIR_MODE
