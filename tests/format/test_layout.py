"""Layout: named mesh axes, rank <-> coordinates, serialization, validation."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import SpecError
from ucp.format import ZERO_MODES, Layout

AXIS_NAMES = ["pp", "dp", "ep", "tp", "cp", "x1", "long_axis"]

layouts = st.builds(
    lambda names, sizes, zero: Layout(tuple(zip(names, sizes)), zero=zero),
    st.lists(st.sampled_from(AXIS_NAMES), min_size=0, max_size=4, unique=True),
    st.lists(st.integers(1, 4), min_size=4, max_size=4),
    st.sampled_from(sorted(ZERO_MODES)),
)


# --------------------------------------------------------------------------- construction


def test_from_sizes_uses_canonical_order_then_the_rest():
    lay = Layout.from_sizes(tp=2, cp=3, dp=4, pp=1, zero=1)
    assert lay.names == ("pp", "dp", "tp", "cp")
    assert lay.axes == (("pp", 1), ("dp", 4), ("tp", 2), ("cp", 3))
    assert lay.zero == 1
    assert lay.world_size == 24


def test_from_sizes_custom_order():
    lay = Layout.from_sizes(order=("tp", "dp"), dp=2, tp=3)
    assert lay.names == ("tp", "dp")


def test_single():
    lay = Layout.single()
    assert lay.world_size == 1
    assert lay.axes == (("dp", 1),)
    assert lay.zero == 0
    assert lay.coords(0) == {"dp": 0}


def test_axes_normalized_to_tuples():
    lay = Layout([["dp", 2], ["tp", 2]], zero=2)
    assert lay.axes == (("dp", 2), ("tp", 2))
    assert lay == Layout((("dp", 2), ("tp", 2)), zero=2)
    hash(lay)  # frozen and hashable


def test_sizes_size_names():
    lay = Layout((("dp", 2), ("tp", 4)))
    assert lay.sizes == {"dp": 2, "tp": 4}
    assert lay.size("tp") == 4
    assert lay.size("pp") == 1  # axes the layout does not name have size 1
    assert lay.names == ("dp", "tp")


def test_str():
    assert str(Layout((("dp", 2), ("tp", 4)), zero=3)) == "dp=2 tp=4 zero=3"


def test_megatron_rank_order_tp_innermost():
    lay = Layout.from_sizes(pp=2, dp=2, tp=2)
    assert lay.coords(0) == {"pp": 0, "dp": 0, "tp": 0}
    assert lay.coords(1) == {"pp": 0, "dp": 0, "tp": 1}
    assert lay.coords(2) == {"pp": 0, "dp": 1, "tp": 0}
    assert lay.coords(4) == {"pp": 1, "dp": 0, "tp": 0}
    assert lay.coords(7) == {"pp": 1, "dp": 1, "tp": 1}
    assert list(lay.coords(5)) == ["pp", "dp", "tp"]  # keys in axis order
    assert lay.rank({"tp": 1, "pp": 1, "dp": 0}) == 5


@settings(max_examples=150, deadline=None)
@given(layouts)
def test_rank_of_coords_round_trips(lay):
    seen = set()
    for r in range(lay.world_size):
        c = lay.coords(r)
        assert set(c) == set(lay.names)
        assert all(0 <= c[n] < lay.size(n) for n in lay.names)
        assert lay.rank(c) == r
        seen.add(tuple(c.values()))
    assert len(seen) == lay.world_size  # every rank has distinct coordinates


@settings(max_examples=150, deadline=None)
@given(layouts)
def test_to_dict_from_dict_round_trip(lay):
    d = lay.to_dict()
    assert Layout.from_dict(d) == lay
    assert Layout.from_dict(json.loads(json.dumps(d))) == lay


def test_to_dict_shape():
    assert Layout((("dp", 2), ("tp", 4)), zero=1).to_dict() == {"axes": [["dp", 2], ["tp", 4]], "zero": 1}


def test_from_dict_defaults_zero():
    assert Layout.from_dict({"axes": [["dp", 2]]}).zero == 0


# --------------------------------------------------------------------------- validation


def test_duplicate_axis():
    with pytest.raises(SpecError, match="layout axis 'dp' appears twice"):
        Layout((("dp", 2), ("tp", 2), ("dp", 2)))


@pytest.mark.parametrize("name", ["DP", "1dp", "", "d-p", "d p", "_dp", "dp!", "dp\n", "tp\n"])
def test_bad_axis_name(name):
    with pytest.raises(SpecError, match=re.escape(f"layout axis name {name!r} must be a lower-case identifier")):
        Layout(((name, 2),))


def test_an_axis_name_with_a_final_newline_is_refused_from_a_document_too():
    # ("$" matches before a final newline: "dp\n" passed as an axis name)
    with pytest.raises(SpecError, match=re.escape("layout axis name 'dp\\n'")):
        Layout.from_dict({"axes": [["dp\n", 2]], "zero": 0})


@pytest.mark.parametrize("size", [0, -1, True, 2.0, "2", None])
def test_bad_axis_size(size):
    with pytest.raises(SpecError, match=re.escape(f"layout axis 'tp' has size {size!r}; sizes must be integers >= 1")):
        Layout((("dp", 2), ("tp", size)))


@pytest.mark.parametrize("zero", [4, -1, True, "1", None, 1.0])
def test_bad_zero(zero):
    with pytest.raises(SpecError, match=re.escape(f"layout zero={zero!r} is not a sharding mode")):
        Layout((("dp", 2),), zero=zero)


@pytest.mark.parametrize("axes", [(("dp",),), (("dp", 2, 3),), 5, (None,)], ids=["short", "long", "int", "none"])
def test_axes_not_pairs(axes):
    with pytest.raises(SpecError, match="layout axes must be \\(name, size\\) pairs"):
        Layout(axes)


@pytest.mark.parametrize("rank", [-1, 8, 100, True, 1.0, "0"])
def test_rank_out_of_range(rank):
    lay = Layout.from_sizes(dp=2, tp=4)
    with pytest.raises(SpecError, match=re.escape(f"rank {rank!r} is outside this layout of 8 ranks")):
        lay.coords(rank)


def test_coords_missing_an_axis():
    lay = Layout.from_sizes(dp=2, tp=4)
    with pytest.raises(SpecError, match=re.escape("must name exactly the axes ['dp', 'tp']")) as ei:
        lay.rank({"dp": 1})
    assert "{'dp': 1}" in str(ei.value)


def test_coords_with_an_extra_axis():
    lay = Layout.from_sizes(dp=2)
    with pytest.raises(SpecError, match=re.escape("must name exactly the axes ['dp']")) as ei:
        lay.rank({"dp": 1, "tp": 0})
    assert "'tp'" in str(ei.value)


@pytest.mark.parametrize("c", [-1, 4])
def test_coordinate_out_of_range(c):
    lay = Layout.from_sizes(dp=2, tp=4)
    with pytest.raises(SpecError, match=re.escape(f"coordinate tp={c} is outside 0..3")):
        lay.rank({"dp": 0, "tp": c})


def test_from_dict_not_an_object():
    with pytest.raises(SpecError, match=re.escape("layout must be an object with 'axes', got [1, 2]")):
        Layout.from_dict([1, 2])


def test_from_dict_missing_axes():
    with pytest.raises(SpecError, match="layout must be an object with 'axes'"):
        Layout.from_dict({"zero": 1})


@pytest.mark.parametrize("axes", [[["dp"]], [5], None], ids=["short-pair", "int-pair", "none"])
def test_from_dict_malformed_pairs(axes):
    with pytest.raises(SpecError, match="layout axes must be \\[name, size\\] pairs"):
        Layout.from_dict({"axes": axes})


def test_from_dict_bad_values_are_validated():
    with pytest.raises(SpecError, match="layout axis 'dp' has size 0"):
        Layout.from_dict({"axes": [["dp", 0]]})
    with pytest.raises(SpecError, match="zero=7"):
        Layout.from_dict({"axes": [["dp", 1]], "zero": 7})
