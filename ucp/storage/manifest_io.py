"""Reading and committing manifests: the fragment table first, the JSON header last (the commit)."""

from __future__ import annotations

import errno
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ucp.codecs.checksum import crc32c
from ucp.errors import CheckpointDeletedError, CorruptCheckpointError, FormatError, SpecError
from ucp.format.fragment import (PAGED_SCHEMA, RegionQuery, SortedRows, check_file_name, files_of, fragments_from_parquet,
                                 fragments_to_table, merge_summaries, table_to_fragments, with_files)
from ucp.format.manifest import (FORMAT, FORMAT_VERSION, PAGED_MINOR, Manifest, canonical_json, check_version,
                                 header_from_json, header_to_json)
from ucp.format.state_table import (LEAF_ROWS as STATE_LEAF_ROWS, STATE_SCHEMA, StateQuery, StateRows, all_ranks,
                                    merge_state_summaries, rank_entries, rows_of, state_rows)
from ucp.format.values import rank_state
from ucp.storage.atomic import write_atomic
from ucp.storage.directory import FRAGMENT_PAGES, MANIFEST, STATE_PAGES
from ucp.storage.objstore import as_location, is_object
from ucp.storage.paged import PagedFile, write_paged

#: the header field holding the CRC-32C of the rest of the header (its canonical JSON)
HEADER_CRC = "header_crc32c"


def sign_header(header: dict) -> dict:
    """``header`` with :data:`HEADER_CRC` set to the CRC-32C of its canonical JSON (in place)."""
    header[HEADER_CRC] = crc32c(canonical_json(header))
    return header


def check_signed(header: dict, path, what: str, holder: str = "") -> dict:
    """Pop and verify a header's :data:`HEADER_CRC`; ``what`` names the document in errors, and
    ``holder`` the part of the file holding the header when it is not the whole file.

    Raises:
        FormatError: the checksum is absent or not an integer, or the header is not JSON-safe.
        CorruptCheckpointError: the checksum does not match.
    """
    stored = header.pop(HEADER_CRC, None)
    if stored is None:
        raise FormatError(f"{path}: {holder + ' lack' if holder else 'lacks'} '{HEADER_CRC}'")
    if isinstance(stored, bool) or not isinstance(stored, int):
        raise FormatError(f"{path}: {holder + ': ' if holder else ''}'{HEADER_CRC}' is {stored!r}, not an integer")
    try:
        actual = crc32c(canonical_json(header))
    except ValueError as e:
        raise FormatError(f"{path}: {e}") from e
    if actual != stored:
        raise CorruptCheckpointError(f"{path}: {'header ' if holder else ''}checksum mismatch (crc32c {actual:08x}, "
                                     f"recorded {stored:08x}); the {what} is corrupted")
    return header


def commit_manifest(directory: Path, manifest: Manifest, table: pa.Table | None = None) -> None:
    """Write the fragment table and the ranks' state, then atomically commit ``manifest.json``: the
    checkpoint becomes visible (format 1.3: both tables paged, sorted; docs/format-checkpoint.md
    rules 20-27).

    ``table``, when given, is the fragment table (:data:`~ucp.format.fragment.FRAGMENT_SCHEMA`),
    built by the caller (a save's plan, column by column: :func:`ucp.format.fragment.with_checksums`);
    ``manifest`` then carries no fragments of its own."""
    directory = as_location(directory)
    table = fragments_to_table(manifest.fragments) if table is None else table
    table = with_files(table, manifest.files, manifest.file_headers)
    table = table.take(SortedRows(table).order(table))
    rows = SortedRows(table)
    blocks = np.diff(table.column("block_crc32c").combine_chunks().offsets.to_numpy())
    fragments = write_paged(table, rows.summarize, merge_summaries, row_bytes=96 + 4 * blocks)
    states = state_rows(manifest.state.get("ranks", {}))
    state_pages = write_paged(states, StateRows(states).summarize, merge_state_summaries, STATE_LEAF_ROWS,
                              row_bytes=pc.binary_length(states.column("json")).to_numpy(zero_copy_only=False))
    header = manifest.header(fragments.header(FRAGMENT_PAGES), state_pages.header(STATE_PAGES))
    document = header_to_json(sign_header(header))
    if is_object(directory):  # no rename: the manifest's conditional creation is the commit (format rule 28)
        (directory / FRAGMENT_PAGES).write_bytes(fragments.data)
        (directory / STATE_PAGES).write_bytes(state_pages.data)
        if not (directory / MANIFEST).create(document):
            raise FileExistsError(errno.EEXIST, "a manifest is there already (another writer committed this step)",
                                  str(directory / MANIFEST))
        return
    write_atomic(directory / FRAGMENT_PAGES, fragments.data)
    write_atomic(directory / STATE_PAGES, state_pages.data)
    write_atomic(directory / MANIFEST, document)


