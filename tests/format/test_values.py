"""Typed JSON for non-tensor state: every supported value survives json.dumps/json.loads exactly."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import binomial_fold, same
from ucp.errors import CaptureError, FormatError
from ucp.state.rng import capture_rng, restore_rng
from ucp.format.jsonio import parse_json
from ucp.format.values import MAX_DEPTH, decode, encode

def through_json(value, path="state"):
    text = json.dumps(encode(value, path), allow_nan=False)  # strict JSON: no NaN literals
    return decode(json.loads(text), path)


@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2**80, "", "text", "$tuple", 1.5, -0.0, 1e308,
    [], [1, "a", None], {}, {"a": 1, "b": [2, {"c": None}]},
])
def test_plain_json_values_pass_through_unchanged(value):
    assert encode(value) == value
    assert same(through_json(value), value)


def test_negative_zero_keeps_its_sign():
    assert math.copysign(1.0, through_json(-0.0)) == -1.0


@pytest.mark.parametrize("value", [
    (), (1,), (1, (2, 3), [4, (5,)]), [(1, "a"), (2, "b")], ("x", None, 1.5),
])
def test_tuples_round_trip_as_tuples(value):
    assert same(through_json(value), value)


@pytest.mark.parametrize("value", [
    {1: "a", 2: "b"},
    {0: {1: {2: (3,)}}},
    {"$tuple": 1},
    {"$dict": [[1, 2]]},
    {"$weird": {"$tensor": 3}, "ok": 1},
    {"a": {"$float": "nan"}},
    {(1, 2): "tuple key", None: "none key", True: "bool key", 1.5: "float key"},
    {-1: [], "s": {}},
    {"outer": {5: {"$inner": (1, 2)}}},
])
def test_dicts_with_int_tuple_and_dollar_keys_round_trip(value):
    got = through_json(value)
    assert same(got, value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_round_trip(value):
    got = through_json(value)
    assert type(got) is float and same(got, value)
    assert same(through_json([value, {"x": (value,)}]), [value, {"x": (value,)}])


@pytest.mark.parametrize("value", [np.float64("nan"), np.float64("inf"), np.float32("-inf"), np.float64(0.25),
                                   np.int64(-3), np.bool_(True), np.uint8(200)])
def test_numpy_scalars_round_trip_as_python_values(value):
    got = through_json(value)
    expected = value.item()
    assert type(got) is type(expected) and same(got, expected)


@pytest.mark.parametrize("value", [b"", b"\x00\xff\x80 binary", bytes(range(256))])
def test_bytes_round_trip(value):
    assert same(through_json(value), value)
    assert through_json(bytearray(value)) == value


@pytest.mark.parametrize("value", [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array([np.nan, -0.0, np.inf], dtype=np.float64),
    np.array(5, dtype=np.int16),
    np.zeros((0, 3), dtype=np.int64),
    np.array([True, False]),
    np.arange(6, dtype=">u4"),  # non-native byte order
    np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],  # non-contiguous
    np.random.default_rng(0).integers(0, 2**32, size=624, dtype=np.uint32),
])
def test_numpy_arrays_round_trip(value):
    got = through_json(value)
    assert isinstance(got, np.ndarray) and got.dtype == value.dtype and got.shape == value.shape
    assert got.tobytes() == np.ascontiguousarray(value).tobytes()
    assert got.flags.writeable  # a copy, not a view of the decoded buffer


@pytest.mark.parametrize("value", [
    torch.randn(3, 4, generator=torch.Generator().manual_seed(0)),
    torch.tensor([1.0, -0.0, float("nan"), float("inf")], dtype=torch.bfloat16),
    torch.tensor(2.5, dtype=torch.bfloat16),  # 0-d bf16
    torch.tensor(7),  # 0-d int64
    torch.tensor(3.0),  # 0-d float (an optimizer step)
    torch.empty(0),  # empty float
    torch.empty(2, 0, dtype=torch.int32),
    torch.empty(0, dtype=torch.bfloat16),  # empty bf16
    torch.empty(0, 3, dtype=torch.bfloat16),
    torch.tensor([True, False]),
    torch.arange(256, dtype=torch.uint8),
    torch.tensor([1.0, 2.0], dtype=torch.float16),
    torch.tensor([1.0, 2.0], dtype=torch.float64),
    torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
    torch.get_rng_state(),
])
def test_tensors_round_trip_bit_exactly(value):
    got = through_json(value)
    assert type(got) is torch.Tensor
    assert same(got, value.contiguous())


def test_bf16_nan_payload_is_kept():
    t = torch.tensor([0x7FC1, 0xFFC3 - 0x10000, 0x0001], dtype=torch.int16).view(torch.bfloat16)
    got = through_json(t)
    assert torch.equal(got.view(torch.int16), t.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_tensors_round_trip(dtype):
    # float8 is a checkpoint dtype (ucp.format.dtypes); small float8 state (FP8 scaling) may be inline too.
    t = torch.tensor([0.5, -1.0, 2.0, 0.0]).to(dtype)
    got = through_json(t)
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))


def test_parameters_and_grad_tensors_are_stored_as_plain_tensors():
    p = torch.nn.Parameter(torch.ones(2))
    got = through_json(p)
    assert type(got) is torch.Tensor and not got.requires_grad and torch.equal(got, torch.ones(2))


def test_decoded_tensors_do_not_share_memory():
    a = through_json({"x": torch.ones(3), "y": torch.ones(3)})
    a["x"].add_(1)
    assert torch.equal(a["y"], torch.ones(3))


def test_mixed_nested_state_round_trips():
    value = {
        "epoch": 3,
        "order": (3, 1, 2),
        "sampler": {"seed": 42, "offsets": {0: 10, 1: 11}, "$meta": b"\x01"},
        "lists": [[(1, 2.0)], {"nan": float("nan")}],
        "arr": np.arange(3, dtype=np.int8),
        "t": torch.tensor([1, 2], dtype=torch.int32),
    }
    assert same(through_json(value), value)


def test_rng_state_round_trips_and_restores_draws():
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    state = through_json(capture_rng())
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(2)
    restore_rng(state)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.binary(max_size=8),
)
json_key = st.one_of(st.text(max_size=4), st.text(max_size=3).map(lambda s: "$" + s), st.integers(), st.booleans())
nested = st.recursive(
    json_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(json_key, children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(nested)
def test_arbitrary_nested_values_round_trip(value):
    assert same(through_json(value), value)


class Opaque:
    pass


@pytest.mark.parametrize("value, path", [
    (object(), "state"),
    ({"a": {"b": [1, Opaque()]}}, "state.a.b[1]"),
    ({"a": (1, {2: object()})}, "state.a[1][2]"),
    ({"a": {1, 2}}, "state.a"),
    ([lambda: 0], "state[0]"),
])
def test_unsupported_values_raise_capture_error_naming_the_path(value, path):
    with pytest.raises(CaptureError) as e:
        encode(value)
    assert str(e.value).startswith(f"{path}:")
    assert "cannot be saved" in str(e.value)


def test_unsupported_dict_key_names_the_path():
    with pytest.raises(CaptureError, match=r"^loader\.cfg<key>"):
        encode({"cfg": {frozenset([1]): 2}}, "loader")


def test_custom_path_prefix_is_used():
    with pytest.raises(CaptureError, match=r"^state\['loader'\]\.x:"):
        encode({"x": object()}, "state['loader']")


def test_tensor_subclass_is_refused():
    class MyTensor(torch.Tensor):
        pass

    t = torch.ones(2).as_subclass(MyTensor)
    with pytest.raises(CaptureError, match="MyTensor"):
        encode({"t": t})


def test_object_arrays_are_refused_at_capture():
    # An object array's bytes are pointers: storing them would save garbage that cannot be read back.
    with pytest.raises(CaptureError, match=r"state\.arr"):
        encode({"arr": np.array([object(), 1], dtype=object)})


@pytest.mark.parametrize("bad", [
    {"$tensor": {"dtype": "no_such_dtype", "shape": [1], "data": ""}},
    {"$tensor": {"dtype": "float32", "shape": [3], "data": "AAAA"}},
    {"$tensor": {"shape": [1]}},
    {"$ndarray": {"dtype": "<f4", "shape": [2], "data": "AAAA"}},
    {"$float": "not a float"},
    {"$bytes": 17},
    {"$dict": [[1]]},
    {"$tuple": 5},
])
def test_malformed_tagged_values_raise_format_error(bad):
    with pytest.raises(FormatError, match=r"^ckpt: malformed"):
        decode(bad, "ckpt")


def test_decode_of_dict_with_tag_among_other_keys_is_a_plain_dict():
    assert decode({"$tuple": [1], "other": 2}) == {"$tuple": [1], "other": 2}


def test_values_nested_deeper_than_documents_allow_are_refused_at_encode():
    # the deepest value a manifest can still read back (parse_json's bound) is accepted and round-trips
    deep = []
    for _ in range(MAX_DEPTH - 1):
        deep = [deep]
    assert decode(parse_json(json.dumps({"state": {"shared": {"x": encode(deep)}}}), "m"))["state"]["shared"]["x"] \
        == deep
    with pytest.raises(CaptureError, match=r"state\[0\]\[0\].*: nested deeper than 40 levels"):
        encode([deep])
    deep = ()
    for _ in range(100_000):  # (no RecursionError either, far past the bound)
        deep = (deep, {1: deep})
        if len(str(deep)) > 10**6:
            break
    with pytest.raises(CaptureError, match="nested deeper than"):
        encode(deep)


def test_a_cyclic_value_is_refused_not_a_recursion_error():
    loop: list = []
    loop.append(loop)
    with pytest.raises(CaptureError, match=r"state(\[0\])+: nested deeper than 40 levels \(or containing itself\)"):
        encode(loop)


def test_a_tensor_declaring_a_shape_without_its_bytes_is_refused():
    with pytest.raises(FormatError, match=r"state: malformed \$tensor value \(shape \[1073741824\] without data\)"):
        decode({"$tensor": {"dtype": "float32", "shape": [1 << 30], "data": ""}})
    assert decode({"$tensor": {"dtype": "float32", "shape": [0, 3], "data": ""}}).shape == (0, 3)


def test_the_folded_state_splits_as_the_gathered_one_with_each_distinct_value_once():
    from ucp.format.values import fold_state, split_folded_state, split_state, state_offer

    rng = random.Random(3)
    for _ in range(200):
        world = rng.randint(1, 9)
        stage = [encode({"lr": rng.choice([1e-3, 2e-3]), "params": [f"p{i}"]}) for i in range(3)]
        states = []
        for r in range(world):
            state = {"sched": {"step": 5}, "rng": encode(torch.tensor([r], dtype=torch.uint8)),
                     "optimizer": stage[rng.randrange(3)]}
            if rng.random() < 0.2:
                del state["sched"]  # (a name some rank lacks is shared by none)
            states.append(state)
        folded = binomial_fold([state_offer(r, s) for r, s in enumerate(states)], fold_state)
        assert split_folded_state(folded, world) == split_state(states)
        distinct = {json.dumps(v, sort_keys=True) for s in states for v in s.values()}
        assert len(folded["values"]) == len(distinct)  # (a value many ranks hold travels once)
        assert all(len(blob) == 16 * world for blob in folded["names"].values())  # (16 bytes a rank and name)
    with pytest.raises(ValueError, match=r"ranks 0..0 and 2..2 are not adjacent"):
        fold_state(state_offer(0, {}), state_offer(2, {}))
    with pytest.raises(ValueError, match=r"ranks 0..1, not of 0..2"):
        split_folded_state(fold_state(state_offer(0, {}), state_offer(1, {})), 3)
