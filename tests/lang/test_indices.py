"""``expert()`` and ``stage()``: local indices mapped to global ones, for a live model (LiveSpec) and for a
checkpoint's manifest (convert); every rule that does not fit is an error at its line and column."""

from __future__ import annotations

import numpy as np
import pytest

from tests.synthetic import write_checkpoint
from ucp.errors import UclError
from ucp.format import Layout, Pattern, Shard
from ucp.lang.apply import LiveSpec, apply_spec, recorded_mapping
from ucp.lang.indices import place_manifest
from ucp.storage.manifest_io import read_manifest

EXPERTS = 'ucl 1\n"experts.{e}.*" : expert(ep, experts=8)\n"*" : replicate(ep)\n'


def names(text: str, layout: Layout, rank: int, fqns) -> list[str]:
    spec = LiveSpec(text, "m.ucl", layout, layout.coords(rank))
    return [spec.place(f)[0] for f in fqns]


def test_expert_maps_a_local_index_to_the_contiguous_global_one():
    layout = Layout.from_sizes(ep=4)
    local = ["experts.0.w1.weight", "experts.1.w1.weight", "router.weight"]
    assert names(EXPERTS, layout, 0, local) == local
    assert names(EXPERTS, layout, 3, local) == ["experts.6.w1.weight", "experts.7.w1.weight", "router.weight"]
    # dp x ep: the dp coordinate does not move experts
    layout = Layout.from_sizes(dp=2, ep=2)
    assert names(EXPERTS, layout, layout.rank({"dp": 1, "ep": 1}), ["experts.3.w"]) == ["experts.7.w"]


def test_strided_placement_interleaves_the_ranks():
    text = EXPERTS.replace("experts=8)", "experts=8, placement=strided)")
    layout = Layout.from_sizes(ep=4)
    assert names(text, layout, 1, ["experts.0.w", "experts.1.w"]) == ["experts.1.w", "experts.5.w"]


def test_stage_maps_a_stage_local_layer_and_both_can_share_a_rule():
    text = ('ucl 1\n"layers.{i}.experts.{e}.*" : stage(pp, layers=4) expert(ep, experts=4)\n'
            '"layers.{i}.*" : stage(pp, layers=4)\n"*" : replicate(pp)\n')
    layout = Layout.from_sizes(pp=2, ep=2)
    rank = layout.rank({"pp": 1, "ep": 1})
    assert names(text, layout, rank, ["layers.1.experts.0.w", "layers.0.norm.weight", "head.weight"]) == \
        ["layers.3.experts.2.w", "layers.2.norm.weight", "head.weight"]


@pytest.mark.parametrize("text, layout, where, message", [
    ('ucl 1\n"experts.{e}.*" : expert(ep, experts=6)\n', Layout.from_sizes(ep=4), "m.ucl:2:19",
     "6 experts do not split evenly over ep=4"),
    ('ucl 1\n"experts.*" : expert(ep, experts=4)\n', Layout.from_sizes(ep=2), "m.ucl:2:1",
     "captures 0 index(es) but expert() map(s) 1"),
    ('ucl 1\n"experts.{e}.*" : expert(ep, experts=4)\n', Layout.from_sizes(dp=2), "m.ucl:2:19",
     "names axis 'ep', which the checkpoint's layout dp=2 zero=0 lacks"),
    ('ucl 1\n"experts.{e}.*" : expert(ep, experts=4, placement=round)\n', Layout.from_sizes(ep=2), "m.ucl:2:19",
     "use placement=contiguous or strided"),
    ('ucl 1\n"experts.{e}.*" : expert(ep, experts=4) shard(ep, dim=0)\n', Layout.from_sizes(ep=2), "m.ucl:2:19",
     "keep one"),
    ('ucl 1\n"*" : average(ep)\n', Layout.from_sizes(ep=2), "m.ucl:2:7", "average() cannot describe a live model"),
    ('ucl 1\nsource layout ep=4\n"*" : replicate(ep)\n', Layout.from_sizes(ep=2), "m.ucl:2:1",
     "is not the checkpoint's"),
])
def test_a_live_rule_that_does_not_fit_is_an_error_at_its_line(text, layout, where, message):
    with pytest.raises(UclError) as e:
        LiveSpec(text, "m.ucl", layout, layout.coords(0))
    assert str(e.value).startswith(where + ": ") and message in str(e.value), str(e.value)


