"""A durable save: the training state of every rank written as a distributed checkpoint, in named
collective phases (docs/architecture.md, "A save"): capture, compare, plan, prepare, write, commit.

A rank that dies or fails in any phase leaves no manifest: the previous checkpoint stays the newest
complete one. Rank 0 writes under the root's writer lease (:mod:`ucp.storage.lease`: one job saves
into a root), clears what failed saves left before it writes, and after a failure clears its own
partial directory; after the commit, checkpoints of later steps (an abandoned run's) are retired
(docs/format-checkpoint.md, rules 4-4f).
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ucp import __version__
from ucp.checkpoint.results import SaveResult
from ucp.codecs.checksum import fragment_checksums
from ucp.errors import StorageError, UcpError
from ucp.format.fragment import Fragment
from ucp.format.manifest import BLOCK_BYTES, Manifest
from ucp.format.values import split_state
from ucp.plan.save_plan import PieceInfo, assign_writers, merge_metas, replicated_regions
from ucp.state.tensors import bytes_view, staged
from ucp.storage import directory as store
from ucp.storage.rank_files import (Cleared, RankFragment, apply_retention, commit_step, prepare_own_step,
                                    write_rank_file)


def save_durable(ckpt, step: int, extras: dict | None) -> SaveResult:
    """Write the checkpoint of ``step`` under ``ckpt.root`` (a :class:`~ucp.Checkpointer`; every
    rank calls this together); visible only once every rank's data is durable."""
    t0 = time.perf_counter()
    coll, rank = ckpt.coll, ckpt.coll.rank
    directory = store.step_dir(ckpt.root, step)
    local: dict = {}

    def capture():
        pieces, state = ckpt.capture(extras)
        metas = {p.key: p.meta for p in pieces}
        pieces = [p for p in pieces if p.numel]  # empty shards (uneven splits) hold nothing
        buffers = [staged(p.data) for p in pieces]
        local.update(pieces=pieces, buffers=buffers, views=[bytes_view(b) for b in buffers])
        infos = [PieceInfo(p.key, p.box, p.flat, p.meta.dtype, v.nbytes) for p, v in zip(pieces, local["views"])]
        return infos, metas, state, ckpt.layout, (step, str(ckpt.root.resolve()))

    gathered = coll.phase("capture", capture)
    infos_by_rank = [g[0] for g in gathered]
    layouts = {g[3] for g in gathered}
    targets = {g[4] for g in gathered}
    shared = replicated_regions(infos_by_rank)

    def compare():
        # Only copies held by several ranks need checksums now; the rest are summed while written.
        todo = [i for i, info in enumerate(infos_by_rank[rank]) if info.region in shared]
        with ThreadPoolExecutor(ckpt.options.io_threads) as pool:
            return dict(zip(todo, pool.map(fragment_checksums, [local["views"][i] for i in todo])))

    early = coll.phase("compare", compare)  # per rank {piece: (crc, block crcs)}
    infos_by_rank = [[replace(info, crc32c=early[r][i][0] if i in early[r] else None) for i, info in enumerate(infos)]
                     for r, infos in enumerate(infos_by_rank)]

    def plan():
        if len(targets) > 1:
            seen = {r: g[4] for r, g in enumerate(gathered)}
            raise UcpError(f"ranks disagree about what to save (step, root): {seen}; every rank must call "
                           "save() with the same step on the same checkpoint root")
        if len(layouts) > 1:
            raise UcpError(f"ranks disagree about the layout: {sorted(map(str, layouts))}")
        local["plan"] = merge_metas([g[1] for g in gathered]), assign_writers(infos_by_rank)

    coll.phase("plan", plan)  # every rank computes the same plan from the same input
    metas, assignments = local.pop("plan")

    def prepare():
        if rank != 0:
            return None
        lease = ckpt._writer_lease()
        took = lease.acquire()  # (a second job stops here, on every rank, with one line naming the holder)
        # with the memory tier, its agents may be writing other steps: only this step's partial goes
        return took, prepare_own_step(ckpt.root, step, ckpt.keep, lease.committed, ckpt.snapshot is None)

    took, cleared = coll.phase("prepare", on_storage(prepare, directory))[0]
    if rank == 0:
        report(took, cleared, directory)

    def after_prepare(name, fn, path):
        """Phase ``name``; if it fails, rank 0 clears the partial save, unless another job holds the
        lease now (it may be writing there: the root is its)."""
        try:
            return coll.phase(name, on_storage(fn, path))
        except BaseException:
            if rank == 0:
                discard_partial(ckpt._writer_lease(), directory)
            raise

    def write():
        mine = assignments[rank]
        if not mine:
            return None
        fragments = [RankFragment(p.key, p.box, p.flat, p.meta.dtype, local["views"][i])
                     for i, p in ((i, local["pieces"][i]) for i in mine)]
        late = [i for i in mine if infos_by_rank[rank][i].crc32c is None]
        with ThreadPoolExecutor(1) as pool:  # checksums on a second core while the file streams out
            sums = pool.map(fragment_checksums, [local["views"][i] for i in late])
            path, size, offsets, head_crc = write_rank_file(directory, rank, fragments, ckpt.options.fsync)
            return path.name, size, offsets, dict(zip(late, sums)), head_crc

    written = after_prepare("write", write, directory / store.rank_file(rank))
    local.clear()

    def commit():
        if rank != 0:
            return None
        fragments, files, heads = [], {}, {}
        for r, w in enumerate(written):
            if w is None:
                continue
            name, size, offsets, late, heads[name] = w
            files[name] = size
            for i, off in zip(assignments[r], offsets):
                info = infos_by_rank[r][i]
                crc, blocks = early[r][i] if i in early[r] else late[i]
                fragments.append(Fragment(info.key, info.box, info.flat, info.dtype, r, name, off, info.nbytes,
                                          crc, blocks))
        manifest = Manifest(step, ckpt.layout, metas, tuple(fragments), split_state([g[2] for g in gathered]),
                            files, created_by=f"ucp {__version__}", block_bytes=BLOCK_BYTES, file_headers=heads)
        manifest.validate()
        ckpt._writer_lease().check()  # (publish only while the root is still this job's: rule 4e)
        commit_step(directory, manifest)  # (what each rank wrote is checked there, whole, before it is published)
        return manifest.nbytes

    nbytes = after_prepare("commit", commit, directory)[0]
    if rank == 0:
        ckpt._writer_lease().committed.add(step)
        report(None, apply_retention(ckpt.root, ckpt.keep, step), directory)
    return SaveResult(step, directory, nbytes, time.perf_counter() - t0)


