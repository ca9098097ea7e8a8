"""Finding checkpoints, retention (``keep``), partial saves and rollbacks, in one process."""

from __future__ import annotations

import shutil

import pytest

import ucp
from tests.checkpoint.common import FAST, make, snapshot, train_step
from tests.helpers import assert_same
from ucp.errors import CheckpointNotFoundError, OptionsError, UcpError
from ucp.storage import directory as store


def test_load_on_empty_root_returns_none(ckpt_root):
    model = make(opt=None)[0]
    assert ucp.Checkpointer(ckpt_root, model=model).load() is None  # root does not exist yet
    ckpt_root.mkdir()
    assert ucp.Checkpointer(ckpt_root, model=model).load() is None


def test_load_missing_step_raises_not_found_naming_the_step(ckpt_root):
    model = make(opt=None)[0]
    ckpt = ucp.Checkpointer(ckpt_root, model=model, options=FAST)
    ckpt.save(1)
    with pytest.raises(CheckpointNotFoundError, match=r"step 42"):
        ckpt.load(step=42)
    assert ckpt.load(step=1).step == 1


def test_load_missing_step_on_missing_root_names_the_step(ckpt_root):
    ckpt = ucp.Checkpointer(ckpt_root, model=make(opt=None)[0])
    with pytest.raises(CheckpointNotFoundError) as e:
        ckpt.load(step=42)
    assert "42" in str(e.value)


def test_saving_an_existing_step_raises_and_keeps_the_checkpoint(ckpt_root):
    model, opt, sched = make()
    ckpt = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
    ckpt.save(4)
    before = {p.name: p.read_bytes() for p in store.step_dir(ckpt_root, 4).iterdir()}
    train_step(model, opt, sched)
    with pytest.raises(UcpError, match="exists already"):
        ckpt.save(4)
    assert {p.name: p.read_bytes() for p in store.step_dir(ckpt_root, 4).iterdir()} == before


@pytest.mark.parametrize("step", [-1, True, 1.0, "3", None])
def test_save_rejects_bad_steps(ckpt_root, step):
    ckpt = ucp.Checkpointer(ckpt_root, model=make(opt=None)[0], options=FAST)
    with pytest.raises(OptionsError, match="non-negative integer"):
        ckpt.save(step)
    assert not ckpt_root.exists() or not any(ckpt_root.iterdir())


def test_keep_two_retains_only_newest_two(ckpt_root):
    model, opt, sched = make()
    ckpt = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, keep=2, options=FAST)
    for step in (1, 2, 3, 4):
        train_step(model, opt, sched)
        ckpt.save(step)
    assert [s for s, _ in store.list_steps(ckpt_root)] == [3, 4]
    assert sorted(p.name for p in ckpt_root.iterdir()) == [".ucp-writer", "step_00000003", "step_00000004"]
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(step=2)
    assert ckpt.load().step == 4
    ckpt.close()  # the writer lease goes with the job
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["step_00000003", "step_00000004"]


def _make_partial(root, src_step: int, dst_step: int):
    """Simulate a save of ``dst_step`` that died before its commit: data files, no manifest."""
    dst = store.step_dir(root, dst_step)
    shutil.copytree(store.step_dir(root, src_step), dst)
    (dst / store.MANIFEST).unlink()
    (dst / "junk.bin").write_bytes(b"half written")
    return dst


def test_partial_save_is_invisible_and_cleared_by_the_next_save_of_any_step(ckpt_root):
    model, opt, sched = make()
    ckpt = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, keep=2, options=FAST)
    ckpt.save(1)
    train_step(model, opt, sched)
    ckpt.save(2)
    partial = _make_partial(ckpt_root, 2, 7)

    assert ckpt.load().step == 2
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(step=7)

    train_step(model, opt, sched)
    ckpt.save(5)  # the root's single writer (its lease) knows no other save is in flight: 7 was a dead one
    assert not partial.exists()
    assert [s for s, _ in store.list_steps(ckpt_root)] == [2, 5]
    assert [s for s, _ in store.list_steps(ckpt_root, complete=False)] == [2, 5]


def test_save_over_a_stale_partial_of_the_same_step_replaces_it(ckpt_root):
    model, opt, sched = make()
    ckpt = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
    ckpt.save(1)
    partial = _make_partial(ckpt_root, 1, 3)
    train_step(model, opt, sched)
    saved = snapshot(model, opt, sched)
    ckpt.save(3)
    assert store.is_complete(partial) and not (partial / "junk.bin").exists()
    train_step(model, opt, sched)
    assert ckpt.load().step == 3
    assert_same(snapshot(model, opt, sched), saved)


def test_only_partial_saves_load_returns_none(ckpt_root):
    model = make(opt=None)[0]
    ckpt = ucp.Checkpointer(ckpt_root, model=model, options=FAST)
    ckpt.save(1)
    _make_partial(ckpt_root, 1, 2)
    store.remove_checkpoint(store.step_dir(ckpt_root, 1))
    assert ckpt.load() is None


