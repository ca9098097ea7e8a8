"""Fragments: the bytes of one box (or flat range of a box) of one tensor key held by one rank."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import bisect

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ucp.errors import FormatError, SpecError
from ucp.format.box import Box, FlatRange
from ucp.format.dtypes import itemsize

# A file a manifest names must be a plain name inside the checkpoint directory.
_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_file_name(name: str) -> str:
    """Reject file names that could escape the checkpoint directory (``../x``, ``/etc/x``, ``a/b``)."""
    if not isinstance(name, str) or not _SAFE_FILE.fullmatch(name) or name in (".", ".."):
        raise FormatError(
            f"file name {name!r} is not a plain file name inside the checkpoint directory "
            "(no '/', no '..', no leading '.')"
        )
    return name


@dataclass(frozen=True)
class Fragment:
    """Where one piece of a tensor lives.

    Args:
        key: tensor key (``model/<fqn>``, ...).
        box: the region of the global tensor.
        flat: if set, only these elements of ``box`` flattened row-major.
        dtype: element type name (see ``ucp.format.dtypes``).
        rank: the rank that wrote the bytes.
        file: file name inside the checkpoint directory.
        offset: byte offset of the data inside ``file``.
        length: byte length of the data.
        crc32c: CRC-32C of the data bytes.
        blocks: CRC-32C of each ``block_bytes`` block of the data (the manifest's block size; the
            last block may be shorter), so that part of a fragment can be read and verified; empty
            for data of one block or less, and in format 1.0.
    """

    key: str
    box: Box
    flat: FlatRange | None
    dtype: str
    rank: int
    file: str
    offset: int
    length: int
    crc32c: int
    blocks: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        return self.flat.numel if self.flat is not None else self.box.numel

    @property
    def region(self) -> tuple:
        """What part of the tensor the fragment holds: equal regions hold the same elements."""
        return (self.key, self.box.offsets, self.box.sizes, None if self.flat is None else (self.flat.start, self.flat.numel))

    def validate(self) -> None:
        check_file_name(self.file)
        if self.flat is not None and not self.flat.fits(self.box):
            raise SpecError(f"fragment of {self.key}: flat range {self.flat} exceeds box {self.box} ({self.box.numel} elements)")
        want = self.numel * itemsize(self.dtype)
        if self.length != want:
            raise SpecError(f"fragment of {self.key} in {self.file}: {self.length} bytes recorded, {want} expected")
        if self.offset < 0 or self.rank < 0 or not 0 <= self.crc32c < 2**32:
            raise SpecError(f"fragment of {self.key} in {self.file}: negative offset/rank or crc out of range")

    def check_blocks(self, block_bytes: int) -> None:
        """Block checksums, when present, cover the data in ``block_bytes`` blocks."""
        if not self.blocks:
            return
        want = -(-self.length // block_bytes) if block_bytes > 0 else None
        if want is None or want < 2 or len(self.blocks) != want or any(not 0 <= c < 2**32 for c in self.blocks):
            raise SpecError(f"fragment of {self.key} in {self.file}: {len(self.blocks)} block checksums for "
                            f"{self.length} bytes in blocks of {block_bytes} (expected {want}, at least 2)")


FRAGMENT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("offsets", pa.list_(pa.int64())),
        ("sizes", pa.list_(pa.int64())),
        ("flat_start", pa.int64()),
        ("flat_numel", pa.int64()),
        ("dtype", pa.string()),
        ("rank", pa.int32()),
        ("file", pa.string()),
        ("byte_offset", pa.int64()),
        ("byte_length", pa.int64()),
        ("crc32c", pa.uint32()),
        ("block_crc32c", pa.list_(pa.uint32())),
    ]
)
# Columns a reader accepts missing (tables of format 1.0): name -> the value a missing one means.
OPTIONAL_COLUMNS = {"block_crc32c": ()}


def fragments_to_table(fragments) -> pa.Table:
    """An Arrow table with one row per fragment (schema :data:`FRAGMENT_SCHEMA`)."""
    cols: dict[str, list] = {name: [] for name in FRAGMENT_SCHEMA.names}
    for f in fragments:
        cols["key"].append(f.key)
        cols["offsets"].append(list(f.box.offsets))
        cols["sizes"].append(list(f.box.sizes))
        cols["flat_start"].append(None if f.flat is None else f.flat.start)
        cols["flat_numel"].append(None if f.flat is None else f.flat.numel)
        cols["dtype"].append(f.dtype)
        cols["rank"].append(f.rank)
        cols["file"].append(f.file)
        cols["byte_offset"].append(f.offset)
        cols["byte_length"].append(f.length)
        cols["crc32c"].append(f.crc32c)
        cols["block_crc32c"].append(list(f.blocks))
    return pa.table(cols, schema=FRAGMENT_SCHEMA)


#: the columns of a fragment table that a save plan fixes (the others are each save's: where in its
#: file each fragment's bytes landed, and their checksums)
FIXED_COLUMNS = ("key", "offsets", "sizes", "flat_start", "flat_numel", "dtype", "rank", "file", "byte_length")


def fixed_columns(rows) -> pa.Table:
    """The :data:`FIXED_COLUMNS` of a fragment table, from ``(key, box, flat, dtype, rank, file,
    length)`` rows: built once per save plan, completed at each save by :func:`with_checksums`."""
    cols: dict[str, list] = {name: [] for name in FIXED_COLUMNS}
    for key, box, flat, dtype, rank, file, length in rows:
        cols["key"].append(key)
        cols["offsets"].append(box.offsets)
        cols["sizes"].append(box.sizes)
        cols["flat_start"].append(None if flat is None else flat.start)
        cols["flat_numel"].append(None if flat is None else flat.numel)
        cols["dtype"].append(dtype)
        cols["rank"].append(rank)
        cols["file"].append(file)
        cols["byte_length"].append(length)
    return pa.table(cols, schema=pa.schema([FRAGMENT_SCHEMA.field(n) for n in FIXED_COLUMNS]))


def with_checksums(fixed: pa.Table, byte_offsets, crcs, block_counts, blocks) -> pa.Table:
    """The whole fragment table: ``fixed`` (:func:`fixed_columns`) and, row by row, the byte offset,
    CRC-32C and block checksums (``block_counts[i]`` of ``blocks``, concatenated) of each fragment."""
    counts = np.asarray(block_counts, dtype=np.int32)
    starts = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=starts[1:])
    cols = {n: fixed.column(n) for n in FIXED_COLUMNS}
    cols["byte_offset"] = pa.array(np.asarray(byte_offsets, dtype=np.int64))
    cols["crc32c"] = pa.array(np.asarray(crcs, dtype=np.uint32))
    cols["block_crc32c"] = pa.ListArray.from_arrays(pa.array(starts), pa.array(np.asarray(blocks, dtype=np.uint32)))
    return pa.table([cols[n] for n in FRAGMENT_SCHEMA.names], schema=FRAGMENT_SCHEMA)


def table_to_fragments(table: pa.Table) -> list[Fragment]:
    """Inverse of :func:`fragments_to_table`; checks the schema's columns and types."""
    names = [n for n in FRAGMENT_SCHEMA.names if n in table.column_names or n not in OPTIONAL_COLUMNS]
    for field in FRAGMENT_SCHEMA:
        if field.name not in table.column_names:
            if field.name in OPTIONAL_COLUMNS:
                continue
            raise FormatError(f"fragment table lacks column {field.name!r}")
        if not table.schema.field(field.name).type.equals(field.type):
            raise FormatError(
                f"fragment table column {field.name!r} has type {table.schema.field(field.name).type}, expected {field.type}"
            )
    cols = {name: table.column(name).to_pylist() for name in names}
    for name, missing in OPTIONAL_COLUMNS.items():
        cols.setdefault(name, [missing] * table.num_rows)
    for name in names:
        if name not in ("flat_start", "flat_numel") and table.column(name).null_count:
            raise FormatError(f"fragment table column {name!r} has empty (null) entries; every fragment needs one")
    out = []
    for i in range(table.num_rows):
        fs, fn = cols["flat_start"][i], cols["flat_numel"][i]
        if (fs is None) != (fn is None):
            raise FormatError(f"fragment table row {i}: flat_start and flat_numel must both be set or both null")
        out.append(
            Fragment(
                key=cols["key"][i],
                box=Box(tuple(cols["offsets"][i]), tuple(cols["sizes"][i])),
                flat=None if fs is None else FlatRange(fs, fn),
                dtype=cols["dtype"][i],
                rank=cols["rank"][i],
                file=cols["file"][i],
                offset=cols["byte_offset"][i],
                length=cols["byte_length"][i],
                crc32c=cols["crc32c"][i],
                blocks=tuple(cols["block_crc32c"][i]),
            )
        )
    return out


