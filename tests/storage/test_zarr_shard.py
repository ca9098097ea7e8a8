"""ucp's zarr shard writer and checked reader, against zarr-python reading and writing the same bytes."""

from __future__ import annotations

import itertools
import os
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import require
from tests.helpers import flip_byte, same_bits
from ucp.codecs.checksum import crc32c
from ucp.errors import CorruptCheckpointError
from ucp.format.universal import shard_shape
from ucp.storage.zarr_shard import ShardReader, read_index, shard_key, write_shard


def zarr_array(root, shape, dtype, chunks, compressor="none"):
    """Create the array's metadata with zarr-python, configured as a universal checkpoint's arrays."""
    zarr = require("zarr")
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    from ucp.storage.zarr_shard import ZSTD_LEVEL

    compressors = ([ZstdCodec(level=ZSTD_LEVEL)] if compressor == "zstd" else []) + [Crc32cCodec()]
    return zarr.create_array(str(root), shape=shape, dtype=dtype, chunks=chunks, shards=shard_shape(shape, chunks),
                             compressors=compressors, serializer=BytesCodec(endian="little"), fill_value=0,
                             chunk_key_encoding={"name": "default", "separator": "."}, zarr_format=3)


def write(root, array, chunks, compressor="none"):
    """Write ``array`` with ucp's writer where zarr expects its shard; returns the shard path."""
    zarr_array(root, array.shape, array.dtype, chunks, compressor)
    path = root / shard_key(array.ndim)
    size, crcs = write_shard(path, array, chunks, compressor, fsync=False)
    assert size == (path.stat().st_size if array.size else 0)
    if array.size:  # the checksums returned are the ones each chunk carries, in grid order
        stored = [int.from_bytes(path.read_bytes()[o + n - 4:o + n], "little")
                  for o, n in chunk_extents(path, array.shape, chunks).values()]
        assert list(crcs) == stored
    else:
        assert crcs == ()
    return path


