"""Universal checkpoints on disk: a zarr v3 group whose root attributes, written last, commit it.

Layout of a universal checkpoint directory::

    zarr.json                 root group; attributes["ucp"] is the header (written last)
    fragments.parquet         where every source fragment came from
    model/<fqn>/zarr.json     one array per tensor key, with its single shard
    model/<fqn>/c.0.0
    optim/<state>/<fqn>/...

zarr writes the group and array metadata; the shards are written by :mod:`ucp.storage.zarr_shard`.
The header carries a CRC-32C of its canonical JSON and of every array's ``zarr.json``, so a reader
detects a corrupted or foreign file before it trusts a byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ucp.codecs.checksum import crc32c
from ucp.errors import CorruptCheckpointError, FormatError
from ucp.format.fragment import check_file_name, fragments_from_parquet
from ucp.format.manifest import header_from_json
from ucp.format.universal import ArrayMeta, UniversalHeader, shard_shape
from ucp.storage.manifest_io import check_signed, sign_header
from ucp.storage.verify import Report
from ucp.storage.zarr_shard import ZSTD_LEVEL, ShardReader, shard_key

ZARR_JSON = "zarr.json"
FRAGMENT_TABLE = "fragments.parquet"
ROOT_ATTR = "ucp"


def is_universal(path) -> bool:
    """Whether ``path`` is a directory holding a zarr group (complete or not) rather than a ucp manifest."""
    path = Path(path)
    return (path / ZARR_JSON).is_file() and not (path / "manifest.json").exists()


def shard_rel(meta: ArrayMeta) -> str:
    """The shard's path relative to the group's root."""
    return f"{meta.path}/{shard_key(len(meta.shape))}"


def shard_path(root: Path, meta: ArrayMeta) -> Path:
    return Path(root) / shard_rel(meta)


#: chunk keys are ``c.0.0``: the shard sits in the array's directory, no ``c/0/`` directories
CHUNK_SEPARATOR = "."
_GROUP = {"zarr_format": 3, "node_type": "group", "attributes": {}}


def array_document(key: str, a: ArrayMeta) -> dict:
    """The zarr v3 ``zarr.json`` of a tensor's array: what zarr-python's ``create_array`` writes for
    these codecs (a test holds the two equal), built directly because zarr takes milliseconds per
    array to write it (0.5-0.9 s of a 1 GB, 208-key conversion, measured)."""
    dtype = np.dtype(a.stored_dtype)
    serializer = {"name": "bytes"} if dtype.itemsize == 1 else {"name": "bytes", "configuration": {"endian": "little"}}
    inner = [serializer] + ([{"name": "zstd", "configuration": {"level": ZSTD_LEVEL, "checksum": False}}]
                            if a.compressor == "zstd" else []) + [{"name": "crc32c"}]
    fill = False if dtype.kind == "b" else [0.0, 0.0] if dtype.kind == "c" else 0.0 if dtype.kind == "f" else 0
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
        "attributes": {ROOT_ATTR: {"key": key, "dtype": a.dtype}},
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


def create_arrays(put, arrays: dict[str, ArrayMeta]) -> dict[str, ArrayMeta]:
    """Write the root group, the groups above the arrays and every array's metadata (no data yet)
    through ``put(relative path, bytes)`` (see :func:`local_put`); returns the metas with their
    ``zarr.json`` checksums filled in. The root's header comes last, from :func:`header_document`."""
    if isinstance(put, (str, Path)):
        put = local_put(put)
    group_bytes = json.dumps(_GROUP, indent=2).encode()
    put(ZARR_JSON, group_bytes)
    groups = set()
    out = {}
    for key, a in arrays.items():
        parts = a.path.split("/")
        for i in range(1, len(parts)):
            group = "/".join(parts[:i])
            if group not in groups:
                put(f"{group}/{ZARR_JSON}", group_bytes)
                groups.add(group)
        meta_bytes = json.dumps(array_document(key, a), indent=2, allow_nan=False).encode()
        put(f"{a.path}/{ZARR_JSON}", meta_bytes)
        out[key] = ArrayMeta(a.path, a.shape, a.dtype, a.chunks, a.pattern, a.compressor, crc32c(meta_bytes))
    return out


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
    """Read, check and validate a universal checkpoint's header."""
    root = Path(root)
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


def array_reader(root: Path, key: str, meta: ArrayMeta) -> ShardReader:
    """A reader of one array's regions (raw stored dtype: bfloat16 comes back as uint16)."""
    return ShardReader(shard_path(root, meta), meta.shape, meta.chunks, np.dtype(meta.stored_dtype), meta.compressor, key)


@dataclass
class UniversalReport(Report):
    """A universal checkpoint's :class:`~ucp.storage.verify.Report`, with the arrays checked."""

    arrays: int = 0


def verify_universal(root: Path, header: UniversalHeader, progress: Callable[[int], None] | None = None) -> UniversalReport:
    """Check the fragment table, every array's metadata checksum and every chunk's CRC-32C."""
    report = UniversalReport(Path(root))
    try:
        read_fragments(root, header)
    except (CorruptCheckpointError, FormatError) as e:
        report.problems.append(str(e))
    for key, meta in header.tensors.items():
        report.arrays += 1
        mpath = Path(root) / meta.path / ZARR_JSON
        try:
            meta_bytes = mpath.read_bytes()
        except FileNotFoundError:
            report.problems.append(f"{mpath}: missing (array of {key})")
            continue
        if crc32c(meta_bytes) != meta.metadata_crc32c:
            report.problems.append(f"{mpath}: metadata checksum mismatch for {key}; the array metadata is corrupted")
            continue
        try:
            stored = json.loads(meta_bytes)
        except ValueError:
            stored = None
        if stored != array_document(key, meta):
            report.problems.append(f"{mpath}: the array metadata of {key} disagrees with the checkpoint header "
                                   "(shape, data type, chunks, codecs or dtype); the header or the array is not ucp's")
            continue
        reader = array_reader(root, key, meta)
        try:
            report.problems += reader.verify(progress)
        finally:
            reader.close()
        report.nbytes += meta.nbytes
    return report
