"""Streaming a snapshot from the agent's memory to the durable tier (docs/agent.md section 5).

The durable checkpoint the agents write is the one ``Checkpointer.save`` writes (the distributed
format of docs/format-checkpoint.md), assembled without the trainers:

1. Each agent writes, for each rank of its node, the rank's file ``rank_<r>.safetensors`` into the
   step directory: the fragments the save plan gives that rank (each replicated region is written
   by one holder, as in a durable save), straight from the snapshot's shared memory. The file's
   metadata carries the rank's snapshot header (the fragments written, their checksums, the rank's
   non-tensor state and tensor metadata) and the snapshot's *token*, an id every rank of one cut
   shares. The file is written under a temporary name, fsynced and renamed: a rank file under its
   own name is whole. On an object store (a root such as ``s3://bucket/run``) it is uploaded under its
   own name: a (multipart) upload appears whole when it completes, or not at all.
2. The agent of rank 0's node (the *committer*) waits until every rank's file with the snapshot's
   token is there, builds the manifest from their metadata and commits it (fragment table, then
   ``manifest.json``, atomically: renamed into place on a disk, created by one conditional write,
   ``If-None-Match: *``, on an object store), then applies retention. A stale rank file of an earlier
   attempt at the same step carries another token and is never taken.

Until the manifest is committed the checkpoint is invisible, so a crash at any point leaves the
previous durable checkpoint the newest.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from ucp.codecs.checksum import crc32c
from ucp.errors import CorruptCheckpointError, FormatError, PersistError
from ucp.format.jsonio import parse_json
from ucp.snapshot.header import FragmentRecord, manifest_from_headers
from ucp.storage import directory as store
from ucp.storage.objstore import is_object
from ucp.storage.rank_files import (Cleared, RankFragment, apply_retention, commit_step, entry_name, prepare_step,
                                     write_rank_file)
from ucp.storage.safetensors_file import stored_header

META = "ucp.snapshot"  # the safetensors metadata entry holding the rank's header
_HEADER_FIELDS = ("step", "rank", "world_size", "layout", "tensors", "state", "created_by", "block_bytes")


def prepare(directory: Path) -> bool:
    """Make the step directory; False when a complete checkpoint of that step is there already."""
    return prepare_step(directory, clear_partial=False)  # other agents write into it too


def write_rank(directory: Path, header: dict, data: memoryview, write: list[int], token: int,
               fsync: bool = True) -> Path:
    """Write rank ``header["rank"]``'s file of the snapshot described by ``header`` (its fragments'
    bytes at their offsets in ``data``, the slot's segment): the fragments at indices ``write``,
    and the header in the metadata. Returns the file's path."""
    chosen = [header["fragments"][i] for i in write]
    records = [FragmentRecord.from_dict(f) for f in chosen]
    fragments = [RankFragment(r.key, r.box, r.flat, r.dtype, data[r.offset:r.offset + r.length]) for r in records]
    meta = {k: header[k] for k in _HEADER_FIELDS if k in header}
    meta.update(token=token, fragments=[{k: v for k, v in f.items() if k not in ("file", "offset")} for f in chosen])
    path = write_rank_file(directory, header["rank"], fragments, fsync, {META: json.dumps(meta)}, token)[0]
    return path


def read_rank(path: Path) -> dict | None:
    """The header a rank file carries, its fragments located in the file (``file``, ``offset``) and
    ``file_size`` set; None when the file is not there. ``path`` is a local path or an object."""
    found = _read_rank(path)
    return None if found is None else found[0]


def _read_rank(path) -> tuple[dict, int] | None:
    """:func:`read_rank`, and the CRC-32C of the file's safetensors header (the manifest records it)."""
    try:
        raw, size = stored_header(path)
    except FileNotFoundError:
        return None
    try:
        header = parse_json(raw[8:], f"{path}: header")
    except FormatError as e:
        raise CorruptCheckpointError(str(e)) from None
    start = len(raw)
    raw_meta = header.get("__metadata__", {}).get(META) if isinstance(header, dict) else None
    if raw_meta is None:
        raise PersistError(f"{path}: a rank file without the snapshot header ({META!r}); not written by an agent")
    try:
        meta = parse_json(raw_meta, f"{path}: snapshot header")
    except FormatError as e:
        raise PersistError(str(e)) from None
    fragments = []
    for f in meta["fragments"]:
        r = FragmentRecord.from_dict(f)
        begin, _ = header[entry_name(r.key, r.box, r.flat)]["data_offsets"]
        fragments.append({**f, "file": path.name, "offset": start + begin})
    return {**meta, "fragments": fragments, "file_size": size, "host": ""}, crc32c(raw)


