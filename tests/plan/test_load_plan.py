"""The load plan: a same-layout load finds each destination's exact fragment; any other destination
is planned by the reshard planner, which must fill it exactly once from any tiling of the tensor."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import LoadError
from ucp.plan.load_plan import FragmentIndex
from ucp.plan.reshard import reshard_plan, source_pieces, target_pieces
from ucp.format import Box, FlatRange, Fragment, Layout, Pattern


def frag(key, box, flat=None, rank=0, offset=0, dtype="float32"):
    numel = flat.numel if flat is not None else box.numel
    return Fragment(key, box, flat, dtype, rank, f"rank_{rank:05d}.safetensors", offset, numel * 4, 0)


def test_exact_regions_are_found_and_nothing_else():
    box = Box((0, 0), (4, 6))
    whole, half = frag("model/w", box), frag("model/v", Box((2, 0), (2, 6)))
    parts = [frag("optim/w/exp_avg", box, FlatRange(i * 8, 8), rank=i) for i in range(3)]
    index = FragmentIndex([whole, half, *parts])
    assert index.exact("model/w", box) is whole
    assert index.exact("model/v", Box((2, 0), (2, 6))) is half
    assert index.exact("optim/w/exp_avg", box, FlatRange(8, 8)) is parts[1]
    assert index.exact("model/w", Box((0, 0), (2, 6))) is None  # a part of a fragment: resharded
    assert index.exact("optim/w/exp_avg", box, FlatRange(4, 8)) is None
    assert index.exact("optim/w/exp_avg", box) is None
    assert index.exact("model/unknown", box) is None


def test_a_destination_the_fragments_do_not_cover_is_refused():
    f0 = frag("model/w", Box((0, 0), (2, 6)))
    sources = source_pieces([f0], (4, 6), Pattern(), Layout.single())
    targets = target_pieces(Box((2, 0), (2, 6)), None, (4, 6), Pattern(), Layout.single())
    with pytest.raises(LoadError, match="covers 0 of the 12"):
        reshard_plan(sources, targets, "model/w")


@st.composite
def tiling(draw, shape, depth=0):
    """A guillotine tiling of a box of ``shape`` at offset 0: a list of (offsets, sizes)."""

    def split(offsets, sizes, depth):
        splittable = [d for d, s in enumerate(sizes) if s > 1]
        if depth >= 4 or not splittable or not draw(st.booleans()):
            return [(offsets, sizes)]
        d = draw(st.sampled_from(splittable))
        cut = draw(st.integers(1, sizes[d] - 1))
        lo_sizes = sizes[:d] + (cut,) + sizes[d + 1:]
        hi_sizes = sizes[:d] + (sizes[d] - cut,) + sizes[d + 1:]
        hi_offsets = offsets[:d] + (offsets[d] + cut,) + offsets[d + 1:]
        return split(offsets, lo_sizes, depth + 1) + split(hi_offsets, hi_sizes, depth + 1)

    return split((0,) * len(shape), tuple(shape), depth)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_any_tiling_fills_any_destination_box_exactly_once(data):
    rows = data.draw(st.integers(1, 12), label="rows")
    cols = data.draw(st.integers(1, 12), label="cols")
    tiles = data.draw(tiling((rows, cols)), label="tiles")
    full = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    fragments = [frag("model/w", Box(o, s), rank=i) for i, (o, s) in enumerate(tiles)]
    held = {f: full[tuple(slice(o, o + s) for o, s in zip(f.box.offsets, f.box.sizes))].reshape(-1) for f in fragments}
    r0 = data.draw(st.integers(0, rows - 1), label="r0")
    c0 = data.draw(st.integers(0, cols - 1), label="c0")
    dest = Box((r0, c0), (data.draw(st.integers(1, rows - r0)), data.draw(st.integers(1, cols - c0))))

    sources = source_pieces(fragments, (rows, cols), Pattern(), Layout.single())
    targets = target_pieces(dest, None, (rows, cols), Pattern(), Layout.single())
    out = np.zeros(dest.sizes, dtype=np.int64)
    hits = np.zeros(dest.sizes, dtype=np.int64)
    sl = lambda b: tuple(slice(o, o + n) for o, n in zip(b.offsets, b.sizes))  # noqa: E731
    for item in reshard_plan(sources, targets, "model/w"):
        sp = item.source
        src = held[sp.ref][sp.sub.offset:sp.sub.offset + sp.sub.box.numel].reshape(sp.sub.box.sizes)
        out[sl(item.dst)] = src[sl(item.src)]
        hits[sl(item.dst)] += 1
    assert (hits == 1).all()
    np.testing.assert_array_equal(out, full[sl(dest)])
