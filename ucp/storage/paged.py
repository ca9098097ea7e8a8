"""Paged tables: an Arrow table stored sorted, in small checksummed pages under a tree of index
pages, so that a reader fetches only the pages holding the rows it needs (format 1.3 of a
checkpoint: its fragment table and its ranks' non-tensor state; docs/format-checkpoint.md rules
20-27).

The rows are cut into *leaves* of :data:`LEAF_ROWS` rows, each one Arrow record batch in IPC form.
Each level above is a table of entries, one per page below: the page's place in the file (offset,
length, CRC-32C, rows) and a *summary* of the rows under it (their first and last sort key and what
else a reader's selection needs: the fragment table's boxes), cut into pages of :data:`FANOUT`
entries; the top level is one page, the *root*, which the manifest points to. A reader that keeps
the entries whose summaries may hold its rows reads, per level, only those pages: the rows a rank
needs cost it O(log rows) pages, however large the table.

Writing is pure (a table in, bytes out); :class:`PagedFile` reads a stored table's pages from its
file, each checked against its checksum.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from ucp.codecs.checksum import crc32c
from ucp.errors import CorruptCheckpointError, FormatError
from ucp.storage.objstore import is_object

LEAF_ROWS = 64  # rows per leaf page at most (by default)
LEAF_BYTES = 16 << 10  # and about this many bytes at most (rows with many block checksums: fewer rows)
FANOUT = 64  # entries per index page
MAX_DEPTH = 16  # index levels a reader follows at most (32**16 pages: more than any table)

INDEX_SCHEMA = pa.schema([("summary", pa.string()), ("offset", pa.int64()), ("length", pa.int64()),
                          ("crc32c", pa.uint32()), ("rows", pa.int64())])


@dataclass(frozen=True)
class PageRef:
    """Where a page lies in its file: ``length`` bytes at ``offset``, their CRC-32C, and the number
    of rows (leaf) or entries (index page) it holds."""

    offset: int
    length: int
    crc32c: int
    rows: int

    def to_dict(self) -> dict:
        return {"offset": self.offset, "length": self.length, "crc32c": self.crc32c, "rows": self.rows}

    @classmethod
    def from_dict(cls, d, where: str) -> "PageRef":
        try:
            ref = cls(*(d[k] for k in ("offset", "length", "crc32c", "rows")))
        except (KeyError, TypeError) as e:
            raise FormatError(f"{where}: malformed page reference {d!r}") from e
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (ref.offset, ref.length, ref.rows)) \
                or isinstance(ref.crc32c, bool) or not isinstance(ref.crc32c, int) or not 0 <= ref.crc32c < 1 << 32:
            raise FormatError(f"{where}: malformed page reference {d!r}")
        return ref


@dataclass(frozen=True)
class PagedTable:
    """A stored paged table: its bytes, its root page and the number of index levels above the leaves."""

    data: bytes
    root: PageRef
    depth: int
    rows: int

    def header(self, file: str) -> dict:
        """How a manifest points to the table stored as ``file``."""
        return {"file": file, "rows": self.rows, "depth": self.depth, "root": self.root.to_dict()}


def write_paged(table: pa.Table, summarize: Callable[[int, int], dict],
                merge: Callable[[list[dict]], dict], leaf_rows: int | None = None, row_bytes=None) -> PagedTable:
    """Store ``table`` (its rows already in sort order) as a paged table.

    Args:
        summarize: ``(start, stop) -> summary`` of rows ``[start, stop)`` (JSON-safe).
        merge: the summary of several consecutive pages from theirs.
        leaf_rows: rows per leaf at most (default :data:`LEAF_ROWS`).
        row_bytes: each row's size, about: a leaf also ends before :data:`LEAF_BYTES` (a reader of
            one row reads its leaf).
    """
    leaf_rows = leaf_rows or LEAF_ROWS
    batch = table.combine_chunks().to_batches()[0] if table.num_rows else None
    parts: list[bytes] = []
    at = 0

    def put(blob) -> PageRef:
        nonlocal at
        data = blob.to_pybytes() if hasattr(blob, "to_pybytes") else bytes(blob)
        parts.append(data)
        ref = PageRef(at, len(data), crc32c(data), 0)
        at += len(data)
        return ref

    entries: list[tuple[dict, PageRef]] = []
    for lo, hi in _leaves(table.num_rows, leaf_rows, row_bytes):
        ref = put(batch.slice(lo, hi - lo).serialize())
        entries.append((summarize(lo, hi), PageRef(ref.offset, ref.length, ref.crc32c, hi - lo)))
    depth = 0
    while True:
        pages = [entries[i:i + FANOUT] for i in range(0, len(entries), FANOUT)] or [[]]
        refs = []
        for page in pages:
            index = pa.table({"summary": [json.dumps(s, separators=(",", ":")) for s, _ in page],
                              "offset": [r.offset for _, r in page], "length": [r.length for _, r in page],
                              "crc32c": [r.crc32c for _, r in page], "rows": [r.rows for _, r in page]},
                             schema=INDEX_SCHEMA)
            ref = put(index.to_batches()[0].serialize() if page else pa.RecordBatch.from_pylist([], INDEX_SCHEMA).serialize())
            refs.append((merge([s for s, _ in page]) if page else {}, PageRef(ref.offset, ref.length, ref.crc32c,
                                                                            len(page))))
        depth += 1
        if len(refs) == 1:
            return PagedTable(b"".join(parts), refs[0][1], depth, table.num_rows)
        entries = refs


def _leaves(rows: int, most: int, row_bytes) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each leaf: at most ``most`` rows, and about :data:`LEAF_BYTES` (one row at least)."""
    if row_bytes is None:
        return [(lo, min(lo + most, rows)) for lo in range(0, rows, most)]
    ends = np.cumsum(np.asarray(row_bytes, dtype=np.int64))
    out, lo = [], 0
    while lo < rows:
        base = ends[lo - 1] if lo else 0
        hi = int(np.searchsorted(ends, base + LEAF_BYTES, side="right"))
        hi = min(max(hi, lo + 1), lo + most, rows)
        out.append((lo, hi))
        lo = hi
    return out