def random_array(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


CASES = {
    "float32 even": ((8, 6), "float32", (4, 3)),
    "float32 uneven": ((10, 7), "float32", (4, 3)),
    "int64 3-d": ((5, 3, 4), "int64", (2, 2, 3)),
    "bf16 bits": ((9, 5), "uint16", (4, 4)),
    "float16 one chunk": ((3, 3), "float16", (3, 3)),
    "uint8 1-d": ((1000,), "uint8", (64,)),
    "scalar": ((), "float64", ()),
    "empty": ((0, 4), "float32", (1, 4)),
    "empty last dim": ((3, 0), "int32", (3, 1)),
}


@pytest.mark.parametrize("compressor", ["none", "zstd"])
@pytest.mark.parametrize("shape, dtype, chunks", CASES.values(), ids=CASES.keys())
def test_zarr_python_reads_what_ucp_writes(tmp_path, shape, dtype, chunks, compressor):
    zarr = require("zarr")
    a = random_array(shape, dtype)  # NaNs with payloads included: bits must survive, not values
    write(tmp_path / "a", a, chunks, compressor)
    got = zarr.open_array(str(tmp_path / "a"), mode="r")[...]
    assert same_bits(np.asarray(got), a)
    with ShardReader(tmp_path / "a" / shard_key(len(shape)), shape, chunks, dtype, compressor) as r:
        assert same_bits(r.read(), a)


def test_zarr_group_reads_arrays_written_under_it(tmp_path):
    zarr = require("zarr")
    zarr.open_group(str(tmp_path), mode="w", zarr_format=3)
    arrays = {"model/w": random_array((6, 4), "float32", 1), "optim/exp_avg/w": random_array((6, 4), "float32", 2)}
    for name, a in arrays.items():
        write(tmp_path / name, a, (4, 4))
    group = zarr.open_group(str(tmp_path), mode="r")
    for name, a in arrays.items():
        assert same_bits(np.asarray(group[name][...]), a)


def test_ucp_reads_what_zarr_python_writes(tmp_path):
    """The same layout from the other side: every chunk present (no all-zero chunk to elide)."""
    a = random_array((10, 7), "float32", 3)
    for compressor in ("none", "zstd"):
        root = tmp_path / compressor
        z = zarr_array(root, a.shape, a.dtype, (4, 3), compressor)
        z[...] = a
        with ShardReader(root / shard_key(2), a.shape, (4, 3), a.dtype, compressor) as r:
            assert same_bits(r.read(), a)
            assert r.verify() == []


def test_edge_chunks_are_zero_padded(tmp_path):
    a = random_array((5, 3), "int32")
    path = write(tmp_path / "a", a, (4, 2))
    with ShardReader(path, a.shape, (4, 2), a.dtype) as r:
        corner = r.chunk((1, 1))
        assert corner.shape == (4, 2)
        assert corner[0, 0] == a[4, 2]
        assert not corner[1:].any() and not corner[:, 1].any()


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_read_of_any_region_equals_numpy_slicing(tmp_path_factory, data):
    ndim = data.draw(st.integers(1, 3))
    shape = tuple(data.draw(st.integers(1, 9)) for _ in range(ndim))
    chunks = tuple(data.draw(st.integers(1, s + 1)) for s in shape)
    compressor = data.draw(st.sampled_from(["none", "zstd"]))
    a = random_array(shape, data.draw(st.sampled_from(["float32", "uint16", "int64"])), data.draw(st.integers(0, 99)))
    root = tmp_path_factory.mktemp("r")
    path = root / "s"
    write_shard(path, a, chunks, compressor, fsync=False)
    with ShardReader(path, shape, chunks, a.dtype, compressor) as r:
        for _ in range(3):
            region = []
            for s in shape:
                lo = data.draw(st.integers(0, s))
                region.append(slice(lo, data.draw(st.integers(lo, s))))
            region = tuple(region)
            assert same_bits(r.read(region), np.ascontiguousarray(a[region]))
            out = np.empty(a[region].shape, dtype=a.dtype)
            assert r.read(region, out=out) is out and same_bits(out, np.ascontiguousarray(a[region]))


@pytest.mark.parametrize("shape, chunks", [((10, 7), (4, 3)), ((8, 6), (4, 3)), ((), ()), ((5,), (8,))])
def test_progress_adds_up_to_the_array_bytes_when_writing_and_verifying(tmp_path, shape, chunks):
    a = random_array(shape, "float32")
    written, verified = [], []
    write_shard(tmp_path / "s", a, chunks, fsync=True, progress=written.append)
    with ShardReader(tmp_path / "s", shape, chunks, a.dtype) as r:
        assert r.verify(progress=verified.append) == []
        assert len(written) == len(verified) == int(np.prod(r.grid))
    assert sum(written) == sum(verified) == a.nbytes  # a progress bar of the array's size ends at 100%


def test_an_empty_array_writes_no_file(tmp_path):
    assert write_shard(tmp_path / "s", np.zeros((0, 3), np.float32), (1, 3)) == (0, ())
    assert not (tmp_path / "s").exists()
    with ShardReader(tmp_path / "s", (0, 3), (1, 3), np.float32) as r:
        assert r.read().shape == (0, 3) and r.verify() == []


# --------------------------------------------------------------------------- corruption


def chunk_extents(path, shape, chunks):
    fd = os.open(path, os.O_RDONLY)
    try:
        index = read_index(fd, shape, chunks, str(path))
    finally:
        os.close(fd)
    return {idx: (int(index[idx][0]), int(index[idx][1])) for idx in itertools.product(*map(range, index.shape[:-1]))}


SHAPE, CHUNKS = (10, 7), (4, 3)  # a 3 x 3 grid with short edge chunks
GRID = list(itertools.product(range(3), range(3)))


@pytest.mark.parametrize("compressor", ["none", "zstd"])
@pytest.mark.parametrize("where", ["first", "middle", "crc"])
def test_a_flipped_byte_in_any_chunk_is_found_and_named(tmp_path, compressor, where):
    a = random_array(SHAPE, "float32")
    for idx in GRID:
        path = tmp_path / f"{idx[0]}{idx[1]}"
        write_shard(path, a, CHUNKS, compressor, fsync=False)
        offset, nbytes = chunk_extents(path, SHAPE, CHUNKS)[idx]
        flip_byte(path, {"first": offset, "middle": offset + nbytes // 2, "crc": offset + nbytes - 1}[where], 0x40)
        with ShardReader(path, SHAPE, CHUNKS, a.dtype, compressor, label="model/w") as r:
            problems = r.verify()
            assert len(problems) == 1 and f"chunk {idx} of model/w" in problems[0], problems
            region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, CHUNKS, SHAPE))
            with pytest.raises(CorruptCheckpointError, match=rf"chunk \({idx[0]}, {idx[1]}\) of model/w"):
                r.read(region)
            with pytest.raises(CorruptCheckpointError, match=rf"chunk \({idx[0]}, {idx[1]}\)"):
                r.read()
            # a region that avoids the bad chunk reads only good chunks
            other = next(j for j in GRID if j[0] != idx[0])
            rows = slice(other[0] * CHUNKS[0], min((other[0] + 1) * CHUNKS[0], SHAPE[0]))
            assert same_bits(r.read((rows, slice(0, SHAPE[1]))), np.ascontiguousarray(a[rows]))


def test_a_flipped_byte_in_a_scalar_is_found(tmp_path):
    a = np.array(2.5, dtype=np.float64)
    write_shard(tmp_path / "c", a, (), fsync=False)
    flip_byte(tmp_path / "c", 3, 0x40)
    with ShardReader(tmp_path / "c", (), (), a.dtype, label="model/s") as r:
        assert len(r.verify()) == 1
        with pytest.raises(CorruptCheckpointError, match=r"chunk \(\) of model/s: checksum mismatch"):
            r.read()


def test_a_flipped_byte_in_the_index_is_caught(tmp_path):
    a = random_array(SHAPE, "float32")
    path = tmp_path / "s"
    size = write_shard(path, a, CHUNKS, fsync=False).nbytes
    index_bytes = 9 * 16 + 4
    for at in (size - index_bytes, size - index_bytes + 17, size - 1):
        write_shard(path, a, CHUNKS, fsync=False)
        flip_byte(path, at, 0x40)
        problems = ShardReader(path, SHAPE, CHUNKS, a.dtype, label="model/w").verify()
        assert len(problems) == 1 and "(model/w): shard index checksum mismatch" in problems[0]
        with pytest.raises(CorruptCheckpointError, match="shard index checksum mismatch"):
            ShardReader(path, SHAPE, CHUNKS, a.dtype).read()


@pytest.mark.parametrize("keep", [0, 10, "all but 1", "all but the index"])
def test_a_truncated_shard_is_caught(tmp_path, keep):
    a = random_array(SHAPE, "float32")
    path = tmp_path / "s"
    size = write_shard(path, a, CHUNKS, fsync=False).nbytes
    n = {"all but 1": size - 1, "all but the index": size - 9 * 16 - 4}.get(keep, keep)
    with open(path, "r+b") as f:
        f.truncate(n)
    problems = ShardReader(path, SHAPE, CHUNKS, a.dtype).verify()
    assert len(problems) == 1 and str(path) in problems[0]
    assert "too short" in problems[0] or "checksum mismatch" in problems[0]
    with pytest.raises(CorruptCheckpointError):
        ShardReader(path, SHAPE, CHUNKS, a.dtype).read()


def _rewrite_index(path, grid, edit):
    """Replace the shard index with an edited one under a *valid* index checksum."""
    data = bytearray(path.read_bytes())
    n = int(np.prod(grid)) * 16
    index = np.frombuffer(bytes(data[-n - 4:-4]), dtype="<u8").reshape(tuple(grid) + (2,)).copy()
    edit(index)
    raw = index.tobytes()
    data[-n - 4:] = raw + struct.pack("<I", crc32c(raw))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset, nbytes", [
    (10**6, 52),  # past the end
    (0, 2**63),  # a length no file has
    (2**64 - 8, 20),  # offset + nbytes wraps around in uint64
])
def test_an_index_pointing_past_the_data_is_caught(tmp_path, offset, nbytes):
    a = random_array(SHAPE, "float32")
    path = tmp_path / "s"
    write_shard(path, a, CHUNKS, fsync=False)
    _rewrite_index(path, (3, 3), lambda ix: ix.__setitem__((2, 1), (offset, nbytes)))
    problems = ShardReader(path, SHAPE, CHUNKS, a.dtype).verify()
    assert len(problems) == 1 and "points past the chunk data at chunk (2, 1)" in problems[0]
    with pytest.raises(CorruptCheckpointError, match=r"points past the chunk data at chunk \(2, 1\)"):
        ShardReader(path, SHAPE, CHUNKS, a.dtype).read()


