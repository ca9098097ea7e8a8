"""The consolidation plan: stored fragments cut into pieces that fill a universal array exactly once.

The oracle is ``tests.synthetic.place``, the forward direction written independently: it turns a
universal array into the fragments a layout stores (fused parts interleaved per shard, padding
appended, flat partitions). Applying the plan to those fragments must give the universal array back.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.synthetic import place
from ucp.errors import FormatError, SpecError
from ucp.plan.consolidate import box_pieces, consolidate_plan, source_runs
from ucp.plan.geometry import Run, dim_runs
from ucp.format import Box, Fragment, Fused, Layout, Pad, Pattern, Shard, TensorMeta
from ucp.format.universal import padded_shape

# --------------------------------------------------------------------------- dim_runs


def test_a_plain_dim_maps_to_itself():
    assert dim_runs(7, Pattern(), Layout.single(), 0) == [Run(0, 0, 7)]


def test_padding_keeps_the_first_rows():
    p = Pattern((Shard("tp", 0),), pad=Pad(0, 12, 10))
    assert dim_runs(12, p, Layout.from_sizes(tp=2), 0) == [Run(0, 0, 10)]
    assert dim_runs(4, p, Layout.from_sizes(tp=2), 1) == [Run(0, 0, 4)]  # another dim is untouched


def test_fused_unsharded_dim_is_the_identity():
    p = Pattern(fused=Fused(0, (("q", 4), ("k", 2), ("v", 2))))
    assert dim_runs(8, p, Layout.from_sizes(tp=2), 0) == [Run(0, 0, 8)]


def test_fused_dim_sharded_in_two():
    # stored: [q0 q1 | k0 | v0 || q2 q3 | k1 | v1]; universal: [q0 q1 q2 q3 | k0 k1 | v0 v1]
    p = Pattern((Shard("tp", 0),), fused=Fused(0, (("q", 4), ("k", 2), ("v", 2))))
    assert dim_runs(8, p, Layout.from_sizes(tp=2), 0) == [
        Run(0, 0, 2), Run(2, 4, 1), Run(3, 6, 1),
        Run(4, 2, 2), Run(6, 5, 1), Run(7, 7, 1),
    ]


def test_fused_dim_sharded_in_four_by_one_axis_and_by_two():
    p4 = Pattern((Shard("tp", 1),), fused=Fused(1, (("q", 4), ("k", 4), ("v", 4))))
    got = dim_runs(12, p4, Layout.from_sizes(tp=4), 1)
    want = [Run(3 * c + i, 4 * i + c, 1) for c in range(4) for i in range(3)]
    assert got == want
    # two axes of size 2 splitting the same dim make four chunks too
    p22 = Pattern((Shard("pp", 1), Shard("tp", 1)), fused=Fused(1, (("q", 4), ("k", 4), ("v", 4))))
    assert dim_runs(12, p22, Layout.from_sizes(pp=2, tp=2), 1) == want


def test_fused_chunks_ignore_shards_of_other_dims():
    p = Pattern((Shard("tp", 1),), flat="dp", fused=Fused(0, (("gate", 2), ("up", 2))))
    assert dim_runs(4, p, Layout.from_sizes(dp=2, tp=2), 0) == [Run(0, 0, 4)]
    assert dim_runs(6, p, Layout.from_sizes(dp=2, tp=2), 1) == [Run(0, 0, 6)]


def test_uneven_fused_parts_are_rejected_naming_them():
    p = Pattern((Shard("tp", 0),), fused=Fused(0, (("q", 4), ("k", 3), ("v", 3))))
    with pytest.raises(SpecError, match=r"fused part\(s\) k, v of dim 0 do not split into 2 equal chunks"):
        dim_runs(10, p, Layout.from_sizes(tp=2), 0)


def test_fused_and_padded_on_one_dim_is_rejected():
    p = Pattern((Shard("tp", 0),), fused=Fused(0, (("q", 4), ("k", 4))), pad=Pad(0, 10, 8))
    with pytest.raises(SpecError, match="dim 0 is both fused and padded"):
        dim_runs(10, p, Layout.from_sizes(tp=2), 0)


def test_box_pieces_cut_a_box_along_the_segments():
    segments = {0: [Run(0, 0, 2), Run(2, 4, 1), Run(3, 6, 1), Run(4, 2, 2), Run(6, 5, 1),
                    Run(7, 7, 1)]}
    pieces = box_pieces(Box((4, 0), (4, 3)), segments)  # tp rank 1 of the fused example above
    assert [(p.src, p.dst) for p in pieces] == [
        ((slice(0, 2), slice(0, 3)), (slice(2, 4), slice(0, 3))),
        ((slice(2, 3), slice(0, 3)), (slice(5, 6), slice(0, 3))),
        ((slice(3, 4), slice(0, 3)), (slice(7, 8), slice(0, 3))),
    ]


def test_a_box_entirely_in_the_padding_has_no_pieces():
    assert box_pieces(Box((8, 0), (4, 2)), {0: [Run(0, 0, 7)]}) == []


# --------------------------------------------------------------------------- consolidate_plan on fixed cases


def fragments_of(key, u, pattern, layout, seed=0):
    """In-memory fragments of ``u`` placed by the oracle, and each fragment's data by file name."""
    frags, data = [], {}
    for i, (rank, box, flat, local) in enumerate(place(key, u, pattern, layout, np.random.default_rng(seed))):
        name = f"f{i:04d}"
        frags.append(Fragment(key, box, flat, "int64", rank, name, 0, local.nbytes, 0))
        data[name] = local
    return frags, data


