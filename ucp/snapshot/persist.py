"""Streaming a snapshot from the agent's memory to the durable tier (docs/agent.md section 5).

The durable checkpoint the agents write is the one ``Checkpointer.save`` writes (the distributed
format of docs/format-checkpoint.md), assembled without the trainers:

1. Each agent writes, for each rank of its node, the rank's file ``rank_<r>.safetensors`` into the
   step directory: the fragments the save plan gives that rank (each replicated region is written
   by one holder, as in a durable save), straight from the snapshot's shared memory. The file's
   metadata carries the rank's snapshot header (the fragments written, their checksums, the rank's
   non-tensor state and tensor metadata) and the snapshot's *token*, an id every rank of one cut
   shares. The file is written under a temporary name, fsynced and renamed: a rank file under its
   own name is whole.
2. The agent of rank 0's node (the *committer*) waits until every rank's file with the snapshot's
   token is there, builds the manifest from their metadata and commits it (fragment table, then
   ``manifest.json``, atomically), then applies retention. A stale rank file of an earlier attempt
   at the same step carries another token and is never taken.

Until the manifest is committed the checkpoint is invisible, so a crash at any point leaves the
previous durable checkpoint the newest.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ucp.errors import UcpError
from ucp.spec.box import Box, FlatRange
from ucp.spec.dtypes import DTYPES
from ucp.storage import directory as store
from ucp.storage.atomic import fsync_dir
from ucp.storage.manifest_io import commit_manifest
from ucp.storage.safetensors_file import Entry, read_header, write_file

META = "ucp.snapshot"  # the safetensors metadata entry holding the rank's header
_HEADER_FIELDS = ("step", "rank", "world_size", "layout", "tensors", "state", "created_by")


class PersistError(UcpError):
    """The agent could not write a snapshot to the durable tier; the snapshot stays in memory."""


def entry_name(fragment: dict) -> str:
    """The safetensors entry name of a fragment, as a durable save names it."""
    flat = "" if fragment["flat"] is None else str(FlatRange(*fragment["flat"]))
    return f"{fragment['key']}{Box(tuple(fragment['offsets']), tuple(fragment['sizes']))}{flat}"


def prepare(directory: Path) -> bool:
    """Make the step directory; False when a complete checkpoint of that step is there already."""
    if store.is_complete(directory):
        return False
    if not directory.exists():
        directory.mkdir(parents=True, exist_ok=True)
        fsync_dir(directory.parent)
    return True


def write_rank(directory: Path, header: dict, data: memoryview, write: list[int], token: int,
               fsync: bool = True) -> Path:
    """Write rank ``header["rank"]``'s file of the snapshot described by ``header`` (its fragments'
    bytes at their offsets in ``data``, the slot's segment): the fragments at indices ``write``,
    and the header in the metadata. Returns the file's path."""
    fragments = header["fragments"]
    chosen = [fragments[i] for i in write]
    entries = []
    for f in chosen:
        shape = (f["flat"][1],) if f["flat"] is not None else tuple(f["sizes"])
        entries.append(Entry(entry_name(f), DTYPES[f["dtype"]][1], shape, data[f["offset"]:f["offset"] + f["length"]]))
    kept = [{k: v for k, v in f.items() if k not in ("file", "offset")} for f in chosen]
    meta = {k: header[k] for k in _HEADER_FIELDS if k in header}
    meta.update(token=token, fragments=kept)
    rank = header["rank"]
    name = store.rank_file(rank)
    tmp = directory / f".{name}.{token}.tmp"
    try:
        write_file(tmp, entries, {"format": "ucp.checkpoint", "rank": str(rank), META: json.dumps(meta)}, fsync)
        os.replace(tmp, directory / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(directory)
    return directory / name


def read_rank(path: Path) -> dict | None:
    """The header a rank file carries, its fragments located in the file (``file``, ``offset``) and
    ``file_size`` set; None when the file is not there."""
    try:
        header, start = read_header(path)
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    raw = header.get("__metadata__", {}).get(META)
    if raw is None:
        raise PersistError(f"{path}: a rank file without the snapshot header ({META!r}); not written by an agent")
    meta = json.loads(raw)
    fragments = []
    for f in meta["fragments"]:
        begin, _ = header[entry_name(f)]["data_offsets"]
        fragments.append({**f, "file": path.name, "offset": start + begin})
    return {**meta, "fragments": fragments, "file_size": size, "host": ""}


def commit_when_written(directory: Path, root: Path, step: int, world_size: int, token: int, keep: int | None,
                        timeout: float, abandon=None) -> bool:
    """Wait (``timeout`` seconds at most, polling; until ``abandon()`` is true, if given) until every
    rank's file of snapshot ``token`` is in ``directory``, then commit the checkpoint of ``step`` and
    apply retention ``keep`` under ``root``. Returns False when a complete checkpoint of that step was
    there already."""
    from ucp.snapshot.memory import manifest_from_headers

    if store.is_complete(directory):
        return False
    deadline = time.monotonic() + timeout
    headers: dict[int, dict] = {}
    while True:
        for r in range(world_size):
            if r not in headers:
                h = read_rank(directory / store.rank_file(r))
                if h is not None and h.get("token") == token:
                    headers[r] = h
        if len(headers) == world_size:
            break
        if not directory.is_dir():
            raise PersistError(f"{directory}: removed while step {step} waited for its rank files")
        if abandon is not None and abandon():
            raise PersistError(f"{directory}: step {step} not committed: the agent was stopped while it waited for "
                               f"the files of rank(s) {sorted(set(range(world_size)) - set(headers))}")
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(headers))
            raise PersistError(f"{directory}: step {step} not committed: the files of rank(s) {missing} did not "
                               f"arrive within {timeout:g} s (their agents failed or were stopped)")
        time.sleep(0.05)
    manifest = manifest_from_headers(list(headers.values()), host="")
    if manifest.step != step:
        raise PersistError(f"{directory}: the rank files hold step {manifest.step}, not {step}")
    commit_manifest(directory, manifest)
    try:
        store.prune(root, keep, current=step)
    except OSError:
        pass  # retention never fails a checkpoint that is committed; the next commit retries it
    return True