def on_storage(fn, path):
    """``fn``, its OSErrors raised as one-line :class:`StorageError` naming the file (``path`` when
    the error names none: a write or fsync failing on a full disk)."""
    def run():
        try:
            return fn()
        except UcpError:
            raise
        except OSError as e:
            where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else (e.filename or path)
            raise StorageError(f"{where}: {e.strerror or e}") from e
    return run


def discard_partial(lease, directory) -> None:
    """Best effort, after a failed save: remove its incomplete directory (the next save would)."""
    try:
        if lease.holds() and not store.is_complete(directory):
            store.remove_checkpoint(directory)
    except OSError:
        pass  # (the next save of this job clears it: rule 4f)


def report(took: str | None, cleared: Cleared, directory) -> None:
    """Warn, one line each, about a lease taken over, checkpoints retired, a retention that failed:
    nothing a user saved disappears without a word."""
    if took is not None:
        warnings.warn(f"ucp: {took}", stacklevel=4)
    if cleared.retired:
        gone = ", ".join(f"{p.name} -> {to}" if to is not None else f"{p.name} (deleted)" for p, to in cleared.retired)
        warnings.warn(f"ucp: saving {directory.name} under {directory.parent}, retired the checkpoints of an "
                      f"abandoned run (later steps, or this step saved by an earlier run): {gone}", stacklevel=4)
    if cleared.error is not None:
        warnings.warn(f"ucp: checkpoint {directory} is saved, but pruning old ones failed: {cleared.error}",
                      stacklevel=4)