def fragments_to_parquet(fragments) -> bytes:
    return table_to_parquet(fragments_to_table(fragments))


def table_to_parquet(table: pa.Table) -> bytes:
    """A fragment table's stored form."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def fragments_from_parquet(data: bytes) -> list[Fragment]:
    # Read on this thread (ParquetFile, not read_table, whose dataset scanner drops its last reference
    # to the file later, on one of arrow's I/O threads) from a buffer arrow owns: freeing a buffer that
    # wraps a Python object takes the GIL, and an arrow thread doing so while the interpreter exits is
    # killed inside a C++ destructor: "terminate called without an active exception", exit 134.
    owned = pa.allocate_buffer(len(data))
    memoryview(owned).cast("B")[:] = data
    try:
        with pq.ParquetFile(pa.BufferReader(owned)) as file:
            table = file.read(use_threads=False)
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"fragment table is not a readable Parquet file: {e}") from e
    return table_to_fragments(table)


# -- the fragment table of format 1.3: sorted, paged, searched by region (ucp.storage.paged) -----------

#: a fragment row of format 1.3: the row of :data:`FRAGMENT_SCHEMA` and its file's size and header
#: checksum (rule 22: a reader of some rows learns of the files it reads from them alone)
PAGED_SCHEMA = pa.schema(list(FRAGMENT_SCHEMA) + [pa.field("file_size", pa.int64()),
                                                  pa.field("file_header_crc32c", pa.uint32())])


def with_files(table: pa.Table, files: dict[str, int], heads: dict[str, int]) -> pa.Table:
    """``table`` (:data:`FRAGMENT_SCHEMA`) with each row's file size and header checksum added."""
    names = table.column("file").to_pylist()
    try:
        sizes = [files[n] for n in names]
        crcs = [heads[n] for n in names]
    except KeyError as e:
        raise FormatError(f"fragment table names file {e.args[0]!r}, whose size or header checksum is not known") from None
    return table.append_column(PAGED_SCHEMA.field("file_size"), pa.array(sizes, pa.int64())).append_column(
        PAGED_SCHEMA.field("file_header_crc32c"), pa.array(crcs, pa.uint32()))


