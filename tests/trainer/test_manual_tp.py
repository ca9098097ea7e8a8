"""Megatron-style tensor parallelism by hand: the split model computes what the whole GPT computes,
and ucp saves and restores its plain tensors with the geometry its patterns give."""

from __future__ import annotations

import pytest
import torch

from tests.trainer import manual_tp_workloads as wl
from ucp.errors import OptionsError
from ucp.format.pattern import Fused, Pad, Shard
from ucp.trainer.manual_tp import ManualTPGPT, gather_whole_state, padded_vocab, ucp_patterns
from ucp.trainer.model import GPTConfig, batch, init_gpt, loss_fn

# (world size, tp): tp over the whole world, and tp=2 groups of neighbouring ranks inside a world of 4
WORLDS = [(2, 2), (4, 4), (4, 2)]
IDS = [f"world{w}-tp{t}" for w, t in WORLDS]
dist = pytest.mark.dist


# -- single process ------------------------------------------------------------------------------


def test_padded_vocab_rounds_up_to_a_multiple_of_8_tp():
    assert padded_vocab(250, 1) == 256
    assert padded_vocab(250, 2) == 256
    assert padded_vocab(250, 4) == 256
    assert padded_vocab(256, 4) == 256
    assert padded_vocab(257, 2) == 272
    assert padded_vocab(250, 3) == 264


@pytest.mark.parametrize("tp", [3, 0, -1, True])
def test_invalid_tp_is_refused_with_the_reason(tp):
    with pytest.raises(OptionsError, match=r"tp=.*(divide|positive)"):
        ucp_patterns(GPTConfig(), tp)


def test_tp_that_does_not_divide_the_heads_names_them():
    with pytest.raises(OptionsError, match="does not divide the model's 4 attention heads"):
        ucp_patterns(GPTConfig(), 3)


def test_patterns_give_the_geometry():
    cfg = GPTConfig()
    d = cfg.d_model
    p = ucp_patterns(cfg, 2)
    assert p["wte.weight"].shards == (Shard("tp", 0),)
    assert p["wte.weight"].pad == Pad(dim=0, to=256, keep=250)
    for glob in ("*.attn.qkv.weight", "*.attn.qkv.bias"):
        assert p[glob].shards == (Shard("tp", 0),)
        assert p[glob].fused == Fused(dim=0, parts=(("q", d), ("k", d), ("v", d)))
    assert p["*.attn.out.weight"].shards == p["*.mlp.fc2.weight"].shards == (Shard("tp", 1),)
    assert p["*.mlp.fc1.weight"].shards == p["*.mlp.fc1.bias"].shards == (Shard("tp", 0),)


def test_one_rank_is_the_whole_model():
    """tp=1 (no process group): same parameters, bit-exact logits, the GPT's seams and names."""
    cfg = GPTConfig()
    whole = init_gpt(cfg, 0)
    model = ManualTPGPT.from_whole(whole, dtype=torch.float32)
    x, y = batch(cfg, 0, 1)
    assert torch.equal(model(x), whole(x))
    h = model.embed(x)
    for block in model.blocks:
        h = block(h)
    assert torch.equal(model.logits(h), whole(x))
    got = gather_whole_state(model)
    assert sorted(got) == sorted(whole.state_dict())
    assert all(torch.equal(got[k], v) for k, v in whole.state_dict().items())
    assert model.head.weight is model.wte.weight
    assert ManualTPGPT.from_whole(whole).wte.weight.dtype == torch.bfloat16  # bf16 unless told
    assert loss_fn(model(x), y).item() == pytest.approx(loss_fn(whole(x), y).item(), rel=1e-6)


# -- tensor parallel ----------------------------------------------------------------------------


