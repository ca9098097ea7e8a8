"""The save plan: one writer per region, bytes balanced over holders, diverged replicas refused."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import ReplicaDivergenceError, SpecError
from ucp.plan.save_plan import (PieceInfo, assign_writers, compare_replicas, merge_metas, pack_share, plan_save,
                                structure_signature, unpack_shares)
from ucp.format import Box, FlatRange, Pattern, Shard, TensorMeta


def info(key, nbytes, crc=0, box=None, flat=None, dtype="float32"):
    return PieceInfo(key, box or Box.full((nbytes // 4,)), flat, dtype, nbytes, crc)


def writers(plan, pieces_by_rank):
    """region -> list of ranks that write it."""
    out = {}
    for rank, idxs in enumerate(plan):
        for i in idxs:
            out.setdefault(pieces_by_rank[rank][i].region, []).append(rank)
    return out


def loads(plan, pieces_by_rank):
    return [sum(pieces_by_rank[r][i].nbytes for i in idxs) for r, idxs in enumerate(plan)]


def test_single_rank_writes_everything():
    pieces = [info("model/a", 40), info("model/b", 8), info("optim/a/step", 4, box=Box((), ()))]
    assert assign_writers([pieces]) == [[0, 1, 2]]


def test_replicated_regions_are_written_once_and_balanced():
    sizes = [100, 90, 60, 50]
    ranks = [[info(f"model/p{i}", n, crc=i) for i, n in enumerate(sizes)] for _ in range(2)]
    plan = assign_writers(ranks)
    w = writers(plan, ranks)
    assert len(w) == 4 and all(len(rs) == 1 for rs in w.values())
    assert loads(plan, ranks) == [150, 150]
    assert all(idx == sorted(idx) for idx in plan)


def test_sharded_pieces_are_written_by_their_only_holder():
    ranks = [[info("model/w", 16, crc=r, box=Box((r * 4,), (4,)))] for r in range(4)]
    assert assign_writers(ranks) == [[0], [0], [0], [0]]


def test_mixed_sharded_and_replicated():
    # Each rank holds its own big shard and a copy of two small replicated tensors.
    ranks = []
    for r in range(2):
        ranks.append([
            info("model/w", 400, crc=10 + r, box=Box((r * 100,), (100,))),
            info("model/b", 40, crc=1),
            info("model/n", 32, crc=2),
        ])
    plan = assign_writers(ranks)
    w = writers(plan, ranks)
    assert w[ranks[0][0].region] == [0] and w[ranks[1][0].region] == [1]
    assert sorted(w[ranks[0][1].region] + w[ranks[0][2].region]) == [0, 1]  # small ones spread too


def test_ties_go_to_the_lowest_rank_and_plan_is_deterministic():
    ranks = [[info("model/a", 8, crc=5)] for _ in range(3)]
    assert assign_writers(ranks) == [[0], [], []]
    ranks = [[info("model/a", 8, crc=5), info("model/b", 8, crc=6)] for _ in range(3)]
    assert assign_writers(ranks) == assign_writers(ranks) == [[0], [1], []]


def test_flat_ranges_are_distinct_regions():
    box = Box((0, 0), (4, 4))
    ranks = [[info("optim/w/exp_avg", 32, crc=r, box=box, flat=FlatRange(r * 8, 8))] for r in range(2)]
    assert assign_writers(ranks) == [[0], [0]]


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_every_region_has_exactly_one_writer_among_its_holders_and_bytes_balance(data):
    n_ranks = data.draw(st.integers(1, 6), label="ranks")
    n_regions = data.draw(st.integers(1, 12), label="regions")
    sizes = data.draw(st.lists(st.integers(0, 1000), min_size=n_regions, max_size=n_regions), label="sizes")
    replicated = data.draw(st.booleans(), label="every rank holds every region")
    ranks: list[list[PieceInfo]] = [[] for _ in range(n_ranks)]
    holders_of = {}
    for j, n in enumerate(sizes):
        hs = list(range(n_ranks)) if replicated else sorted(
            data.draw(st.sets(st.integers(0, n_ranks - 1), min_size=1), label=f"holders{j}"))
        holders_of[("model/t", (j,), (1,), None)] = hs
        for r in hs:
            ranks[r].append(PieceInfo("model/t", Box((j,), (1,)), None, "uint8", n, j))
    plan = assign_writers(ranks)
    assert len(plan) == n_ranks
    w = writers(plan, ranks)
    assert set(w) == set(holders_of)
    for region, rs in w.items():
        assert len(rs) == 1 and rs[0] in holders_of[region]
    for idxs, pieces in zip(plan, ranks):
        assert len(set(idxs)) == len(idxs) and all(0 <= i < len(pieces) for i in idxs)
    if replicated:
        ld = loads(plan, ranks)
        assert max(ld) - min(ld) <= max(sizes)


def test_diverged_replicas_are_named_grouped_by_checksum():
    pieces = [
        [info("model/layer.0.weight", 64, crc=0xAAAA), info("model/ok", 8, crc=1)],
        [info("model/layer.0.weight", 64, crc=0xBBBB), info("model/ok", 8, crc=1)],
        [info("model/layer.0.weight", 64, crc=0xAAAA), info("model/ok", 8, crc=1)],
    ]
    with pytest.raises(ReplicaDivergenceError) as e:
        assign_writers(pieces)
    msg = str(e.value)
    assert "model/layer.0.weight" in msg and "model/ok" not in msg
    assert "ranks [0, 2] have crc32c 0000aaaa" in msg
    assert "ranks [1] have crc32c 0000bbbb" in msg


def test_replicas_with_different_dtype_diverge():
    pieces = [[info("model/w", 16, crc=7, dtype="float32")], [info("model/w", 16, crc=7, dtype="int32")]]
    with pytest.raises(ReplicaDivergenceError, match="model/w"):
        assign_writers(pieces)


def test_many_diverged_tensors_are_summarised():
    pieces = [[info(f"model/p{i}", 8, crc=r) for i in range(8)] for r in range(2)]
    with pytest.raises(ReplicaDivergenceError, match=r"and 3 more") as e:
        assign_writers(pieces)
    assert "model/p0" in str(e.value) and "model/p7" not in str(e.value)


def test_diverged_flat_region_names_its_range():
    box = Box((0,), (16,))
    pieces = [[info("optim/w/exp_avg", 32, crc=r, box=box, flat=FlatRange(8, 8))] for r in range(2)]
    with pytest.raises(ReplicaDivergenceError, match=r"optim/w/exp_avg \[0:16\] \{8:16\}"):
        assign_writers(pieces)


def test_merge_metas_agreement():
    a = TensorMeta((4, 4), "float32", Pattern((Shard("tp", 0),)))
    b = TensorMeta((3,), "bfloat16")
    merged = merge_metas([{"model/a": a}, {"model/a": a, "model/b": b}, {}])
    assert merged == {"model/a": a, "model/b": b}
    assert merge_metas([]) == {}


@pytest.mark.parametrize("other", [
    TensorMeta((4, 5), "float32"),
    TensorMeta((4, 4), "float16"),
    TensorMeta((4, 4), "float32", Pattern((Shard("tp", 1),))),
])
def test_merge_metas_disagreement_names_both_ranks(other):
    base = TensorMeta((4, 4), "float32")
    with pytest.raises(SpecError) as e:
        merge_metas([{"model/x": base}, {"model/y": base}, {"model/x": other}])
    msg = str(e.value)
    assert "ranks 0 and 2" in msg and "model/x" in msg


def test_shares_alike_are_unpickled_once_and_come_back_in_order():
    """Ranks of one stage replicated over dp send equal runs of parameters and equal metadata:
    rank 0 gets each rank's pieces in its own order, sharing the objects of equal bytes."""
    meta = {"model/w": TensorMeta((8,), "float32"), "optim/w/m": TensorMeta((8,), "float32")}
    params = [info("model/w", 32), info("model/v", 16)]
    flats = [[info("optim/w/m", 16, flat=FlatRange(4 * r, 4))] for r in range(2)]
    ranks = [params + flats[0] + [info("model/z", 8)], params + flats[1] + [info("model/z", 8)]]
    packed = [pack_share(ps, dict(meta)) for ps in ranks]
    assert [len(runs) for runs, _ in packed] == [3, 3]  # params, flat, params
    pieces, metas = unpack_shares(packed)
    assert pieces == ranks and metas == [meta, meta]
    assert pieces[0][0] is pieces[1][0] and pieces[0][2] is not pieces[1][2] and metas[0] is metas[1]
    plan, shares = plan_save(pieces, metas, [b"a", b"b"], plan_id=1)
    assert sorted(i for s in shares for i in s.replicated) == [0, 0, 1, 1, 3, 3]