def files_of(table: pa.Table) -> tuple[dict[str, int], dict[str, int]]:
    """The files a table of :data:`PAGED_SCHEMA` rows names: ``(name -> size, name -> header checksum)``.

    Raises:
        FormatError: a column is missing or empty, or two rows disagree about one file.
    """
    for name in ("file", "file_size", "file_header_crc32c"):
        if name not in table.column_names or table.column(name).null_count:
            raise FormatError(f"fragment table lacks column {name!r} or has empty entries in it")
    files: dict[str, int] = {}
    heads: dict[str, int] = {}
    for name, size, crc in zip(*(table.column(c).to_pylist() for c in ("file", "file_size", "file_header_crc32c"))):
        if files.setdefault(name, size) != size or heads.setdefault(name, crc) != crc:
            raise FormatError(f"fragment table rows disagree about the size or header checksum of {name}")
    return files, heads


class SortedRows:
    """A fragment table's rows as arrays, for sorting and for the page summaries of format 1.3.

    Rows are sorted by tensor key, then box offsets, then flat start (docs/format-checkpoint.md
    rule 21); a page's summary names its first and last key and, when all its rows are of one key,
    the bounding box of their boxes (``lo``, ``hi``), and when they are of one box too, that box and
    the span of their flat ranges (``box``, ``flat``): enough for a reader to skip every page that
    holds none of the regions it loads (:class:`RegionQuery`).
    """

    def __init__(self, table: pa.Table):
        self.keys = table.column("key").to_pylist()
        n = table.num_rows
        offsets, sizes = table.column("offsets").combine_chunks(), table.column("sizes").combine_chunks()
        starts = offsets.offsets.to_numpy()
        self.ndim = np.diff(starts)
        dims = int(self.ndim.max()) if n else 0
        self.lo = np.zeros((n, dims), dtype=np.int64)
        self.hi = np.zeros((n, dims), dtype=np.int64)
        flat_off, flat_size = offsets.values.to_numpy(), sizes.values.to_numpy()
        for d in range(dims):
            has = self.ndim > d
            self.lo[has, d] = flat_off[starts[:-1][has] + d]
            self.hi[has, d] = self.lo[has, d] + flat_size[starts[:-1][has] + d]
        fs = table.column("flat_start").combine_chunks()
        self.flat = fs.is_valid().to_numpy(zero_copy_only=False)
        self.flat_lo = fs.fill_null(0).to_numpy()
        self.flat_hi = self.flat_lo + table.column("flat_numel").combine_chunks().fill_null(0).to_numpy()

    def order(self, table: pa.Table) -> np.ndarray:
        """The permutation that sorts the rows (by key, box offsets, flat start)."""
        key_rank = pc.rank(table.column("key"), sort_keys="ascending", tiebreaker="dense").to_numpy()
        columns = [np.where(self.flat, self.flat_lo, -1)] + [self.lo[:, d] for d in reversed(range(self.lo.shape[1]))]
        return np.lexsort(columns + [key_rank])

    def summarize(self, start: int, stop: int) -> dict:
        """The summary of sorted rows ``[start, stop)``."""
        first, last = self.keys[start], self.keys[stop - 1]
        out: dict = {"k": [first, last]}
        if first == last:
            nd = int(self.ndim[start])
            lo, hi = self.lo[start:stop, :nd], self.hi[start:stop, :nd]
            out["lo"], out["hi"] = lo.min(axis=0).tolist(), hi.max(axis=0).tolist()
            if self.flat[start:stop].all() and (lo == lo[0]).all() and (hi == hi[0]).all():
                out["box"] = True
                out["flat"] = [int(self.flat_lo[start:stop].min()), int(self.flat_hi[start:stop].max())]
        return out


