"""The shared geometry: stored boxes onto universal index space, and boxes onto bytes.

Every property is checked against a brute force written independently of ``ucp.plan.geometry``:
numpy's ``ravel_multi_index`` and ``indices`` for the element order, ``tests.synthetic``'s
``stored_tensor`` (which builds the stored tensor from a universal one by hand) for fused parts and
padding, and plain sets of bytes for blocks.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.synthetic import stored_tensor
from ucp.format.box import Box
from ucp.format.layout import Layout
from ucp.format.pattern import Fused, Pad, Pattern, Shard
from ucp.plan.geometry import (box_cut, box_slices, byte_span, chunk_box, dim_cut, dim_runs, is_contiguous,
                               needed_blocks, pattern_runs, ravel)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def regions(draw, max_ndim=4, empty=False):
    """``(sizes, region)``: a box of ``sizes`` and a region of it (relative), non-empty unless ``empty``."""
    ndim = draw(st.integers(0, max_ndim))
    sizes = tuple(draw(st.integers(1, 5)) for _ in range(ndim))
    offsets = tuple(draw(st.integers(0, s - 1)) for s in sizes)
    lo = 0 if empty else 1
    extents = tuple(draw(st.integers(lo, s - o)) for s, o in zip(sizes, offsets))
    return sizes, Box(offsets, extents)


def element_indices(sizes, region: Box) -> np.ndarray:
    """Row-major indices, in a box of ``sizes``, of every element of ``region`` (brute force)."""
    if not region.ndim:
        return np.zeros(1, dtype=np.int64)
    idx = np.indices(region.sizes).reshape(region.ndim, -1) + np.array(region.offsets)[:, None]
    return np.ravel_multi_index(tuple(idx), sizes)


# --------------------------------------------------------------------------- element order and bytes


@SETTINGS
@given(regions(empty=True))
def test_ravel_agrees_with_numpy(case):
    sizes, region = case
    want = int(np.ravel_multi_index(region.offsets, sizes)) if sizes else 0
    assert ravel(sizes, region.offsets) == want


@SETTINGS
@given(regions())
def test_is_contiguous_agrees_with_a_brute_force(case):
    sizes, region = case
    idx = np.sort(element_indices(sizes, region))
    assert is_contiguous(sizes, region) == bool(np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)))


@SETTINGS
@given(regions(), st.sampled_from([1, 2, 4, 8]), st.integers(0, 50))
def test_byte_span_is_the_tightest_span_of_the_regions_bytes(case, itemsize, start):
    sizes, region = case
    idx = element_indices(sizes, region) + start
    lo, hi = byte_span(sizes, region, itemsize, start)
    assert lo == idx.min() * itemsize and hi == (idx.max() + 1) * itemsize
    if is_contiguous(sizes, region):  # a contiguous region's span holds its bytes and nothing else
        assert hi - lo == region.numel * itemsize


@SETTINGS
@given(regions(empty=True))
def test_box_slices_select_the_box(case):
    sizes, region = case
    a = np.arange(int(np.prod(sizes)), dtype=np.int64).reshape(sizes)
    assert np.array_equal(np.sort(a[box_slices(region)].reshape(-1)), np.sort(element_indices(sizes, region))
                          if region.numel else np.zeros(0, np.int64))


@SETTINGS
@given(st.integers(1, 12), st.integers(1, 16), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40)),
                                                       min_size=1, max_size=6))
def test_needed_blocks_hold_every_byte_of_the_spans_and_only_whole_needed_blocks(nblocks, block_bytes, raw):
    total = nblocks * block_bytes
    spans = [(min(lo, total), min(lo + n, total)) for lo, n in raw]
    wanted = {x // block_bytes for lo, hi in spans for x in range(lo, hi)}  # the blocks some byte lies in
    runs = needed_blocks(spans, nblocks, block_bytes)
    if len(wanted) >= nblocks:
        assert runs is None  # every block needed: take the buffer whole
        return
    assert runs is not None
    got = [b for first, last in runs for b in range(first, last)]
    assert got == sorted(wanted)  # every needed block once, in order, and no other
    assert all(first < last for first, last in runs)
    assert all(a[1] < b[0] for a, b in zip(runs, runs[1:]))  # runs that touch are merged
    covered = {x for first, last in runs for x in range(first * block_bytes, last * block_bytes)}
    assert all(x in covered for lo, hi in spans for x in range(lo, hi))


def test_needed_blocks_without_spans_or_blocks_take_the_buffer_whole():
    assert needed_blocks([], 4, 8) is None
    assert needed_blocks([(0, 3)], 0, 8) is None
    assert needed_blocks([(0, 3)], 4, 0) is None
    assert needed_blocks([(3, 3)], 4, 8) == []  # an empty span needs nothing


@SETTINGS
@given(st.lists(st.integers(1, 9), min_size=0, max_size=3).flatmap(
    lambda shape: st.tuples(st.just(tuple(shape)), st.tuples(*(st.integers(1, 5) for _ in shape)))))
def test_chunk_boxes_tile_the_array(case):
    shape, chunks = case
    hits = np.zeros(shape, dtype=np.int64)
    for idx in np.ndindex(*(-(-s // c) for s, c in zip(shape, chunks))):
        b = chunk_box(shape, chunks, idx)
        assert b.fits(shape) and all(0 < n <= c for n, c in zip(b.sizes, chunks))
        hits[box_slices(b)] += 1
    assert (hits == 1).all()


# --------------------------------------------------------------------------- stored -> universal


@st.composite
def fused_dims(draw):
    """``(size, pattern, layout)``: a fused dim 0 sharded over one or two axes."""
    tp, pp = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    axes = draw(st.sampled_from([("tp",), ("tp", "pp"), ("pp",)]))
    n = (tp if "tp" in axes else 1) * (pp if "pp" in axes else 1)
    parts = tuple((f"p{i}", n * draw(st.integers(0, 3))) for i in range(draw(st.integers(1, 4))))
    pattern = Pattern(tuple(Shard(a, 0) for a in axes), fused=Fused(0, parts))
    return sum(s for _, s in parts), pattern, Layout.from_sizes(tp=tp, pp=pp)


def _mapped(runs) -> dict[int, int]:
    """Stored position -> universal position, every stored position in at most one run."""
    out: dict[int, int] = {}
    for r in runs:
        assert r.length >= 0  # an empty run (keep 0, size 0) maps nothing
        for j in range(r.length):
            assert r.stored + j not in out
            out[r.stored + j] = r.universal + j
    return out


@SETTINGS
@given(fused_dims())
def test_fused_runs_are_the_bijection_the_saver_stores(case):
    size, pattern, layout = case
    stored = stored_tensor(np.arange(size), pattern, layout, np.random.default_rng(0))  # universal index per position
    runs = dim_runs(size, pattern, layout, 0)
    m = _mapped(runs)
    assert sorted(m) == list(range(size)) and sorted(m.values()) == list(range(size))
    assert all(stored[s] == u for s, u in m.items())
    assert [r.stored for r in runs] == sorted(r.stored for r in runs)  # in stored order


@SETTINGS
@given(st.integers(1, 12), st.integers(0, 6), st.integers(1, 4))
def test_padding_maps_nowhere_and_kept_positions_to_themselves(keep, extra, tp):
    pattern = Pattern((Shard("tp", 0),), pad=Pad(0, keep + extra, keep))
    runs = dim_runs(keep + extra, pattern, Layout.from_sizes(tp=tp), 0)
    assert _mapped(runs) == {i: i for i in range(keep)}


@SETTINGS
@given(fused_dims(), st.data())
def test_dim_cut_covers_the_range_in_order_as_the_runs_map_it(case, data):
    size, pattern, layout = case
    runs = dim_runs(size, pattern, layout, 0) if data.draw(st.booleans()) else None
    if data.draw(st.booleans()):  # padding instead: positions past keep map nowhere
        keep = data.draw(st.integers(0, size))
        runs = dim_runs(size, Pattern(pad=Pad(0, size, keep)), layout, 0)
    m = _mapped(runs) if runs is not None else {i: i for i in range(size)}
    lo = data.draw(st.integers(0, size))
    hi = data.draw(st.integers(lo, size))
    parts = dim_cut(lo, hi, runs)
    pos = lo
    for s, u, n in parts:
        assert s == pos and (n > 0 or runs is None)
        for j in range(n):
            assert m.get(s + j) == (None if u is None else u + j)
        pos += n
    assert pos == hi


@st.composite
def stored_boxes(draw):
    """A stored tensor (fused dim 0, maybe padded dim 1, maybe a third dim), its pattern, layout and a box of it."""
    size, fused, layout = draw(fused_dims())
    cols = draw(st.integers(1, 5))
    pad = Pad(1, cols + draw(st.integers(0, 3)), cols) if draw(st.booleans()) else None
    shape = (size, cols) + ((draw(st.integers(1, 3)),) if draw(st.booleans()) else ())
    pattern = Pattern(fused.shards, fused=fused.fused, pad=pad)
    stored_shape = (size, pad.to if pad else cols) + shape[2:]
    offsets = tuple(draw(st.integers(0, s)) for s in stored_shape)
    box = Box(offsets, tuple(draw(st.integers(0, s - o)) for s, o in zip(stored_shape, offsets)))
    return shape, pattern, layout, box


@SETTINGS
@given(stored_boxes())
def test_box_cut_tiles_the_box_and_each_region_lands_on_its_universal_box(case):
    shape, pattern, layout, box = case
    u = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    stored = stored_tensor(u, pattern, layout, np.random.default_rng(0))
    padding = np.zeros(stored.shape, dtype=bool)
    if pattern.pad is not None:
        padding[:, pattern.pad.keep:] = True
    local = stored[box_slices(box)]
    hits = np.zeros(box.sizes, dtype=np.int64)
    for region, universal in box_cut(box, pattern_runs(stored.shape, pattern, layout)):
        hits[box_slices(region)] += 1
        if universal is None:
            assert padding[box_slices(box)][box_slices(region)].all()
        else:
            assert region.sizes == universal.sizes
            assert np.array_equal(local[box_slices(region)], u[box_slices(universal)])
    assert (hits == 1).all()


def test_a_scalar_box_is_one_region_onto_the_scalar():
    assert box_cut(Box((), ()), {}) == [(Box((), ()), Box((), ()))]