def gone(directory: Path, what: str) -> CheckpointDeletedError:
    """The error for a checkpoint file found missing when ``manifest.json`` is gone too: retention
    deletes the manifest first (format rule 3), so the checkpoint was deleted while being read."""
    return CheckpointDeletedError(f"{directory}: the checkpoint was deleted (by retention?) while being read: "
                                  f"{what} and {MANIFEST} are gone")


def read_manifest(directory: Path) -> Manifest:
    """Read, check and validate the whole manifest of the checkpoint in ``directory`` (every fragment
    and every rank's state; a loader reads only its part: :func:`open_manifest`).

    Raises:
        CheckpointDeletedError: ``manifest.json`` is not there (any more), or a table is gone and the
            manifest with it (a checkpoint deleted while being read).
        CorruptCheckpointError: a checksum does not match, or a table is missing.
        FormatError: a rule of docs/format-checkpoint.md is broken (named with the manifest's path),
            such as a ``step`` other than the directory's name says.
    """
    stored = open_manifest(directory)
    if stored.whole is not None:
        return stored.whole
    return stored.select(None)


class StoredManifest:
    """A committed checkpoint's manifest as a loader reads it: the header now (checked and
    validated), fragment rows and ranks' state when asked, each read page checked (format 1.3: only
    the pages holding what is asked; before 1.3, the whole manifest is read at once, :attr:`whole`).

    Attributes:
        step, layout, tensors, block_bytes, format_version: from the header.
        whole: the whole :class:`Manifest` (format 1.0-1.2), else None.
        nbytes_read: bytes of the manifest read so far (header and pages).
    """

    def __init__(self, directory: Path, header: dict, nbytes: int, whole: Manifest | None):
        self.directory, self.path = directory, directory / MANIFEST
        self.header = header
        self.whole = whole
        self.nbytes_read = nbytes
        self._base = whole if whole is not None else Manifest.from_header(header, (), {}, {}, {}, cover=False)
        self.step, self.layout, self.tensors = self._base.step, self._base.layout, self._base.tensors
        self.block_bytes, self.format_version = self._base.block_bytes, self._base.format_version
        self._states: dict | None = None

    @contextmanager
    def _table(self, entry: str, schema, file: str):
        """The :class:`PagedFile` of table ``entry`` (in ``file``), open while the block runs; the
        table missing, there or at a page read in the block (an object store asks nothing before the
        first page), is a checkpoint deleted while being read if the manifest is gone too, else
        corruption."""
        meta = self.header.get(entry)
        if not isinstance(meta, dict) or meta.get("file") != file:
            raise FormatError(f"{self.path}: lacks a valid {entry!r} entry (format {self.format_version} names {file})")
        path = self.directory / file
        try:
            with PagedFile(path, meta, schema) as pages:
                yield pages
        except FileNotFoundError:
            if not self.path.exists():
                raise gone(self.directory, file) from None
            raise CorruptCheckpointError(f"{path}: {entry.replace('_', ' ')} is missing") from None

    def select(self, query: RegionQuery | None) -> Manifest:
        """The manifest holding the fragments ``query`` wants (None: all of them, validated as a
        whole), the files they name and the shared state; rank state is asked separately
        (:meth:`rank_state`)."""
        if self.whole is not None:
            return self.whole
        with self._table("fragment_table", PAGED_SCHEMA, FRAGMENT_PAGES) as pages:
            try:
                if query is None:
                    table = pages.read_all()
                else:
                    leaves = pages.select(query.keep)
                    table = pa.Table.from_batches(leaves, schema=PAGED_SCHEMA)
            finally:
                self.nbytes_read += pages.nbytes
        try:
            fragments = table_to_fragments(table)
            if query is not None:
                keep = [i for i, f in enumerate(fragments) if query.wants(f)]
                fragments, table = [fragments[i] for i in keep], table.take(pa.array(keep, type=pa.int64()))
            files, heads = files_of(table)
            ranks = self.all_states() if query is None else {}
            manifest = Manifest.from_header(self.header, fragments, files, heads, ranks, cover=query is None)
            if query is not None:  # keys asked whole: every row of theirs is here, and must cover them
                manifest.check_cover([k for k, boxes in query.regions.items() if boxes is None and k in self.tensors])
            return manifest
        except (FormatError, SpecError) as e:
            raise FormatError(f"{self.path}: {e}") from e

    def _state_rows(self, query: StateQuery | None) -> dict:
        with self._table("state_table", STATE_SCHEMA, STATE_PAGES) as pages:
            try:
                batches = pages.select(query.keep) if query is not None else pages.read_all().to_batches()
            finally:
                self.nbytes_read += pages.nbytes
        return rows_of(batches, str(pages.path))

    def shared_state(self) -> dict:
        """The non-tensor state every rank saved alike (read with the header)."""
        return self._base.state.get("shared", {})

    def rank_state(self, rank: int) -> dict:
        """Rank ``rank``'s view of the non-tensor state: the shared entries overlaid with its own."""
        if self.whole is not None:
            return rank_state(self.whole.state, rank)
        rows = self._state_rows(StateQuery(keys=[("", rank)]))
        held = rows.get(("", rank), {})
        if held and isinstance(held, dict):
            rows.update(self._state_rows(StateQuery(keys=[(name, vid) for name, vid in held.items()
                                                          if isinstance(vid, int)])))
        return {**self._base.state.get("shared", {}), **rank_entries(rows, rank, str(self.directory / STATE_PAGES))}

    def states_of(self, name: str) -> dict:
        """A state as :func:`ucp.state.optimizer.merged_optimizer_state` reads it: the shared value of
        ``name`` and each distinct per-rank value of it (``{"shared": ..., "ranks": ...}``)."""
        shared = {k: v for k, v in self._base.state.get("shared", {}).items() if k == name}
        if self.whole is not None:
            return {"shared": shared, "ranks": {r: {name: v[name]} for r, v in self.whole.state.get("ranks", {}).items()
                                                if name in v}}
        rows = self._state_rows(StateQuery(names=[name]))
        distinct = sorted(n for (nm, n) in rows if nm == name)
        return {"shared": shared, "ranks": {str(i): {name: rows[(name, n)]} for i, n in enumerate(distinct)}}

    def all_states(self) -> dict[str, dict]:
        """Every rank's per-rank state."""
        return all_ranks(self._state_rows(None), str(self.directory / STATE_PAGES))


