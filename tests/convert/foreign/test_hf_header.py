"""Hugging Face safetensors headers that a careless or hostile writer produced are refused, naming the file
and the tensors (issue 17 items 8b, 9): overlapping or identical ``data_offsets``, a shape that is not a list
of integers >= 0 (``"22"`` was read as [2, 2]), JSON nested deeper than any header."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ucp.convert import convert
from ucp.convert.foreign.hf import hf_source
from ucp.errors import UcpError


def _file(path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


DATA = np.arange(8, dtype=np.float32).tobytes()  # 32 bytes


def _refused(tmp_path, header, data=DATA) -> str:
    path = _file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(UcpError) as e:
        hf_source(tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    with pytest.raises(UcpError):
        convert(tmp_path, tmp_path / "u", source="hf")
    assert not (tmp_path / "u").exists()
    return msg


def t(shape, offsets, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def test_identical_data_offsets_are_refused_naming_both_tensors(tmp_path):
    msg = _refused(tmp_path, {"a": t([4], [0, 16]), "b": t([4], [0, 16]), "c": t([4], [16, 32])})
    assert "tensors 'a' (bytes [0, 16)) and 'b' (bytes [0, 16)) overlap" in msg


def test_overlapping_data_offsets_are_refused(tmp_path):
    msg = _refused(tmp_path, {"a": t([4], [0, 16]), "b": t([4], [8, 24]), "c": t([2], [24, 32])})
    assert "tensors 'a' (bytes [0, 16)) and 'b' (bytes [8, 24)) overlap" in msg


def test_empty_tensors_at_one_offset_do_not_overlap(tmp_path):
    _file(tmp_path / "model.safetensors", {"a": t([0], [16, 16]), "b": t([0, 3], [16, 16]), "c": t([8], [0, 32])},
          DATA)
    assert sorted(hf_source(tmp_path).manifest.tensors) == ["model/a", "model/b", "model/c"]


@pytest.mark.parametrize("shape, words", [
    ("22", "shape '22' is not a list of integers >= 0"),
    ([2, "2"], "shape [2, '2']"),
    ([-2, -2], "shape [-2, -2]"),
    ([True, 4], "shape [True, 4]"),
    ([2.0, 2], "shape [2.0, 2]"),
    ({"0": 2}, "shape {'0': 2}"),
])
def test_a_shape_that_is_not_a_list_of_whole_numbers_is_refused(tmp_path, shape, words):
    assert words in _refused(tmp_path, {"a": t(shape, [0, 16]), "c": t([4], [16, 32])})


@pytest.mark.parametrize("offsets", ["0,16", [0], [16, 0], [0, 16.0], [-16, 0], [0, 1 << 64]])
def test_data_offsets_must_be_two_ordered_whole_numbers(tmp_path, offsets):
    assert "data_offsets" in _refused(tmp_path, {"a": t([4], offsets)})


def test_a_deeply_nested_header_is_one_error_line(tmp_path):
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(UcpError, match="nested deeper than") as e:
        hf_source(tmp_path)
    assert str(e.value).startswith(str(path))


def test_a_deeply_nested_index_is_one_error_line(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_bytes(b'{"weight_map": ' + b"[" * 100_000 + b"}")
    with pytest.raises(UcpError, match="nested deeper than|not valid JSON") as e:
        hf_source(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "model.safetensors.index.json"))