def plan_of(u, pattern, layout, key="model/w", seed=0):
    frags, data = fragments_of(key, u, pattern, layout, seed)
    meta = TensorMeta(padded_shape(u.shape, pattern), "int64", pattern)
    return consolidate_plan(key, meta, frags, layout, u.shape), data


def box_data(source, data) -> np.ndarray:
    """The source box, flattened, assembled from its fragments (flat ones must tile it in order)."""
    if source.flat:
        at = 0
        for f in source.fragments:
            assert f.flat.start == at, "flat fragments are sorted and contiguous"
            at += f.flat.numel
        assert at == source.box.numel
        return np.concatenate([data[f.file] for f in source.fragments])
    assert len(source.fragments) == 1
    return data[source.fragments[0].file]


def apply_pieces(plan, data, sentinel=-1):
    out = np.full(plan.shape, sentinel, dtype=np.int64)
    hits = np.zeros(plan.shape, dtype=np.int64)
    for s in plan.sources:
        boxed = box_data(s, data).reshape(s.box.sizes)
        for p in s.pieces:
            assert boxed[p.src].shape == out[p.dst].shape
            out[p.dst] = boxed[p.src]
            hits[p.dst] += 1
    return out, hits


def apply_runs(plan, data, sentinel=-1):
    out = np.full(math.prod(plan.shape), sentinel, dtype=np.int64)
    hits = np.zeros(math.prod(plan.shape), dtype=np.int64)
    for s in plan.sources:
        flat = box_data(s, data)
        runs = source_runs(s, plan.shape)
        assert runs.dtype == np.int64 and runs.shape[1:] == (3,)
        assert (runs[:, 2] > 0).all()
        assert (np.diff(runs[:, 0]) >= 0).all(), "sorted by box start"
        assert (runs[:-1, 0] + runs[:-1, 2] <= runs[1:, 0]).all(), "runs do not overlap in the box"
        assert runs[:, 2].sum() == sum(p.numel for p in s.pieces)
        for b, a, n in runs:
            out[a:a + n] = flat[b:b + n]
            hits[a:a + n] += 1
    return out.reshape(plan.shape), hits.reshape(plan.shape)


def universal(shape):
    return (np.arange(math.prod(shape), dtype=np.int64) + 1).reshape(shape)


TP0, TP1 = (Shard("tp", 0),), (Shard("tp", 1),)
QKV444 = (("q", 4), ("k", 4), ("v", 4))

