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
import time
from dataclasses import replace
from pathlib import Path

from ucp.errors import FormatError, PersistError
from ucp.format.jsonio import parse_json
from ucp.snapshot.header import FragmentRecord, manifest_from_headers
from ucp.storage import directory as store
from ucp.storage.rank_files import RankFragment, apply_retention, commit_step, entry_name, prepare_step, write_rank_file
from ucp.storage.safetensors_file import header_checksum, read_header

META = "ucp.snapshot"  # the safetensors metadata entry holding the rank's header
_HEADER_FIELDS = ("step", "rank", "world_size", "layout", "tensors", "state", "created_by")


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
    ``file_size`` set; None when the file is not there."""
    try:
        header, start = read_header(path)
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    raw = header.get("__metadata__", {}).get(META)
    if raw is None:
        raise PersistError(f"{path}: a rank file without the snapshot header ({META!r}); not written by an agent")
    try:
        meta = parse_json(raw, f"{path}: snapshot header")
    except FormatError as e:
        raise PersistError(str(e)) from None
    fragments = []
    for f in meta["fragments"]:
        r = FragmentRecord.from_dict(f)
        begin, _ = header[entry_name(r.key, r.box, r.flat)]["data_offsets"]
        fragments.append({**f, "file": path.name, "offset": start + begin})
    return {**meta, "fragments": fragments, "file_size": size, "host": ""}


def commit_when_written(directory: Path, root: Path, step: int, world_size: int, token: int, keep: int | None,
                        timeout: float, abandon=None) -> bool:
    """Wait (``timeout`` seconds at most, polling; until ``abandon()`` is true, if given) until every
    rank's file of snapshot ``token`` is in ``directory``, then commit the checkpoint of ``step`` and
    apply retention ``keep`` under ``root``. Returns False when a complete checkpoint of that step was
    there already."""
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
    # (the rank files are whole under their names: their headers' checksums, as format 1.2 records them)
    manifest = replace(manifest, file_headers={n: header_checksum(directory / n) for n in manifest.files})
    if manifest.step != step:
        raise PersistError(f"{directory}: the rank files hold step {manifest.step}, not {step}")
    commit_step(directory, manifest)
    # (its failure is retried by the next commit; no rollback: this job may have saved later steps)
    apply_retention(root, keep, step, roll_back=False)
    return True
