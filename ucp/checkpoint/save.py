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
from dataclasses import dataclass, replace

import numpy as np

from ucp import __version__
from ucp.checkpoint.results import SaveResult
from ucp.codecs.checksum import crc32c, fragment_checksums
from ucp.errors import StorageError, UcpError, few
from ucp.format.fragment import fixed_columns, table_to_fragments, with_checksums
from ucp.format.manifest import BLOCK_BYTES, Manifest
from ucp.format.values import fold_state, split_folded_state, state_offer
from ucp.plan.save_plan import (CommitPlan, PieceInfo, RankPlan, compare_replicas, pack_share, plan_save,
                                structure_signature, unpack_shares)
from ucp.state.tensors import bytes_view, staged
from ucp.storage import directory as store
from ucp.storage.rank_files import (Cleared, RankFragment, apply_retention, commit_step, prepare_own_step,
                                    write_rank_file)


@dataclass
class SavePlans:
    """A Checkpointer's durable save plan, reused while no rank's pieces change (their structure
    signatures; docs/architecture.md, "Scale"): every rank keeps its own share, the committing rank
    (0) the plan's commit side and the fragment table's fixed columns."""

    rank: RankPlan | None = None
    commit: CommitPlan | None = None
    fixed: object = None  # the fragment table's fixed columns (ucp.format.fragment.fixed_columns), once committed
    made: int = 0  # plans made on this rank (the next one's id)


@dataclass(frozen=True)
class WriteReport:
    """What a rank tells the committing rank of its write: its file (name, size, header checksum;
    None when it writes nothing), each written fragment's offset, CRC-32C and block checksums (their
    counts, then all of them), and the CRC-32C of each of its replicated pieces."""

    file: str | None
    size: int
    head_crc: int
    offsets: np.ndarray
    crcs: np.ndarray
    block_counts: np.ndarray
    blocks: np.ndarray
    replicas: np.ndarray


