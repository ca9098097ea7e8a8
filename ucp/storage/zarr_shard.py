"""One zarr v3 shard per array, written chunk by chunk and read by chunk.

The byte layout is zarr's ``sharding_indexed`` codec (zarr v3 sharding extension): the encoded
inner chunks one after another, then the shard index, an array of ``(offset, nbytes)`` uint64
little-endian pairs over the chunk grid in C order, followed by the CRC-32C of the index. Each
inner chunk is encoded as ``bytes`` (little-endian), optionally ``zstd``, then ``crc32c`` (4 bytes,
little-endian, over the encoded bytes before it). zarr-python reads these files; the tests check it.

A chunk's own CRC-32C says its bytes are intact, not that they belong at this position of this
array: a chunk or a whole shard moved from elsewhere carries a valid checksum too. The writer
therefore returns every chunk's CRC-32C (:class:`WrittenShard`), the universal writer records that
list in the array's ``zarr.json`` (bound to the signed header), and :class:`ShardReader` given the
list compares each chunk's CRC with the one recorded for its grid position: the same pass over the
bytes that checks the chunk also checks where it belongs.

Why not let zarr write them: zarr builds a whole shard in memory before it writes it (about three
times the array's size at peak, measured), while this writer streams chunks from the caller's
array through one reused chunk buffer, keeps peak memory at the array itself, and starts writeback
as it goes. Reads go straight to the chunks a region needs, verifying each one's checksum.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from ucp.codecs.checksum import crc32c
from ucp.errors import CorruptCheckpointError
from ucp.storage.atomic import WRITEBACK_EVERY, start_writeback
from ucp.storage.objstore import ObjectPath, is_object

#: index entry of a chunk that is not stored
_EMPTY = 2**64 - 1


class WrittenShard(NamedTuple):
    """What :func:`write_shard` wrote: the file's size and each inner chunk's CRC-32C, in grid (C) order."""

    nbytes: int
    chunk_crc32c: tuple[int, ...]


def chunk_count(shape, chunks) -> int:
    """How many inner chunks the shard of an array of ``shape`` holds (none for an empty array)."""
    return math.prod(_grid(shape, chunks)) if math.prod(shape) else 0


def shard_key(ndim: int) -> str:
    """The store key of an array's single shard (chunk key separator ``.``): ``c.0.0`` for 2-d, ``c`` for 0-d."""
    return ".".join(["c"] + ["0"] * ndim)


