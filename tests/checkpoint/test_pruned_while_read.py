"""A checkpoint pruned by retention while it is being read (issue 17, item 6) is not corruption:
retention deletes ``manifest.json`` first (docs/format-checkpoint.md rule 3), so a reader that finds
a data file missing and the manifest gone knows the checkpoint was deleted. A load of the newest
checkpoint (and a conversion of the newest) finds the newest again and starts over; a load or a
conversion of a given step says that the step was deleted while being read
(CheckpointNotFoundError), never CorruptCheckpointError.

The race is made deterministic: a hook deletes the checkpoint as retention does (manifest first),
after the manifest was read and before the data files are opened."""

from __future__ import annotations

import shutil

import pytest

import ucp
import ucp.checkpoint.load as load_module
import ucp.convert.universal as universal_module
from tests.checkpoint.common import FAST, fresh_checkpointer, make, train_step
from tests.helpers import assert_bits_equal
from ucp.checkpoint.readers import FragmentReader
from ucp.errors import CheckpointDeletedError, CheckpointNotFoundError, CorruptCheckpointError
from ucp.storage import directory as store
from ucp.storage.manifest_io import open_manifest, read_manifest


@pytest.fixture
def two_steps(ckpt_root, tmp_path):
    """Steps 4 and 5 saved; step 5 held aside (``commit()`` puts it in place, as another job's
    save would): returns (step-4 weights, step-5 weights, commit)."""
    model, opt, sched = make()
    ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
    for step in (4, 5):
        train_step(model, opt, sched)
        ck.save(step)
        if step == 4:
            w4 = model.fc1.weight.detach().clone()
    w5 = model.fc1.weight.detach().clone()
    aside = tmp_path / "aside"
    store.step_dir(ckpt_root, 5).rename(aside)

    def commit():
        aside.rename(store.step_dir(ckpt_root, 5))

    return w4, w5, commit


def _prune_on(monkeypatch, where: str, victim, then=lambda: None):
    """Delete ``victim`` as retention does (manifest first) once, at ``where``: right after its
    manifest is read ("manifest"), or as the data reader is made, before any data file is opened
    ("read")."""
    done = []

    def prune():
        if not done:
            done.append(victim)
            then()
            store.remove_checkpoint(victim)

    if where == "manifest":
        def reading(path, data=None):
            m = open_manifest(path, data)
            prune()
            return m
        monkeypatch.setattr(load_module, "open_manifest", reading)
    else:
        class Pruned(FragmentReader):
            def __init__(self, directory, manifest=None, **kwargs):
                prune()
                super().__init__(directory, manifest, **kwargs)
        monkeypatch.setattr(load_module, "FragmentReader", Pruned)
    return done


@pytest.mark.parametrize("where", ["manifest", "read"])
def test_load_of_the_newest_finds_the_newest_again_when_it_is_pruned_while_read(ckpt_root, two_steps, monkeypatch, where):
    w4, w5, commit = two_steps
    done = _prune_on(monkeypatch, where, store.step_dir(ckpt_root, 4), then=commit)  # step 5 saved, keep=1
    ckpt, fresh = fresh_checkpointer(ckpt_root)
    result = ckpt.load()
    assert done and result.step == 5 and result.path == store.step_dir(ckpt_root, 5)
    assert_bits_equal(fresh.fc1.weight, w5)


@pytest.mark.parametrize("where", ["manifest", "read"])
def test_load_of_a_step_pruned_while_read_says_it_was_deleted(ckpt_root, two_steps, monkeypatch, where):
    w4, w5, commit = two_steps
    done = _prune_on(monkeypatch, where, store.step_dir(ckpt_root, 4), then=commit)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CheckpointNotFoundError) as e:
        ckpt.load(step=4)
    assert done and not isinstance(e.value, CorruptCheckpointError)
    msg = str(e.value)
    assert "step 4 was deleted (by retention?) while being read" in msg and str(ckpt_root) in msg and "\n" not in msg


