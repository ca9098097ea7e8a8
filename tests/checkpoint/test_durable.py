"""Durable distributed checkpoints on gloo worlds of 2 and 4 ranks."""

from __future__ import annotations

import pytest

from tests.checkpoint import durable_workloads as workloads
from tests.world import World
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest

pytestmark = pytest.mark.dist


@pytest.mark.parametrize("kind", ["tp", "fsdp"])
@pytest.mark.parametrize("size", [2, 4])
def test_same_layout_resume_is_bit_exact(worlds, tmp_path, kind, size):
    out = worlds(size).run(workloads.save_and_resume, kind, str(tmp_path / "ck"))
    for rank, r in enumerate(out):
        assert r["step"] == 3 and r["source"] == "durable"
        assert r["diffs"] == [], f"rank {rank}: tensors differ after load: {r['diffs']}"
        assert r["got"] == r["ref"], f"rank {rank}: resumed losses {r['got']} != uninterrupted {r['ref']}"
    m = read_manifest(store.resolve(tmp_path / "ck"))
    assert m.layout.world_size == size
    # Replicated bytes are written once: the stored bytes equal the state's size exactly.
    assert m.nbytes == sum(f.length for f in m.fragments) == out[0]["nbytes"]
    numel = {k: 1 for k in m.tensors}
    for k, meta in m.tensors.items():
        for s in meta.shape:
            numel[k] *= s
    assert sum(f.numel for f in m.fragments) == sum(numel.values())


def test_fsdp_tp_2d_resume_is_bit_exact(world4, tmp_path):
    out = world4.run(workloads.save_and_resume, "fsdp_tp", str(tmp_path / "ck"))
    for r in out:
        assert r["diffs"] == [] and r["got"] == r["ref"]
    assert out[0]["layout"] == "dp=2 tp=2 zero=3"


def test_fsdp_layout_is_recorded(world4, tmp_path):
    world4.run(workloads.save_and_resume, "fsdp", str(tmp_path / "ck"), 1, 1)
    m = read_manifest(store.resolve(tmp_path / "ck"))
    assert m.layout.zero == 3 and m.layout.sizes == {"dp": 4}
    assert str(m.tensors["model/fc1.weight"].pattern) == "shard(dp, dim=0)"
    # every rank wrote its own shard of the sharded weight
    assert sorted(f.rank for f in m.fragments_of("model/fc1.weight")) == [0, 1, 2, 3]


def test_diverged_replica_is_refused_and_named(world4, tmp_path):
    out = world4.run(workloads.save_diverged, str(tmp_path / "ck"), 2)
    for msg in out:
        assert "model/norm.weight" in msg and "differ" in msg, msg
        assert "[2]" in msg, msg  # rank 2 is named on its own
    assert store.list_steps(tmp_path / "ck", complete=False) == [] or not store.list_steps(tmp_path / "ck")


def test_a_reused_plan_saves_the_same_and_still_compares_replicas(world4, tmp_path):
    out = world4.run(workloads.save_with_a_reused_plan, str(tmp_path / "ck"), 1)
    assert [r["made"] for r in out] == [1, 0, 0, 0]  # once, on the committing rank
    for r in out:
        assert "model/norm.weight" in r["error"] and "ranks [1] have crc32c" in r["error"], r["error"]
        assert r["loaded"] == 2 and r["diffs"] == []
    assert [s for s, _ in store.list_steps(tmp_path / "ck")] == [1, 2]


@pytest.mark.fault
def test_rank_killed_mid_save_leaves_previous_checkpoint(tmp_path):
    root = tmp_path / "ck"
    world = World(2, pg_timeout=30)
    try:
        out = world.run(workloads.die_mid_save, str(root), 1, timeout=90, may_die=frozenset({1}))
    finally:
        world.close()
    assert out[0] != "no error", "the surviving rank must fail the save, not commit it"
    assert [s for s, _ in store.list_steps(root)] == [1]
    partial = [s for s, p in store.list_steps(root, complete=False) if not store.is_complete(p)]
    assert partial == []  # rank 0, the root's writer, cleared the failed save's directory (format rule 4f)
    assert store.resolve(root).name == "step_00000001"
    m = read_manifest(store.resolve(root))
    assert m.step == 1


def test_flat_zero1_partitions_round_trip(world4, tmp_path):
    out = world4.run(workloads.flat_zero1_resume, str(tmp_path / "ck"))
    for r in out:
        assert r["diffs"] == [] and r["got"] == r["ref"]
    m = read_manifest(store.resolve(tmp_path / "ck"))
    frags = sorted(m.fragments_of("optim/fc1.weight/momentum"), key=lambda f: f.flat.start)
    # fc1.weight is 10x6 = 60 elements: four flat ranges of 15, one per dp rank, of the whole box
    assert [(f.rank, f.flat.start, f.flat.numel) for f in frags] == [(0, 0, 15), (1, 15, 15), (2, 30, 15), (3, 45, 15)]
    assert all(f.box.sizes == (10, 6) for f in frags)
    assert m.tensors["optim/fc1.weight/master"].pattern.flat == "dp"
    # norm.weight has 6 elements over 4 ranks: chunks of 2, 2, 2 and an empty one that is not stored
    assert sorted(f.flat.numel for f in m.fragments_of("optim/norm.weight/momentum")) == [2, 2, 2]


def test_ranks_saving_different_steps_are_refused_and_nothing_is_touched(world2, tmp_path):
    from ucp.storage.verify import verify_checkpoint

    root = tmp_path / "ck"
    out = world2.run(workloads.save_disagreeing_steps, str(root))
    for msg in out:
        assert "disagree about what to save" in msg, msg
    assert [s for s, _ in store.list_steps(root)] == [1]
    path = store.resolve(root)
    assert verify_checkpoint(path, read_manifest(path)).ok  # the finished checkpoint was not rewritten


@pytest.mark.fault
def test_corruption_under_torch_distributed_keeps_its_error_class(world2, tmp_path):
    out = world2.run(workloads.load_corrupted, str(tmp_path / "ck"))
    for r in out:
        assert r["both"] is True, r  # caught as CorruptCheckpointError, and it is a DistributedError
        assert r["exit_code"] == 3 and "fails its checksum" in r["msg"]
