"""Reading and committing manifests: the fragment table first, the JSON header last (the commit)."""

from __future__ import annotations

import re
from pathlib import Path

from ucp.codecs.checksum import crc32c
from ucp.errors import CheckpointDeletedError, CorruptCheckpointError, FormatError, SpecError
from ucp.format.fragment import check_file_name, fragments_from_parquet, fragments_to_parquet
from ucp.format.manifest import Manifest, canonical_json, header_from_json, header_to_json
from ucp.storage.atomic import write_atomic
from ucp.storage.directory import FRAGMENT_TABLE, MANIFEST

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


def commit_manifest(directory: Path, manifest: Manifest, table: tuple[bytes, int] | None = None) -> None:
    """Write the fragment table, then atomically commit ``manifest.json``: the checkpoint becomes visible.

    ``table``, when given, is the stored fragment table and its row count, built by the caller
    (a save's plan, column by column: :func:`ucp.format.fragment.with_checksums`); ``manifest`` then
    carries no fragments of its own."""
    directory = Path(directory)
    data, rows = (fragments_to_parquet(manifest.fragments), len(manifest.fragments)) if table is None else table
    write_atomic(directory / FRAGMENT_TABLE, data)
    header = manifest.header({"file": FRAGMENT_TABLE, "crc32c": crc32c(data), "rows": rows})
    write_atomic(directory / MANIFEST, header_to_json(sign_header(header)))


def gone(directory: Path, what: str) -> CheckpointDeletedError:
    """The error for a checkpoint file found missing when ``manifest.json`` is gone too: retention
    deletes the manifest first (format rule 3), so the checkpoint was deleted while being read."""
    return CheckpointDeletedError(f"{directory}: the checkpoint was deleted (by retention?) while being read: "
                                  f"{what} and {MANIFEST} are gone")


def read_manifest(directory: Path) -> Manifest:
    """Read, check and validate the manifest of the checkpoint in ``directory``.

    Raises:
        CheckpointDeletedError: ``manifest.json`` is not there (any more), or the fragment table is
            gone and the manifest with it (a checkpoint deleted while being read).
        CorruptCheckpointError: a checksum does not match, or the fragment table is missing.
        FormatError: a rule of docs/format-checkpoint.md is broken (named with the manifest's path),
            such as a ``step`` other than the directory's name says.
    """
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        header = header_from_json(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise CheckpointDeletedError(f"{directory}: no {MANIFEST}; not a complete checkpoint (or one deleted, "
                                     "by retention, while being read)") from None
    check_signed(header, path, "manifest")
    table_meta = header.get("fragment_table")
    if not isinstance(table_meta, dict) or not isinstance(table_meta.get("file"), str):
        raise FormatError(f"{path}: lacks a valid 'fragment_table' entry")

    table_path = directory / check_file_name(table_meta["file"])
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
    named = step_of(directory)
    if named is not None and named != manifest.step:
        raise FormatError(f"{path}: holds step {manifest.step}, but its directory {directory.name} is step {named}; "
                          "the manifest was edited or moved")
    return manifest


def step_of(directory: Path) -> int | None:
    """The step a directory's name says it holds (``step_00000004``: 4), or None for another name."""
    m = re.fullmatch(r"step_([0-9]{8,})", directory.name)  # (the names of ucp.storage.directory.step_dir)
    return int(m.group(1)) if m else None


def _minor(version: str) -> int:
    return int(version.split(".")[1])