def test_a_chunk_absent_from_the_index_is_caught(tmp_path):
    a = random_array(SHAPE, "float32")
    path = tmp_path / "s"
    write_shard(path, a, CHUNKS, fsync=False)
    _rewrite_index(path, (3, 3), lambda ix: ix.__setitem__((1, 2), 2**64 - 1))
    with ShardReader(path, SHAPE, CHUNKS, a.dtype, label="model/w") as r:
        problems = r.verify()
        assert len(problems) == 1 and "chunk (1, 2) of model/w is absent" in problems[0]
        assert same_bits(r.read((slice(0, 4), slice(0, 6))), np.ascontiguousarray(a[:4, :6]))


def test_a_chunk_of_the_wrong_length_is_caught(tmp_path):
    a = random_array(SHAPE, "float32")
    path = tmp_path / "s"
    write_shard(path, a, CHUNKS, fsync=False)
    _rewrite_index(path, (3, 3), lambda ix: ix.__setitem__((0, 0, 1), ix[0, 0, 1] - 4))
    with ShardReader(path, SHAPE, CHUNKS, a.dtype, label="model/w") as r:
        with pytest.raises(CorruptCheckpointError, match=r"chunk \(0, 0\) of model/w: 48 bytes recorded, 52 expected"):
            r.read()


