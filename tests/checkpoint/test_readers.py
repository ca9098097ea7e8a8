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


@pytest.mark.parametrize("threads", [0, 3])
@pytest.mark.parametrize("mapped", [False, True])
def test_reads_through_staging_buffers_are_chunked_by_whole_blocks_and_bit_exact(saved, threads, mapped):
    """The path of a load onto a GPU (here with CPU buffers): a fragment larger than a buffer goes
    in chunks of whole blocks, each verified; a small one whole; buffers are reused."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.storage.test_fragment_files import _Maps
    from ucp.state.staging import DeviceStaging

    path, frags, tensors = saved
    assert frags["model/0.weight"].length > 6 * 3 * BLOCK_BYTES  # (seven chunks or more through two buffers)
    pool = ThreadPoolExecutor(threads) if threads else None
    reader = FragmentReader(path, maps=_Maps(path) if mapped else None, pool=pool, helpers=max(threads - 1, 0),
                            block_bytes=BLOCK_BYTES)
    staging = DeviceStaging("cpu", buffers=2, nbytes=3 * BLOCK_BYTES)
    try:
        dests = {k: torch.full_like(t, float("nan")) for k, t in tensors.items()}
        reader.read_staged([(frags[k], d) for k, d in dests.items()], staging)
        for k, t in tensors.items():
            assert torch.equal(dests[k].view(torch.int32), t.view(torch.int32)), k
        assert staging.staged == sum(f.length for f in frags.values())
    finally:
        reader.close()
        if pool is not None:
            pool.shutdown()


@pytest.mark.parametrize("mapped", [False, True])
def test_a_corrupted_block_read_through_staging_is_named(saved, mapped):
    from tests.storage.test_fragment_files import _Maps
    from ucp.state.staging import DeviceStaging

    path, frags, tensors = saved
    f = frags["model/0.weight"]
    data = bytearray((path / f.file).read_bytes())
    data[f.offset + 7 * BLOCK_BYTES + 5] ^= 1
    (path / f.file).write_bytes(bytes(data))
    reader = FragmentReader(path, maps=_Maps(path) if mapped else None, block_bytes=BLOCK_BYTES)
    try:
        with pytest.raises(CorruptCheckpointError, match=r"model/0\.weight .*block 7 at bytes"):
            reader.read_staged([(f, torch.empty(600, 512))], DeviceStaging("cpu", buffers=2, nbytes=2 * BLOCK_BYTES))
        intact = torch.empty(3, 600)
        reader.read_staged([(frags["model/1.weight"], intact)], DeviceStaging("cpu", buffers=2, nbytes=2 * BLOCK_BYTES))
        assert torch.equal(intact, tensors["model/1.weight"])
    finally:
        reader.close()


def test_a_fragment_without_block_checksums_and_larger_than_a_buffer_is_read_whole(saved):
    from ucp.state.staging import DeviceStaging

    path, frags, tensors = saved
    reader = FragmentReader(path)  # (no block size: the blocks cannot be checked, so no chunks)
    staging = DeviceStaging("cpu", buffers=1, nbytes=BLOCK_BYTES)
    try:
        dest = torch.empty(600, 512)
        reader.read_staged([(frags["model/0.weight"], dest)], staging)
        assert torch.equal(dest, tensors["model/0.weight"]) and staging.staged == 0
    finally:
        reader.close()