def _grid(shape, chunks) -> tuple[int, ...]:
    return tuple(max(1, -(-s // c)) for s, c in zip(shape, chunks))


def _compressor(name: str):
    if name == "none":
        return None
    if name == "zstd":
        from numcodecs import Zstd

        return Zstd(level=ZSTD_LEVEL)
    raise ValueError(f"unknown compressor {name!r}")


#: zstd level written into the array metadata and used by the writer
ZSTD_LEVEL = 3


def write_shard(target, array: np.ndarray, chunks: tuple[int, ...], compressor: str = "none",
                fsync: bool = True, progress: Callable[[int], None] | None = None,
                writeback: bool | None = None) -> WrittenShard:
    """Write ``array`` (C-contiguous, little-endian) as one shard; returns its size and chunk CRCs.

    ``target`` is a local path (written with writeback started as it goes when ``writeback``, by
    default when ``fsync``, and fsynced when ``fsync``) or a writable binary file object (an fsspec
    file: its store decides durability). Every inner chunk is written (edge chunks padded with
    zeros), so every chunk has a checksum. A caller that fsyncs the whole tree before making it
    visible passes ``fsync=False, writeback=True``: one fsync per file at the end costs far less
    than each writer waiting for its own.
    """
    if array.size == 0:
        return WrittenShard(0, ())
    if not isinstance(target, (str, Path)):
        return _write_chunks(target, array, chunks, compressor, None, progress)
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb", buffering=0) as f:
        early = fsync if writeback is None else writeback
        written = _write_chunks(f, array, chunks, compressor, f.fileno() if early else None, progress)
        if fsync:
            os.fsync(f.fileno())
    return written


def _write_chunks(f, array, chunks, compressor, fd, progress) -> WrittenShard:
    shape = array.shape
    grid = _grid(shape, chunks)
    codec = _compressor(compressor)
    buf = np.zeros(chunks, dtype=array.dtype)
    index = np.empty(grid + (2,), dtype="<u8")
    pos, flushed = 0, 0
    crcs = []
    for idx in itertools.product(*(range(g) for g in grid)):
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(idx, chunks, shape))
        view = array[region]
        if view.shape == tuple(chunks) and view.flags.c_contiguous:
            data = view
        else:
            if view.shape != tuple(chunks):
                buf.fill(0)
            buf[tuple(slice(0, n) for n in view.shape)] = view
            data = buf
        payload = memoryview(data).cast("B") if codec is None else codec.encode(data)
        _write_all(f, payload)
        crcs.append(crc32c(payload))
        _write_all(f, struct.pack("<I", crcs[-1]))
        n = len(payload) + 4
        index[idx] = (pos, n)
        pos += n
        if fd is not None and pos - flushed >= WRITEBACK_EVERY:
            start_writeback(fd, flushed, pos - flushed)
            flushed = pos
        if progress is not None:
            progress(view.nbytes)
    raw = index.tobytes()
    _write_all(f, raw)
    _write_all(f, struct.pack("<I", crc32c(raw)))
    end = pos + len(raw) + 4
    if fd is not None:
        start_writeback(fd, flushed, end - flushed)  # (the rest: a small shard is on its way before its fsync)
    return WrittenShard(end, tuple(crcs))


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    done = 0
    while done < view.nbytes:
        n = f.write(view[done:])
        done += view.nbytes - done if n is None else n


def read_index(fd: int, shape, chunks, where: str, obj: ObjectPath | None = None) -> np.ndarray:
    """The shard's ``(offset, nbytes)`` index over the chunk grid, checksum verified: of open file
    ``fd``, or of object ``obj`` (one ranged GET)."""
    grid = _grid(shape, chunks)
    n = math.prod(grid) * 16
    size = os.fstat(fd).st_size if obj is None else obj.stat().st_size
    if size < n + 4:
        raise CorruptCheckpointError(f"{where}: {size} bytes, too short for its shard index of {n + 4} bytes (truncated?)")
    raw = os.pread(fd, n + 4, size - n - 4) if obj is None else obj.read_range(size - n - 4, size)
    if struct.unpack("<I", raw[n:])[0] != crc32c(raw[:n]):
        raise CorruptCheckpointError(f"{where}: shard index checksum mismatch; the file is corrupted")
    index = np.frombuffer(raw[:n], dtype="<u8").reshape(grid + (2,))
    data_end = size - n - 4
    end = np.uint64(data_end)
    offset, nbytes = index[..., 0], index[..., 1]
    # offset + nbytes could wrap around in uint64: compare against what is left after the offset instead
    bad = (offset != _EMPTY) & ((offset > end) | (nbytes > end - np.minimum(offset, end)))
    if bad.any():
        raise CorruptCheckpointError(f"{where}: shard index points past the chunk data at chunk "
                                     f"{tuple(int(i) for i in np.argwhere(bad)[0])}; the file is corrupted")
    return index


class ShardReader:
    """Reads regions of one array's shard, chunk by chunk, checking every chunk's CRC-32C.

    Args:
        path: the shard file (or object: :class:`~ucp.storage.objstore.ObjectPath`, read by ranged GETs).
        shape: the array's shape; chunks: its inner chunk shape; dtype: numpy dtype of the stored data.
        compressor: ``none`` or ``zstd``.
        label: how errors name the array (its tensor key).
        expected: the CRC-32C recorded for each chunk in grid (C) order (the writer's
            :attr:`WrittenShard.chunk_crc32c`), or None: a chunk whose bytes are intact but are not
            the ones recorded for its position (moved from another position or another array) is
            then refused too.
    """

    def __init__(self, path: Path, shape, chunks, dtype, compressor: str = "none", label: str = "",
                 expected: Sequence[int] | None = None):
        self.path = path if is_object(path) else Path(path)
        self.shape, self.chunks = tuple(shape), tuple(chunks)
        if expected is not None and len(expected) != chunk_count(self.shape, self.chunks):
            n = chunk_count(self.shape, self.chunks)
            raise ValueError(f"{len(expected)} expected chunk checksums for {n} chunks")
        self.expected = expected
        self.dtype = np.dtype(dtype)
        self.codec = _compressor(compressor)
        self.label = label or str(path)
        self.chunk_nbytes = math.prod(self.chunks) * self.dtype.itemsize
        self._fd = None
        self._index = None

    def __enter__(self) -> "ShardReader":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if self._fd is None and math.prod(self.shape) and is_object(self.path):
            try:
                self._index = read_index(-1, self.shape, self.chunks, f"{self.path} ({self.label})", self.path)
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{self.path}: the shard of {self.label} is missing") from None
            self._fd = -1  # (an object: no descriptor, every chunk one ranged GET)
        if self._fd is None and math.prod(self.shape):
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{self.path}: the shard of {self.label} is missing") from None
            try:
                self._index = read_index(self._fd, self.shape, self.chunks, f"{self.path} ({self.label})")
            except BaseException:
                os.close(self._fd)
                self._fd = None
                raise

    def close(self) -> None:
        if self._fd is not None and self._fd >= 0:
            os.close(self._fd)
        self._fd = None

    @property
    def grid(self) -> tuple[int, ...]:
        return _grid(self.shape, self.chunks)

    def chunk(self, idx: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
        """Decoded chunk ``idx`` (full chunk shape, edge padding included), checksum verified."""
        self.open()
        offset, nbytes = (int(v) for v in self._index[idx])
        where = f"{self.path}: chunk {idx} of {self.label}"
        if offset == _EMPTY:
            raise CorruptCheckpointError(f"{where} is absent from the shard index; the file is corrupted")
        raw = bytearray(nbytes) if self.codec is not None or out is None else None
        if raw is None:
            if nbytes != self.chunk_nbytes + 4:
                raise CorruptCheckpointError(f"{where}: {nbytes} bytes recorded, {self.chunk_nbytes + 4} expected")
            payload = memoryview(out.reshape(-1).view(np.uint8))
            got = self._preadv([payload, crc_buf := bytearray(4)], offset)
            stored = crc_buf
        else:
            got = self._preadv([raw], offset)
            payload, stored = memoryview(raw)[:-4], raw[-4:]
        if got != nbytes:
            raise CorruptCheckpointError(f"{where}: file ends early ({got} of {nbytes} bytes)")
        crc = crc32c(payload)
        if crc != struct.unpack("<I", stored)[0]:
            raise CorruptCheckpointError(f"{where}: checksum mismatch; the chunk is corrupted")
        if self.expected is not None:
            want = self.expected[int(np.ravel_multi_index(idx, self.grid)) if idx else 0]
            if crc != want:
                raise CorruptCheckpointError(
                    f"{where} holds bytes that belong elsewhere (crc32c {crc:08x}; its array's zarr.json records "
                    f"{want:08x} for this chunk): a chunk or shard file was moved or replaced")
        if self.codec is not None:
            try:
                decoded = self.codec.decode(bytes(payload))
            except Exception as e:  # noqa: BLE001 - numcodecs raises assorted errors on bad input
                raise CorruptCheckpointError(f"{where}: cannot be decompressed ({e})") from e
            if len(decoded) != self.chunk_nbytes:
                raise CorruptCheckpointError(f"{where}: decodes to {len(decoded)} bytes, {self.chunk_nbytes} expected")
            data = np.frombuffer(decoded, dtype=self.dtype).reshape(self.chunks)
            if out is None:
                return data
            out[...] = data
            return out
        if out is None:
            return np.frombuffer(payload, dtype=self.dtype).reshape(self.chunks)
        return out

    def _preadv(self, views: list, offset: int) -> int:
        return os.preadv(self._fd, views, offset) if self._fd >= 0 else self.path.read_into(offset, views)

    def read(self, region: tuple[slice, ...] | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """The array's ``region`` (default: all of it), reading only the chunks it overlaps."""
        region = region or tuple(slice(0, s) for s in self.shape)
        lo = [r.start for r in region]
        hi = [r.stop for r in region]
        if out is None:
            out = np.empty([h - l for l, h in zip(lo, hi)], dtype=self.dtype)
        if out.size == 0:
            return out
        buf = np.empty(self.chunks, dtype=self.dtype)
        ranges = [range(l // c, -(-h // c)) for l, h, c in zip(lo, hi, self.chunks)]
        for idx in itertools.product(*ranges):
            c0 = [i * c for i, c in zip(idx, self.chunks)]
            a = [max(l, s) for l, s in zip(lo, c0)]
            b = [min(h, s + c) for h, s, c in zip(hi, c0, self.chunks)]
            data = self.chunk(idx, buf)
            out[tuple(slice(x - l, y - l) for x, y, l in zip(a, b, lo))] = \
                data[tuple(slice(x - s, y - s) for x, y, s in zip(a, b, c0))]
        return out

    def verify(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """Every chunk read and checked; one line per bad chunk (or for an unreadable shard)."""
        if not math.prod(self.shape):
            return []
        try:
            self.open()
        except CorruptCheckpointError as e:
            return [str(e)]
        problems = []
        buf = np.empty(self.chunks, dtype=self.dtype)
        for idx in itertools.product(*(range(g) for g in self.grid)):
            try:
                self.chunk(idx, buf)
            except CorruptCheckpointError as e:
                problems.append(str(e))
            if progress is not None:  # the chunk's bytes inside the array, as write_shard reports them
                inside = math.prod(min(c, s - i * c) for i, c, s in zip(idx, self.chunks, self.shape))
                progress(inside * self.dtype.itemsize)
        return problems