def test_merge_metas_merges_a_shared_table_once_and_still_names_a_disagreement():
    a, other = TensorMeta((4,), "float32"), TensorMeta((5,), "float32")
    table = {"model/x": a}
    assert merge_metas([table, table, table]) == table
    with pytest.raises(SpecError, match="ranks 0 and 2"):
        merge_metas([table, table, {"model/x": other}, table])


# -- the plan made once per layout (plan_save), the replicas compared at each save ------------------


def made(pieces_by_rank):
    sigs = [bytes([r]) for r in range(len(pieces_by_rank))]
    metas = [{p.key: TensorMeta(p.box.sizes, p.dtype) for p in ps} for ps in pieces_by_rank]
    return plan_save(pieces_by_rank, metas, sigs, plan_id=7)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_plan_made_once_writes_what_assign_writers_writes(data):
    n_ranks = data.draw(st.integers(1, 5), label="ranks")
    ranks: list[list[PieceInfo]] = [[] for _ in range(n_ranks)]
    for j in range(data.draw(st.integers(1, 10), label="regions")):
        n = data.draw(st.integers(0, 100), label=f"size{j}")
        for r in sorted(data.draw(st.sets(st.integers(0, n_ranks - 1), min_size=1), label=f"holders{j}")):
            ranks[r].append(PieceInfo(f"model/t{j}", Box((0,), (1,)), None, "uint8", n, None))
    commit, shares = made(ranks)
    assert [list(s.writes) for s in shares] == assign_writers([[replace(p, crc32c=0) for p in ps] for ps in ranks])
    assert [s.plan_id for s in shares] == [7] * n_ranks and [s.signature for s in shares] == list(commit.signatures)
    held = {}
    for r, ps in enumerate(ranks):
        for i, p in enumerate(ps):
            held.setdefault(p.region, []).append((r, i))
    for r, s in enumerate(shares):  # a piece is compared exactly when another rank holds its region
        assert list(s.replicated) == [i for i, p in enumerate(ranks[r]) if len(held[p.region]) > 1]
    assert [list(w) for w in commit.written] == [[ranks[r][i] for i in s.writes] for r, s in enumerate(shares)]
    assert commit.nbytes == sum(len(p.key) and p.nbytes for hs in held.values() for p in [ranks[hs[0][0]][hs[0][1]]])