def _arrived(directory, world_size: int, headers: dict, crcs: dict, token: int, seen: dict) -> None:
    """Read the rank files of ``directory`` not yet taken: those carrying ``token`` go into ``headers``
    (and their header checksums into ``crcs``). On an object store, one listing tells which files are
    there and of which version (``seen``: name -> version tag read last), so a poll sends one request,
    plus one read per new or rewritten file; those reads go :data:`READERS` at a time (the committer
    reads every rank's header: at 16,384 ranks, one after another, they would wait on 50,000 round trips)."""
    listing = directory.versions() if is_object(directory) else None
    todo = []
    for r in range(world_size):
        if r in headers:
            continue
        name = store.rank_file(r)
        if listing is not None:
            if name not in listing or seen.get(name) == listing[name]:
                continue
            seen[name] = listing[name]
        todo.append((r, name))
    if not todo:
        return
    with ThreadPoolExecutor(min(READERS, len(todo))) as pool:
        for (r, name), found in zip(todo, pool.map(_read_rank, [directory / name for _, name in todo])):
            if found is not None and found[0].get("token") == token:
                headers[r], crcs[name] = found


#: rank files the committer reads at once (on an object store each is a few round trips)
READERS = 32
#: seconds between two looks for the rank files: a local directory, an object store (a listing a look)
POLL, POLL_OBJECTS = 0.05, 0.25


def commit_when_written(directory: Path, root: Path, step: int, world_size: int, token: int, keep: int | None,
                        timeout: float, abandon=None) -> Cleared | None:
    """Wait (``timeout`` seconds at most, polling; until ``abandon()`` is true, if given) until every
    rank's file of snapshot ``token`` is in ``directory``, then commit the checkpoint of ``step`` and
    apply retention ``keep`` under ``root``. Returns what retention cleared (its ``error`` set when it
    failed: retried by the next commit), or None when a complete checkpoint of that step was there
    already. ``directory`` and ``root`` are local paths or locations on an object store
    (:class:`~ucp.storage.objstore.ObjectPath`), where the commit is the manifest's conditional
    creation (docs/format-checkpoint.md, rule 28)."""
    if store.is_complete(directory):
        return None
    deadline = time.monotonic() + timeout
    headers: dict[int, dict] = {}
    crcs: dict[str, int] = {}
    seen: dict[str, str] = {}
    objects = is_object(directory)
    while True:
        _arrived(directory, world_size, headers, crcs, token, seen)
        if len(headers) == world_size:
            break
        if not objects and not directory.is_dir():  # (an object store has no directory to remove: rule 29)
            raise PersistError(f"{directory}: removed while step {step} waited for its rank files")
        if abandon is not None and abandon():
            raise PersistError(f"{directory}: step {step} not committed: the agent was stopped while it waited for "
                               f"the files of rank(s) {sorted(set(range(world_size)) - set(headers))}")
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(headers))
            raise PersistError(f"{directory}: step {step} not committed: the files of rank(s) {missing} did not "
                               f"arrive within {timeout:g} s (their agents failed or were stopped)")
        time.sleep(POLL_OBJECTS if objects else POLL)
    manifest = manifest_from_headers(list(headers.values()), host="")
    # (the rank files are whole under their names: their headers' checksums, as format 1.2 records them)
    manifest = replace(manifest, file_headers={n: crcs[n] for n in manifest.files})
    if manifest.step != step:
        raise PersistError(f"{directory}: the rank files hold step {manifest.step}, not {step}")
    commit_step(directory, manifest)
    # (its failure is retried by the next commit; no rollback: this job may have saved later steps)
    return apply_retention(root, keep, step, roll_back=False)