def save_durable(ckpt, step: int, extras: dict | None) -> SaveResult:
    """Write the checkpoint of ``step`` under ``ckpt.root`` (a :class:`~ucp.Checkpointer`; every
    rank calls this together); visible only once every rank's data is durable.

    What a rank sends and receives grows with its own share: the ranks' reports go to rank 0 alone,
    which commits; the save plan is made once per layout, on rank 0, and each rank keeps its share.
    """
    t0 = time.perf_counter()
    coll, rank = ckpt.coll, ckpt.coll.rank
    plans: SavePlans = ckpt._save_plans
    directory = store.step_dir(ckpt.root, step)
    local: dict = {}
    target = (step, str(ckpt.root.resolve()))

    def capture():
        pieces, state = ckpt.capture(extras)
        metas = {p.key: p.meta for p in pieces}
        pieces = [p for p in pieces if p.numel]  # empty shards (uneven splits) hold nothing
        buffers = [staged(p.data) for p in pieces]
        views = [bytes_view(b) for b in buffers]
        infos = [PieceInfo(p.key, p.box, p.flat, p.meta.dtype, v.nbytes) for p, v in zip(pieces, views)]
        signature = structure_signature(infos, metas, ckpt.layout)
        local.update(pieces=pieces, buffers=buffers, views=views, infos=infos, metas=metas, signature=signature)
        # the plan this rank holds, while its pieces are those it was made for (their signature)
        held = plans.rank.plan_id if plans.rank is not None and plans.rank.signature == signature else None
        return capture_offer(rank, held, target, state)

    def agree(folded):  # rank 0: the ranks save the same step, and whether the plan still holds
        if len(folded["targets"]) > 1:
            which = "; ".join(f"ranks {few(rs, total=n)}: {t}"
                              for t, (n, rs) in sorted(folded["targets"].items(), key=lambda kv: kv[1][1]))
            raise UcpError(f"ranks disagree about what to save (step, root): {which}; every rank must call save() "
                           "with the same step on the same checkpoint root")
        return plans.commit is None or folded["held"] != {plans.commit.plan_id}

    # every rank's report folded up a tree to rank 0: its state's distinct values once, not a copy per rank
    folded, replan = coll.reduce_phase("capture", capture, fold_capture, agree)
    if replan:
        def make(shares):  # rank 0, once per layout
            layouts = {sh[1] for sh in shares}
            if len(layouts) > 1:
                raise UcpError(f"ranks disagree about the layout: {sorted(map(str, layouts))}")
            pieces, metas = unpack_shares([sh[0] for sh in shares])
            local["made"] = plan_save(pieces, metas, [sh[2] for sh in shares], plans.made)

        coll.gather_phase("plan", lambda: (pack_share(local["infos"], local["metas"]), ckpt.layout, local["signature"]),
                          make)
        commit_plan, rank_plans = local.pop("made", (None, None))
        plans.rank = coll.scatter(rank_plans)
        if rank == 0:
            plans.commit, plans.fixed, plans.made = commit_plan, None, plans.made + 1
    state = None if folded is None else split_folded_state(folded["state"], coll.world_size)

    def prepare(_):
        lease = ckpt._writer_lease()
        took = lease.acquire()  # (a second job stops here, on every rank, with one line naming the holder)
        # with the memory tier, its agents may be writing other steps: only this step's partial goes
        return took, prepare_own_step(ckpt.root, step, ckpt.keep, lease.committed, ckpt.snapshot is None)

    _, (took, cleared) = coll.gather_phase("prepare", lambda: None, on_storage(prepare, directory))
    if rank == 0:
        report(took, cleared, directory)

    def after_prepare(name, fn, decide, path):
        """Phase ``name`` (its results to rank 0, which runs ``decide``); if it fails, rank 0 clears
        the partial save, unless another job holds the lease now (it may be writing there: the root
        is its)."""
        try:
            return coll.gather_phase(name, on_storage(fn, path), decide and on_storage(decide, directory))
        except BaseException:
            if rank == 0:
                discard_partial(ckpt._writer_lease(), directory)
            raise

    def write():
        return write_share(directory, rank, plans.rank, local, ckpt.options.fsync)

    written, _ = after_prepare("write", write, None, directory / store.rank_file(rank))
    local.clear()

    def commit(_):
        manifest, table = commit_manifest_of(plans, step, ckpt.layout, state, written)
        ckpt._writer_lease().check()  # (publish only while the root is still this job's: rule 4e)
        commit_step(directory, manifest, table)  # (what each rank wrote is checked there, whole, before it is published)
        return plans.commit.nbytes

    _, nbytes = after_prepare("commit", lambda: None, commit, directory)
    if rank == 0:
        ckpt._writer_lease().committed.add(step)
        report(None, apply_retention(ckpt.root, ckpt.keep, step), directory)
    return SaveResult(step, directory, nbytes, time.perf_counter() - t0)


def write_share(directory, rank: int, plan: RankPlan, local: dict, fsync: bool) -> WriteReport:
    """Write this rank's share of the plan (its file, streamed from the staged pieces) while a second
    thread sums the fragments it writes and the replicated pieces it holds."""
    views, pieces = local["views"], local["pieces"]
    mine = list(plan.writes)
    others = [i for i in plan.replicated if i not in set(mine)]
    fragments = [RankFragment(pieces[i].key, pieces[i].box, pieces[i].flat, pieces[i].meta.dtype, views[i])
                 for i in mine]
    name, size, offsets, head_crc = None, 0, [], 0
    with ThreadPoolExecutor(1) as pool:  # checksums on a second core while the file streams out
        sums = pool.map(fragment_checksums, [views[i] for i in mine])
        other_sums = pool.map(crc32c, [views[i] for i in others])
        if mine:
            path, size, offsets, head_crc = write_rank_file(directory, rank, fragments, fsync)
            name = path.name
        sums, other_sums = list(sums), list(other_sums)
    crc_of = dict(zip(mine, (c for c, _ in sums))) | dict(zip(others, other_sums))
    return WriteReport(name, size, head_crc, np.asarray(offsets, dtype=np.int64),
                       np.fromiter((c for c, _ in sums), dtype=np.uint32, count=len(sums)),
                       np.fromiter((len(b) for _, b in sums), dtype=np.int32, count=len(sums)),
                       np.fromiter((x for _, b in sums for x in b), dtype=np.uint32),
                       np.fromiter((crc_of[i] for i in plan.replicated), dtype=np.uint32, count=len(plan.replicated)))


