"""How a tensor-parallel DeepSpeed save's pieces map onto global tensors (no DeepSpeed needed): the
packaged specs' geometry from local shapes, the averaged copies ``ds_to_universal`` takes, and the
settings read from a save."""

from __future__ import annotations

from argparse import Namespace

import numpy as np
import pytest
import torch

from ucp.convert.foreign.deepspeed import DeepSpeedFiles, model_settings
from ucp.convert.foreign.deepspeed_files import checked_spec
from ucp.convert.foreign.deepspeed_grid import geometries
from ucp.errors import UclError
from ucp.format.box import Box, FlatRange
from ucp.format.fragment import Fragment
from ucp.format.layout import Layout
from ucp.format.pattern import Fused, Pad, Shard

def _checked_spec(spec, settings, layout, model):
    return checked_spec(spec, settings, layout, model)[0]


LAYOUT = Layout.from_sizes(zero=1, dp=2, tp=2)
LLAMA = {"original_vocab_size": 50, "padded_vocab_size": 52}
ARGS = Namespace(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, ffn_hidden_size=24)


def _llama_local(tp: int = 2) -> dict:
    """Local shapes of a 1-layer Llama-style model on each of ``tp`` ranks (Megatron-DeepSpeed names)."""
    shapes = {
        "embedding.word_embeddings.weight": (52 // tp, 16),
        "layers.0.input_layernorm.weight": (16,),
        "layers.0.self_attention.query_key_value.weight": ((16 + 2 * 8) // tp, 16),
        "layers.0.self_attention.dense.weight": (16, 16 // tp),
        "layers.0.post_attention_layernorm.weight": (16,),
        "layers.0.mlp.dense_h_to_4h.weight": (2 * 24 // tp, 16),
        "layers.0.mlp.dense_4h_to_h.weight": (16, 24 // tp),
        "final_layernorm.weight": (16,),
        "lm_head.weight": (52 // tp, 16),
    }
    return {n: [s] * tp for n, s in shapes.items()}


def test_model_settings_come_from_universal_checkpoint_info_and_args():
    got = model_settings({"universal_checkpoint_info": LLAMA, "args": ARGS})
    assert got == {"vocab": 50, "padded_vocab": 52, "q_size": 16, "kv_size": 8, "ffn": 24}
    assert model_settings({}) == {}


def test_the_llama_spec_gives_global_shapes_fused_parts_padding_and_averaging():
    checked = _checked_spec("megatron-llama", None, LAYOUT, {"universal_checkpoint_info": LLAMA, "args": ARGS})
    geo = geometries(checked, _llama_local(), 2)
    qkv = geo["layers.0.self_attention.query_key_value.weight"]
    assert qkv.shape == (32, 16) and qkv.pattern.shards == (Shard("tp", 0),)
    assert qkv.pattern.fused == Fused(0, (("q", 16), ("k", 8), ("v", 8)))
    assert geo["layers.0.mlp.dense_h_to_4h.weight"].pattern.fused == Fused(0, (("gate", 24), ("up", 24)))
    emb = geo["embedding.word_embeddings.weight"]
    assert emb.shape == (52, 16) and emb.pattern.pad == Pad(0, 52, 50)
    assert emb.box(1, 2) == Box((26, 0), (26, 16)) and emb.sources(1) == (1,)
    dense = geo["layers.0.self_attention.dense.weight"]
    assert dense.shape == (16, 16) and dense.box(1, 2) == Box((0, 8), (16, 8))
    norm = geo["layers.0.input_layernorm.weight"]  # average(tp): tp rank 0's fragment averages both copies
    assert norm.shape == (16,) and norm.sources(0) == (0, 1) and norm.sources(1) == ()


def test_specs_that_do_not_fit_the_save_say_where():
    meta = {"universal_checkpoint_info": LLAMA, "args": ARGS}
    with pytest.raises(UclError, match="megatron-llama:.*fused sizes .* sum to 56 but dim 0 has 32"):
        geometries(_checked_spec("megatron-llama", {"kv_size": 20}, LAYOUT, meta), _llama_local(), 2)
    with pytest.raises(UclError, match="'lm_head.weight' is matched by no rule"):
        geometries(_checked_spec("megatron-gpt", None, LAYOUT, meta), _llama_local(), 2)
    with pytest.raises(UclError, match="'q_size' is not a model setting"):
        _checked_spec("megatron-llama", None, LAYOUT, {"universal_checkpoint_info": LLAMA})
    uneven = _llama_local()
    uneven["layers.0.self_attention.dense.weight"] = [(16, 8), (16, 9)]
    with pytest.raises(UclError, match="different shapes"):
        geometries(_checked_spec("megatron-llama", None, LAYOUT, meta), uneven, 2)


def test_averaged_copies_decode_as_ds_to_universal_takes_them():
    a = np.array([1.0, 2.0, 3.0, 4.0, 1e-8, 3.0], dtype=np.float32)
    b = np.array([9.0, 2.5, 3.0, -4.0, 3e-8, 1e30], dtype=np.float32)
    frag = Fragment("optim/n.weight/master", Box.full((4,)), FlatRange(0, 4), "float32", 0, "f", 0, 16, 0)
    files = DeepSpeedFiles(None)
    files.where[frag] = [(a, 2), (b, 2)]  # each copy's slice starts at element 2
    want = ((torch.from_numpy(a[2:6]) + torch.from_numpy(b[2:6])) / 2).numpy()
    assert files.decode(frag).tobytes() == want.tobytes()
    bf = Fragment("model/n.weight", Box.full((4,)), None, "bfloat16", 0, "f", 0, 8, 0)
    x, y = torch.randn(4).to(torch.bfloat16), torch.randn(4).to(torch.bfloat16)
    files.where[bf] = [(x.view(torch.uint16).numpy(), 0), (y.view(torch.uint16).numpy(), 0)]
    assert files.decode(bf).tobytes() == ((x + y) / 2).view(torch.uint16).numpy().tobytes()
    files.where[frag] = [(a, 0)]
    assert files.decode(frag).tobytes() == a[:4].tobytes()
    assert files.decode(Fragment("k", Box.full((1,)), None, "float32", 0, "f", 0, 4, 0)) is None  # (read in place)


def _fake_save(root, model: dict, optim: dict | None) -> None:
    """A directory shaped like a DeepSpeed ZeRO-1 save of one rank (torch.save'd dicts, no DeepSpeed)."""
    tag = root / "global_step1"
    tag.mkdir(parents=True)
    (root / "latest").write_text("global_step1")
    torch.save(model, tag / "mp_rank_00_model_states.pt")
    if optim is not None:
        torch.save(optim, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")


@pytest.mark.parametrize("model, optim, words", [
    ({"module": {}}, {}, "mp_rank_00_model_states.pt: not a DeepSpeed model-states file (missing 'param_shapes')"),
    ({"module": {"w": torch.ones(2)}, "param_shapes": [{"w": torch.Size([2])}], "dp_world_size": 1},
     {"optimizer_state_dict": {"zero_stage": 1}},
     "zero_pp_rank_0_mp_rank_00_optim_states.pt: not a ZeRO-1/2 optimizer-states file (missing "
     "'single_partition_of_fp32_groups')"),
    ({"module": {"w": torch.ones(2)}, "param_shapes": [{"w": torch.Size([2])}], "dp_world_size": 1}, None,
     "no ZeRO optimizer files"),
    ({"module": {"w": torch.ones(2)}, "param_shapes": [{"w": torch.Size([2])}], "dp_world_size": 2},
     {"optimizer_state_dict": {"single_partition_of_fp32_groups": [], "base_optimizer_state": {},
                               "param_slice_mappings": []}},
     "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing from the DeepSpeed checkpoint"),
])
def test_malformed_deepspeed_saves_give_one_clear_error(tmp_path, capsys, model, optim, words):
    from ucp.cli.main import main

    _fake_save(tmp_path / "ckpt", model, optim)
    code = main(["convert", "--from", "deepspeed", str(tmp_path / "ckpt"), str(tmp_path / "u"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert words in err, err
    assert not (tmp_path / "u").exists()
