"""Where checkpoints live: naming, completeness, resolving a path, retention and removal."""

from __future__ import annotations

import pytest

from ucp.errors import CheckpointNotFoundError
from ucp.storage import directory as store
from ucp.storage.directory import FRAGMENT_TABLE, MANIFEST


def make_ckpt(root, step: int, complete: bool = True):
    d = store.step_dir(root, step)
    d.mkdir(parents=True)
    (d / store.rank_file(0)).write_bytes(b"data")
    (d / FRAGMENT_TABLE).write_bytes(b"table")
    if complete:
        (d / MANIFEST).write_text("{}")
    return d


def steps(root, complete=True):
    return [s for s, _ in store.list_steps(root, complete=complete)]


def test_names():
    assert store.step_dir("r", 7).name == "step_00000007"
    assert store.step_dir("r", 123456789).name == "step_123456789"
    assert store.rank_file(3) == "rank_00003.safetensors"


def test_is_complete_needs_a_manifest_file(tmp_path):
    d = make_ckpt(tmp_path, 1, complete=False)
    assert not store.is_complete(d)
    (d / MANIFEST).mkdir()
    assert not store.is_complete(d)  # a directory named manifest.json is not a manifest
    (d / MANIFEST).rmdir()
    (d / MANIFEST).write_text("{}")
    assert store.is_complete(d)
    assert not store.is_complete(tmp_path / "missing")


def test_list_steps_orders_numerically_and_ignores_other_entries(tmp_path):
    for s in (10, 2, 100000000):
        make_ckpt(tmp_path, s)
    make_ckpt(tmp_path, 5, complete=False)
    (tmp_path / "step_3").mkdir()  # not 8 digits
    (tmp_path / "step_00000004").write_text("a file, not a directory")
    (tmp_path / "notes").mkdir()
    (tmp_path / "step_00000006.tmp").mkdir()
    assert steps(tmp_path) == [2, 10, 100000000]
    assert steps(tmp_path, complete=False) == [2, 5, 10, 100000000]
    assert store.list_steps(tmp_path)[0][1] == store.step_dir(tmp_path, 2)
    assert store.list_steps(tmp_path / "missing") == []


def test_resolve_root_gives_newest_complete(tmp_path):
    make_ckpt(tmp_path, 1)
    make_ckpt(tmp_path, 3)
    make_ckpt(tmp_path, 9, complete=False)
    assert store.resolve(tmp_path) == store.step_dir(tmp_path, 3)
    assert store.resolve(tmp_path, 1) == store.step_dir(tmp_path, 1)
    assert store.resolve(str(tmp_path)) == store.step_dir(tmp_path, 3)


def test_resolve_step_dir_gives_itself(tmp_path):
    d = make_ckpt(tmp_path, 4)
    assert store.resolve(d) == d


def test_resolve_missing_step_names_it_and_lists_what_exists(tmp_path):
    make_ckpt(tmp_path, 1)
    make_ckpt(tmp_path, 2)
    with pytest.raises(CheckpointNotFoundError, match=r"step 7 \(have: \[1, 2\]\)"):
        store.resolve(tmp_path, 7)
    make_ckpt(tmp_path, 7, complete=False)
    with pytest.raises(CheckpointNotFoundError, match="step 7"):
        store.resolve(tmp_path, 7)


