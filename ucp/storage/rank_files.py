"""One rank's file of a distributed checkpoint, the step directory it goes into, and the
checkpoint's commit: done the same way by a trainer's durable save (:mod:`ucp.checkpoint.save`) and
by an agent writing a snapshot durably (:mod:`ucp.snapshot.persist`); docs/format-checkpoint.md."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

from ucp.errors import UcpError
from ucp.format.box import Box, FlatRange
from ucp.format.dtypes import DTYPES
from ucp.format.manifest import Manifest
from ucp.storage import directory as store
from ucp.storage.atomic import fsync_dir
from ucp.storage.manifest_io import commit_manifest
from ucp.storage.objstore import is_object
from ucp.storage.safetensors_file import Entry, write_file

FORMAT = "ucp.checkpoint"  # a rank file's ``format`` metadata entry


@dataclass(frozen=True)
class RankFragment:
    """A fragment a rank writes: the region ``box`` (and ``flat`` range) of tensor ``key``, ``data``
    its bytes (a contiguous buffer: no copy is made)."""

    key: str
    box: Box
    flat: FlatRange | None
    dtype: str
    data: memoryview


def entry_name(key: str, box: Box, flat: FlatRange | None) -> str:
    """The safetensors entry name of a fragment: its key, box and flat range (format rule 11)."""
    return f"{key}{box}{flat or ''}"


def write_rank_file(directory: Path, rank: int, fragments: list[RankFragment], fsync: bool,
                    metadata: dict | None = None, token: int | None = None) -> tuple[Path, int, list[int], int]:
    """Stream rank ``rank``'s fragments into its file in ``directory`` (``metadata`` added to the
    file's own). With a ``token``, the file is written under a temporary name and renamed: a rank
    file under its own name is then whole (the agents' writes, which another agent's commit reads).
    On an object store it is written under its own name: the object appears whole or not at all.

    Returns:
        (path, file size, each fragment's data offset in the file, CRC-32C of the file's safetensors
        header, which the manifest records: format 1.2).
    """
    entries = [Entry(entry_name(f.key, f.box, f.flat), DTYPES[f.dtype][1],
                     (f.flat.numel,) if f.flat is not None else f.box.sizes, f.data) for f in fragments]
    meta = {"format": FORMAT, "rank": str(rank), **(metadata or {})}
    path = directory / store.rank_file(rank)
    if token is None or is_object(path):  # (an object appears whole when its upload completes: no rename to do)
        size, offsets, head_crc = write_file(path, entries, meta, fsync)
        return path, size, offsets, head_crc
    tmp = directory / f".{path.name}.{token}.tmp"
    try:
        size, offsets, head_crc = write_file(tmp, entries, meta, fsync)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(directory)
    return path, size, offsets, head_crc


def prepare_step(directory: Path, clear_partial: bool) -> bool:
    """Make a step's directory, its entry durable; False when a complete checkpoint of that step is
    there already. ``clear_partial`` removes what a failed save of the same step left (only the
    one writer of the directory may: agents writing a snapshot share it)."""
    if store.is_complete(directory):
        return False
    if clear_partial and directory.exists():
        store.remove_checkpoint(directory)
    if is_object(directory):
        return True  # (an object store has no directories to make)
    if clear_partial or not directory.exists():
        directory.mkdir(parents=True, exist_ok=not clear_partial)  # (a partial that would not go: an error)
        fsync_dir(directory.parent)
    return True


@dataclass(frozen=True)
class Cleared:
    """What a save cleared away before and after writing, for the saver to report."""

    partial: list[Path] = field(default_factory=list)  # incomplete saves removed (failed or killed)
    retired: list[tuple[Path, Path | None]] = field(default_factory=list)  # (checkpoint, moved to; None: deleted)
    pruned: list[Path] = field(default_factory=list)  # removed by retention (``keep``)
    aborted: list[str] = field(default_factory=list)  # orphaned multipart uploads aborted (format rule 33)
    error: OSError | None = None  # retention failed (retried by the next commit)


def prepare_own_step(root: Path, step: int, keep: int | None, saved_here: Collection[int],
                     every_partial: bool = True) -> Cleared:
    """The step directory of a save by the root's single writer (the holder of its lease:
    :mod:`ucp.storage.lease`), made empty and durable.

    A complete checkpoint of ``step`` that this job did not save (``saved_here``) belongs to an
    abandoned run and is retired first (format rule 4b); ``every_partial`` clears every incomplete
    save under the root, of any step (rule 4f): with the lease, none is in flight, and what a failed
    save left (a full disk's worth, say) must not block the next one. Without ``every_partial`` (the
    memory tier's agents may be writing other steps), only a partial of ``step`` is cleared.

    Raises:
        UcpError: this job saved ``step`` already.
        OSError: the storage refused (names the path).
    """
    directory = store.step_dir(root, step)
    cleared = Cleared()
    if store.is_complete(directory):
        if step in saved_here:
            raise UcpError(f"{directory}: a complete checkpoint for this step exists already (this job saved it); "
                           "save under a new step")
        cleared.retired.append((directory, store.retire_checkpoint(directory, keep)))
    if every_partial:
        cleared.partial.extend(store.clear_partials(root))
    elif directory.exists():
        store.remove_checkpoint(directory)
        cleared.partial.append(directory)
    if not is_object(directory):  # (an object store has no directories to make)
        directory.mkdir(parents=True)
        fsync_dir(directory.parent)
    return cleared


def commit_step(directory: Path, manifest: Manifest, table=None) -> None:
    """Make the checkpoint in ``directory`` visible: its manifest committed atomically (after the
    fragment table: ``table``, when the caller built it, see
    :func:`~ucp.storage.manifest_io.commit_manifest`), once every file it lists is there with the
    size its writer reported.

    Raises:
        UcpError: a file is missing or of another size (the ranks do not share the storage, say).
    """
    stored = stored_sizes(directory)
    for name, size in manifest.files.items():
        found = stored.get(name)
        if found != size:
            raise UcpError(f"{directory / name}: {found} bytes on storage, the writing rank reported {size}; "
                           "is the checkpoint root the same storage on every rank?")
    commit_manifest(directory, manifest, table)


def stored_sizes(directory: Path) -> dict[str, int]:
    """``{name: size}`` of the files in ``directory`` (none when it is not there), from one listing: on
    an object store a LIST per 1,000 objects, not two HEADs per file (a commit of 16,384 ranks' files
    would otherwise wait on 32,768 round trips)."""
    if is_object(directory):
        return directory.sizes()
    try:
        with os.scandir(directory) as entries:
            return {e.name: e.stat().st_size for e in entries if e.is_file(follow_symlinks=False)}
    except FileNotFoundError:
        return {}


def apply_retention(root: Path, keep: int | None, step: int, roll_back: bool = True) -> Cleared:
    """After the commit of ``step``: the rollback rule (format rule 4b: complete checkpoints of later
    steps belong to an abandoned run and are retired, whatever ``keep`` is), then retention (keep the
    newest ``keep`` complete checkpoints under ``root``). It never fails a committed checkpoint: an
    error is returned in :attr:`Cleared.error` for the caller to report, and the next commit retries it.

    ``roll_back=False`` (the memory tier's agents, whose durable copies of snapshots may commit after
    a later durable save of the same job) applies retention only: a snapshot's commit never retires
    a later checkpoint.

    On an object store it then aborts the incomplete multipart uploads under the root's step prefixes
    that writers killed mid-upload left (idle for :data:`~ucp.storage.objstore.ORPHAN_AFTER`, format
    rule 33), whatever ``keep`` is."""
    cleared = Cleared()
    try:
        if roll_back:
            cleared.retired.extend(store.roll_back(root, step, keep))
        cleared.pruned.extend(store.prune(root, keep, current=step))
        if is_object(root):
            cleared.aborted.extend(root.abort_orphan_uploads())
    except OSError as e:
        return replace(cleared, error=e)
    return cleared
