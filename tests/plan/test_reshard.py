"""The reshard planner: any source layout and pattern onto any target layout and pattern.

The oracle is ``tests.synthetic``: it places a universal tensor into a layout (fused parts
interleaved per shard, padding appended, flat partitions) independently of the planner. For every
target rank the planned copies must reproduce exactly what the target layout holds, padding left
zero, every element written once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.synthetic import place, stored_tensor
from ucp.errors import LoadError
from ucp.plan.reshard import (check_target, chunk_pieces, flat_boxes, reshard_plan, source_pieces, target_box, target_pieces)
from ucp.format.box import Box, FlatRange
from ucp.format.fragment import Fragment
from ucp.format.layout import Layout
from ucp.format.pattern import Fused, Pad, Pattern, Shard


def _fragments(u, pattern, layout, rng):
    """In-memory fragments (data kept beside them) of ``u`` placed under ``layout``."""
    out = []
    for rank, box, flat, data in place("k", u, pattern, layout, rng):
        f = Fragment("k", box, flat, "int64", rank, f"r{rank}", 0, data.nbytes, 0)
        out.append((f, data))
    return out


def _expected(u, pattern, layout, rank):
    """What ``rank`` holds under ``layout``: its box (or flat range), padding zero."""
    s = stored_tensor(u, pattern, layout, np.random.default_rng(0))
    if pattern.pad is not None:
        idx = [slice(None)] * s.ndim
        idx[pattern.pad.dim] = slice(pattern.pad.keep, None)
        s[tuple(idx)] = 0
    box, flat = target_box(s.shape, pattern, layout, rank)
    local = s[tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))].reshape(-1)
    return local if flat is None else local[flat.start:flat.end]


def _fill(u, src_pattern, src_layout, dst_pattern, dst_layout, rank, rng):
    frags = _fragments(u, src_pattern, src_layout, rng)
    data = {id(f): d for f, d in frags}
    s_shape = stored_tensor(u, src_pattern, src_layout, rng).shape
    t_shape = stored_tensor(u, dst_pattern, dst_layout, rng).shape
    sources = source_pieces([f for f, _ in frags], s_shape, src_pattern, src_layout)
    box, flat = target_box(t_shape, dst_pattern, dst_layout, rank)
    targets = target_pieces(box, flat, t_shape, dst_pattern, dst_layout)
    n = flat.numel if flat is not None else box.numel
    out = np.zeros(n, dtype=u.dtype)
    written = np.zeros(n, dtype=np.int64)
    for item in reshard_plan(sources, targets, "k"):
        sp, tp = item.source, item.target
        src = data[id(sp.ref)][sp.sub.offset:sp.sub.offset + sp.sub.box.numel].reshape(sp.sub.box.sizes)
        sl = lambda b: tuple(slice(o, o + k) for o, k in zip(b.offsets, b.sizes))  # noqa: E731
        dst = out[tp.sub.offset:tp.sub.offset + tp.sub.box.numel].reshape(tp.sub.box.sizes)
        cnt = written[tp.sub.offset:tp.sub.offset + tp.sub.box.numel].reshape(tp.sub.box.sizes)
        dst[sl(item.dst)] = src[sl(item.src)]
        cnt[sl(item.dst)] += 1
    return out, written, targets


def _check(u, sp, sl, tp, tl):
    rng = np.random.default_rng(1)
    for rank in range(tl.world_size):
        out, written, targets = _fill(u, sp, sl, tp, tl, rank, rng)
        want = _expected(u, tp, tl, rank)
        np.testing.assert_array_equal(out, want, err_msg=f"rank {rank}")
        pad = np.zeros_like(written)
        for t in targets:
            if t.universal is None:
                cells = pad[t.sub.offset:t.sub.offset + t.sub.box.numel].reshape(t.sub.box.sizes)
                cells[tuple(slice(o, o + k) for o, k in zip(t.region.offsets, t.region.sizes))] = 1
        assert ((written == 1) | (pad == 1)).all() and not (written & pad).any(), f"rank {rank}: not covered exactly once"


QKV = Fused(0, (("q", 8), ("k", 8), ("v", 8)))


@pytest.mark.parametrize("src, dst", [
    ((dict(tp=2), Pattern((Shard("tp", 0),), fused=QKV)), (dict(tp=4), Pattern((Shard("tp", 0),), fused=QKV))),
    ((dict(tp=4), Pattern((Shard("tp", 0),), fused=QKV)), (dict(tp=1), Pattern(fused=QKV))),
    ((dict(dp=2, tp=2, zero=1), Pattern((Shard("tp", 0),), flat="dp", fused=QKV)),
     (dict(dp=3, zero=1), Pattern(flat="dp", fused=QKV))),
    ((dict(tp=2, dp=2), Pattern((Shard("tp", 0), Shard("dp", 0)), fused=QKV)),
     (dict(tp=2, dp=3, zero=1), Pattern((Shard("tp", 0),), flat="dp", fused=QKV))),
])
def test_fused_parts_are_resplit_for_the_new_layout(src, dst):
    u = np.arange(24 * 5, dtype=np.int64).reshape(24, 5)
    _check(u, src[1], Layout.from_sizes(**src[0]), dst[1], Layout.from_sizes(**dst[0]))


@pytest.mark.parametrize("tp_src, tp_dst", [(2, 3), (4, 1), (1, 4), (3, 2)])
def test_vocabulary_is_repadded_for_the_new_tp(tp_src, tp_dst):
    vocab = 25
    u = np.arange(vocab * 3, dtype=np.int64).reshape(vocab, 3) + 1
    pad = lambda tp: -(-vocab // (8 * tp)) * 8 * tp  # noqa: E731
    sp = Pattern((Shard("tp", 0),), pad=Pad(0, pad(tp_src), vocab))
    tp = Pattern((Shard("tp", 0),), pad=Pad(0, pad(tp_dst), vocab))
    _check(u, sp, Layout.from_sizes(tp=tp_src), tp, Layout.from_sizes(tp=tp_dst))


@pytest.mark.parametrize("src, dst", [
    (dict(ep=4, dp=2), dict(ep=3)), (dict(ep=2), dict(ep=8)), (dict(ep=8), dict(ep=1, tp=2)), (dict(ep=3, tp=2), dict(ep=2, tp=3)),
])
def test_experts_are_re_placed_for_the_new_ep(src, dst):
    """Expert weights [experts, d_ff, d] sharded over ep by expert (and over tp by d_ff): any ep onto any."""
    u = np.arange(8 * 6 * 3, dtype=np.int64).reshape(8, 6, 3)

    def pattern(sizes):
        return Pattern((Shard("ep", 0),) + ((Shard("tp", 1),) if "tp" in sizes else ()))

    _check(u, pattern(src), Layout.from_sizes(**src), pattern(dst), Layout.from_sizes(**dst))


def test_flat_boxes_are_contiguous_runs_of_the_range():
    box = Box((2, 1, 0), (3, 4, 5))
    for start, end in [(0, 60), (3, 4), (3, 27), (7, 59), (20, 40), (0, 1), (59, 60)]:
        subs = flat_boxes(box, FlatRange(start, end - start))
        idx = np.arange(60).reshape(3, 4, 5)
        got = []
        for sub in subs:
            rel = tuple(slice(o - bo, o - bo + n) for o, bo, n in zip(sub.box.offsets, box.offsets, sub.box.sizes))
            vals = idx[rel].reshape(-1)
            assert list(vals) == list(range(start + sub.offset, start + sub.offset + sub.box.numel))
            got += list(vals)
        assert sorted(got) == list(range(start, end))


def test_universal_chunks_as_sources():
    u = np.arange(7 * 9, dtype=np.int64).reshape(7, 9)
    want_box = Box((1, 2), (5, 6))
    pieces = chunk_pieces(u.shape, (3, 4), want_box)
    out = np.zeros((5, 6), dtype=np.int64)
    for p in pieces:
        c = u[tuple(slice(o, o + n) for o, n in zip(p.sub.box.offsets, p.sub.box.sizes))]
        r = p.region
        dst = tuple(slice(o - w, o - w + n) for o, w, n in zip(p.universal.offsets, want_box.offsets, p.universal.sizes))
        out[dst] = c[tuple(slice(o, o + n) for o, n in zip(r.offsets, r.sizes))]
    np.testing.assert_array_equal(out, u[1:6, 2:8])


def test_a_source_missing_elements_is_refused():
    u = np.arange(12, dtype=np.int64).reshape(4, 3)
    lay = Layout.from_sizes(tp=2)
    frags = [f for f, _ in _fragments(u, Pattern((Shard("tp", 0),)), lay, np.random.default_rng(0))][:1]
    sources = source_pieces(frags, (4, 3), Pattern((Shard("tp", 0),)), lay)
    targets = target_pieces(Box.full((4, 3)), None, (4, 3), Pattern(), Layout.single())
    with pytest.raises(LoadError, match="covers 6 of the 12"):
        reshard_plan(sources, targets, "k")


AXES = st.sampled_from(["tp", "dp", "pp", "ep"])


@st.composite
def placements(draw, rows, cols, parts, vocab_keep):
    """A layout and a pattern for a [rows, cols] tensor (fused parts or padding on dim 0, maybe flat)."""
    sizes = {a: draw(st.integers(1, 3)) for a in ("pp", "dp", "ep", "tp")}
    layout = Layout.from_sizes(zero=1, **sizes)
    shards = []
    for axis in draw(st.lists(AXES, unique=True, max_size=2)):
        shards.append(Shard(axis, draw(st.integers(0, 1))))
    kind = draw(st.sampled_from(["plain", "fused", "pad"]))
    fused = pad = None
    n0 = math.prod(layout.size(s.axis) for s in shards if s.dim == 0)
    if kind == "fused":
        if any(p % n0 for p in parts):
            kind = "plain"
        else:
            fused = Fused(0, tuple(zip("qkv", parts)))
    if kind == "pad":
        to = vocab_keep + draw(st.integers(0, 5))
        pad = Pad(0, to, vocab_keep)
    free = [a for a in ("pp", "dp", "ep", "tp") if a not in {s.axis for s in shards}]
    flat = draw(st.sampled_from([None] + free))
    return layout, Pattern(tuple(shards), flat, fused, pad)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_layout_onto_any_layout(data):
    parts = (12, 6, 6)
    rows, cols = sum(parts), data.draw(st.integers(1, 5))
    u = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols) + 1
    sl, sp = data.draw(placements(rows, cols, parts, rows))
    tl, tp = data.draw(placements(rows, cols, parts, rows))
    _check(u, sp, sl, tp, tl)


def test_a_layout_that_cannot_split_the_fused_heads_is_refused_with_the_reason():
    qkv = Pattern((Shard("tp", 0),), fused=Fused(0, (("q", 8), ("k", 8), ("v", 8))))
    check_target("model/a.qkv.weight", (24, 4), qkv, Layout.from_sizes(dp=1, tp=4))  # 8 rows per part: fine
    with pytest.raises(LoadError, match=r"model/a\.qkv\.weight: this layout cannot hold it: fused part\(s\) q, k, v "
                                        r"of dim 0 do not split into 3 equal chunks"):
        check_target("model/a.qkv.weight", (24, 4), qkv, Layout.from_sizes(dp=1, tp=3))


# -- what a rank reads of a paged fragment table: load_regions, and a RegionQuery of them -----------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_fragments_a_query_keeps_fill_every_target_as_all_fragments_do(data):
    from ucp.format.fragment import RegionQuery
    from ucp.format.manifest import TensorMeta
    from ucp.plan.reshard import load_regions
    from ucp.plan.sources import Slice

    parts = (12, 6, 6)
    rows, cols = sum(parts), data.draw(st.integers(1, 5))
    u = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols) + 1
    sl, sp = data.draw(placements(rows, cols, parts, rows))
    tl, tp = data.draw(placements(rows, cols, parts, rows))
    rng = np.random.default_rng(2)
    frags = _fragments(u, sp, sl, rng)
    s_shape = stored_tensor(u, sp, sl, rng).shape
    t_shape = stored_tensor(u, tp, tl, rng).shape
    for rank in range(tl.world_size):
        box, flat = target_box(t_shape, tp, tl, rank)
        regions = load_regions(box, flat, t_shape, tp, tl, [Slice("k")], {"k": TensorMeta(s_shape, "int64", sp)}, sl)
        query = RegionQuery(regions)
        kept = [f for f, _ in frags if query.wants(f)]
        targets = target_pieces(box, flat, t_shape, tp, tl)
        reshard_plan(source_pieces(kept, s_shape, sp, sl), targets, "k")  # raises if an element is missing
        needed = {id(o.source.ref) for o in reshard_plan(source_pieces([f for f, _ in frags], s_shape, sp, sl),
                                                          targets, "k")}
        assert needed <= {id(f) for f in kept}  # every fragment the plan reads is kept


@pytest.mark.parametrize("dst, most", [(dict(tp=4, dp=2, zero=1), 1), (dict(tp=2, dp=3, zero=1), 4),
                                       (dict(dp=1), 8)])
def test_a_query_keeps_only_the_fragments_near_a_ranks_region(dst, most):
    from ucp.format.fragment import RegionQuery
    from ucp.format.manifest import TensorMeta
    from ucp.plan.reshard import load_regions
    from ucp.plan.sources import Slice

    u = np.arange(24 * 4, dtype=np.int64).reshape(24, 4)
    sl, pattern = Layout.from_sizes(tp=4, dp=2, zero=1), Pattern((Shard("tp", 0),), flat="dp", fused=QKV)
    frags = [f for f, _ in _fragments(u, pattern, sl, np.random.default_rng(0))]
    tl = Layout.from_sizes(**dst)
    tpat = Pattern((Shard("tp", 0),) if "tp" in dst else (), flat="dp" if tl.size("dp") > 1 else None, fused=QKV)
    box, flat = target_box(u.shape, tpat, tl, 0)
    query = RegionQuery(load_regions(box, flat, u.shape, tpat, tl, [Slice("k")], {"k": TensorMeta(u.shape, "int64",
                                                                                                  pattern)}, sl))
    kept = [f for f in frags if query.wants(f)]
    assert len(frags) == 8 and 1 <= len(kept) <= most
