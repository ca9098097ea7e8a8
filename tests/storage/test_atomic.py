"""Atomic commit: a file appears under its final name only complete, and leaves no temporary behind."""

from __future__ import annotations

import errno
import os

import pytest

from ucp.storage import atomic
from ucp.storage.atomic import TMP_SUFFIX, fsync_dir, write_atomic


def test_write_atomic_creates_file_with_exact_bytes(tmp_path):
    path = tmp_path / "manifest.json"
    data = bytes(range(256)) * 3
    write_atomic(path, data)
    assert path.read_bytes() == data
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_write_atomic_replaces_content_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old content that is longer than the new one")
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"
    write_atomic(path, b"")
    assert path.read_bytes() == b""
    assert sorted(os.listdir(tmp_path)) == ["f.bin"]
    assert not (tmp_path / ("f.bin" + TMP_SUFFIX)).exists()


def test_write_atomic_replaces_a_stale_tmp_from_a_crashed_writer(tmp_path):
    path = tmp_path / "f.bin"
    (tmp_path / ("f.bin" + TMP_SUFFIX)).write_bytes(b"garbage from a crash")
    write_atomic(path, b"fresh")
    assert path.read_bytes() == b"fresh"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_write_atomic_accepts_str_path_and_buffers(tmp_path):
    path = tmp_path / "g.bin"
    write_atomic(str(path), memoryview(b"abc"))
    assert path.read_bytes() == b"abc"


def test_replaced_file_is_a_new_inode_so_open_readers_keep_the_old_bytes(tmp_path):
    path = tmp_path / "f.bin"
    write_atomic(path, b"version 1")
    with open(path, "rb") as reader:
        write_atomic(path, b"version 2")
        assert reader.read() == b"version 1"
    assert path.read_bytes() == b"version 2"


def test_failed_write_keeps_old_content_and_leaves_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    write_atomic(path, b"committed")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError):
        write_atomic(path, b"never visible")
    monkeypatch.undo()
    assert path.read_bytes() == b"committed"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_fsync_dir_on_existing_and_missing_directory(tmp_path):
    fsync_dir(tmp_path)  # no error
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "missing")


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    # os.fsync (like os.write) raises ENOSPC naming no file; the error a user sees must say where
    path = tmp_path / "manifest.json"
    path.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(OSError) as e:
        write_atomic(path, b"new")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(path)
    assert str(e.value) == f"[Errno 28] No space left on device: '{path}'"
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["manifest.json"]


def test_with_path_keeps_a_name_the_error_has():
    named = FileNotFoundError(errno.ENOENT, "No such file or directory", "/a/b")
    assert atomic.with_path(named, "/c") is named
    bare = atomic.with_path(OSError(errno.ENOENT, "No such file or directory"), "/c")
    assert isinstance(bare, FileNotFoundError) and bare.filename == "/c"
