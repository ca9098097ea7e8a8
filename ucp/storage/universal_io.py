"""Universal checkpoints on disk: a zarr v3 group whose root attributes, written last, commit it.

Layout of a universal checkpoint directory::

    zarr.json                 root group; attributes["ucp"] is the header (written last)
    fragments.parquet         where every source fragment came from
    model/<fqn>/zarr.json     one array per tensor key, with its single shard
    model/<fqn>/c.0.0
    optim/<state>/<fqn>/...

ucp writes the group and array metadata as zarr-python would, and the shards through
:mod:`ucp.storage.zarr_shard`. Every byte a reader trusts is bound to the signed header: the header
carries a CRC-32C of its canonical JSON and of every array's ``zarr.json``; each ``zarr.json``
names its tensor key and records the CRC-32C of each of its shard's chunks (format 1.1), so a
corrupted file, a ``zarr.json`` or a shard moved from another array, and a chunk moved inside its
shard are each refused, naming the file. The groups' ``zarr.json`` files are one fixed document,
which ``verify`` compares byte for byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from ucp.codecs.checksum import crc32c
from ucp.errors import CorruptCheckpointError, FormatError
from ucp.format.fragment import check_file_name, fragments_from_parquet
from ucp.format.jsonio import parse_json
from ucp.format.manifest import header_from_json
from ucp.format.universal import ArrayMeta, UniversalHeader, shard_shape
from ucp.storage.objstore import as_location
from ucp.storage.manifest_io import check_signed, sign_header
from ucp.storage.verify import Report
from ucp.storage.zarr_shard import ZSTD_LEVEL, ShardReader, chunk_count, shard_key

ZARR_JSON = "zarr.json"
FRAGMENT_TABLE = "fragments.parquet"
ROOT_ATTR = "ucp"
#: the attribute of an array's ``zarr.json`` (under ``ucp``) listing its chunks' CRC-32C in grid order
CHUNK_CRCS = "chunk_crc32c"


def is_universal(path) -> bool:
    """Whether ``path`` is a directory holding a zarr group (complete or not) rather than a ucp manifest."""
    path = as_location(path)
    return (path / ZARR_JSON).is_file() and not (path / "manifest.json").exists()


def shard_rel(meta: ArrayMeta) -> str:
    """The shard's path relative to the group's root."""
    return f"{meta.path}/{shard_key(len(meta.shape))}"


def shard_path(root: Path, meta: ArrayMeta) -> Path:
    return as_location(root) / str(shard_rel(meta))


#: chunk keys are ``c.0.0``: the shard sits in the array's directory, no ``c/0/`` directories
CHUNK_SEPARATOR = "."
_GROUP = {"zarr_format": 3, "node_type": "group", "attributes": {}}
#: the exact bytes of every group's ``zarr.json`` but the root's (``verify`` compares them byte for byte)
GROUP_DOCUMENT = json.dumps(_GROUP, indent=2).encode()


def array_document(key: str, a: ArrayMeta, chunk_crcs: Sequence[int] | None = None) -> dict:
    """The zarr v3 ``zarr.json`` of a tensor's array: what zarr-python's ``create_array`` writes for
    these codecs (a test holds the two equal), built directly because zarr takes milliseconds per
    array to write it (0.5-0.9 s of a 1 GB, 208-key conversion, measured). ``chunk_crcs`` (the
    shard's chunk checksums in grid order, :attr:`~ucp.storage.zarr_shard.WrittenShard.chunk_crc32c`)
    go into its ``ucp`` attribute; None leaves them out (a format 1.0 document)."""
    dtype = np.dtype(a.stored_dtype)
    serializer = {"name": "bytes"} if dtype.itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}
    inner = [serializer] + ([{"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}]
                            if a.compressor == "zstd" else []) + [{"name": "crc32c"}]
    fill = False if dtype.kind == "b" else [0.0, 0.0] if dtype.kind == "c" else 0.0 if dtype.kind == "f" else 0
    attrs = {"key": key, "dtype": a.dtype}
    if chunk_crcs is not None:
        attrs[CHUNK_CRCS] = [int(c) for c in chunk_crcs]
    return {
        "shape": list(a.shape),
        "data_type": a.stored_dtype,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shard_shape(a.shape, a.chunks))}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": CHUNK_SEPARATOR}},
        "fill_value": fill,
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": list(a.chunks), "codecs": inner,
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end"}}],
        "attributes": {ROOT_ATTR: attrs},
        "zarr_format": 3,
        "node_type": "array",
        "storage_transformers": [],
    }


def local_put(root: Path):
    """``put(relative path, bytes)`` writing under the local directory ``root`` (parents created)."""
    root = Path(root)

    def put(rel: str, data: bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return put


def group_paths(arrays: Iterable[ArrayMeta]) -> list[str]:
    """The groups above ``arrays`` (``model``, ``optim``, ``optim/exp_avg``, ...), parents first;
    the root (``""``) not included."""
    groups: dict[str, None] = {}
    for a in arrays:
        parts = a.path.split("/")
        for i in range(1, len(parts)):
            groups["/".join(parts[:i])] = None
    return sorted(groups, key=lambda g: (g.count("/"), g))


def create_groups(put, arrays: Iterable[ArrayMeta]) -> None:
    """Write the root group (without the header: :func:`header_document` comes last) and the groups
    above ``arrays`` through ``put(relative path, bytes)`` (see :func:`local_put`)."""
    if isinstance(put, (str, Path)):
        put = local_put(put)
    put(ZARR_JSON, GROUP_DOCUMENT)
    for group in group_paths(arrays):
        put(f"{group}/{ZARR_JSON}", GROUP_DOCUMENT)


def put_array(put, key: str, a: ArrayMeta, chunk_crcs: Sequence[int]) -> ArrayMeta:
    """Write the ``zarr.json`` of ``key``'s array once its shard is written (``chunk_crcs``: the
    shard's chunk checksums, as :func:`~ucp.storage.zarr_shard.write_shard` returned them); returns
    ``a`` with the document's checksum, which the header then records."""
    if isinstance(put, (str, Path)):
        put = local_put(put)
    if len(chunk_crcs) != chunk_count(a.shape, a.chunks):
        raise ValueError(f"{key}: {len(chunk_crcs)} chunk checksums for {chunk_count(a.shape, a.chunks)} chunks")
    meta_bytes = json.dumps(array_document(key, a, chunk_crcs), indent=2, allow_nan=False).encode()
    put(f"{a.path}/{ZARR_JSON}", meta_bytes)
    return ArrayMeta(a.path, a.shape, a.dtype, a.chunks, a.pattern, a.compressor, crc32c(meta_bytes))


def header_document(header: UniversalHeader) -> bytes:
    """The root group's ``zarr.json`` carrying the header (with its checksum): written last, it
    commits the checkpoint."""
    doc = sign_header(header.to_dict())
    return json.dumps({**_GROUP, "attributes": {ROOT_ATTR: doc}}, indent=1, allow_nan=False).encode()


def fsync_tree(root: Path, threads: int = 8) -> None:
    """Make every file and directory entry under ``root`` durable (zarr itself does not fsync).

    Everything is fsynced from ``threads`` threads: the filesystem then commits their journal
    entries together, where one by one hundreds of small files cost a journal commit each. (The
    order does not matter: nothing under ``root`` is visible until the caller renames it, after
    this returns.)"""
    from concurrent.futures import ThreadPoolExecutor

    def sync(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    paths = []
    for dirpath, _, names in os.walk(root):
        paths.append(dirpath)
        paths.extend(os.path.join(dirpath, name) for name in names)
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(paths))), thread_name_prefix="ucp-fsync") as pool:
        list(pool.map(sync, paths))


