"""Real transformers models through ``convert --from hf``, a live load and ``export`` (docs/foreign.md
sections 1 and 1a): tiny models saved with ``save_pretrained``, converted, loaded into the model
transformers holds in memory (MoE experts fused) and trained on, exported back, and loaded with
``from_pretrained`` with nothing copied by hand. transformers is installed by .ci/run for this tier
only, never a dependency of ucp."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import ucp
from tests.convert.foreign.test_hf import read_all
from tests.helpers import same_state
from ucp.cli.main import main

pytestmark = pytest.mark.transformers


def _transformers():
    """The transformers package, imported by the tests themselves: the fast tier deselects them (a
    module-level import would count as a skip there), and this tier fails if it is missing."""
    import transformers

    return transformers

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64)


def tiny(kind: str):
    """A tiny model of ``kind`` with weights of a fixed seed (experts different from each other)."""
    t = _transformers()
    configs = {
        "llama": lambda: t.LlamaConfig(intermediate_size=24, tie_word_embeddings=True, **TINY),
        "mixtral": lambda: t.MixtralConfig(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, **TINY),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(intermediate_size=24, moe_intermediate_size=8, num_experts=4,
                                              num_experts_per_tok=2, shared_expert_intermediate_size=12,
                                              decoder_sparse_step=1, **TINY),
        "deepseek_v3": lambda: t.DeepseekV3Config(intermediate_size=24, moe_intermediate_size=8, n_routed_experts=4,
                                                  n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                                                  n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=8,
                                                  qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, **TINY),
    }
    torch.manual_seed(0)
    model = _transformers().AutoModelForCausalLM.from_config(configs[kind]())
    with torch.no_grad():
        for p in model.parameters():  # (some initialisations leave zeros or ones: make every element count)
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def ids() -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["llama", "mixtral", "qwen2_moe", "deepseek_v3"])
def test_save_pretrained_convert_export_from_pretrained_gives_identical_logits(tmp_path, kind):
    model = tiny(kind)
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "u"), "--quiet"]) == 0
    assert main(["export", str(tmp_path / "u"), str(tmp_path / "back"), "--quiet"]) == 0
    assert (tmp_path / "back" / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()
    assert (tmp_path / "back" / "generation_config.json").is_file()
    assert same_state(read_all(tmp_path / "back"), read_all(tmp_path / "hf"))  # the files' names, bit for bit
    again = _transformers().AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert torch.equal(logits(again, ids()), logits(model, ids()))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_moe_weights_load_live_into_the_fused_experts_train_and_export_back(tmp_path, kind):
    model = tiny(kind)
    model.save_pretrained(tmp_path / "hf")
    assert main(["convert", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "u"), "--quiet"]) == 0

    torch.manual_seed(5)
    live = _transformers().AutoModelForCausalLM.from_config(model.config)  # other weights: the load must set them all
    opt = torch.optim.AdamW(live.parameters(), lr=1e-3)
    with pytest.warns(RuntimeWarning, match="weights only"):
        res = ucp.Checkpointer(tmp_path / "u", model=live, optimizer=opt).load()
    assert res.optimizer_restored is False and res.missing_keys == () and res.unexpected_keys == ()
    live.eval()
    assert torch.equal(logits(live, ids()), logits(model, ids()))
    fused = dict(live.named_parameters())["model.layers.1.mlp.experts.gate_up_proj"]
    assert fused.dim() == 3 and fused.shape[0] == 4

    live.train()  # one training step on the live model, saved by ucp, converted, exported with --config
    out = live(ids(), labels=ids())
    out.loss.backward()
    opt.step()
    ucp.Checkpointer(tmp_path / "ck", model=live, optimizer=opt).save(1)
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "u1"), "--quiet"]) == 0
    assert main(["export", str(tmp_path / "u1"), str(tmp_path / "back"), "--config", str(tmp_path / "hf"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "back" / "config.json").read_text())["model_type"] == kind
    assert set(read_all(tmp_path / "back")) == set(read_all(tmp_path / "hf"))  # per-expert names again
    again = _transformers().AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    live.eval()
    assert torch.equal(logits(again, ids()), logits(live, ids()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the optimizer state is there now: restored, no warning
        res = ucp.Checkpointer(tmp_path / "ck", model=again, optimizer=torch.optim.AdamW(again.parameters())).load()
    assert res.optimizer_restored is True