def test_closed_checkpointer_refuses_work(ckpt_root):
    with ucp.Checkpointer(ckpt_root, model=make(opt=None)[0], options=FAST) as ckpt:
        ckpt.save(1)
    with pytest.raises(UcpError, match="closed"):
        ckpt.save(2)
    with pytest.raises(UcpError, match="closed"):
        ckpt.load()


def test_rollback_then_save_keeps_the_new_checkpoint(ckpt_root):
    # resume from 100 after 200 was saved (a loss spike, say): the next save is the newest one,
    # retention removes the abandoned run's checkpoint, never the one just written
    model, opt, sched = make()
    ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, keep=1, options=FAST)
    ck.save(100)
    ck.save(200)
    assert [s for s, _ in store.list_steps(ckpt_root)] == [200]
    with pytest.warns(UserWarning, match=r"step_00000200 \(deleted\)"):
        res = ck.save(150)
    assert res.path.is_dir() and store.is_complete(res.path)
    assert [s for s, _ in store.list_steps(ckpt_root)] == [150]
    assert ck.load().step == 150


def test_pruning_failure_does_not_fail_a_committed_save(ckpt_root, monkeypatch):
    model, opt, sched = make()
    ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, keep=1, options=FAST)
    ck.save(1)

    def refuse(*a, **k):
        raise PermissionError("read-only old checkpoint")

    monkeypatch.setattr(store, "prune", refuse)
    with pytest.warns(UserWarning, match="pruning old ones failed"):
        res = ck.save(2)
    assert store.is_complete(res.path) and ck.load().step == 2


def _run(root, steps, load_step=None):
    """One run of a job: load ``load_step`` (if given), then train and save each of ``steps``;
    returns the state saved at the last step. The job ends (closes its Checkpointer)."""
    model, opt, sched = make(seed=len(steps))
    with ucp.Checkpointer(root, model=model, optimizer=opt, scheduler=sched, options=FAST) as ck:
        if load_step is not None:
            assert ck.load(step=load_step).step == load_step
        for step in steps:
            train_step(model, opt, sched)
            ck.save(step)
            saved = snapshot(model, opt, sched)
    return saved


def test_resuming_an_older_step_rolls_back_without_retention(ckpt_root):
    # issue 17, item 2: keep=None; run 1 saves 2, 4, 6; run 2 resumes 2, saves 3 and 4: both saves
    # succeed, and a restart resumes run 2's step 4, not the abandoned run's step 6
    _run(ckpt_root, [2, 4, 6])
    with pytest.warns(UserWarning, match=r"step_00000004 -> .*\.abandoned.*step_00000006 -> "):
        saved = _run(ckpt_root, [3, 4], load_step=2)
    assert [s for s, _ in store.list_steps(ckpt_root)] == [2, 3, 4]

    model, opt, sched = make(seed=99)
    result = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST).load()
    assert result.step == 4
    assert_same(snapshot(model, opt, sched), saved)  # run 2's step 4, bit for bit

    # the abandoned run's checkpoints are kept whole, out of the readers' sight
    retired = sorted((ckpt_root / store.ABANDONED).iterdir())
    assert [p.name.split(".")[0] for p in retired] == ["step_00000004", "step_00000006"]
    assert all(store.is_complete(p) for p in retired)
    with pytest.raises(CheckpointNotFoundError, match="step 6"):
        ucp.Checkpointer(ckpt_root, model=make()[0]).load(step=6, strict=False)


def test_saving_a_step_an_abandoned_run_saved_retires_it_first(ckpt_root):
    # run 2 resumes step 2 and saves step 4 straight away: run 1's complete step 4 is retired, not an error
    _run(ckpt_root, [2, 4, 6])
    with pytest.warns(UserWarning) as caught:
        saved = _run(ckpt_root, [4], load_step=2)
    said = " ".join(str(w.message) for w in caught)
    assert "step_00000004 -> " in said and "step_00000006 -> " in said
    assert [s for s, _ in store.list_steps(ckpt_root)] == [2, 4]
    model, opt, sched = make(seed=99)
    assert ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST).load().step == 4
    assert_same(snapshot(model, opt, sched), saved)


def test_rollback_under_retention_deletes_the_abandoned_run(ckpt_root):
    model, opt, sched = make()
    with ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, keep=5, options=FAST) as ck:
        for step in (2, 4, 6):
            ck.save(step)
    with ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, keep=5, options=FAST) as ck:
        ck.load(step=2)
        with pytest.warns(UserWarning, match=r"step_00000004 \(deleted\), step_00000006 \(deleted\)"):
            ck.save(3)
        ck.save(4)
    assert [s for s, _ in store.list_steps(ckpt_root)] == [2, 3, 4]
    assert not (ckpt_root / store.ABANDONED).exists()
