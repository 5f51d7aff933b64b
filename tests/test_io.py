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


def test_the_next_write_sweeps_what_a_killed_writer_left(tmp_path):
    # what kill -9 leaves: a temp file beside a file, a temp tree and a moved-aside old tree beside a directory
    (tmp_path / ".train.json.a1b2c3d4.tmp").write_text("half")
    (tmp_path / ".student.k9_x8y7z.tmp").mkdir()
    (tmp_path / ".student.old-4242").mkdir()
    keep = [".train.json.a1b2c3d4.tmp.bak", ".student.notes", ".students.a1b2c3d4.tmp", "train.json.a1b2c3d4.tmp"]
    for name in keep:
        (tmp_path / name).write_text("not ours")
    io.atomic_write_json(tmp_path / "train.json", {"ok": 1})
    with io.atomic_dir(tmp_path / "student") as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["student", "train.json"])
