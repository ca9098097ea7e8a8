"""The fragment table of format 1.3: rows sorted by key, box and flat start; page summaries and
region queries that never lose a fragment a reader needs; per-rank state stored once per value."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.format import Box, FlatRange, Fragment
from ucp.format.fragment import RegionQuery, SortedRows, fragments_to_table, merge_summaries, table_to_fragments
from ucp.format.state_table import StateQuery, StateRows, all_ranks, rank_entries, rows_of, state_rows


def grid_fragments(key: str, shape: tuple[int, int], split: tuple[int, int], parts: int) -> list[Fragment]:
    """``key`` cut into a grid of ``split`` boxes, each box flat-partitioned into ``parts`` ranges."""
    out = []
    rows, cols = shape[0] // split[0], shape[1] // split[1]
    for i, j in itertools.product(range(split[0]), range(split[1])):
        box = Box((i * rows, j * cols), (rows, cols))
        step = -(-box.numel // parts)
        for p in range(parts):
            lo = min(p * step, box.numel)
            n = min(step, box.numel - lo)
            out.append(Fragment(key, box, FlatRange(lo, n), "float32", len(out), "f", 0, n * 4, 0))
    return out


def test_rows_sort_by_key_then_box_then_flat_start():
    frags = grid_fragments("optim/b", (4, 4), (2, 1), 2) + grid_fragments("model/a", (4, 4), (2, 2), 1)
    table = fragments_to_table(frags[::-1])
    ordered = table_to_fragments(table.take(SortedRows(table).order(table)))
    assert [(f.key, f.box.offsets, f.flat.start if f.flat else None) for f in ordered] == sorted(
        (f.key, f.box.offsets, f.flat.start if f.flat else None) for f in frags)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_a_query_keeps_every_fragment_overlapping_its_boxes(data):
    split = (data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)))
    shape = (split[0] * data.draw(st.integers(1, 4)), split[1] * data.draw(st.integers(1, 4)))
    frags = grid_fragments("optim/w/exp_avg", shape, split, data.draw(st.integers(1, 5)))
    frags += grid_fragments("model/w", shape, split, 1)
    table = fragments_to_table(frags)
    table = table.take(SortedRows(table).order(table))
    rows = SortedRows(table)
    ordered = table_to_fragments(table)
    r0, c0 = data.draw(st.integers(0, shape[0] - 1)), data.draw(st.integers(0, shape[1] - 1))
    q = Box((r0, c0), (data.draw(st.integers(1, shape[0] - r0)), data.draw(st.integers(1, shape[1] - c0))))
    query = RegionQuery({"optim/w/exp_avg": [q]})
    size = data.draw(st.integers(1, 6))
    leaves = [(lo, min(lo + size, len(ordered))) for lo in range(0, len(ordered), size)]
    summaries = [rows.summarize(a, b) for a, b in leaves]
    # two levels: pages of leaves summarized by merge_summaries
    upper = [(merge_summaries(summaries[i:i + 2]), leaves[i:i + 2]) for i in range(0, len(leaves), 2)]
    kept = [f for s, below in upper if query.keep(s)
            for (a, b), sub in zip(below, [rows.summarize(a, b) for a, b in below]) if query.keep(sub)
            for f in ordered[a:b] if query.wants(f)]
    def truly(f):
        if f.key != "optim/w/exp_avg":
            return False
        flat_idx = range(f.flat.start, f.flat.end)
        cols = f.box.sizes[1]
        return any(q.offsets[0] <= f.box.offsets[0] + k // cols < q.ends[0] and
                   q.offsets[1] <= f.box.offsets[1] + k % cols < q.ends[1] for k in flat_idx)
    needed = [f for f in ordered if truly(f)]
    assert set(needed) <= set(kept)
    assert all(f.key == "optim/w/exp_avg" for f in kept)


def test_a_query_for_a_whole_key_or_a_scalar_keeps_its_rows():
    frags = [Fragment("optim/s/step", Box((), ()), None, "float32", 0, "f", 0, 4, 0)]
    frags += grid_fragments("model/w", (4, 4), (2, 2), 1)
    table = fragments_to_table(frags)
    table = table.take(SortedRows(table).order(table))
    rows = SortedRows(table)
    whole = RegionQuery({"model/w": None, "optim/s/step": [Box((), ())]})
    assert all(whole.keep(rows.summarize(i, i + 1)) for i in range(len(frags)))
    assert not RegionQuery({"model/a": None}).keep(rows.summarize(0, len(frags)))  # (before the first key)
    assert RegionQuery({"model/x": None}).keep(rows.summarize(0, len(frags)))  # (between two: may be there)


def test_rank_state_is_stored_once_per_distinct_value_and_found_by_rank():
    ranks = {str(r): {"rng": {"seed": r}, "optimizer": {"groups": r // 4}} for r in range(8)}
    table = state_rows(ranks)
    assert table.num_rows == 8 + 8 + 2  # a row per rank, 8 RNG values, 2 optimizer values
    keys = list(zip(table.column("name").to_pylist(), table.column("n").to_pylist()))
    assert keys == sorted(keys)
    rows = rows_of(table.to_batches(), "t")
    assert rank_entries(rows, 5, "t") == ranks["5"]
    assert all_ranks(rows, "t") == ranks
    summary = StateRows(table).summarize(0, 3)
    assert StateQuery(keys=[("", 1)]).keep(summary) and not StateQuery(keys=[("", 7)]).keep(summary)
    assert StateQuery(names=["optimizer"]).keep(StateRows(table).summarize(8, 10))