def test_a_local_index_beyond_the_ranks_share_is_an_error():
    layout = Layout.from_sizes(ep=4)
    spec = LiveSpec(EXPERTS, "m.ucl", layout, layout.coords(1))
    with pytest.raises(UclError, match=r"m.ucl:2:19: 'experts.2.w': local expert index 2 is out of range: each of "
                                       r"the 4 ep rank\(s\) holds 2 of 8"):
        spec.place("experts.2.w")
    with pytest.raises(UclError, match="matched by no rule"):
        LiveSpec('ucl 1\n"experts.{e}.*" : expert(ep, experts=8)\n', "m.ucl", layout, layout.coords(0)).place("router.w")


def test_the_mapping_ignores_the_layout_but_not_the_rules():
    two, four = Layout.from_sizes(ep=2), Layout.from_sizes(ep=4)
    a = LiveSpec(EXPERTS, "a.ucl", two, two.coords(0))
    assert recorded_mapping(a.text) == a.mapping() == LiveSpec(EXPERTS, "b.ucl", four, four.coords(3)).mapping()
    assert a.mapping() != LiveSpec(EXPERTS.replace("=8", "=16"), "c.ucl", two, two.coords(0)).mapping()
    assert recorded_mapping(None) == () and LiveSpec('ucl 1\n"*" : replicate(ep)\n', "d", two, {}).mapping() == ()


RNG = np.random.default_rng(3)


def local_index_checkpoint(root):
    """ep=2, each rank holding experts.0 and .1 locally: the patterns trick, shard(ep, dim=0) fusing ranks."""
    layout = Layout.from_sizes(ep=2)
    sharded = Pattern((Shard("ep", 0),))
    tensors = {f"model/experts.{j}.w": (RNG.standard_normal((6, 3)).astype(np.float32), "float32", sharded)
               for j in range(2)}
    tensors.update({f"optim/experts.{j}.w/exp_avg": (RNG.standard_normal((6, 3)).astype(np.float32), "float32", sharded)
                    for j in range(2)})
    tensors["optim/experts.0.w/step"] = (np.array(5, dtype=np.int64), "int64", Pattern())
    tensors["optim/experts.1.w/step"] = (np.array(5, dtype=np.int64), "int64", Pattern())
    tensors["model/router.w"] = (RNG.standard_normal((4, 3)).astype(np.float32), "float32", Pattern())
    return write_checkpoint(root, 1, tensors, layout), tensors


def test_place_manifest_splits_a_local_index_tensor_into_global_ones(tmp_path):
    directory, tensors = local_index_checkpoint(tmp_path / "c")
    spec = tmp_path / "s.ucl"
    spec.write_text(EXPERTS.replace("=8", "=4"))
    manifest = read_manifest(directory)
    placed = place_manifest(apply_spec(spec, manifest.layout)[0], manifest)
    assert sorted(k for k in placed.tensors if k.startswith("model/")) == \
        ["model/experts.0.w", "model/experts.1.w", "model/experts.2.w", "model/experts.3.w", "model/router.w"]
    meta = placed.tensors["model/experts.3.w"]
    assert meta.shape == (3, 3) and meta.pattern == Pattern()
    (frag,) = [f for f in placed.fragments if f.key == "model/experts.3.w"]
    assert frag.rank == 1 and frag.box.offsets == (0, 0)  # rank 1's local experts.1
    assert {f.key for f in placed.fragments if f.key.endswith("/step")} == {f"optim/experts.{g}.w/step" for g in range(4)}


def test_place_manifest_refuses_what_does_not_fit(tmp_path):
    directory, _ = local_index_checkpoint(tmp_path / "c")
    manifest = read_manifest(directory)
    for text, message in [(EXPERTS.replace("=8", "=2"), "local expert index 1 is out of range"),
                          (EXPERTS.replace("=8", "=3"), "3 experts do not split evenly over ep=2")]:
        spec = tmp_path / "s.ucl"
        spec.write_text(text)
        with pytest.raises(UclError, match=f"{spec}:2:19: .*{message}"):
            place_manifest(apply_spec(spec, manifest.layout)[0], manifest)