def test_a_load_that_keeps_losing_the_race_gives_up_after_a_few_tries(ckpt_root, two_steps, monkeypatch, tmp_path):
    calls = []

    resolve = store.resolve

    def finding(root, step=None):  # the pruned checkpoint is back (as if saved again) for the next find
        if (tmp_path / "kept").exists():
            (tmp_path / "kept").rename(store.step_dir(ckpt_root, 4))
        return resolve(root, step)

    def reading(path, data=None):  # every checkpoint found is pruned as soon as its manifest is read
        m = open_manifest(path, data)
        calls.append(path)
        shutil.copytree(path, tmp_path / "kept")
        store.remove_checkpoint(path)
        return m

    monkeypatch.setattr(load_module, "open_manifest", reading)
    monkeypatch.setattr(store, "resolve", finding)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CheckpointDeletedError, match="deleted"):
        ckpt.load()
    assert len(calls) == load_module.RETRIES + 1


def test_a_data_file_missing_from_a_checkpoint_still_listed_is_corruption(ckpt_root, two_steps, monkeypatch):
    (store.step_dir(ckpt_root, 4) / store.rank_file(0)).unlink()  # the manifest is there: not retention
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match="data file is missing"):
        ckpt.load()


def test_convert_of_the_newest_finds_the_newest_again_when_it_is_pruned_while_read(ckpt_root, two_steps, monkeypatch,
                                                                                    tmp_path):
    """Step 4 is the newest when convert starts; retention deletes it (step 5 committed meanwhile):
    convert starts over on step 5 and converts it, bit-exactly."""
    _, w5, commit = two_steps
    victim = store.step_dir(ckpt_root, 4)
    done = []

    def reading(path):
        m = read_manifest(path)
        if not done:
            done.append(path)
            commit()
            store.remove_checkpoint(victim)
        return m

    monkeypatch.setattr(universal_module, "read_manifest", reading)
    result = universal_module.convert(ckpt_root, tmp_path / "u", fsync=False)
    assert result.step == 5 and done == [victim]
    model, opt, sched = make()
    ucp.Checkpointer(tmp_path / "u", model=model, optimizer=opt, scheduler=sched, options=FAST).load()
    assert_bits_equal(model.fc1.weight, w5)


def test_convert_of_a_step_pruned_while_read_says_it_was_deleted(ckpt_root, two_steps, monkeypatch, tmp_path):
    victim = store.step_dir(ckpt_root, 4)

    def reading(path):
        m = read_manifest(path)
        store.remove_checkpoint(victim)
        return m

    monkeypatch.setattr(universal_module, "read_manifest", reading)
    with pytest.raises(CheckpointNotFoundError) as e:
        universal_module.convert(ckpt_root, tmp_path / "u", step=4, fsync=False)
    assert not isinstance(e.value, CorruptCheckpointError)
    assert str(e.value).startswith(f"{victim}: the checkpoint was deleted (by retention?) while being read")
    assert not (tmp_path / "u").exists()


def test_a_fragment_table_pruned_after_its_manifest_was_read_is_a_deleted_checkpoint(ckpt_root, two_steps, monkeypatch):
    import ucp.storage.manifest_io as manifest_io

    victim = store.step_dir(ckpt_root, 4)
    check_signed = manifest_io.check_signed

    def checking(header, path, what, holder=""):
        out = check_signed(header, path, what, holder)
        store.remove_checkpoint(victim)  # between manifest.json and the fragment table
        return out

    monkeypatch.setattr(manifest_io, "check_signed", checking)
    with pytest.raises(CheckpointDeletedError) as e:
        read_manifest(victim)
    assert str(e.value) == (f"{victim}: the checkpoint was deleted (by retention?) while being read: "
                            f"{store.FRAGMENT_PAGES} and {store.MANIFEST} are gone")


def test_verify_of_a_checkpoint_pruned_while_verified_says_it_was_deleted(ckpt_root, two_steps):
    from ucp.storage.verify import verify_checkpoint

    victim = store.step_dir(ckpt_root, 4)
    m = read_manifest(victim)
    store.remove_checkpoint(victim)
    with pytest.raises(CheckpointDeletedError, match="deleted"):
        verify_checkpoint(victim, m)


@pytest.mark.dist
def test_every_rank_starts_over_together_when_one_rank_finds_the_checkpoint_pruned(world2, tmp_path):
    from tests.checkpoint import pruned_workloads

    out = world2.run(pruned_workloads.load_newest_pruned_on_one_rank, str(tmp_path / "ck"), str(tmp_path / "aside"))
    assert out == [(5, []), (5, [])]
