"""Hugging Face weights in and out: ``ucp convert --from hf`` then ``ucp export``, bit for bit.

The inputs are written by the ``safetensors`` library itself (sharded with an index, or one file)
from the reference GPT's weights; bf16 tensors go through zarr as raw 16-bit patterns.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import ucp
from tests.helpers import same_state
from ucp.cli.main import main
from ucp.codecs.checksum import crc32c
from ucp.convert import convert
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError, OptionsError
from ucp.convert.export import export
from ucp.storage.universal_io import read_fragments, read_header, verify_universal
from ucp.trainer.model import GPTConfig, init_gpt


def gpt_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """The reference GPT's weights as ``save_pretrained`` keeps them: a tied weight once."""
    model = init_gpt(GPTConfig(), seed)
    return {k: v.detach().clone().contiguous() for k, v in model.named_parameters()}


def write_sharded(directory: Path, weights: dict, shards: int = 2) -> dict[str, str]:
    """``weights`` in ``shards`` files with a ``model.safetensors.index.json``, as transformers writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(weights)
    weight_map = {}
    for i in range(shards):
        part = {k: weights[k] for k in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, directory / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                        "weight_map": weight_map}))
    return weight_map


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_sharded_weights_convert_and_export_back_bit_exactly(tmp_path):
    weights = gpt_weights()
    weights["blocks.0.ln1.weight"] = weights["blocks.0.ln1.weight"].to(torch.bfloat16)  # mixed dtypes
    weights["blocks.1.mlp.fc1.bias"] = weights["blocks.1.mlp.fc1.bias"].to(torch.float16)
    write_sharded(tmp_path / "hf", weights, shards=3)
    res = convert(tmp_path / "hf", tmp_path / "u", source="hf", fsync=False)
    assert res.tensors == len(weights) and res.step == 0
    header = read_header(tmp_path / "u")
    assert verify_universal(tmp_path / "u", header).problems == []
    assert header.source["format"] == "huggingface.safetensors"
    # the fragment table records each tensor's CRC-32C as read from the foreign files
    table = {f.key: f for f in read_fragments(tmp_path / "u", header)}
    for name, t in weights.items():
        assert table[f"model/{name}"].crc32c == crc32c(t.view(torch.uint8).numpy())
    assert main(["export", str(tmp_path / "u"), str(tmp_path / "back"), "--quiet"]) == 0
    assert same_state(read_all(tmp_path / "back"), weights)


def test_a_converted_model_loads_into_a_fresh_model(tmp_path):
    weights = gpt_weights(seed=3)
    save_file(weights, tmp_path / "model.safetensors")
    assert main(["convert", "--from", "hf", str(tmp_path), str(tmp_path / "u"), "--quiet"]) == 0
    model = init_gpt(GPTConfig(), seed=9)
    res = ucp.Checkpointer(tmp_path / "u", model=model).load()
    assert res.source == "universal" and res.step == 0
    assert same_state({k: v.detach() for k, v in model.named_parameters()}, weights)


def test_a_single_safetensors_file_is_a_source_too(tmp_path):
    weights = {"a.weight": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64)}
    save_file(weights, tmp_path / "weights.safetensors")
    convert(tmp_path / "weights.safetensors", tmp_path / "u", source="hf", fsync=False)
    export(tmp_path / "u", tmp_path / "back")
    assert same_state(read_all(tmp_path / "back"), weights)


def test_an_index_tensor_outside_the_index_is_not_part_of_the_model(tmp_path):
    weights = {"a": torch.randn(4), "b": torch.randn(2)}
    write_sharded(tmp_path / "hf", weights, shards=1)
    save_file({"stray": torch.zeros(3)}, tmp_path / "hf" / "extra.safetensors")  # not in the index: ignored
    res = convert(tmp_path / "hf", tmp_path / "u", source="hf", fsync=False)
    assert res.tensors == 2


def _cli_error(capsys, *argv) -> str:
    code = main(["convert", "--from", "hf", *map(str, argv), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_malformed_inputs_get_one_clear_error_each(tmp_path, capsys):
    weights = {"a": torch.randn(4), "b": torch.randn(2, 2)}
    hf = tmp_path / "hf"
    weight_map = write_sharded(hf, weights, shards=2)
    # a shard the index lists is missing
    missing = hf / weight_map["b"]
    data = missing.read_bytes()
    missing.unlink()
    assert "listed in model.safetensors.index.json but missing" in _cli_error(capsys, hf, tmp_path / "u1")
    # the index names a tensor its file lacks
    missing.write_bytes(data)
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    index["weight_map"]["c"] = weight_map["a"]
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "not in the file the index names, e.g. 'c'" in _cli_error(capsys, hf, tmp_path / "u2")
    # a malformed index
    (hf / "model.safetensors.index.json").write_text("{not json")
    assert "model.safetensors.index.json is not valid JSON" in _cli_error(capsys, hf, tmp_path / "u3")
    # a truncated file
    (hf / "model.safetensors.index.json").unlink()
    save_file(weights, hf / "model.safetensors")
    whole = (hf / "model.safetensors").read_bytes()
    (hf / "model.safetensors").write_bytes(whole[:-8])
    assert "do not hold float32[2, 2]" in _cli_error(capsys, hf, tmp_path / "u4")
    # nothing to read
    (hf / "model.safetensors").unlink()
    for f in hf.glob("*"):
        f.unlink()
    assert "no model.safetensors or model.safetensors.index.json" in _cli_error(capsys, hf, tmp_path / "u5")
    assert "no such file or directory" in _cli_error(capsys, tmp_path / "nowhere", tmp_path / "u6")
    assert not any((tmp_path / f"u{i}").exists() for i in range(1, 7))


def test_unknown_dtypes_and_steps_are_refused(tmp_path):
    header = json.dumps({"x": {"dtype": "F8_E9M9", "shape": [2], "data_offsets": [0, 2]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0")
    with pytest.raises(CorruptCheckpointError, match="tensor 'x': unknown dtype"):
        convert(tmp_path, tmp_path / "u", source="hf")
    with pytest.raises(OptionsError, match="no steps"):
        convert(tmp_path, tmp_path / "u", source="hf", step=3)
    with pytest.raises(OptionsError, match="source='orbax'"):
        convert(tmp_path, tmp_path / "u", source="orbax")
    with pytest.raises(CheckpointNotFoundError):
        convert(tmp_path / "none", tmp_path / "u", source="hf")