def replicated_world():
    """Three ranks: each its own shard of model/w, and a copy of model/b and model/n."""
    return [[info("model/w", 16, box=Box((r * 4,), (4,))), info("model/b", 8, box=Box((0,), (2,))),
             info("model/n", 8, box=Box((0,), (2,)))] for r in range(3)]


def test_equal_replicas_pass_and_a_diverged_copy_is_named_with_its_ranks():
    commit, shares = made(replicated_world())
    assert [s.replicated for s in shares] == [(1, 2)] * 3
    same = [np.array([0xB, 0xC], dtype=np.uint32)] * 3
    compare_replicas(commit, same)
    with pytest.raises(ReplicaDivergenceError) as e:
        compare_replicas(commit, [same[0], np.array([0xB, 0xD], dtype=np.uint32), same[0]])
    msg = str(e.value)
    assert "model/n [0:2]: ranks [0, 2] have crc32c 0000000c; ranks [1] have crc32c 0000000d" in msg
    assert "model/b" not in msg


def test_a_plan_without_replicas_compares_nothing():
    commit, shares = made([[info("model/w", 16, box=Box((r * 4,), (4,)))] for r in range(2)])
    assert [s.replicated for s in shares] == [(), ()]
    compare_replicas(commit, [np.zeros(0, np.uint32)] * 2)


def test_holders_of_one_region_with_different_sizes_are_refused_when_planning():
    ranks = [[info("model/b", 8, box=Box((0,), (2,)))], [info("model/b", 12, box=Box((0,), (2,)))]]
    with pytest.raises(ReplicaDivergenceError, match=r"model/b \[0:2\]: ranks \[0\] hold 8 bytes of float32; "
                                                     r"ranks \[1\] hold 12 bytes"):
        made(ranks)


def test_the_signature_changes_with_the_regions_the_metadata_and_the_layout():
    from ucp.format import Layout
    pieces = [info("model/w", 16, box=Box((0,), (4,)))]
    metas = {"model/w": TensorMeta((8,), "float32")}
    lay = Layout.from_sizes(dp=2)
    base = structure_signature(pieces, metas, lay)
    assert structure_signature(list(pieces), dict(metas), Layout.from_sizes(dp=2)) == base
    assert structure_signature([info("model/w", 16, box=Box((4,), (4,)))], metas, lay) != base
    assert structure_signature(pieces, {"model/w": TensorMeta((8,), "bfloat16")}, lay) != base
    assert structure_signature(pieces, metas, Layout.from_sizes(dp=2, zero=1)) != base
    assert structure_signature([replace(pieces[0], crc32c=5)], metas, lay) == base  # data is not structure