def read_page(data: bytes, schema: pa.Schema, ref: PageRef, where: str) -> pa.RecordBatch:
    """Decode one page (``data``: its bytes, checksum already verified) of ``schema``.

    Raises:
        FormatError: the bytes are not a record batch of ``schema`` with the rows ``ref`` says.
    """
    try:
        batch = pa.ipc.read_record_batch(pa.py_buffer(data), schema)
        batch.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError, ValueError) as e:
        raise FormatError(f"{where}: not a readable page ({e})") from e
    if batch.num_rows != ref.rows:
        raise FormatError(f"{where}: a page of {batch.num_rows} rows, its index says {ref.rows}")
    return batch


def index_entries(batch: pa.RecordBatch, where: str) -> list[tuple[dict, PageRef]]:
    """The entries of an index page: each page below's summary and place."""
    cols = {n: batch.column(n).to_pylist() for n in INDEX_SCHEMA.names}
    out = []
    for i, text in enumerate(cols["summary"]):
        try:
            summary = json.loads(text)
        except (TypeError, ValueError) as e:
            raise FormatError(f"{where}: entry {i} has no readable summary") from e
        out.append((summary, PageRef.from_dict({k: cols[k][i] for k in ("offset", "length", "crc32c", "rows")},
                                               where)))
    return out


def select_leaves(fetch: Callable[[PageRef, pa.Schema, str], pa.RecordBatch], root: PageRef, depth: int,
                  keep: Callable[[dict], bool], leaf_schema: pa.Schema, where: str) -> list[pa.RecordBatch]:
    """The leaves under ``root`` whose summaries ``keep`` accepts at every level, in sort order.

    Args:
        fetch: ``(ref, schema, what) -> record batch``: reads and verifies one page.
        depth: index levels above the leaves (1: the root indexes leaves).
    """
    if not 1 <= depth <= MAX_DEPTH:
        raise FormatError(f"{where}: an index of depth {depth} (1 to {MAX_DEPTH})")
    level = [root]
    for d in range(depth):
        below = []
        for ref in level:
            below += [r for s, r in index_entries(fetch(ref, INDEX_SCHEMA, f"index page at byte {ref.offset}"), where)
                      if keep(s)]
        level = below
    return [fetch(ref, leaf_schema, f"page at byte {ref.offset}") for ref in level]


class PagedFile:
    """A paged table's file, read page by page (``os.pread``), every page checked against the
    checksum its parent records; counts the bytes read.

    Raises (from its methods):
        CorruptCheckpointError: a page fails its checksum, or lies past the end of the file.
        FormatError: a page is not a record batch of the schema it should hold.
    """

    def __init__(self, path: Path, header: dict, leaf_schema: pa.Schema):
        self.path = path if is_object(path) else Path(path)
        where = str(self.path)
        try:
            self.rows, self.depth = int(header["rows"]), int(header["depth"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: the manifest's entry for this table is malformed ({e})") from e
        self.root = PageRef.from_dict(header.get("root"), where)
        self.leaf_schema = leaf_schema
        self.nbytes = 0
        self._object = is_object(self.path)  # (then each page is one ranged GET, and nothing is asked before:
        # a missing table raises FileNotFoundError at the first page, where a file's os.open raises it here)
        self._fd = None if self._object else os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PagedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def fetch(self, ref: PageRef, schema: pa.Schema, what: str) -> pa.RecordBatch:
        if self._object:
            data = self.path.read_range(ref.offset, ref.offset + ref.length)  # (fewer bytes past its end)
        else:
            data = os.pread(self._fd, ref.length, ref.offset)
        self.nbytes += len(data)
        if len(data) != ref.length:
            raise CorruptCheckpointError(f"{self.path}: {what} ends past the end of the file (truncated)")
        if crc32c(data) != ref.crc32c:
            raise CorruptCheckpointError(f"{self.path}: {what}: checksum mismatch; the table is corrupted")
        return read_page(data, schema, ref, f"{self.path}: {what}")

    def select(self, keep: Callable[[dict], bool]) -> list[pa.RecordBatch]:
        """The leaves whose summaries ``keep`` accepts at every level (see :func:`select_leaves`)."""
        return select_leaves(self.fetch, self.root, self.depth, keep, self.leaf_schema, str(self.path))

    def read_all(self) -> pa.Table:
        """Every row, checked page by page against the table's row count."""
        leaves = self.select(lambda summary: True)
        table = pa.Table.from_batches(leaves, schema=self.leaf_schema)
        if table.num_rows != self.rows:
            raise FormatError(f"{self.path}: {table.num_rows} rows in its pages, the manifest says {self.rows}")
        return table