CASES = {
    "dense rows": ((8, 6), Pattern((Shard("tp", 0),)), Layout.from_sizes(tp=2)),
    "dense columns": ((4, 6), Pattern((Shard("tp", 1),)), Layout.from_sizes(tp=3)),
    "uneven shards": ((5, 3), Pattern((Shard("tp", 0),)), Layout.from_sizes(tp=3)),
    "flat zero-1 of tp shards": ((6, 5), Pattern((Shard("tp", 0),), flat="dp"), Layout.from_sizes(dp=3, tp=2, zero=1)),
    "fused tp2": ((12, 3), Pattern(TP0, fused=Fused(0, QKV444)), Layout.from_sizes(tp=2)),
    "fused tp4 columns": ((3, 16), Pattern(TP1, fused=Fused(1, (("q", 8), ("k", 4), ("v", 4)))), Layout.from_sizes(tp=4)),
    "fused flat": ((8, 4), Pattern(TP0, flat="dp", fused=Fused(0, (("gate", 4), ("up", 4)))), Layout.from_sizes(dp=2, tp=2)),
    "padded vocab": ((10, 4), Pattern((Shard("tp", 0),), pad=Pad(0, 12, 10)), Layout.from_sizes(tp=2)),
    "padding fills a whole shard": ((5, 2), Pattern((Shard("tp", 0),), pad=Pad(0, 12, 5)), Layout.from_sizes(tp=3)),
    "padded columns flat": ((3, 5), Pattern((Shard("tp", 0),), flat="dp", pad=Pad(1, 8, 5)), Layout.from_sizes(dp=2, tp=3)),
    "scalar": ((), Pattern(), Layout.from_sizes(dp=2)),
    "scalar flat": ((), Pattern(flat="dp"), Layout.from_sizes(dp=2)),
    "empty": ((0, 4), Pattern((Shard("tp", 1),)), Layout.from_sizes(tp=2)),
}


@pytest.mark.parametrize("shape, pattern, layout", CASES.values(), ids=CASES.keys())
def test_plan_reproduces_the_universal_array(shape, pattern, layout):
    u = universal(shape)
    plan, data = plan_of(u, pattern, layout)
    assert plan.shape == u.shape and plan.dtype == "int64"
    assert plan.nbytes == sum(d.nbytes for d in data.values())
    out, hits = apply_pieces(plan, data)
    assert (hits == 1).all()
    assert np.array_equal(out, u)
    out, hits = apply_runs(plan, data)
    assert (hits == 1).all()
    assert np.array_equal(out, u)


def test_whole_and_flat_sources():
    plan, _ = plan_of(universal((8, 6)), Pattern((Shard("tp", 0),)), Layout.from_sizes(tp=2))
    assert all(s.whole and not s.flat for s in plan.sources)
    plan, _ = plan_of(universal((10, 4)), Pattern((Shard("tp", 0),), pad=Pad(0, 12, 10)), Layout.from_sizes(tp=2))
    assert [s.whole for s in plan.sources] == [True, False]  # the second shard carries two padding rows
    plan, _ = plan_of(universal((6, 5)), Pattern((Shard("tp", 0),), flat="dp"), Layout.from_sizes(dp=3, tp=2))
    assert all(s.flat and len(s.fragments) == 3 for s in plan.sources)


def test_sources_are_ordered_by_file_and_offset():
    plan, _ = plan_of(universal((9, 2)), Pattern((Shard("tp", 0),)), Layout.from_sizes(tp=3))
    assert [s.fragments[0].file for s in plan.sources] == sorted(s.fragments[0].file for s in plan.sources)


def test_source_runs_of_whole_rows_and_of_a_column_block():
    plan, _ = plan_of(universal((8, 6)), Pattern((Shard("tp", 0),)), Layout.from_sizes(tp=2))
    assert [source_runs(s, plan.shape).tolist() for s in plan.sources] == [[[0, 0, 24]], [[0, 24, 24]]]
    plan, _ = plan_of(universal((3, 6)), Pattern((Shard("tp", 1),)), Layout.from_sizes(tp=2))
    assert source_runs(plan.sources[1], plan.shape).tolist() == [[0, 3, 3], [3, 9, 3], [6, 15, 3]]