def test_a_zstd_chunk_that_does_not_decode_is_caught(tmp_path):
    """Garbage under a valid checksum (a foreign writer's bug) is reported, not a crash."""
    a = random_array(SHAPE, "float32")
    path = tmp_path / "s"
    write_shard(path, a, CHUNKS, "zstd", fsync=False)
    offset, nbytes = chunk_extents(path, SHAPE, CHUNKS)[(1, 1)]
    data = bytearray(path.read_bytes())
    data[offset:offset + nbytes - 4] = b"\x00" * (nbytes - 4)
    data[offset + nbytes - 4:offset + nbytes] = struct.pack("<I", crc32c(bytes(nbytes - 4)))
    path.write_bytes(bytes(data))
    with ShardReader(path, SHAPE, CHUNKS, a.dtype, "zstd", label="model/w") as r:
        problems = r.verify()
        assert len(problems) == 1 and "chunk (1, 1) of model/w" in problems[0]


def test_a_missing_shard_is_named(tmp_path):
    r = ShardReader(tmp_path / "nope", SHAPE, CHUNKS, np.float32, label="model/w")
    assert r.verify() == [f"{tmp_path / 'nope'}: the shard of model/w is missing"]
    with pytest.raises(CorruptCheckpointError, match="the shard of model/w is missing"):
        r.read()


# --------------------------------------------------------------------------- chunks bound to their position


def _swap_chunk_bytes(path, a_ext, b_ext):
    """Exchange the bytes (checksums included) of two same-size chunks; the index stays valid."""
    data = bytearray(path.read_bytes())
    (oa, n), (ob, m) = a_ext, b_ext
    assert n == m
    data[oa:oa + n], data[ob:ob + n] = data[ob:ob + n], data[oa:oa + n]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["index entries", "bytes"])
def test_two_chunks_swapped_inside_a_shard_are_caught_against_the_recorded_checksums(tmp_path, how):
    a = random_array(SHAPE, "float32")
    path = tmp_path / "s"
    crcs = write_shard(path, a, CHUNKS, fsync=False).chunk_crc32c
    ext = chunk_extents(path, SHAPE, CHUNKS)
    if how == "index entries":  # under a valid index checksum: every chunk still passes its own CRC
        def swap(ix):
            ix[0, 1], ix[1, 0] = ix[1, 0].copy(), ix[0, 1].copy()

        _rewrite_index(path, (3, 3), swap)
    else:
        _swap_chunk_bytes(path, ext[(0, 0)], ext[(1, 1)])
    swapped = {"index entries": [(0, 1), (1, 0)], "bytes": [(0, 0), (1, 1)]}[how]
    # without the record the swap is invisible: every chunk's own checksum holds
    assert ShardReader(path, SHAPE, CHUNKS, a.dtype, label="model/w").verify() == []
    with ShardReader(path, SHAPE, CHUNKS, a.dtype, label="model/w", expected=crcs) as r:
        problems = r.verify()
        assert len(problems) == 2, problems
        for idx, line in zip(swapped, problems):
            assert f"{path}: chunk {idx} of model/w holds bytes that belong elsewhere" in line
        first = rf"chunk \({swapped[0][0]}, {swapped[0][1]}\) of model/w holds"
        with pytest.raises(CorruptCheckpointError, match=first):
            r.read()
        rows = slice(8, 10)  # the last row of chunks is untouched and still reads
        assert same_bits(r.read((rows, slice(0, 7))), np.ascontiguousarray(a[rows]))


def test_a_shard_of_another_array_is_caught_against_the_recorded_checksums(tmp_path):
    a, b = random_array(SHAPE, "float32", seed=1), random_array(SHAPE, "float32", seed=2)
    crcs = write_shard(tmp_path / "a", a, CHUNKS, "zstd", fsync=False).chunk_crc32c
    write_shard(tmp_path / "b", b, CHUNKS, "zstd", fsync=False)
    with ShardReader(tmp_path / "b", SHAPE, CHUNKS, a.dtype, "zstd", label="model/a", expected=crcs) as r:
        assert len(r.verify()) == len(GRID)
        with pytest.raises(CorruptCheckpointError, match=r"chunk \(0, 0\) of model/a holds bytes that belong"):
            r.read()