def test_resolve_missing_path(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such file or directory") as e:
        store.resolve(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    assert isinstance(e.value, FileNotFoundError)


def test_resolve_a_file_is_not_a_checkpoint(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match="not a checkpoint directory"):
        store.resolve(f)


def test_resolve_empty_root(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint") as e:
        store.resolve(tmp_path)
    assert "incomplete" not in str(e.value)


def test_resolve_root_with_only_partial_saves_says_incomplete(tmp_path):
    make_ckpt(tmp_path, 1, complete=False)
    make_ckpt(tmp_path, 2, complete=False)
    with pytest.raises(CheckpointNotFoundError) as e:
        store.resolve(tmp_path)
    msg = str(e.value)
    assert "incomplete" in msg and "2 incomplete" in msg and MANIFEST in msg


def test_resolve_partial_step_dir_itself_is_not_found(tmp_path):
    d = make_ckpt(tmp_path, 1, complete=False)
    with pytest.raises(CheckpointNotFoundError):
        store.resolve(d)


def test_prune_keeps_newest_complete(tmp_path):
    for s in (1, 2, 3, 4, 5):
        make_ckpt(tmp_path, s)
    removed = store.prune(tmp_path, 2)
    assert sorted(removed) == [store.step_dir(tmp_path, s) for s in (1, 2, 3)]
    assert steps(tmp_path, complete=False) == [4, 5]
    assert store.prune(tmp_path, 2) == []
    assert steps(tmp_path) == [4, 5]


def test_prune_removes_partials_older_than_newest_complete_only(tmp_path):
    make_ckpt(tmp_path, 1, complete=False)
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 3, complete=False)
    make_ckpt(tmp_path, 4)
    make_ckpt(tmp_path, 6, complete=False)
    removed = store.prune(tmp_path, 5)  # keep is not the limit here
    assert sorted(removed) == [store.step_dir(tmp_path, 1), store.step_dir(tmp_path, 3)]
    assert steps(tmp_path) == [2, 4]
    assert steps(tmp_path, complete=False) == [2, 4, 6]


def test_prune_without_complete_checkpoints_keeps_partials(tmp_path):
    make_ckpt(tmp_path, 1, complete=False)
    make_ckpt(tmp_path, 2, complete=False)
    assert store.prune(tmp_path, 1) == []
    assert steps(tmp_path, complete=False) == [1, 2]


def test_prune_on_missing_root_is_a_no_op(tmp_path):
    assert store.prune(tmp_path / "missing", 1) == []


def test_remove_checkpoint_deletes_everything(tmp_path):
    d = make_ckpt(tmp_path, 1)
    (d / "sub").mkdir()
    (d / "sub" / "x").write_bytes(b"1")
    store.remove_checkpoint(d)
    assert not d.exists()
    assert list(tmp_path.iterdir()) == []


def test_remove_checkpoint_unlinks_manifest_before_anything_else(tmp_path, monkeypatch):
    d = make_ckpt(tmp_path, 1)
    seen = []
    real_rmtree = store.shutil.rmtree

    def spy(path, *a, **k):
        seen.append(((d / MANIFEST).exists(), (d / FRAGMENT_TABLE).exists(), (d / store.rank_file(0)).exists()))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(store.shutil, "rmtree", spy)
    store.remove_checkpoint(d)
    assert seen == [(False, True, True)]  # the checkpoint became invisible while its data was still there
    assert not d.exists()


def test_remove_checkpoint_of_partial_or_missing_dir(tmp_path):
    d = make_ckpt(tmp_path, 1, complete=False)
    store.remove_checkpoint(d)
    assert not d.exists()
    store.remove_checkpoint(tmp_path / "missing")  # nothing to do, no error


def test_a_snapshot_commit_applies_retention_but_never_retires_a_later_checkpoint(tmp_path):
    """The memory tier's agents commit durable copies of snapshots in the background: one of step 4
    committing after the same job's durable save of step 6 must leave step 6 alone (a trainer's save
    of step 4 would retire it: rule 4b)."""
    from ucp.storage.rank_files import apply_retention

    for step in (2, 4, 6):
        d = store.step_dir(tmp_path, step)
        d.mkdir()
        (d / store.MANIFEST).write_text("{}")
    cleared = apply_retention(tmp_path, None, 4, roll_back=False)
    assert cleared.retired == [] and [s for s, _ in store.list_steps(tmp_path)] == [2, 4, 6]
    cleared = apply_retention(tmp_path, None, 4)
    assert [p.name for p, _ in cleared.retired] == ["step_00000006"]
    assert [s for s, _ in store.list_steps(tmp_path)] == [2, 4]