def merge_summaries(parts: list[dict]) -> dict:
    """The summary of consecutive pages from theirs (see :class:`SortedRows`)."""
    first, last = parts[0]["k"][0], parts[-1]["k"][1]
    out: dict = {"k": [first, last]}
    if first == last and all("lo" in p for p in parts):
        out["lo"] = [min(v) for v in zip(*(p["lo"] for p in parts))]
        out["hi"] = [max(v) for v in zip(*(p["hi"] for p in parts))]
        if all(p.get("box") and p["lo"] == parts[0]["lo"] and p["hi"] == parts[0]["hi"] for p in parts):
            out["box"] = True
            out["flat"] = [min(p["flat"][0] for p in parts), max(p["flat"][1] for p in parts)]
    return out


class RegionQuery:
    """The regions of a checkpoint's tensors a reader loads: tensor key -> boxes in the key's stored
    index space (None: the whole tensor). :meth:`keep` decides from a page's summary whether the page
    may hold a fragment overlapping them; :meth:`wants` decides for one fragment."""

    def __init__(self, regions: dict[str, list[Box] | None]):
        self.regions = regions
        self.keys = sorted(regions)

    def keep(self, summary: dict) -> bool:
        first, last = summary["k"]
        i = bisect.bisect_left(self.keys, first)
        if i == len(self.keys) or self.keys[i] > last:
            return False
        if first != last or "lo" not in summary:
            return True
        boxes = self.regions[first]
        if boxes is None:
            return True
        span = Box(tuple(summary["lo"]), tuple(h - l for l, h in zip(summary["lo"], summary["hi"])))
        flat = FlatRange(summary["flat"][0], summary["flat"][1] - summary["flat"][0]) if summary.get("box") else None
        return any(_touches(span, flat, q) for q in boxes)

    def wants(self, frag: Fragment) -> bool:
        boxes = self.regions.get(frag.key, ())
        return boxes is None or any(_touches(frag.box, frag.flat, q) for q in boxes)


def _touches(box: Box, flat: FlatRange | None, query: Box) -> bool:
    """Whether the elements of ``box`` (only its flat range ``flat``, if given) may meet ``query``:
    exact for boxes; for a flat range, against the span of flat indices the overlap covers in ``box``."""
    if len(box.offsets) != len(query.offsets):
        return True  # (a malformed row: kept, so that validation names it)
    if not box.offsets:
        return True
    over = box.intersect(query)
    if over is None or not over.numel:
        return False
    if flat is None:
        return True
    first = _ravel(tuple(o - b for o, b in zip(over.offsets, box.offsets)), box.sizes)
    last = _ravel(tuple(o + s - 1 - b for o, s, b in zip(over.offsets, over.sizes, box.offsets)), box.sizes)
    return flat.start <= last and flat.start + flat.numel > first


def _ravel(index: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    at = 0
    for i, n in zip(index, sizes):
        at = at * n + i
    return at