def test_a_missing_fragment_is_a_format_error():
    u = universal((8, 6))
    pattern, layout = Pattern((Shard("tp", 0),)), Layout.from_sizes(tp=2)
    frags, _ = fragments_of("model/w", u, pattern, layout)
    with pytest.raises(FormatError, match=r"model/w: its fragments fill 24 of the 48 elements of the universal array \[8, 6\]"):
        consolidate_plan("model/w", TensorMeta((8, 6), "int64", pattern), frags[:1], layout, (8, 6))


def test_overlapping_fragments_are_a_format_error():
    frags = [Fragment("model/w", Box((0,), (3,)), None, "int64", 0, "a", 0, 24, 0),
             Fragment("model/w", Box((2,), (2,)), None, "int64", 1, "b", 0, 16, 0)]
    with pytest.raises(FormatError, match="fill 5 of the 4"):
        consolidate_plan("model/w", TensorMeta((4,), "int64", Pattern()), frags, Layout.from_sizes(tp=2), (4,))


def test_uneven_fused_parts_fail_the_plan():
    pattern = Pattern((Shard("tp", 0),), fused=Fused(0, (("q", 3), ("k", 3))))
    frag = Fragment("model/w", Box((0,), (3,)), None, "int64", 0, "f", 0, 24, 0)
    with pytest.raises(SpecError, match="do not split into 2 equal chunks"):
        consolidate_plan("model/w", TensorMeta((6,), "int64", pattern), [frag], Layout.from_sizes(tp=2), (6,))


# --------------------------------------------------------------------------- the property


@st.composite
def placed_tensors(draw):
    """A random layout, universal shape and pattern the saver could have produced."""
    sizes = {a: draw(st.integers(1, 3)) for a in ("pp", "dp", "tp")}
    layout = Layout.from_sizes(zero=1, **sizes)
    ndim = draw(st.integers(0, 3))
    shape = [draw(st.integers(0, 7)) for _ in range(ndim)]
    shards = []
    if ndim:
        for axis in ("tp", "pp"):
            if draw(st.booleans()):
                shards.append(Shard(axis, draw(st.integers(0, ndim - 1))))
        shards = draw(st.permutations(shards))
    fused = pad = None
    if ndim and draw(st.booleans()):
        d = draw(st.sampled_from(sorted({s.dim for s in shards}) or list(range(ndim))))
        n = math.prod(layout.size(s.axis) for s in shards if s.dim == d)
        parts = tuple((f"p{i}", n * draw(st.integers(0, 3))) for i in range(draw(st.integers(1, 3))))
        fused = Fused(d, parts)
        shape[d] = sum(s for _, s in parts)
    free = [d for d in range(ndim) if fused is None or d != fused.dim]
    if free and draw(st.booleans()):
        d = draw(st.sampled_from(free))
        shape[d] = max(shape[d], 1)
        pad = Pad(d, shape[d] + draw(st.integers(0, 4)), shape[d])
    flat = "dp" if draw(st.booleans()) else None
    pattern = Pattern(tuple(shards), flat, fused, pad)
    pattern.validate(padded_shape(tuple(shape), pattern), layout.names)
    seed = draw(st.integers(0, 2**16))
    return universal(tuple(shape)), pattern, layout, seed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(placed_tensors())
def test_plan_covers_every_element_once_and_copies_reproduce_the_array(case):
    u, pattern, layout, seed = case
    plan, data = plan_of(u, pattern, layout, seed=seed)
    for s in plan.sources:
        for p in s.pieces:
            assert all(0 <= sl.start <= sl.stop <= n for sl, n in zip(p.src, s.box.sizes))
            assert all(0 <= sl.start <= sl.stop <= n for sl, n in zip(p.dst, u.shape))
    out, hits = apply_pieces(plan, data)
    assert (hits == 1).all(), (pattern, layout)
    assert np.array_equal(out, u), (pattern, layout)
    out, hits = apply_runs(plan, data)
    assert (hits == 1).all(), (pattern, layout)
    assert np.array_equal(out, u), (pattern, layout)