@dist
@pytest.mark.parametrize("size, tp", WORLDS, ids=IDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_slices_reassemble_into_the_whole_model(worlds, size, tp, dtype):
    cfg, d = GPTConfig(), GPTConfig().d_model
    for rank, r in enumerate(worlds(size).run(wl.slices_reassemble, tp, dtype)):
        assert r["diffs"] == [], f"rank {rank}: gathered parameters differ from the whole model: {r['diffs']}"
        assert r["dtypes"] == [f"torch.{dtype}"] and r["tied"]
        s = r["shapes"]
        assert s["wte.weight"] == [256 // tp, d] and "head.weight" not in s
        assert s["blocks.0.attn.qkv.weight"] == [3 * d // tp, d] and s["blocks.0.attn.qkv.bias"] == [3 * d // tp]
        assert s["blocks.0.attn.out.weight"] == [d, d // tp] and s["blocks.0.attn.out.bias"] == [d]
        assert s["blocks.0.mlp.fc1.weight"] == [4 * d // tp, d] and s["blocks.0.mlp.fc2.weight"] == [d, 4 * d // tp]
        assert s["wpe.weight"] == [cfg.seq, d] and s["ln_f.weight"] == [d]


@dist
@pytest.mark.parametrize("size, tp", WORLDS, ids=IDS)
def test_fp32_forward_and_backward_match_the_whole_model(worlds, size, tp):
    cfg = GPTConfig()
    for rank, r in enumerate(worlds(size).run(wl.fp32_forward_backward, tp)):
        assert r["shape"] == [cfg.global_batch, cfg.seq, cfg.vocab] and r["dtype"] == "torch.float32"
        assert r["logits_rel"] < 1e-5, f"rank {rank}: logits differ by {r['logits_rel']:.2e} (relative)"
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5)
        assert r["grad_keys"] and r["bad_grads"] == [], f"rank {rank}: gradients differ: {r['bad_grads']}"


@dist
@pytest.mark.parametrize("size, tp", WORLDS[:2], ids=IDS[:2])
def test_bf16_loss_is_close_to_the_fp32_whole_model(worlds, size, tp):
    out = worlds(size).run(wl.bf16_loss, tp)
    for rank, r in enumerate(out):
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-2), f"rank {rank}"
        assert r["finite_grads"] and r["grad_dtype"] == "torch.bfloat16"
    assert len({r["loss"] for r in out}) == 1  # every tp rank computes the same loss


@dist
def test_ucp_round_trip_restores_every_tensor_and_records_the_geometry(worlds, tmp_path):
    from ucp.storage.directory import resolve
    from ucp.storage.manifest_io import read_manifest

    cfg, d = GPTConfig(), GPTConfig().d_model
    root = tmp_path / "ck"
    for rank, r in enumerate(worlds(2).run(wl.save_load_roundtrip, str(root), 2)):
        assert r["step"] == 1 and r["differed_before"] > 0
        assert r["diffs"] == [], f"rank {rank}: state differs after load: {r['diffs']}"
        assert r["got"] == r["ref"], f"rank {rank}: the resumed step differs"

    m = read_manifest(resolve(root))
    wte = m.tensors["model/wte.weight"]
    assert wte.shape == (256, d) and wte.dtype == "bfloat16"
    assert wte.pattern.pad == Pad(dim=0, to=256, keep=cfg.vocab) and wte.pattern.shards == (Shard("tp", 0),)
    frags = sorted((f.rank, f.box.offsets, f.box.sizes) for f in m.fragments if f.key == "model/wte.weight")
    assert frags == [(0, (0, 0), (128, d)), (1, (128, 0), (128, d))]  # padding rows 250..255 are rank 1's
    qkv = m.tensors["model/blocks.0.attn.qkv.weight"]
    assert qkv.shape == (3 * d, d)
    assert [n for n, _ in qkv.pattern.fused.parts] == ["q", "k", "v"] and qkv.pattern.fused.dim == 0
    assert m.tensors["optim/blocks.0.attn.qkv.weight/exp_avg"].pattern == qkv.pattern
    assert m.tensors["model/blocks.0.attn.out.weight"].shape == (d, d)
    assert m.tensors["model/blocks.0.mlp.fc1.bias"].shape == (4 * d,)
    assert m.tensors["model/ln_f.weight"].pattern.is_replicated
    assert "model/head.weight" not in m.tensors  # tied: saved once, as wte.weight


@dist
def test_ucp_round_trip_with_data_parallel_replicas(worlds, tmp_path):
    for rank, r in enumerate(worlds(4).run(wl.save_load_roundtrip, str(tmp_path / "ck"), 2)):
        assert r["diffs"] == [] and r["got"] == r["ref"], f"rank {rank}: {r['diffs']}"
