"""A save that fails on a full disk (issue 17, item 3): one line naming the file, no partial left
behind, and the next save is not blocked."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
import torch
from torch import nn

import ucp
from tests.checkpoint.common import FAST, make, snapshot, train_step
from tests.helpers import assert_same
from ucp.checkpoint import save as save_module
from ucp.errors import StorageError
from ucp.storage import directory as store


def _full_disk_after(nbytes: int):
    """A rank-file writer that writes ``nbytes`` of the file, then fails as ``os.write`` does on a
    full disk: ENOSPC, no file name."""
    real = save_module.write_rank_file

    def write(directory, rank, fragments, fsync, *a, **k):
        path = directory / store.rank_file(rank)
        path.write_bytes(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")

    return real, write


def test_a_full_disk_names_the_file_and_leaves_no_partial(ckpt_root, monkeypatch):
    model, opt, sched = make()
    ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
    ck.save(2)
    real, full = _full_disk_after(1000)
    monkeypatch.setattr(save_module, "write_rank_file", full)
    train_step(model, opt, sched)
    with pytest.raises(StorageError) as e:
        ck.save(4)
    assert str(e.value) == f"{store.step_dir(ckpt_root, 4) / store.rank_file(0)}: No space left on device"
    assert [s for s, _ in store.list_steps(ckpt_root, complete=False)] == [2]  # the failed save cleared itself

    monkeypatch.setattr(save_module, "write_rank_file", real)
    saved = snapshot(model, opt, sched)
    assert ck.save(4).step == 4  # the same step again: not "exists already", not blocked
    model2, opt2, sched2 = make(seed=7)
    assert ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, scheduler=sched2).load().step == 4
    assert_same(snapshot(model2, opt2, sched2), saved)


def test_a_partial_left_by_a_killed_save_of_another_step_is_cleared_by_the_next_save(ckpt_root, monkeypatch):
    model, opt, sched = make()
    ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
    ck.save(2)
    monkeypatch.setattr(save_module, "discard_partial", lambda *a: None)  # as if the process was killed
    monkeypatch.setattr(save_module, "write_rank_file", _full_disk_after(5000)[1])
    with pytest.raises(StorageError):
        ck.save(9)
    assert (store.step_dir(ckpt_root, 9) / store.rank_file(0)).stat().st_size == 5000
    monkeypatch.undo()
    ck.save(3)  # an earlier step than the partial's: cleared all the same (rule 4f)
    assert [s for s, _ in store.list_steps(ckpt_root, complete=False)] == [2, 3]


def test_a_failed_fragment_table_write_names_the_table(ckpt_root, monkeypatch):
    from ucp.storage import atomic

    model = make(opt=None)[0]
    ck = ucp.Checkpointer(ckpt_root, model=model, options=FAST)
    real_fsync = atomic.os.fsync

    def fsync(fd):  # the fragment table's write fails, as a full disk fails it: no file name
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".pages.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(StorageError, match=r"step_00000001/fragments\.pages: No space left on device$"):
        ck.save(1)
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert store.list_steps(ckpt_root, complete=False) == []
    assert ck.save(1).step == 1


# -- a real full disk: a 20 MB tmpfs -------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs (root may mount one; skipped only where mounting is not permitted)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


class Wide(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, 1000))  # n * 4 kB


@pytest.mark.fault
def test_saving_until_the_disk_is_full_then_saving_again(small_disk):
    root = small_disk / "ck"
    model = Wide(1500)  # 6 MB a checkpoint: three fit in 20 MB, the fourth does not
    ck = ucp.Checkpointer(root, model=model, options=FAST)
    for step in (1, 2, 3):
        ck.save(step)
    with pytest.raises(StorageError) as e:
        ck.save(4)
    msg = str(e.value)
    assert "\n" not in msg and msg == f"{store.step_dir(root, 4) / store.rank_file(0)}: No space left on device"
    assert [s for s, _ in store.list_steps(root, complete=False)] == [1, 2, 3]  # no partial left behind

    with torch.no_grad():
        model.w.mul_(2)
    with pytest.raises(StorageError):
        ck.save(4)  # still full: fails the same way, and again clears after itself
    store.remove_checkpoint(store.step_dir(root, 1))  # space freed
    expected = model.w.detach().clone()
    assert ck.save(4).step == 4
    assert [s for s, _ in store.list_steps(root, complete=False)] == [2, 3, 4]

    # a smaller state fits in what is left, whatever failed before
    small = Wide(10)
    assert ucp.Checkpointer(root, model=small, options=FAST).save(5).step == 5
    fresh = Wide(1500)
    assert ucp.Checkpointer(root, model=fresh).load(step=4).step == 4
    assert torch.equal(fresh.w.detach().view(torch.int32), expected.view(torch.int32))


def test_the_rank_file_writer_names_its_file_when_the_disk_is_full(tmp_path, monkeypatch):
    # (the root cause: a file object's write raises ENOSPC without a file name; every writer of
    # safetensors files, the export's too, now names it)
    from ucp.storage import safetensors_file
    from ucp.storage.safetensors_file import Entry, write_file

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_file.os, "fsync", full)
    path = tmp_path / "rank_00001.safetensors"
    with pytest.raises(OSError) as e:
        write_file(path, [Entry("t", "F32", (2,), memoryview(b"\0" * 8))])
    assert e.value.filename == str(path) and e.value.errno == errno.ENOSPC


@pytest.mark.dist
@pytest.mark.fault
def test_a_full_disk_on_one_rank_is_one_line_on_every_rank_naming_its_file(world2, tmp_path):
    from tests.checkpoint import writer_workloads

    root = tmp_path / "ck"
    out = world2.run(writer_workloads.full_disk_on_rank, str(root), 1)
    named = f"{store.step_dir(root, 2) / store.rank_file(1)}: No space left on device"
    for r in out:
        assert r["error"] == f"DistributedStorageError: phase 'write' failed on rank 1: {named}", r
        assert r["after_failure"] == [1]  # rank 0 cleared the failed save's directory
        assert r["complete"] == [1, 3]