def read_header(root: Path) -> UniversalHeader:
    """Read, check and validate a universal checkpoint's header (a local directory, or a URL)."""
    root = as_location(root)
    path = root / ZARR_JSON
    try:
        group = header_from_json(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise FormatError(f"{root}: no {ZARR_JSON}; not a universal checkpoint") from None
    doc = group.get("attributes", {}).get(ROOT_ATTR) if isinstance(group.get("attributes"), dict) else None
    if group.get("zarr_format") != 3 or group.get("node_type") != "group":
        raise FormatError(f"{path}: not a zarr v3 group")
    if not isinstance(doc, dict):
        raise FormatError(f"{root}: a zarr group without ucp attributes; not a complete universal checkpoint")
    doc = check_signed(dict(doc), path, "group metadata", holder="the ucp attributes")
    try:
        return UniversalHeader.from_dict(doc)
    except FormatError as e:
        raise FormatError(f"{root}: {e}") from e


def read_fragments(root: Path, header: UniversalHeader) -> list:
    """The source fragment table, checksum verified."""
    path = Path(root) / check_file_name(header.fragment_table["file"])
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: fragment table is missing") from None
    if crc32c(data) != header.fragment_table["crc32c"]:
        raise CorruptCheckpointError(f"{path}: checksum mismatch; the fragment table is corrupted")
    frags = fragments_from_parquet(data)
    if len(frags) != header.fragment_table["rows"]:
        raise FormatError(f"{path}: {len(frags)} rows, the header says {header.fragment_table['rows']}")
    return frags


def array_crcs(root: Path, key: str, meta: ArrayMeta) -> tuple[int, ...] | None:
    """Read ``key``'s ``zarr.json``, check it against the header entry ``meta``, and return the
    CRC-32C its writer recorded for each chunk (None: a format 1.0 document, which records none).

    Its bytes must match the header's ``metadata_crc32c`` (so it is the document written for this
    key: it names the key), and it must be the document ucp writes for ``meta`` (shape, data type,
    chunks, codecs, key and dtype attributes) with one checksum per chunk.

    Raises:
        CorruptCheckpointError: the file is missing or its checksum does not match the header's.
        FormatError: it matches the header's checksum but disagrees with the header's entry.
    """
    path = as_location(root) / f"{meta.path}/{ZARR_JSON}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing (the array metadata of {key})") from None
    got = crc32c(data)
    if got != meta.metadata_crc32c:
        raise CorruptCheckpointError(
            f"{path}: metadata checksum mismatch for {key} (crc32c {got:08x}, the header records "
            f"{meta.metadata_crc32c:08x}); the array metadata is corrupted or belongs to another array")
    doc = parse_json(data, str(path))
    attrs = doc.get("attributes") if isinstance(doc, dict) else None
    ours = attrs.get(ROOT_ATTR) if isinstance(attrs, dict) else None
    crcs = ours.get(CHUNK_CRCS) if isinstance(ours, dict) else None
    n = chunk_count(meta.shape, meta.chunks)
    if crcs is not None and not (isinstance(crcs, list) and len(crcs) == n and all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 2**32 for c in crcs)):
        raise FormatError(f"{path}: '{CHUNK_CRCS}' of {key} must list {n} CRC-32C value(s), one per chunk")
    if doc != array_document(key, meta, crcs):
        raise FormatError(f"{path}: the array metadata of {key} disagrees with the checkpoint header (shape, data "
                          "type, chunks, codecs or dtype); the header or the array is not ucp's")
    return None if crcs is None else tuple(crcs)


