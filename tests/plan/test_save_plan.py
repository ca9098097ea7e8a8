"""The save plan: one writer per region, bytes balanced over holders, diverged replicas refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import ReplicaDivergenceError, SpecError
from ucp.plan.save_plan import PieceInfo, assign_writers, merge_metas
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