def manifest_bytes(directory: Path) -> bytes:
    """The bytes of ``manifest.json`` of the checkpoint in ``directory``, unchecked (:func:`open_manifest`
    checks them).

    Raises:
        CheckpointDeletedError: there is none (any more).
    """
    directory = as_location(directory)
    try:
        return (directory / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise CheckpointDeletedError(f"{directory}: no {MANIFEST}; not a complete checkpoint (or one deleted, "
                                     "by retention, while being read)") from None


def open_manifest(directory: Path, data: bytes | None = None) -> StoredManifest:
    """Read and check the header of the checkpoint in ``directory`` (format 1.0-1.2: the whole
    manifest); its fragment rows and ranks' state are read on demand (:class:`StoredManifest`).
    ``data``: the bytes of its ``manifest.json`` already read (:func:`manifest_bytes`, by one rank for
    all), else read here; they are checked all the same.

    Raises:
        as :func:`read_manifest`.
    """
    directory = as_location(directory)
    path = directory / MANIFEST
    data = manifest_bytes(directory) if data is None else data
    header = header_from_json(data, str(path))
    check_signed(header, path, "manifest")
    version = header.get("format_version")
    check_version(version, FORMAT_VERSION, str(path))
    if header.get("format") != FORMAT:
        raise FormatError(f"{path}: not a ucp checkpoint manifest (format is {header.get('format')!r})")
    whole = None if int(version.split(".")[1]) >= PAGED_MINOR else _read_parquet_manifest(directory, path, header)
    named = step_of(directory)
    try:
        stored = StoredManifest(directory, header, len(data), whole)
    except (FormatError, SpecError) as e:
        raise FormatError(f"{path}: {e}") from e
    if named is not None and named != stored.step:
        raise FormatError(f"{path}: holds step {stored.step}, but its directory {directory.name} is step {named}; "
                          "the manifest was edited or moved")
    return stored


def _read_parquet_manifest(directory: Path, path: Path, header: dict) -> Manifest:
    """The whole manifest of format 1.0-1.2: the header and its Parquet fragment table."""
    table_meta = header.get("fragment_table")
    if not isinstance(table_meta, dict) or not isinstance(table_meta.get("file"), str):
        raise FormatError(f"{path}: lacks a valid 'fragment_table' entry")
    try:
        table_path = directory / check_file_name(table_meta["file"])
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from e
    try:
        data = table_path.read_bytes()
    except FileNotFoundError:
        if not path.exists():
            raise gone(directory, table_path.name) from None
        raise CorruptCheckpointError(f"{table_path}: fragment table is missing") from None
    if crc32c(data) != table_meta.get("crc32c"):
        raise CorruptCheckpointError(f"{table_path}: checksum mismatch; the fragment table is corrupted")
    try:
        fragments = fragments_from_parquet(data)
        if len(fragments) != table_meta.get("rows"):
            raise FormatError(f"fragment table has {len(fragments)} rows, manifest says {table_meta.get('rows')}")
        manifest = Manifest.from_header(header, fragments)
        unsigned = sorted(set(manifest.files) - set(manifest.file_headers))
        if unsigned and _minor(manifest.format_version) >= 2:
            raise FormatError(f"format {manifest.format_version} records the header checksum of every data file "
                              f"in 'file_headers', which lacks {unsigned[0]}")
    except (FormatError, SpecError) as e:
        raise FormatError(f"{path}: {e}") from e
    return manifest


def step_of(directory: Path) -> int | None:
    """The step a directory's name says it holds (``step_00000004``: 4), or None for another name."""
    m = re.fullmatch(r"step_([0-9]{8,})", directory.name)  # (the names of ucp.storage.directory.step_dir)
    return int(m.group(1)) if m else None


def _minor(version: str) -> int:
    return int(version.split(".")[1])