def array_reader(root: Path, key: str, meta: ArrayMeta) -> ShardReader:
    """A reader of one array's regions (raw stored dtype: bfloat16 comes back as uint16), its
    ``zarr.json`` checked first (:func:`array_crcs`): every chunk it reads is checked to be the one
    recorded for its position of this array.

    Raises:
        CorruptCheckpointError, FormatError: as :func:`array_crcs`.
    """
    expected = array_crcs(root, key, meta)
    return ShardReader(shard_path(root, meta), meta.shape, meta.chunks, np.dtype(meta.stored_dtype), meta.compressor,
                       key, expected)


@dataclass
class UniversalReport(Report):
    """A universal checkpoint's :class:`~ucp.storage.verify.Report`, with the arrays checked."""

    arrays: int = 0


def verify_groups(root: Path, header: UniversalHeader) -> list[str]:
    """One line per group ``zarr.json`` (all but the root's) that is missing or is not
    :data:`GROUP_DOCUMENT` byte for byte."""
    problems = []
    for group in group_paths(header.tensors.values()):
        path = Path(root) / group / ZARR_JSON
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            problems.append(f"{path}: missing (the zarr group {group})")
            continue
        if data != GROUP_DOCUMENT:
            problems.append(f"{path}: not the group document ucp writes (zarr v3 group, no attributes); the group "
                            "metadata is corrupted or was changed")
    return problems


def verify_universal(root: Path, header: UniversalHeader, progress: Callable[[int], None] | None = None) -> UniversalReport:
    """Check the fragment table, the groups' metadata, every array's metadata against the header,
    and every chunk's CRC-32C against its own and against the one its array's metadata records."""
    report = UniversalReport(Path(root))
    try:
        read_fragments(root, header)
    except (CorruptCheckpointError, FormatError) as e:
        report.problems.append(str(e))
    report.problems += verify_groups(root, header)
    for key, meta in header.tensors.items():
        report.arrays += 1
        try:
            reader = array_reader(root, key, meta)
        except (CorruptCheckpointError, FormatError) as e:
            report.problems.append(str(e))
            continue
        try:
            report.problems += reader.verify(progress)
        finally:
            reader.close()
        report.nbytes += meta.nbytes
    return report
