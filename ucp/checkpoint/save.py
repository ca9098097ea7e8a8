"""A durable save: the training state of every rank written as a distributed checkpoint, in named
collective phases (docs/architecture.md, "A save"): capture, compare, plan, prepare, write, commit.

A rank that dies or fails in any phase leaves no manifest: the previous checkpoint stays the newest
complete one.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from ucp import __version__
from ucp.checkpoint.results import SaveResult
from ucp.codecs.checksum import fragment_checksums
from ucp.errors import UcpError
from ucp.format.fragment import Fragment
from ucp.format.manifest import BLOCK_BYTES, Manifest
from ucp.format.values import split_state
from ucp.plan.save_plan import PieceInfo, assign_writers, merge_metas, replicated_regions
from ucp.state.tensors import bytes_view, staged
from ucp.storage import directory as store
from ucp.storage.rank_files import RankFragment, apply_retention, commit_step, prepare_step, write_rank_file


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
        if rank == 0 and not prepare_step(directory, clear_partial=True):
            raise UcpError(f"{directory}: a complete checkpoint for this step exists already; save under a new step")

    coll.phase("prepare", prepare)

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

    written = coll.phase("write", write)
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
        commit_step(directory, manifest)  # (what each rank wrote is checked there, whole, before it is published)
        return manifest.nbytes

    nbytes = coll.phase("commit", commit)[0]
    if rank == 0:
        pruned = apply_retention(ckpt.root, ckpt.keep, step)
        if pruned is not None:
            warnings.warn(f"ucp: checkpoint {directory} is saved, but pruning old ones failed: {pruned}", stacklevel=3)
    return SaveResult(step, directory, nbytes, time.perf_counter() - t0)
