"""Streaming safetensors files: written from tensor memory, read by byte range into caller buffers.

The format (https://github.com/huggingface/safetensors, "Format") is an 8-byte little-endian header
length N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` (offsets
relative to the data section, which starts right after the header), then the data, contiguous and
in offset order. ucp writes it itself because the library's Python writer first copies every tensor
into a ``bytes`` object (doubling peak memory) and cannot fsync; files written here are read back by
``safetensors.safe_open`` in the tests. Reads go straight into the destination buffer
(``os.preadv``), without an intermediate copy.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ucp.codecs.checksum import crc32c
from ucp.errors import CorruptCheckpointError, FormatError
from ucp.format.jsonio import parse_json
from ucp.storage.atomic import WRITEBACK_EVERY, start_writeback, with_path
from ucp.storage.objstore import is_object

_ALIGN = 8
# Beyond this a header is not a header: refuse to allocate for it (the library uses 100 MB too).
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its unique name, safetensors dtype code, shape and raw bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass(frozen=True)
class Slot:
    """A tensor whose bytes are produced while the file is written (see :func:`write_stream`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def plan_file(entries: list, metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included) and each entry's (or slot's) absolute byte offset."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    rel = []
    for e in entries:
        n = e.nbytes
        header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [pos, pos + n]}
        rel.append(pos)
        pos += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % _ALIGN)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, [start + r for r in rel]




def write_file(path: Path, entries: list[Entry], metadata: dict[str, str] | None = None,
               fsync: bool = True) -> tuple[int, list[int], int]:
    """Write ``entries`` to ``path`` (overwriting), fsync it, and return (file size, entry offsets,
    CRC-32C of the header: the 8-byte length and the JSON, as :func:`header_checksum` reads it).
    The entries' bytes must not change until it returns: an object is sent from them, not from a copy."""
    return write_stream(path, entries, lambda i: entries[i].data, metadata, fsync, held=True)


def write_stream(path: Path, slots: list, produce, metadata: dict[str, str] | None = None,
                 fsync: bool = True, held: bool = False) -> tuple[int, list[int], int]:
    """Write a file whose tensors' bytes come one at a time: ``produce(i)`` returns slot ``i``'s bytes
    (exactly ``slots[i].nbytes`` of them) and may reuse one buffer, as each is written before the next
    is asked for; unless ``held``: then every slot's bytes stay as they are until this returns, and an
    object's parts are sent from them without a copy (:meth:`~ucp.storage.multipart.MultipartWriter.write_held`).
    Returns (file size, entry offsets, header CRC-32C).

    Raises:
        OSError: naming ``path`` (a file object's ``write`` and ``os.fsync`` raise a full disk's
            ENOSPC without a file name).
    """
    try:
        return _write_stream(path, slots, produce, metadata, fsync, held)
    except OSError as e:
        raise with_path(e, path) from e


def _write_stream(path: Path, slots: list, produce, metadata: dict[str, str] | None, fsync: bool, held: bool):
    head, offsets = plan_file(slots, metadata)
    local = not is_object(path)  # (an object is streamed up in parts, and appears whole when closed)
    fsync = fsync and local
    total = len(head) + sum(slot.nbytes for slot in slots)  # (an object's part size is chosen from it)
    with open(path, "wb", buffering=0) if local else path.open_write(total) as f:
        fd = f.fileno() if local else -1
        put = getattr(f, "write_held", f.write) if held else f.write  # (only an S3 writer sends bytes uncopied)
        f.write(head)
        flushed = 0
        for i, slot in enumerate(slots):
            data = memoryview(produce(i))
            view = data.cast("B") if data.ndim != 1 or data.format != "B" else data
            if view.nbytes != slot.nbytes:
                raise ValueError(f"{path}: tensor {slot.name} has {view.nbytes} bytes, its slot {slot.nbytes}")
            written = 0
            while written < view.nbytes:
                written += put(view[written:])
            pos = f.tell()
            if fsync and pos - flushed >= WRITEBACK_EVERY:
                start_writeback(fd, flushed, pos - flushed)
                flushed = pos
        size = f.tell()
        if fsync:
            os.fsync(fd)
    return size, offsets, crc32c(head)


def header_bytes(fd: int, size: int, path, pread=os.pread) -> bytes:
    """The header of open file ``fd`` (``size`` bytes long) as stored: the 8-byte length and the JSON
    (two small reads, ``pread(fd, n, offset)``; its declared length is checked against ``size`` before
    anything is allocated)."""
    prefix = pread(fd, 8, 0)
    if len(prefix) < 8:
        raise CorruptCheckpointError(f"{path}: too short to be a safetensors file ({len(prefix)} bytes)")
    (n,) = struct.unpack("<Q", prefix)
    if n > min(MAX_HEADER, size - 8):
        raise CorruptCheckpointError(f"{path}: header length {n} is implausible for a file of {size} bytes; "
                                     "the file is corrupted")
    raw = pread(fd, n, 8)
    if len(raw) < n:
        raise CorruptCheckpointError(f"{path}: header truncated ({len(raw)} of {n} bytes)")
    return prefix + raw


def stored_header(path) -> tuple[bytes, int]:
    """The header of the safetensors file at ``path`` as stored (the 8-byte length and the JSON) and
    the file's size; ``path`` a local path or an object (:class:`~ucp.storage.objstore.ObjectPath`,
    read by two ranged GETs).

    Raises:
        FileNotFoundError: there is no such file or object.
        CorruptCheckpointError: the header's length is implausible, or the file ends inside it.
    """
    if is_object(path):
        size = path.stat().st_size
        return header_bytes(-1, size, path, lambda _, n, offset: path.read_range(offset, offset + n)), size
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        return header_bytes(fd, size, path), size
    finally:
        os.close(fd)


def header_checksum(path: Path) -> int:
    """CRC-32C of the header of the safetensors file (or object) at ``path``, the one a manifest records."""
    return crc32c(stored_header(path)[0])


def read_header(path: Path) -> tuple[dict, int]:
    """Parse and check a file's header; returns (header, byte offset of the data section)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(f"{path}: too short to be a safetensors file ({len(prefix)} bytes)")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER:
            raise CorruptCheckpointError(f"{path}: header length {n} is implausible; the file is corrupted")
        raw = f.read(n)
    if len(raw) < n:
        raise CorruptCheckpointError(f"{path}: header truncated ({len(raw)} of {n} bytes)")
    try:
        header = parse_json(raw, f"{path}: header")  # (bounded depth: no RecursionError on [[[[...)
    except FormatError as e:
        raise CorruptCheckpointError(str(e)) from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: header is not a JSON object")
    return header, 8 + n


def read_into(fd: int, offset: int, buf: memoryview, path: Path | str = "") -> None:
    """Fill ``buf`` with the bytes at ``offset`` of open file ``fd``; a short file is corruption."""
    buf = buf.cast("B") if buf.ndim != 1 or buf.format != "B" else buf
    done = 0
    while done < buf.nbytes:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            raise CorruptCheckpointError(
                f"{path}: file ends at byte {offset + done}, expected {buf.nbytes - done} more bytes (truncated?)"
            )
        done += n
