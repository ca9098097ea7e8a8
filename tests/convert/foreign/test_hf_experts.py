"""Hugging Face MoE weights without transformers (docs/foreign.md section 1a): per-expert tensors
written with the ``safetensors`` library under a hand-written ``config.json``, stacked by
``convert --from hf`` into the fused tensors transformers holds in memory, loaded live into a module
holding them, and cut back into the files' names by ``export``, config files included."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import ucp
from tests.convert.foreign.test_hf import read_all
from tests.helpers import assert_bits_equal, same_state
from ucp.cli.main import main
from ucp.convert import convert
from ucp.convert.export import export
from ucp.convert.foreign.hf_experts import RULES, Placed, stacked, unstacked
from ucp.errors import CorruptCheckpointError, FormatError, OptionsError
from ucp.format.universal import UniversalHeader
from ucp.storage.universal_io import read_header

E, F, H = 4, 6, 5


def mixtral_files(layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors named as transformers 5 saves a Mixtral, every element distinct."""
    g = torch.Generator().manual_seed(seed)
    out = {"model.embed_tokens.weight": torch.randn(11, H, generator=g)}
    for n in range(layers):
        pre = f"model.layers.{n}.block_sparse_moe"
        out[f"{pre}.gate.weight"] = torch.randn(E, H, generator=g)
        for j in range(E):
            out[f"{pre}.experts.{j}.w1.weight"] = torch.randn(F, H, generator=g)
            out[f"{pre}.experts.{j}.w2.weight"] = torch.randn(H, F, generator=g)
            out[f"{pre}.experts.{j}.w3.weight"] = torch.randn(F, H, generator=g)
    return out


CONFIG = json.dumps({"model_type": "mixtral", "num_local_experts": E, "hidden_size": H}, indent=2) + "\n"


def write_model(directory, tensors, config: str | None = CONFIG) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    if config is not None:
        (directory / "config.json").write_text(config)
        (directory / "generation_config.json").write_text('{"bos_token_id": 1}\n')


def test_names_stack_and_cut_back_by_the_packaged_rules():
    rules = RULES["mixtral"]
    files = {"m.layers.0.block_sparse_moe.experts.1.w3.weight": ("bfloat16", (F, H)),
             "m.layers.0.block_sparse_moe.experts.0.w1.weight": ("bfloat16", (F, H)),
             "m.layers.0.block_sparse_moe.experts.0.w3.weight": ("bfloat16", (F, H)),
             "m.layers.0.block_sparse_moe.experts.1.w1.weight": ("bfloat16", (F, H)),
             "m.layers.0.block_sparse_moe.gate.weight": ("bfloat16", (2, H))}
    shapes, places = stacked(files, rules, "here")
    assert shapes == {"m.layers.0.mlp.gate.weight": ("bfloat16", (2, H)),
                      "m.layers.0.mlp.experts.gate_up_proj": ("bfloat16", (2, 2 * F, H))}
    assert places["m.layers.0.block_sparse_moe.experts.1.w3.weight"] == \
        Placed("m.layers.0.mlp.experts.gate_up_proj", (1, F, 0), (1, F, H))
    cuts = unstacked("m.layers.0.mlp.experts.gate_up_proj", (2, 2 * F, H), rules)
    assert [(c.name, c.starts, c.shape) for c in cuts] == [
        ("m.layers.0.block_sparse_moe.experts.0.w1.weight", (0, 0, 0), (F, H)),
        ("m.layers.0.block_sparse_moe.experts.0.w3.weight", (0, F, 0), (F, H)),
        ("m.layers.0.block_sparse_moe.experts.1.w1.weight", (1, 0, 0), (F, H)),
        ("m.layers.0.block_sparse_moe.experts.1.w3.weight", (1, F, 0), (F, H))]
    assert [c.name for c in unstacked("m.layers.0.mlp.gate.weight", (2, H), rules)] == \
        ["m.layers.0.block_sparse_moe.gate.weight"]
    # routed experts stack; a shared expert (DeepSeek-V3's shared_experts, no index) keeps its name
    shapes, _ = stacked({"l.mlp.experts.0.down_proj.weight": ("float32", (H, F)),
                         "l.mlp.shared_experts.down_proj.weight": ("float32", (H, F))}, RULES["deepseek_v3"], "here")
    assert shapes == {"l.mlp.experts.down_proj": ("float32", (1, H, F)),
                      "l.mlp.shared_experts.down_proj.weight": ("float32", (H, F))}


