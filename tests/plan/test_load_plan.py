"""The load plan: which fragment regions fill a destination box, each element exactly once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import LoadError
from ucp.plan.load_plan import FragmentIndex, ReadItem
from ucp.spec import Box, FlatRange, Fragment


def frag(key, box, flat=None, rank=0, offset=0, dtype="float32"):
    numel = flat.numel if flat is not None else box.numel
    return Fragment(key, box, flat, dtype, rank, f"rank_{rank:05d}.safetensors", offset, numel * 4, 0)


def assemble(items, fragments_data, dest_shape):
    """Apply the plan the way the loader does; also count how often each element is written."""
    out = np.zeros(dest_shape, dtype=np.int64)
    hits = np.zeros(dest_shape, dtype=np.int64)
    for it in items:
        src = fragments_data[it.fragment]
        if it.src is None:
            assert it.dst is None
            out[...] = src.reshape(dest_shape)
            hits += 1
        else:
            assert src[it.src].shape == out[it.dst].shape
            out[it.dst] = src[it.src]
            hits[it.dst] += 1
    return out, hits


def test_exact_match_reads_the_whole_fragment():
    f = frag("model/w", Box((0, 0), (4, 6)))
    g = frag("model/w", Box((4, 0), (4, 6)), rank=1)
    items = FragmentIndex([f, g]).plan("model/w", Box((4, 0), (4, 6)))
    assert items == [ReadItem(g)]
    assert items[0].src is None and items[0].dst is None


def test_exact_match_of_0d_and_flat_fragments():
    s = frag("optim/w/step", Box((), ()))
    assert FragmentIndex([s]).plan("optim/w/step", Box((), ())) == [ReadItem(s)]
    box = Box((0, 0), (4, 4))
    parts = [frag("optim/w/exp_avg", box, FlatRange(i * 8, 8), rank=i) for i in range(2)]
    assert FragmentIndex(parts).plan("optim/w/exp_avg", box, FlatRange(8, 8)) == [ReadItem(parts[1])]


def test_first_of_equal_regions_wins():
    a = frag("model/w", Box((0,), (4,)), rank=0)
    b = frag("model/w", Box((0,), (4,)), rank=1)
    assert FragmentIndex([a, b]).plan("model/w", Box((0,), (4,))) == [ReadItem(a)]


def test_box_spanning_two_fragments_gives_two_items_tiling_it():
    f0 = frag("model/w", Box((0, 0), (4, 6)))
    f1 = frag("model/w", Box((4, 0), (4, 6)), rank=1)
    dest = Box((2, 1), (4, 3))  # rows 2..6, cols 1..4
    items = FragmentIndex([f0, f1]).plan("model/w", dest)
    assert len(items) == 2
    by_frag = {it.fragment: it for it in items}
    assert by_frag[f0].src == (slice(2, 4), slice(1, 4)) and by_frag[f0].dst == (slice(0, 2), slice(0, 3))
    assert by_frag[f1].src == (slice(0, 2), slice(1, 4)) and by_frag[f1].dst == (slice(2, 4), slice(0, 3))
    full = np.arange(48).reshape(8, 6)
    data = {f0: full[0:4], f1: full[4:8]}
    out, hits = assemble(items, data, dest.sizes)
    assert (hits == 1).all()
    np.testing.assert_array_equal(out, full[2:6, 1:4])


def test_other_keys_and_non_overlapping_fragments_are_ignored():
    f0 = frag("model/w", Box((0,), (4,)))
    f1 = frag("model/w", Box((4,), (4,)))
    other = frag("model/v", Box((0,), (8,)))
    items = FragmentIndex([other, f0, f1]).plan("model/w", Box((1,), (2,)))
    assert [it.fragment for it in items] == [f0]
    assert items[0].src == (slice(1, 3),) and items[0].dst == (slice(0, 2),)


def test_missing_coverage_raises_load_error():
    f0 = frag("model/w", Box((0, 0), (4, 6)))
    with pytest.raises(LoadError, match=r"model/w: the checkpoint covers 12 of the 24 elements of \[2:6,0:6\]"):
        FragmentIndex([f0]).plan("model/w", Box((2, 0), (4, 6)))
    with pytest.raises(LoadError, match=r"covers 0 of"):
        FragmentIndex([f0]).plan("model/unknown", Box((0,), (3,)))


def test_flat_mismatch_raises_load_error():
    box = Box((0, 0), (4, 4))
    parts = [frag("optim/w/exp_avg", box, FlatRange(i * 8, 8), rank=i) for i in range(2)]
    index = FragmentIndex(parts)
    with pytest.raises(LoadError, match="flat partitions") as e:
        index.plan("optim/w/exp_avg", box, FlatRange(4, 8))
    assert "{4:12}" in str(e.value) and "resharding loader" in str(e.value)
    with pytest.raises(LoadError, match="flat partitions"):
        index.plan("optim/w/exp_avg", box)  # dense destination over flat sources
    dense = FragmentIndex([frag("model/w", box)])
    with pytest.raises(LoadError, match="flat partitions"):
        dense.plan("model/w", box, FlatRange(0, 8))  # flat destination over a dense source


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
def test_random_2d_tilings_cover_every_destination_element_exactly_once(data):
    rows = data.draw(st.integers(1, 12), label="rows")
    cols = data.draw(st.integers(1, 12), label="cols")
    tiles = data.draw(tiling((rows, cols)), label="tiles")
    full = np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    fragments = [frag("model/w", Box(o, s), rank=i) for i, (o, s) in enumerate(tiles)]
    fragments_data = {f: full[tuple(slice(o, o + s) for o, s in zip(f.box.offsets, f.box.sizes))] for f in fragments}

    r0 = data.draw(st.integers(0, rows - 1), label="r0")
    c0 = data.draw(st.integers(0, cols - 1), label="c0")
    dest = Box((r0, c0), (data.draw(st.integers(1, rows - r0)), data.draw(st.integers(1, cols - c0))))
    items = FragmentIndex(fragments).plan("model/w", dest)

    out, hits = assemble(items, fragments_data, dest.sizes)
    assert (hits == 1).all()
    np.testing.assert_array_equal(out, full[r0:r0 + dest.sizes[0], c0:c0 + dest.sizes[1]])
    assert len({id(it.fragment) for it in items}) == len(items)
    overlapping = [f for f in fragments if (ov := f.box.intersect(dest)) is not None and ov.numel]
    assert len(items) == len(overlapping)
    if any(f.box == dest for f in fragments):
        assert len(items) == 1 and items[0].src is None


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_random_tiling_with_a_missing_tile_raises(data):
    rows = data.draw(st.integers(2, 10), label="rows")
    cols = data.draw(st.integers(1, 10), label="cols")
    tiles = data.draw(tiling((rows, cols)).filter(lambda t: len(t) > 1), label="tiles")
    drop = data.draw(st.integers(0, len(tiles) - 1), label="drop")
    fragments = [frag("model/w", Box(o, s)) for i, (o, s) in enumerate(tiles) if i != drop]
    with pytest.raises(LoadError, match="covers"):
        FragmentIndex(fragments).plan("model/w", Box.full((rows, cols)))


def test_fused_or_padded_tensor_is_never_cut_across_layouts():
    # stored by tp=2 as [q0;k0;v0 | q1;k1;v1]: a whole-tensor read would mix the parts up, so refuse
    from ucp.spec import Fused, Pad, Pattern, Shard

    frags = [Fragment("model/qkv", Box((r * 6, 0), (6, 2)), None, "float32", r, "f", 0, 48, 0) for r in range(2)]
    index = FragmentIndex(frags)
    fused = Pattern(shards=(Shard("tp", 0),), fused=Fused(0, (("q", 4), ("k", 4), ("v", 4))))
    with pytest.raises(LoadError, match="resharding loader"):
        index.plan("model/qkv", Box((0, 0), (12, 2)), None, fused)
    padded = Pattern(shards=(Shard("tp", 0),), pad=Pad(0, 12, 10))
    with pytest.raises(LoadError, match="resharding loader"):
        index.plan("model/qkv", Box((0, 0), (12, 2)), None, padded)
    # the same layout still reads its own shard exactly
    assert [i.fragment.rank for i in index.plan("model/qkv", Box((6, 0), (6, 2)), None, fused)] == [1]
    # a plain pattern may be cut: both shards fill the whole box
    assert len(index.plan("model/qkv", Box((0, 0), (12, 2)), None, Pattern(shards=(Shard("tp", 0),)))) == 2