def capture_offer(rank: int, held, target: tuple, state: dict) -> dict:
    """What rank ``rank`` reports of its capture, folded to rank 0 (:func:`fold_capture`): the save
    plan it holds (None: none, or its pieces changed), what it saves (step, root) and its non-tensor
    state (:func:`~ucp.format.values.state_offer`)."""
    return {"held": {held}, "targets": {target: (1, [rank])}, "state": state_offer(rank, state)}


def fold_capture(a: dict, b: dict) -> dict:
    """Two folds of :func:`capture_offer` s as one: the plans held, each target with how many ranks
    save it and the first few of them (for the error when they disagree), the ranks' states."""
    targets = dict(a["targets"])
    for t, (n, ranks) in b["targets"].items():
        m, first = targets.get(t, (0, []))
        targets[t] = (m + n, sorted(first + ranks)[:8])
    return {"held": a["held"] | b["held"], "targets": targets, "state": fold_state(a["state"], b["state"])}


def commit_manifest_of(plans: SavePlans, step: int, layout, state: dict, written: list[WriteReport]):
    """The manifest of a save (rank 0) and its fragment table, from the plan, the ranks' non-tensor
    ``state`` (:func:`~ucp.format.values.split_state`'s form) and their write reports, after the
    replicas' checksums compared equal. The first save of a plan validates every
    fragment against the format's rules; later saves of the same plan, whose fragments are the same
    regions, check only what the ranks report (offsets inside their files, block counts).

    Returns:
        (manifest without fragments, fragment table).
    """
    plan = plans.commit
    compare_replicas(plan, [w.replicas for w in written])
    files, heads = {}, {}
    for r, (w, expect) in enumerate(zip(written, plan.written)):
        if len(w.offsets) != len(expect) or (w.file is None) != (not expect):
            raise UcpError(f"rank {r} reported {len(w.offsets)} fragments written to {w.file}, its plan has "
                           f"{len(expect)}")
        if w.file is not None:
            files[w.file], heads[w.file] = w.size, w.head_crc
    manifest = Manifest(step, layout, plan.metas, (), state, files, created_by=f"ucp {__version__}",
                        block_bytes=BLOCK_BYTES, file_headers=heads)
    manifest.validate_header()
    first = plans.fixed is None
    if first:
        plans.fixed = fixed_columns((p.key, p.box, p.flat, p.dtype, r, w.file, p.nbytes)
                                    for r, (w, ps) in enumerate(zip(written, plan.written)) for p in ps)
    reports = [w for w in written if w.file is not None]
    offsets = np.concatenate([w.offsets for w in reports]) if reports else np.zeros(0, np.int64)
    counts = np.concatenate([w.block_counts for w in reports]) if reports else np.zeros(0, np.int32)
    lengths = plans.fixed.column("byte_length").to_numpy()
    ends = np.repeat([w.size for w in reports], [len(w.offsets) for w in reports])
    blocks_wanted = np.where(lengths > BLOCK_BYTES, -(-lengths // BLOCK_BYTES), 0)
    if (offsets < 0).any() or (offsets + lengths > ends).any() or (counts != blocks_wanted).any():
        raise UcpError("a rank reported fragments outside its file or with the wrong number of block checksums")
    table = with_checksums(plans.fixed, offsets, np.concatenate([w.crcs for w in reports]) if reports else [],
                           counts, np.concatenate([w.blocks for w in reports]) if reports else [])
    if first:  # every rule of the format, on every fragment, once per plan (block counts: checked above)
        replace(manifest, fragments=tuple(table_to_fragments(table.drop_columns(["block_crc32c"])))).validate()
    return manifest, table


def on_storage(fn, path):
    """``fn``, its OSErrors raised as one-line :class:`StorageError` naming the file (``path`` when
    the error names none: a write or fsync failing on a full disk)."""
    def run(*args):
        try:
            return fn(*args)
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