def test_hf_moe_weights_stack_on_conversion_load_live_and_export_back_bit_exactly(tmp_path):
    files = mixtral_files()
    files["model.layers.1.block_sparse_moe.experts.2.w2.weight"] = \
        files["model.layers.1.block_sparse_moe.experts.2.w2.weight"].to(torch.bfloat16).float()
    write_model(tmp_path / "hf", files)
    assert main(["convert", "--from", "hf", str(tmp_path / "hf"), str(tmp_path / "u"), "--quiet"]) == 0
    header = read_header(tmp_path / "u")
    assert header.source["config_files"]["config.json"] == CONFIG
    assert sorted(header.tensors) == sorted([f"model/model.layers.{n}.mlp.{t}" for n in range(2)
                                             for t in ("gate.weight", "experts.gate_up_proj", "experts.down_proj")]
                                            + ["model/model.embed_tokens.weight"])

    class Experts(nn.Module):  # what transformers holds in memory, written out by hand
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * F, H))
            self.down_proj = nn.Parameter(torch.zeros(E, H, F))

    model = nn.Module()
    model.model = nn.Module()
    model.model.embed_tokens = nn.Embedding(11, H)
    model.model.layers = nn.ModuleList()
    for _ in range(2):
        layer = nn.Module()
        layer.mlp = nn.Module()
        layer.mlp.gate = nn.Linear(H, E, bias=False)
        layer.mlp.experts = Experts()
        model.model.layers.append(layer)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.warns(RuntimeWarning, match="weights only"):
        res = ucp.Checkpointer(tmp_path / "u", model=model, optimizer=opt).load()
    assert res.optimizer_restored is False
    for n in range(2):
        pre = f"model.layers.{n}.block_sparse_moe.experts"
        experts = model.model.layers[n].mlp.experts
        assert_bits_equal(experts.gate_up_proj, torch.stack(
            [torch.cat([files[f"{pre}.{j}.w1.weight"], files[f"{pre}.{j}.w3.weight"]]) for j in range(E)]))
        assert_bits_equal(experts.down_proj, torch.stack([files[f"{pre}.{j}.w2.weight"] for j in range(E)]))

    res = export(tmp_path / "u", tmp_path / "back")
    assert res.configs == ("config.json", "generation_config.json") and res.tensors == len(files)
    assert same_state(read_all(tmp_path / "back"), files)
    assert (tmp_path / "back" / "config.json").read_text() == CONFIG
    assert (tmp_path / "back" / "generation_config.json").read_text() == '{"bos_token_id": 1}\n'

    # trained on, saved by ucp, converted: --config gives the names back, optimizer states cut alike
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    ucp.Checkpointer(tmp_path / "ck", model=model, optimizer=opt).save(1)
    convert(tmp_path / "ck", tmp_path / "u1", fsync=False)
    export(tmp_path / "u1", tmp_path / "trained", optimizer=True, config=[tmp_path / "hf"])
    back = read_all(tmp_path / "trained")
    fused = model.model.layers[1].mlp.experts.gate_up_proj
    w3 = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    assert_bits_equal(back[w3], fused[2, F:])
    assert_bits_equal(back[f"{w3}/exp_avg"], opt.state[fused]["exp_avg"][2, F:])
    assert set(back) == set(files) | {f"{n}/{s}" for n in files for s in ("exp_avg", "exp_avg_sq", "step")}


def test_without_a_config_names_stay_as_the_files_hold_them(tmp_path):
    files = mixtral_files(layers=1)
    write_model(tmp_path / "hf", files, config=None)
    convert(tmp_path / "hf", tmp_path / "u", source="hf", fsync=False)
    header = read_header(tmp_path / "u")
    assert sorted(header.tensors) == sorted(f"model/{n}" for n in files) and "config_files" not in header.source
    res = export(tmp_path / "u", tmp_path / "back")
    assert res.configs == () and sorted(p.name for p in (tmp_path / "back").iterdir()) == ["model.safetensors"]


def test_export_writes_the_configs_config_names(tmp_path, capsys):
    files = mixtral_files(layers=1)
    write_model(tmp_path / "plain", files, config=None)
    write_model(tmp_path / "hf", files)
    convert(tmp_path / "hf", tmp_path / "stacked", source="hf", fsync=False)
    convert(tmp_path / "plain", tmp_path / "u", source="hf", fsync=False)
    # a checkpoint without configs: --config gives them (a file, or a model directory)
    assert main(["export", str(tmp_path / "u"), str(tmp_path / "a"), "--config", str(tmp_path / "hf" / "config.json"),
                 "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    assert "with config.json" in capsys.readouterr().out
    # the fused experts of a stacked checkpoint, cut by --config's rules, whatever the checkpoint kept
    other = json.dumps({"model_type": "mixtral", "note": "mine"})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text(other)
    export(tmp_path / "stacked", tmp_path / "b", config=[tmp_path / "mine"])
    assert (tmp_path / "b" / "config.json").read_text() == other
    assert not (tmp_path / "b" / "generation_config.json").exists()
    assert same_state(read_all(tmp_path / "b"), files)
    with pytest.raises(OptionsError, match="config.json or generation_config.json"):
        export(tmp_path / "u", tmp_path / "c", config=[tmp_path / "hf" / "model.safetensors"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    with pytest.raises(CorruptCheckpointError, match="not a JSON object"):
        export(tmp_path / "u", tmp_path / "c", config=[tmp_path / "bad"])
    assert not (tmp_path / "c").exists()


def test_experts_that_do_not_stack_are_refused_naming_them(tmp_path):
    files = mixtral_files(layers=1)
    del files["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    write_model(tmp_path / "gap", files)
    with pytest.raises(CorruptCheckpointError, match=r"gate_up_proj stacks experts 0-3, but the files lack "
                                                     r"model.layers.0.mlp.experts.2.w3.weight"):
        convert(tmp_path / "gap", tmp_path / "u", source="hf", fsync=False)
    files = mixtral_files(layers=1)
    files["model.layers.0.block_sparse_moe.experts.1.w2.weight"] = torch.zeros(H, F + 1)
    write_model(tmp_path / "odd", files)
    with pytest.raises(CorruptCheckpointError, match=r"experts.1.w2.weight is float32\[5, 7\].*must agree"):
        convert(tmp_path / "odd", tmp_path / "u", source="hf", fsync=False)
    assert not (tmp_path / "u").exists()


def test_a_header_keeps_only_the_known_config_files_as_text(tmp_path):
    write_model(tmp_path / "hf", mixtral_files(layers=1))
    convert(tmp_path / "hf", tmp_path / "u", source="hf", fsync=False)
    d = read_header(tmp_path / "u").to_dict()
    for bad in ({"model.py": "x"}, {"config.json": {"model_type": "mixtral"}}, ["config.json"]):
        with pytest.raises(FormatError, match="config_files"):
            UniversalHeader.from_dict({**d, "source": {**d["source"], "config_files": bad}})
