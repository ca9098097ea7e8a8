"""Box and FlatRange: construction, validation, geometry."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import SpecError, UcpError
from ucp.format import Box, FlatRange


# --------------------------------------------------------------------------- construction


def test_box_normalizes_sequences_to_int_tuples():
    b = Box([1, 2], [3, 4])
    assert b.offsets == (1, 2) and b.sizes == (3, 4)
    assert isinstance(b.offsets, tuple) and isinstance(b.sizes, tuple)
    assert b == Box((1, 2), (3, 4))
    assert hash(b) == hash(Box((1, 2), (3, 4)))


def test_box_accepts_integral_numpy_values():
    b = Box([np.int64(2)], [np.int32(5)])
    assert b.offsets == (2,) and b.sizes == (5,)
    assert type(b.offsets[0]) is int and type(b.sizes[0]) is int


def test_box_full_and_properties():
    b = Box.full((3, 4, 5))
    assert b.offsets == (0, 0, 0)
    assert b.sizes == (3, 4, 5)
    assert b.ndim == 3
    assert b.numel == 60
    assert b.ends == (3, 4, 5)


def test_zero_dim_box():
    b = Box.full(())
    assert b == Box((), ())
    assert b.ndim == 0
    assert b.numel == 1  # a scalar holds one element
    assert b.ends == ()
    assert b.fits(())
    assert not b.fits((1,))
    assert str(b) == "[]"


def test_box_with_empty_dim_has_no_elements():
    b = Box((2, 0), (0, 7))
    assert b.numel == 0
    assert b.ends == (2, 7)


def test_box_str():
    assert str(Box((1, 0), (2, 3))) == "[1:3,0:3]"


def test_fits():
    b = Box((1, 2), (3, 2))
    assert b.fits((4, 4))
    assert not b.fits((3, 4))  # ends at 4 in dim 0
    assert not b.fits((4, 3))  # ends at 4 in dim 1
    assert not b.fits((4,))  # rank mismatch
    assert not b.fits((4, 4, 4))


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "offsets, sizes, needle",
    [
        ((-1, 0), (2, 2), "(-1, 0)"),
        ((0, 0), (2, -3), "(2, -3)"),
    ],
)
def test_negative_box_is_rejected(offsets, sizes, needle):
    with pytest.raises(SpecError, match="non-negative") as ei:
        Box(offsets, sizes)
    assert needle in str(ei.value)


def test_mismatched_ranks_are_rejected():
    with pytest.raises(SpecError, match="different ranks") as ei:
        Box((0, 0), (1,))
    assert "(0, 0)" in str(ei.value) and "(1,)" in str(ei.value)


@pytest.mark.parametrize(
    "bad",
    [(1.5,), ("3",), (None,), (True,), (0, False), (2.0000001,)],
    ids=["float", "str", "none", "true", "false", "near-int-float"],
)
def test_non_integer_offsets_are_rejected(bad):
    sizes = (1,) * len(bad)
    with pytest.raises(SpecError, match="box offsets must be a sequence of integers") as ei:
        Box(bad, sizes)
    assert repr(bad) in str(ei.value)


@pytest.mark.parametrize("bad", [(1.5,), ("x",), (True,)], ids=["float", "str", "bool"])
def test_non_integer_sizes_are_rejected(bad):
    with pytest.raises(SpecError, match="box sizes must be a sequence of integers") as ei:
        Box((0,), bad)
    assert repr(bad) in str(ei.value)


def test_non_sequence_is_rejected():
    with pytest.raises(SpecError, match="box sizes must be a sequence of integers, got 3"):
        Box((0,), 3)


def test_generator_input_is_validated_too():
    # A one-shot iterable must get the same checks as a tuple (no silent truncation of 1.5 -> 1).
    with pytest.raises(SpecError, match="box offsets"):
        Box((x for x in [1.5]), (1,))
    assert Box((x for x in [1, 2]), (x for x in [3, 4])) == Box((1, 2), (3, 4))


def test_spec_error_is_a_value_error_and_ucp_error():
    with pytest.raises(ValueError):
        Box((-1,), (1,))
    with pytest.raises(UcpError):
        Box((-1,), (1,))


# --------------------------------------------------------------------------- intersect


def test_intersect_overlapping():
    a = Box((0, 0), (4, 4))
    b = Box((2, 3), (4, 4))
    assert a.intersect(b) == Box((2, 3), (2, 1))


def test_intersect_contained():
    outer = Box((0, 0), (10, 10))
    inner = Box((3, 4), (2, 2))
    assert outer.intersect(inner) == inner
    assert inner.intersect(outer) == inner


def test_intersect_disjoint_and_touching_is_none():
    assert Box((0,), (2,)).intersect(Box((5,), (2,))) is None
    assert Box((0,), (2,)).intersect(Box((2,), (2,))) is None  # half-open: touching is disjoint
    assert Box((0, 0), (2, 2)).intersect(Box((0, 2), (2, 2))) is None


def test_intersect_with_empty_box_is_none():
    assert Box((0,), (4,)).intersect(Box((1,), (0,))) is None


def test_intersect_zero_dim():
    assert Box((), ()).intersect(Box((), ())) == Box((), ())


def test_intersect_rank_mismatch():
    with pytest.raises(SpecError, match="rank 2 and 1"):
        Box((0, 0), (1, 1)).intersect(Box((0,), (1,)))


def _boxes(ndim):
    return st.tuples(
        st.tuples(*[st.integers(0, 6)] * ndim),
        st.tuples(*[st.integers(0, 5)] * ndim),
    ).map(lambda t: Box(*t))


box_pairs = st.integers(1, 3).flatmap(lambda n: st.tuples(_boxes(n), _boxes(n)))


def _points(box):
    return set(itertools.product(*[range(o, o + s) for o, s in zip(box.offsets, box.sizes)]))


@settings(max_examples=200, deadline=None)
@given(box_pairs)
def test_intersect_is_symmetric_and_contained_in_both(pair):
    a, b = pair
    ab, ba = a.intersect(b), b.intersect(a)
    assert ab == ba
    common = _points(a) & _points(b)
    if ab is None:
        assert not common
    else:
        assert ab.numel > 0
        for box in (a, b):
            assert all(x >= o for x, o in zip(ab.offsets, box.offsets))
            assert all(x <= e for x, e in zip(ab.ends, box.ends))
        assert _points(ab) == common


# --------------------------------------------------------------------------- relative_to


def test_relative_to_example():
    outer = Box((2, 4), (4, 4))
    inner = Box((3, 5), (2, 1))
    assert inner.relative_to(outer) == (slice(1, 3), slice(1, 2))


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_relative_to_selects_the_same_elements(data):
    ndim = data.draw(st.integers(1, 3))
    shape = data.draw(st.tuples(*[st.integers(1, 6)] * ndim))
    full = np.arange(int(np.prod(shape))).reshape(shape)

    def sub_box(within: Box) -> Box:
        offs, sizes = [], []
        for o, s in zip(within.offsets, within.sizes):
            lo = data.draw(st.integers(o, o + s))
            hi = data.draw(st.integers(lo, o + s))
            offs.append(lo)
            sizes.append(hi - lo)
        return Box(tuple(offs), tuple(sizes))

    outer = sub_box(Box.full(shape))
    inner = sub_box(outer)
    local = full[outer.relative_to(Box.full(shape))]  # what a holder of ``outer`` has
    assert local.shape == outer.sizes
    assert np.array_equal(local[inner.relative_to(outer)], full[inner.relative_to(Box.full(shape))])


# --------------------------------------------------------------------------- FlatRange


def test_flat_range_basics():
    f = FlatRange(3, 4)
    assert f.end == 7
    assert str(f) == "{3:7}"
    assert f.fits(Box((0,), (7,)))
    assert not f.fits(Box((0,), (6,)))
    assert FlatRange(0, 0).fits(Box((0,), (0,)))
    assert FlatRange(0, 1).fits(Box((), ()))


@pytest.mark.parametrize(
    "start, numel, name",
    [(-1, 2, "start"), (0, -2, "numel"), (True, 2, "start"), (0, False, "numel"), (1.0, 2, "start"), (0, "3", "numel")],
)
def test_flat_range_validation(start, numel, name):
    bad = start if name == "start" else numel
    with pytest.raises(SpecError, match=re.escape(f"flat range {name} must be a non-negative integer, got {bad!r}")):
        FlatRange(start, numel)
