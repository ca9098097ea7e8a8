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


@pytest.fixture
def staged_on_cpu(monkeypatch):
    """Destinations on the CPU routed as a GPU's are (through staging), for the path without a GPU."""
    from ucp.checkpoint import readers

    monkeypatch.setattr(readers, "_staged",
                        lambda f, dest: dest.is_contiguous() and readers.dtype_name(dest.dtype) == f.dtype)
    monkeypatch.setattr(readers, "STAGE_BYTES", 3 * BLOCK_BYTES)


def test_read_all_sends_device_destinations_through_staging_in_parallel(saved, staged_on_cpu):
    from concurrent.futures import ThreadPoolExecutor

    path, frags, tensors = saved
    with ThreadPoolExecutor(3) as pool:
        reader = FragmentReader(path, pool=pool, helpers=2, block_bytes=BLOCK_BYTES)
        try:
            dests = {k: torch.full_like(t, float("nan")) for k, t in tensors.items()}
            items = [(ReadItem(frags[k]), d) for k, d in dests.items()]
            assert all(reader.batches(item, d) for item, d in items)
            reader.read_all(items)
            for k, t in tensors.items():
                assert torch.equal(dests[k], t), k
            assert reader.staging("cpu").staged == sum(f.length for f in frags.values())
        finally:
            reader.close()


def test_a_failed_chunk_stops_the_other_readers(saved, staged_on_cpu):
    import time
    from concurrent.futures import ThreadPoolExecutor

    path, frags, _ = saved
    f = frags["model/0.weight"]
    data = bytearray((path / f.file).read_bytes())
    data[f.offset + BLOCK_BYTES + 5] ^= 1  # in the first chunk
    (path / f.file).write_bytes(bytes(data))
    with ThreadPoolExecutor(3) as pool:
        reader = FragmentReader(path, pool=pool, helpers=2, block_bytes=BLOCK_BYTES)
        read_run = reader.files.read_run

        def slow_but_the_first(f_, lo, hi, out, bb):  # (the other readers' chunks still in progress when it fails)
            if lo:
                time.sleep(0.2)
            return read_run(f_, lo, hi, out, bb)

        reader.files.read_run = slow_but_the_first
        try:
            with pytest.raises(CorruptCheckpointError, match="block 1 at bytes"):
                reader.read_all([(ReadItem(f), torch.empty(600, 512))])
            # (the chunks taken while the first failed, one per other reader, not the rest)
            assert reader.staging("cpu").staged <= 3 * 3 * BLOCK_BYTES < f.length // 2
        finally:
            reader.close()


def test_a_corrupted_small_fragment_read_whole_through_staging_is_named(saved, staged_on_cpu):
    path, frags, _ = saved
    f = frags["model/1.weight"]  # 7,200 bytes: one chunk, its CRC-32C checked
    data = bytearray((path / f.file).read_bytes())
    data[f.offset + 100] ^= 1
    (path / f.file).write_bytes(bytes(data))
    reader = FragmentReader(path, block_bytes=BLOCK_BYTES)
    try:
        with pytest.raises(CorruptCheckpointError, match=r"model/1\.weight.*fails its checksum"):
            reader.read_all([(ReadItem(f), torch.empty(3, 600))])
    finally:
        reader.close()


@pytest.mark.parametrize("mapped", [False, True])
def test_runs_of_a_resharded_read_go_through_staging_in_chunks_ending_on_blocks(saved, mapped):
    """A resharded read onto a GPU sends the runs contiguous on both sides through staging; each
    chunk's end is a block boundary of the fragment (or the run's end), so every block is read once."""
    from tests.storage.test_fragment_files import _Maps
    from ucp.state.staging import DeviceStaging

    path, frags, tensors = saved
    f = frags["model/0.weight"]
    whole = tensors["model/0.weight"].reshape(-1).view(torch.uint8)
    reader = FragmentReader(path, maps=_Maps(path) if mapped else None, block_bytes=BLOCK_BYTES)
    calls = []
    read_run = reader.files.read_run
    reader.files.read_run = lambda f_, lo, hi, out, bb: (calls.append((lo, hi)), read_run(f_, lo, hi, out, bb))[1]
    reader._stagings[torch.device("cpu")] = staging = DeviceStaging("cpu", buffers=2, nbytes=2 * BLOCK_BYTES)
    try:
        dest = torch.zeros(f.length, dtype=torch.uint8)
        runs = [(f, 1000, 5 * BLOCK_BYTES + 17, 0), (f, 7 * BLOCK_BYTES + 3, f.length, 6 * BLOCK_BYTES)]
        reader._stage_runs(dest, runs, BLOCK_BYTES)
        n0 = 5 * BLOCK_BYTES + 17 - 1000
        assert torch.equal(dest[:n0], whole[1000:5 * BLOCK_BYTES + 17])
        n1 = f.length - 7 * BLOCK_BYTES - 3
        assert torch.equal(dest[6 * BLOCK_BYTES:6 * BLOCK_BYTES + n1], whole[7 * BLOCK_BYTES + 3:])
        assert all(hi - lo <= 2 * BLOCK_BYTES and (hi % BLOCK_BYTES == 0 or hi in (5 * BLOCK_BYTES + 17, f.length))
                   for lo, hi in calls), calls
        assert staging.staged == n0 + n1
        with pytest.raises(ValueError, match="do not fit staging buffers"):  # (not a loop that never ends)
            reader._stage_runs(dest, runs, 4 * BLOCK_BYTES)
    finally:
        reader.close()
