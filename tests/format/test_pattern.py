"""Pattern, chunk_bounds and local_box: per-tensor geometry over a layout."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import SpecError
from ucp.format import REPLICATED, Box, Fused, Layout, Pad, Pattern, Shard, local_box
from ucp.format.pattern import chunk_bounds

AXES = ("dp", "tp")


# --------------------------------------------------------------------------- basics


def test_replicated():
    assert REPLICATED == Pattern()
    assert REPLICATED.is_replicated
    assert str(REPLICATED) == "replicate"
    assert REPLICATED.to_dict() == {}
    assert Pattern.from_dict({}) == REPLICATED


def test_is_replicated_false_when_sharded_or_flat():
    assert not Pattern(shards=(Shard("tp", 0),)).is_replicated
    assert not Pattern(flat="dp").is_replicated
    # fused/pad are facts about the content, not a distribution
    assert Pattern(fused=Fused(0, (("q", 2), ("k", 2))), pad=Pad(1, 8, 5)).is_replicated


def test_shards_normalized_to_tuple():
    p = Pattern(shards=[Shard("tp", 0), Shard("dp", 1)])
    assert p.shards == (Shard("tp", 0), Shard("dp", 1))
    assert p == Pattern(shards=(Shard("tp", 0), Shard("dp", 1)))


def test_str_lists_every_part():
    p = Pattern(shards=(Shard("tp", 0),), flat="dp", fused=Fused(0, (("q", 4), ("k", 2))), pad=Pad(1, 8, 6))
    assert str(p) == "shard(tp, dim=0) flat(dp) fused(dim=0, q=4, k=2) pad(dim=1, to=8, keep=6)"


FULL = Pattern(
    shards=(Shard("tp", 0), Shard("pp", 1)),
    flat="dp",
    fused=Fused(0, (("q", 8), ("k", 4), ("v", 4))),
    pad=Pad(1, 32, 30),
)


def test_to_dict_shape():
    assert FULL.to_dict() == {
        "shards": [["tp", 0], ["pp", 1]],
        "flat": "dp",
        "fused": {"dim": 0, "parts": [["q", 8], ["k", 4], ["v", 4]]},
        "pad": {"dim": 1, "to": 32, "keep": 30},
    }


@pytest.mark.parametrize(
    "pattern",
    [
        REPLICATED,
        Pattern(shards=(Shard("tp", 1),)),
        Pattern(flat="dp"),
        Pattern(fused=Fused(2, (("gate", 3), ("up", 3)))),
        Pattern(pad=Pad(0, 128, 100)),
        FULL,
    ],
    ids=["replicated", "shards", "flat", "fused", "pad", "all"],
)
def test_to_dict_from_dict_round_trip(pattern):
    assert Pattern.from_dict(pattern.to_dict()) == pattern
    assert Pattern.from_dict(json.loads(json.dumps(pattern.to_dict()))) == pattern


patterns = st.builds(
    lambda shards, flat, fused, pad: Pattern(
        shards=tuple(Shard(a, d) for a, d in shards),
        flat=None if flat is None or flat in {a for a, _ in shards} else flat,
        fused=fused,
        pad=pad,
    ),
    st.lists(st.tuples(st.sampled_from(["dp", "tp", "pp", "ep", "cp"]), st.integers(0, 4)), max_size=4,
             unique_by=lambda t: t[0]),
    st.none() | st.sampled_from(["dp", "tp", "zz"]),
    st.none() | st.builds(Fused, st.integers(0, 3),
                          st.lists(st.tuples(st.text("abcxyz_", min_size=1, max_size=5), st.integers(0, 99)),
                                   min_size=1, max_size=4).map(tuple)),
    st.none() | st.builds(Pad, st.integers(0, 3), st.integers(0, 999), st.integers(0, 999)),
)


@settings(max_examples=150, deadline=None)
@given(patterns)
def test_to_dict_from_dict_round_trip_property(pattern):
    assert Pattern.from_dict(json.loads(json.dumps(pattern.to_dict()))) == pattern


# --------------------------------------------------------------------------- constructor errors


def test_duplicate_shard_axis():
    with pytest.raises(SpecError, match=re.escape("pattern shards over axis ['tp', 'tp'] more than once")):
        Pattern(shards=(Shard("tp", 0), Shard("tp", 1)))


def test_flat_axis_also_sharding():
    with pytest.raises(SpecError, match=re.escape("pattern partitions flat over axis 'dp' that also shards a dim")):
        Pattern(shards=(Shard("dp", 0),), flat="dp")


# --------------------------------------------------------------------------- from_dict errors


def test_from_dict_not_an_object():
    with pytest.raises(SpecError, match=re.escape("pattern must be an object, got 'shard'")):
        Pattern.from_dict("shard")


def test_from_dict_unknown_field():
    with pytest.raises(SpecError, match=re.escape("pattern has unknown field(s) ['replicas']")):
        Pattern.from_dict({"shards": [], "replicas": 2})


@pytest.mark.parametrize(
    "d",
    [
        {"shards": [["tp"]]},
        {"shards": [["tp", "zero"]]},
        {"shards": 5},
        {"fused": {"dim": 0}},
        {"fused": {"dim": 0, "parts": [["q"]]}},
        {"pad": {"dim": 0, "to": 8}},
        {"pad": {"dim": "x", "to": 8, "keep": 4}},
    ],
    ids=["shard-short", "shard-dim-str", "shards-int", "fused-no-parts", "fused-part-short", "pad-no-keep", "pad-dim-str"],
)
def test_from_dict_malformed(d):
    with pytest.raises(SpecError, match="malformed pattern"):
        Pattern.from_dict(d)


def test_from_dict_duplicate_shard_axis_is_rejected():
    with pytest.raises(SpecError, match="more than once"):
        Pattern.from_dict({"shards": [["tp", 0], ["tp", 1]]})


# --------------------------------------------------------------------------- validate


def test_validate_accepts_a_good_pattern():
    Pattern(shards=(Shard("tp", 0),), flat="dp").validate((8, 4), AXES, "model/w")
    FULL.validate((16, 32), ("pp", "dp", "tp"), "model/qkv")
    REPLICATED.validate((), (), "")


def test_shard_axis_not_in_layout():
    p = Pattern(shards=(Shard("pp", 0),))
    with pytest.raises(SpecError, match=re.escape("pattern for model/w shards over axis 'pp', which the layout ['dp', 'tp'] lacks")):
        p.validate((4,), AXES, "model/w")


def test_message_without_where():
    with pytest.raises(SpecError, match=re.escape("pattern shards over axis 'pp'")):
        Pattern(shards=(Shard("pp", 0),)).validate((4,), AXES)


def test_shard_rejects_negative_or_non_int_dims_at_construction():
    for dim in (-1, 1.5, True):
        with pytest.raises(SpecError, match="dim >= 0"):
            Shard("tp", dim)


def test_fused_parts_are_tuples_and_patterns_hashable():
    f = Fused(0, [["q", 4], ["k", 2]])
    assert f.parts == (("q", 4), ("k", 2))
    assert hash(Pattern(fused=f)) == hash(Pattern(fused=Fused(0, (("q", 4), ("k", 2)))))
    with pytest.raises(SpecError, match="non-negative integer sizes"):
        Fused(0, (("q", -1),))


@pytest.mark.parametrize("dim", [2, 5])
def test_shard_dim_out_of_range(dim):
    p = Pattern(shards=(Shard("tp", dim),))
    with pytest.raises(SpecError, match=re.escape(f"pattern for model/w shards dim {dim}, outside a tensor of shape [3, 4]")):
        p.validate((3, 4), AXES, "model/w")


def test_shard_of_a_scalar_is_rejected():
    with pytest.raises(SpecError, match=re.escape("shards dim 0, outside a tensor of shape []")):
        Pattern(shards=(Shard("tp", 0),)).validate((), AXES, "extra/s")


def test_flat_axis_not_in_layout():
    with pytest.raises(SpecError, match=re.escape("pattern for optim/w/m partitions over axis 'zz', which the layout ['dp', 'tp'] lacks")):
        Pattern(flat="zz").validate((4,), AXES, "optim/w/m")


@pytest.mark.parametrize("dim", [2, -1])
def test_fused_dim_out_of_range(dim):
    p = Pattern(fused=Fused(dim, (("q", 2), ("k", 2))))
    with pytest.raises(SpecError, match=re.escape(f"fused dim {dim} for model/qkv is outside shape [4, 4]")):
        p.validate((4, 4), AXES, "model/qkv")


def test_fused_sizes_that_do_not_sum():
    p = Pattern(fused=Fused(0, (("q", 4), ("k", 2), ("v", 2))))
    with pytest.raises(SpecError, match=re.escape("fused sizes for model/qkv sum to 8 but dim 0 has 12")):
        p.validate((12, 4), AXES, "model/qkv")


def test_fused_sizes_sum_to_kept_size_when_padded_on_the_same_dim():
    p = Pattern(fused=Fused(0, (("q", 4), ("k", 2))), pad=Pad(0, 8, 6))
    p.validate((8, 3), AXES, "model/qkv")  # 4 + 2 == keep
    bad = Pattern(fused=Fused(0, (("q", 4), ("k", 4))), pad=Pad(0, 8, 6))
    with pytest.raises(SpecError, match="fused sizes for model/qkv sum to 8 but dim 0 has 6"):
        bad.validate((8, 3), AXES, "model/qkv")


def test_fused_ignores_pad_on_another_dim():
    Pattern(fused=Fused(0, (("q", 4), ("k", 4))), pad=Pad(1, 8, 6)).validate((8, 8), AXES)
    with pytest.raises(SpecError, match="sum to 6 but dim 0 has 8"):
        Pattern(fused=Fused(0, (("q", 3), ("k", 3))), pad=Pad(1, 8, 6)).validate((8, 8), AXES)


@pytest.mark.parametrize(
    "pad",
    [Pad(0, 10, 5), Pad(0, 8, 0), Pad(0, 8, 9), Pad(0, 8, -1), Pad(2, 8, 4), Pad(-1, 8, 4)],
    ids=["to-not-shape", "keep-zero", "keep-past-to", "keep-negative", "dim-past-end", "dim-negative"],
)
def test_pad_that_does_not_fit(pad):
    msg = f"padding for model/emb (dim={pad.dim}, to={pad.to}, keep={pad.keep}) does not fit shape [8, 3]"
    with pytest.raises(SpecError, match=re.escape(msg)):
        Pattern(pad=pad).validate((8, 3), AXES, "model/emb")


def test_pad_that_fits():
    Pattern(pad=Pad(0, 8, 8)).validate((8, 3), AXES)
    Pattern(pad=Pad(0, 8, 1)).validate((8, 3), AXES)


# --------------------------------------------------------------------------- chunk_bounds


def test_chunk_bounds_examples():
    assert [chunk_bounds(5, 4, i) for i in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
    assert [chunk_bounds(2, 4, i) for i in range(4)] == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert [chunk_bounds(8, 2, i) for i in range(2)] == [(0, 4), (4, 8)]
    assert chunk_bounds(0, 3, 2) == (0, 0)
    assert chunk_bounds(7, 1, 0) == (0, 7)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 40), st.integers(1, 12))
def test_chunk_bounds_matches_torch_chunk(size, parts):
    torch_sizes = [c.numel() for c in torch.chunk(torch.arange(size), parts)]
    torch_sizes += [0] * (parts - len(torch_sizes))  # torch drops empty trailing chunks
    lo_expected = 0
    for i, n in enumerate(torch_sizes):
        lo, hi = chunk_bounds(size, parts, i)
        assert 0 <= lo <= hi <= size
        assert hi - lo == n, (size, parts, i)
        if n:
            assert lo == lo_expected
        lo_expected += n
    assert sum(hi - lo for lo, hi in (chunk_bounds(size, parts, i) for i in range(parts))) == size


# --------------------------------------------------------------------------- local_box


def test_local_box_examples():
    p = Pattern(shards=(Shard("tp", 0),))
    sizes = {"dp": 2, "tp": 2}
    assert local_box(p, (5, 3), sizes, {"dp": 0, "tp": 0}) == Box((0, 0), (3, 3))
    assert local_box(p, (5, 3), sizes, {"dp": 1, "tp": 1}) == Box((3, 0), (2, 3))
    # nested splits of one dim: dp outermost, then tp inside each dp chunk
    nested = Pattern(shards=(Shard("dp", 0), Shard("tp", 0)))
    assert local_box(nested, (8,), sizes, {"dp": 1, "tp": 0}) == Box((4,), (2,))
    assert local_box(nested, (8,), sizes, {"dp": 0, "tp": 1}) == Box((2,), (2,))
    # two dims, two axes
    two = Pattern(shards=(Shard("dp", 1), Shard("tp", 0)))
    assert local_box(two, (4, 6), sizes, {"dp": 1, "tp": 0}) == Box((0, 3), (2, 3))


def test_local_box_replicated_and_flat_are_the_whole_tensor():
    sizes = {"dp": 4}
    for c in range(4):
        assert local_box(REPLICATED, (3, 2), sizes, {"dp": c}) == Box.full((3, 2))
        assert local_box(Pattern(flat="dp"), (3, 2), sizes, {"dp": c}) == Box.full((3, 2))
    assert local_box(REPLICATED, (), sizes, {"dp": 0}) == Box((), ())


def test_local_box_uneven_gives_empty_trailing_box():
    p = Pattern(shards=(Shard("dp", 0),))
    boxes = [local_box(p, (2, 3), {"dp": 4}, {"dp": c}) for c in range(4)]
    assert [b.sizes for b in boxes] == [(1, 3), (1, 3), (0, 3), (0, 3)]


@st.composite
def layouts_and_patterns(draw):
    names = draw(st.lists(st.sampled_from(["pp", "dp", "ep", "tp", "cp"]), min_size=1, max_size=3, unique=True))
    layout = Layout(tuple((n, draw(st.integers(1, 4))) for n in names))
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=0, max_size=3)))
    shard_axes = draw(st.lists(st.sampled_from(names), unique=True)) if shape else []
    shards = tuple(Shard(a, draw(st.integers(0, len(shape) - 1))) for a in shard_axes)
    return layout, Pattern(shards=shards), shape


@settings(max_examples=150, deadline=None)
@given(layouts_and_patterns())
def test_local_box_tiles_the_tensor_exactly_once(case):
    layout, pattern, shape = case
    pattern.validate(shape, layout.names)
    shard_axes = [s.axis for s in pattern.shards]
    by_shard_coords: dict[tuple, Box] = {}
    for r in range(layout.world_size):
        coords = layout.coords(r)
        box = local_box(pattern, shape, layout.sizes, coords)
        assert box.fits(shape)
        key = tuple(coords[a] for a in shard_axes)
        # replicas (ranks differing only on non-sharding axes) hold the same box
        assert by_shard_coords.setdefault(key, box) == box
    assert len(by_shard_coords) == math.prod(layout.size(a) for a in shard_axes)
    boxes = list(by_shard_coords.values())
    assert sum(b.numel for b in boxes) == Box.full(shape).numel
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            ov = a.intersect(b)
            assert ov is None or ov.numel == 0
    count = np.zeros(shape, dtype=np.int64)
    for b in boxes:
        count[b.relative_to(Box.full(shape))] += 1
    assert (count == 1).all()


def test_chunk_bounds_rejects_impossible_chunks():
    from ucp.format.pattern import chunk_bounds

    for parts, index in ((0, 0), (2, 2), (2, -1)):
        with pytest.raises(SpecError, match="does not exist"):
            chunk_bounds(10, parts, index)
