"""ucp's own safetensors writer and byte-range reader, checked against the safetensors library."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from tests.conftest import require
from tests.helpers import bits_equal
import torch

from ucp.errors import CorruptCheckpointError
from ucp.format.dtypes import DTYPES
from ucp.storage.safetensors_file import MAX_HEADER, Entry, plan_file, read_header, read_into, write_file



def raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def code(t: torch.Tensor) -> str:
    return DTYPES[str(t.dtype).removeprefix("torch.")][1]


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    bf = torch.randn(3, 5, generator=g).to(torch.bfloat16)
    bf.view(torch.int16)[0, 0] = 0x7FC3  # a NaN with a payload
    return {
        "model/w[0:4,0:3]": torch.randn(4, 3, generator=g),
        "model/bf[0:3,0:5]": bf,
        "model/h": torch.randn(7, generator=g).to(torch.float16),
        "model/d": torch.randn(2, 2, generator=g).to(torch.float64),
        "optim/w/step[]": torch.tensor(3.0),
        "model/count": torch.tensor(12345678901, dtype=torch.int64),
        "model/mask": torch.tensor([True, False, True]),
        "model/bytes": torch.arange(11, dtype=torch.uint8),
        "model/i32": torch.tensor([[-1, 2], [3, -4]], dtype=torch.int32),
        "model/empty": torch.empty(0, 4),
    }


def write(path, tensors, metadata=None):
    entries = [Entry(n, code(t), tuple(t.shape), raw(t)) for n, t in tensors.items()]
    return write_file(path, entries, metadata, fsync=True)[:2]


def test_write_file_is_read_by_safetensors_library(tmp_path, tensors):
    path = tmp_path / "rank_00000.safetensors"
    size, offsets = write(path, tensors, {"format": "ucp.checkpoint", "rank": "0"})
    assert size == path.stat().st_size
    assert len(offsets) == len(tensors)
    safetensors = require("safetensors")
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "ucp.checkpoint", "rank": "0"}
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            assert bits_equal(f.get_tensor(name), t), name


def test_write_read_header_read_into_round_trip(tmp_path, tensors):
    path = tmp_path / "f.safetensors"
    size, offsets = write(path, tensors)
    header, data_start = read_header(path)
    assert data_start % 8 == 0  # the data section is 8-byte aligned
    assert "__metadata__" not in header
    assert list(header) == list(tensors)
    fd = os.open(path, os.O_RDONLY)
    try:
        for (name, t), off in zip(tensors.items(), offsets):
            e = header[name]
            assert e["dtype"] == code(t) and e["shape"] == list(t.shape)
            assert off == data_start + e["data_offsets"][0]
            assert e["data_offsets"][1] - e["data_offsets"][0] == t.numel() * t.element_size()
            out = torch.empty_like(t)
            read_into(fd, off, raw(out), path)
            assert bits_equal(out, t), name
    finally:
        os.close(fd)
    assert size == data_start + max(header[n]["data_offsets"][1] for n in tensors)


def test_data_offsets_are_contiguous_in_order(tmp_path, tensors):
    path = tmp_path / "f.safetensors"
    write(path, tensors)
    header, _ = read_header(path)
    pos = 0
    for name in tensors:
        begin, end = header[name]["data_offsets"]
        assert begin == pos
        pos = end


def test_plan_file_matches_what_write_file_writes(tmp_path, tensors):
    entries = [Entry(n, code(t), tuple(t.shape), raw(t)) for n, t in tensors.items()]
    head, offsets = plan_file(entries, {"k": "v"})
    path = tmp_path / "f.safetensors"
    _, written_offsets, _ = write_file(path, entries, {"k": "v"}, fsync=False)
    assert offsets == written_offsets
    assert path.read_bytes()[: len(head)] == head
    (n,) = struct.unpack("<Q", head[:8])
    assert n == len(head) - 8 and json.loads(head[8:])["__metadata__"] == {"k": "v"}


def test_write_file_takes_multidimensional_typed_views(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = tmp_path / "f.safetensors"
    _, (off,), _ = write_file(path, [Entry("a", "F32", (3, 4), memoryview(a))], fsync=False)
    safetensors = require("safetensors")
    with safetensors.safe_open(str(path), framework="np") as f:
        np.testing.assert_array_equal(f.get_tensor("a"), a)
    assert path.read_bytes()[off:] == a.tobytes()


def test_write_file_overwrites_a_longer_file(tmp_path):
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"x" * 10000)
    t = torch.arange(4, dtype=torch.int64)
    size, _, _ = write_file(path, [Entry("t", "I64", (4,), raw(t))], fsync=False)
    assert path.stat().st_size == size < 10000
    safetensors = require("safetensors")
    with safetensors.safe_open(str(path), framework="pt") as f:
        assert torch.equal(f.get_tensor("t"), t)


def test_files_written_by_safetensors_library_are_read(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1, 2], dtype=torch.int16)}
    path = tmp_path / "lib.safetensors"
    save_file = require("safetensors.torch").save_file
    save_file(t, str(path), metadata={"m": "1"})
    header, start = read_header(path)
    assert header["__metadata__"] == {"m": "1"}
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, v in t.items():
            out = torch.empty_like(v)
            read_into(fd, start + header[name]["data_offsets"][0], raw(out), path)
            assert torch.equal(out, v)
    finally:
        os.close(fd)


def test_read_into_short_file_raises_corrupt(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(range(10)))
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(8)
        with pytest.raises(CorruptCheckpointError) as e:
            read_into(fd, 6, memoryview(buf), path)
        assert str(path) in str(e.value) and "truncated" in str(e.value)
        with pytest.raises(CorruptCheckpointError):
            read_into(fd, 100, memoryview(bytearray(1)), path)
        read_into(fd, 2, memoryview(buf), path)  # exactly to the end is fine
        assert bytes(buf) == bytes(range(2, 10))
        read_into(fd, 10, memoryview(bytearray(0)), path)  # nothing to read at EOF is fine
    finally:
        os.close(fd)


def test_read_into_fills_typed_multidimensional_buffers(tmp_path):
    data = np.arange(6, dtype=np.float64).reshape(2, 3)
    path = tmp_path / "d.bin"
    path.write_bytes(b"pad" + data.tobytes())
    out = np.empty((2, 3), dtype=np.float64)
    fd = os.open(path, os.O_RDONLY)
    try:
        read_into(fd, 3, memoryview(out), path)
    finally:
        os.close(fd)
    np.testing.assert_array_equal(out, data)


@pytest.mark.parametrize("content, what", [
    (b"", "too short"),
    (b"\x01\x02\x03", "too short"),
    (struct.pack("<Q", MAX_HEADER + 1) + b"{}", "implausible"),
    (struct.pack("<Q", 2**63) + b"{}", "implausible"),
    (struct.pack("<Q", 100) + b'{"a": 1}', "truncated"),
    (struct.pack("<Q", 6) + b"\xff\xfe\xfa\x00\x01\x02", "JSON"),
    (struct.pack("<Q", 5) + b"{abc}", "JSON"),
    (struct.pack("<Q", 0), "JSON"),
    (struct.pack("<Q", 9) + b"[1, 2, 3]", "object"),
    (struct.pack("<Q", 200_000) + b"[" * 200_000, "nested deeper than 64 levels"),  # not a RecursionError
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, ""),
])
def test_read_header_rejects_garbage(tmp_path, content, what):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as e:
        read_header(path)
    assert str(path) in str(e.value)
    assert what in str(e.value)
