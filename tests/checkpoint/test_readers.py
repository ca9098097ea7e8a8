"""ucp.checkpoint.readers: fragments read into live tensors, every byte checked, only the blocks a
destination needs read."""

from __future__ import annotations

import pytest
import torch

import ucp
from ucp.checkpoint.readers import FragmentReader
from ucp.errors import CorruptCheckpointError
from ucp.format.manifest import BLOCK_BYTES
from ucp.plan.load_plan import ReadItem
from ucp.storage.manifest_io import read_manifest


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 600), torch.nn.Linear(600, 3))  # weight 0: 1.2 MB
    res = ucp.Checkpointer(tmp_path, model=model, options=ucp.CheckpointOptions(fsync=False)).save(1)
    manifest = read_manifest(res.path)
    by_key = {f.key: f for f in manifest.fragments}
    return res.path, by_key, {f"model/{k}": v for k, v in model.state_dict().items()}


def test_each_fragment_reads_back_bit_exactly_contiguous_or_not(saved):
    path, frags, tensors = saved
    reader = FragmentReader(path)
    try:
        for key, t in tensors.items():
            dest = torch.empty_like(t)
            reader.read(ReadItem(frags[key]), dest)
            assert torch.equal(dest, t)
            if t.ndim == 2:  # a non-contiguous destination goes through a bounce buffer
                strided = torch.empty(t.shape[1], t.shape[0]).t()
                reader.read(ReadItem(frags[key]), strided)
                assert torch.equal(strided, t)
        assert reader.nbytes >= sum(f.length for f in frags.values())
    finally:
        reader.close()


def test_fetch_reads_only_the_blocks_holding_the_spans(saved):
    path, frags, tensors = saved
    f = frags["model/0.weight"]
    assert f.length > 4 * BLOCK_BYTES and f.blocks
    reader = FragmentReader(path)
    try:
        got = reader.fetch(f, spans=[(BLOCK_BYTES + 8, BLOCK_BYTES + 16)], block_bytes=BLOCK_BYTES)
        assert reader.nbytes == BLOCK_BYTES  # block 1 only
        whole = tensors["model/0.weight"].reshape(-1)
        lo, hi = BLOCK_BYTES // 4, 2 * BLOCK_BYTES // 4
        assert torch.equal(got[lo:hi], whole[lo:hi])
    finally:
        reader.close()


def test_a_flipped_byte_is_named_by_block_and_only_when_read(saved):
    path, frags, _ = saved
    f = frags["model/0.weight"]
    data = bytearray((path / f.file).read_bytes())
    data[f.offset + 3 * BLOCK_BYTES + 5] ^= 1
    (path / f.file).write_bytes(bytes(data))
    reader = FragmentReader(path)
    try:
        reader.fetch(f, spans=[(0, 100)], block_bytes=BLOCK_BYTES)  # block 0 is intact
        with pytest.raises(CorruptCheckpointError, match=r"model/0\.weight .*block 3 at bytes"):
            reader.fetch(f, spans=[(3 * BLOCK_BYTES, 3 * BLOCK_BYTES + 4)], block_bytes=BLOCK_BYTES)
        with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
            reader.read(ReadItem(f), torch.empty(600, 512))
    finally:
        reader.close()
