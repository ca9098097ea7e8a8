"""Resolving target keys to checkpoint tensors under other names (ucp.plan.sources)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.plan.reshard import SourcePiece, SubBox, chunk_pieces
from ucp.plan.sources import Slice, SourceIndex, relocate, to_source
from ucp.format.box import Box
from ucp.format.manifest import TensorMeta
from ucp.format.pattern import Fused, Pad, Pattern, Shard

D = 8
QKV = Pattern((Shard("tp", 0),), fused=Fused(0, (("q", D), ("k", D), ("v", D))))


def _fused_checkpoint() -> SourceIndex:
    return SourceIndex({
        "model/h.0.attn.qkv.weight": TensorMeta((3 * D, D), "bfloat16", QKV),
        "model/h.0.attn.qkv.bias": TensorMeta((3 * D,), "bfloat16", QKV),
        "optim/h.0.attn.qkv.weight/exp_avg": TensorMeta((3 * D, D), "float32", QKV),
        "optim/h.0.attn.qkv.weight/master": TensorMeta((3 * D, D), "float32", QKV),
        "model/wte.weight": TensorMeta((16, D), "bfloat16", Pattern((Shard("tp", 0),), pad=Pad(0, 16, 13))),
    })


def test_a_key_the_checkpoint_has_resolves_to_itself():
    res = _fused_checkpoint().resolve("model/h.0.attn.qkv.weight", (3 * D, D), QKV, "bfloat16")
    assert res.rule == "same" and res.slices == (Slice("model/h.0.attn.qkv.weight"),) and res.dtype == "bfloat16"


def test_a_part_resolves_to_its_rows_of_the_fused_tensor():
    idx = _fused_checkpoint()
    for i, part in enumerate("qkv"):
        res = idx.resolve(f"model/h.0.attn.{part}.weight", (D, D), Pattern(), "float32")
        assert res.rule == "part" and res.dtype == "bfloat16"
        assert res.slices == (Slice("model/h.0.attn.qkv.weight", 0, i * D, D, 0),)
        res = idx.resolve(f"optim/h.0.attn.{part}.weight/exp_avg", (D, D), Pattern())
        assert res.slices == (Slice("optim/h.0.attn.qkv.weight/exp_avg", 0, i * D, D, 0),)
    assert idx.resolve("model/h.0.attn.q.bias", (D,), Pattern()).slices == (Slice("model/h.0.attn.qkv.bias", 0, 0, D, 0),)


def test_a_part_of_another_shape_does_not_resolve():
    assert _fused_checkpoint().resolve("model/h.0.attn.q.weight", (D, D + 1), Pattern()) is None
    assert _fused_checkpoint().resolve("model/h.0.attn.x.weight", (D, D), Pattern()) is None


def test_a_fused_target_resolves_to_its_parts_in_order():
    split = SourceIndex({f"model/a.{p}.weight": TensorMeta((D, 4), "float32", Pattern()) for p in "qkv"})
    res = split.resolve("model/a.qkv.weight", (3 * D, 4), QKV, "bfloat16")
    assert res.rule == "fused" and res.dtype == "float32"
    assert res.slices == tuple(Slice(f"model/a.{p}.weight", 0, 0, D, i * D) for i, p in enumerate("qkv"))
    del split.tensors["model/a.k.weight"]
    assert split.resolve("model/a.qkv.weight", (3 * D, 4), QKV) is None


def test_a_master_comes_from_the_model_tensor_of_its_dtype_only():
    fp32 = SourceIndex({f"model/a.{p}.weight": TensorMeta((D, 4), "float32", Pattern()) for p in "qkv"})
    res = fp32.resolve("optim/a.qkv.weight/master", (3 * D, 4), QKV, "float32")
    assert res.rule == "master" and [s.key for s in res.slices] == [f"model/a.{p}.weight" for p in "qkv"]
    bf16 = SourceIndex({"model/w": TensorMeta((4,), "bfloat16", Pattern())})
    assert bf16.resolve("optim/w/master", (4,), Pattern(), "float32") is None


def test_states_are_found_through_fused_and_split_names():
    idx = _fused_checkpoint()
    assert idx.states("h.0.attn.qkv.weight") == ["exp_avg", "master"]  # in the checkpoint's order
    assert idx.states("h.0.attn.k.weight") == ["exp_avg", "master"]
    split = SourceIndex({f"optim/a.{p}.weight/{s}": TensorMeta((D,), "float32", Pattern())
                         for p in "qkv" for s in ("exp_avg", "step") if not (p == "v" and s == "step")})
    assert split.states("a.qkv.weight", QKV) == ["exp_avg"]  # only what every part has
    assert split.states("a.qkv.weight") == []


def test_to_source_maps_a_target_box_into_the_slice():
    s = Slice("k", 0, 16, 8, 0)
    assert to_source(Box((2, 0), (4, 3)), s) == Box((18, 0), (4, 3))
    assert to_source(Box((0, 0), (8, 3)), Slice("k", 0, 0, 8, 8)) is None
    assert to_source(Box((6, 1), (4, 2)), Slice("k", 0, 0, 8, 8)) == Box((0, 1), (2, 2))
    assert to_source(Box((6, 1), (4, 2)), Slice("k")) == Box((6, 1), (4, 2))


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(st.integers(1, 7), min_size=1, max_size=4), cols=st.integers(1, 5),
       chunk=st.integers(1, 6), which=st.data())
def test_relocated_chunks_cover_a_part_exactly_with_its_elements(parts, cols, chunk, which):
    """A part of a fused universal array, read through its chunks: every target element is covered
    once, by the element of the fused array at the part's offset."""
    rows = sum(parts)
    i = which.draw(st.integers(0, len(parts) - 1))
    lo, n = sum(parts[:i]), parts[i]
    fused = np.arange(rows * cols).reshape(rows, cols)
    s = Slice("fused", 0, lo, n, 0)
    target = Box((0, 0), (n, cols))
    pieces = relocate(chunk_pieces((rows, cols), (chunk, cols), to_source(target, s)), s)
    got = np.full((n, cols), -1)
    for p in pieces:
        assert p.ref[0] == "fused"
        src = fused[tuple(slice(o, o + k) for o, k in zip(p.sub.box.offsets, p.sub.box.sizes))]
        region = src[tuple(slice(o, o + k) for o, k in zip(p.region.offsets, p.region.sizes))]
        dst = tuple(slice(o, o + k) for o, k in zip(p.universal.offsets, p.universal.sizes))
        assert (got[dst] == -1).all(), "an element is covered twice"
        got[dst] = region
    np.testing.assert_array_equal(got, fused[lo:lo + n])


def test_relocate_without_a_dim_only_tags_the_key():
    p = SourcePiece((0,), SubBox(Box((0,), (4,))), Box((0,), (4,)), Box((0,), (4,)))
    assert relocate([p], Slice("k")) == [SourcePiece(("k", (0,)), p.sub, p.region, p.universal)]
