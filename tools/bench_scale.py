#!/usr/bin/env python
"""Metadata cost of ucp's save, load and restore from memory at W simulated ranks, in one process.

Runs ucp's REAL planning, manifest, commit and load-metadata code (not a model of it) on the pieces
every rank of a large job would capture (``tools/scale_layouts.py``: Llama-70B, Llama-405B or an
MoE under tp x pp x dp [x ep], ZeRO-1 flat optimizer state; real byte sizes, fake CRCs, no tensor
data), and prints one JSON line per world size W. Every measured phase is one small function
calling ucp's code:

* :func:`save_now` -- a durable save as ``checkpoint.save.save_durable`` runs it: capture folded up a
  tree to rank 0 (:func:`fold_to_root`: the plan held, the step and root, the state's digests and each
  distinct value once), every other phase a ``Collective.gather_phase`` (:func:`gather_to_root`): each
  rank's outcome pickled to rank 0 alone (its size gathered first, then its bytes), rank 0's verdict
  back to every rank. Plan (only for the first
  save of a layout: each rank's regions to rank 0, ``plan_save`` there, each rank's ``RankPlan``
  scattered), prepare, write (each rank's ``WriteReport``: numpy arrays of its fragments' offsets
  and checksums), commit (``commit_manifest_of`` and ``storage.rank_files.commit_step`` on rank 0,
  into a work directory whose rank files are sparse files of the recorded sizes). It runs twice: the
  first save of the layout (``save_*``, ``plan_s``, ``commit_first_s``: every fragment validated) and
  a save reusing the plan (``save_cached_*``, ``commit_s``).
* :func:`load_now` -- onto a world 25% smaller (dp reduced): ``open_manifest`` (the header), the
  targets (``load._resolve_targets``), ``StoredManifest.select`` of the regions the rank loads (the
  pages of the paged fragment table it needs), the files' sizes, its own state row, what the ranks
  take folded up a binomial tree to rank 0, which judges strictness (``Collective.reduce_phase``:
  :func:`fold_to_root`; ``load_targets_root_bytes`` and ``load_targets_root_s`` are rank 0's share of
  it; they were every rank's taken keys before), and what the read phase builds before reading a byte
  (``FragmentIndex`` over the rows read, per piece the exact fragment or ``FragmentReader.read_resharded``'s
  plan: ``source_pieces``, ``relocate``, ``target_pieces``, ``reshard_plan``, byte spans and blocks).
* :func:`restore_metadata` -- ``checkpoint.memory.Snapshots.source`` of a job resuming in place
  (``_source_own``): every rank's offer from its node's header summaries (8 ranks a node, two slots
  each) folded up a tree to rank 0, which chooses (``checkpoint.memory_source.decide_own``); each
  rank's own header (the dict ``MemoryTier.write`` commits) and ``snapshot.header.manifest_from_headers``
  of it alone.
* :func:`restore_resharded` -- the same snapshot resumed from memory onto the smaller world
  (``Snapshots._source_all``), its headers held by the surviving nodes as after a parity rebuild:
  the nodes' summaries folded to rank 0, each node's once (``fold_nodes``, ``choose_source``), each
  speaker's fragments to their keys' owners
  and its metadata and state to rank 0 (``snapshot.index``), the rank's targets and regions, its
  queries to the owners, their answers and the manifest of its fragments; an owner's answers to every
  rank that asks (the sampled ranks', and the busiest owner's: ``restore_resharded_busiest_owner``).

Sampled ranks: rank 1, the middle rank and the last rank (of the target world for the load); rank 0
commits. A non-committing rank's seconds are its own work (pickling what it sends, its signature,
its targets, the pages it reads); rank 0's are reported apart (``plan_s``, ``commit_*``,
``commit_root_recv_s``: unpickling every rank's report). What an all-gather of the restore from
memory moves is what every rank receives, timed once. ``*_s`` of a rank are seconds of one core.

Keys (per W): ``save_metadata_s`` / ``save_bytes_per_rank`` (worst sampled non-committing rank, the
first save of a layout: bytes sent + received), ``save_cached_metadata_s`` /
``save_cached_bytes_per_rank`` (a save reusing the plan), ``save_<phase>_bytes`` and
``save_<phase>_root_bytes`` (what rank 0 receives; ``_root_padded_bytes``: what a gather of buffers padded
to the largest, ucp's before its gather sent sizes first, would move), ``save_states_bytes`` (every rank's state pickled: what a
gather of them would bring rank 0), ``plan_s``, ``commit_first_s``, ``commit_s``,
``manifest_bytes`` (``manifest.json`` + the paged tables on disk), ``load_metadata_s``,
``load_targets_exchange_bytes`` (a sampled rank's share of the targets phase), ``load_targets_root_bytes`` /
``load_targets_root_s`` (rank 0's),
``manifest_bytes_read_per_rank`` (header and pages), ``load_bytes_per_rank``, ``restore_metadata_s``,
``restore_bytes_per_rank``, ``restore_resharded_metadata_s`` / ``restore_resharded_bytes_per_rank``
(worst sampled rank, its answers as an owner included), ``restore_resharded_root_s`` (rank 0's, split into
``restore_resharded_root_choice_s`` / ``_choice_bytes``, the choice's folds, and ``_state_s`` / ``_state_bytes``, the
speakers' metadata and state), ``pieces_gathered`` (by rank 0, once per layout), ``fragments``,
``peak_rss_bytes`` (``ru_maxrss`` of the process running that W), ``load_avg_1m``.
The first version of this tool (commit 385a1a3) drove the all-gather save of ucp <= e10bf50: the
"before" figures of issue 18.
When several W ran, a last line holds the least-squares slope of log(metric) over log(W) between
512 and 16384 (``growth``: 1 is linear in W, 2 quadratic) of every per-rank metric.

Seconds are this process's CPU time (``--clock cpu``, the default: the machine may be shared, and the
work measured is one core's; ``commit_write_s`` then leaves out waiting for the disk), or elapsed
time with ``--clock wall``. ``--layers N`` cuts the model to N layers (quick runs, the tests).

Each W runs in a child process of its own (so its peak RSS is its own), a W above the last one run
only if its peak RSS scaled by the ratio of the Ws fits in ``MemAvailable``; one ``--world W`` runs
in this process. ``--profile N`` prints the N functions of most own time (cProfile, elapsed time; the harness's own
work included: pickling every rank's object, building the pieces) and ucp's N functions of most
cumulative time to stderr.

    python tools/bench_scale.py [--world W ...] [--layout llama70b|llama405b|moe] [--max-world W]
                                [--layers N] [--clock cpu|wall] [--work DIR] [--keep] [--profile N]
"""

from __future__ import annotations

import fnmatch
import json
import math
import operator
import os
import pickle
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import benchlib
import numpy as np
import scale_layouts

from ucp import __version__
from ucp.checkpoint.load import _regions, _resolve_targets, _untaken
from ucp.checkpoint.readers import byte_spans, resharded_items
from ucp.checkpoint.save import SavePlans, WriteReport, capture_offer, commit_manifest_of, fold_capture
from ucp.format.values import split_folded_state
from ucp.codecs.checksum import crc32c
from ucp.format.dtypes import DTYPES
from ucp.format.fragment import RegionQuery
from ucp.format.keys import MODEL, parse_key
from ucp.format.manifest import BLOCK_BYTES
from ucp.plan.geometry import needed_blocks
from ucp.plan.load_plan import FragmentIndex
from ucp.plan.save_plan import PieceInfo, pack_share, plan_save, structure_signature, unpack_shares
from ucp.plan.sources import SourceIndex
from ucp.snapshot import shm
from ucp.checkpoint.memory_source import (choose_source, decide_own, fold_nodes, fold_own, node_offer, own_offer,
                                         speaker_mask)
from ucp.format.manifest import Manifest
from ucp.snapshot.header import FragmentRecord, manifest_from_headers
from ucp.snapshot.index import (KeyIndex, SnapshotManifest, decide_states, fold_states, index_messages, own_state,
                               query_messages, state_offer)
from ucp.snapshot.memory import FORMAT as SNAPSHOT_FORMAT
from ucp.snapshot.memory import FORMAT_VERSION as SNAPSHOT_VERSION
from ucp.snapshot.memory import place
from ucp.storage import directory as store
from ucp.storage.directory import MANIFEST
from ucp.storage.fragment_files import FragmentFiles
from ucp.storage.manifest_io import open_manifest
from ucp.storage.rank_files import FORMAT as RANK_FILE_FORMAT
from ucp.storage.rank_files import Cleared, commit_step, entry_name
from ucp.storage.safetensors_file import Slot, plan_file

DEFAULT_WORLDS = (64, 512, 4096, 16384)
FIT_RANGE = (512, 16384)
RANKS_PER_NODE = 8
JOB = "scale"
RANK_FILES = store.rank_file(0).replace("00000", "*")  # rank_*.safetensors
log = benchlib.logger("bench_scale")


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
_clock = CLOCKS["cpu"]


def _now() -> float:
    """The clock of every measured second (``--clock``): this process's CPU time by default, which a
    machine shared with other work does not inflate; ``wall`` for elapsed time."""
    return _clock()


# -- fake checksums ---------------------------------------------------------------------------------


class Checksums:
    """Fake CRC-32C values of every region (random uint32, the same for every holder of a region, so
    replicas agree), made once and shared: a region's ``(crc, block crcs)`` as ``fragment_checksums``
    returns them (no block checksums for data of one block or less)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.by_region: dict[tuple, tuple[int, tuple[int, ...]]] = {}
        self.lists: dict[tuple, list[int]] = {}

    def of(self, region: tuple, nbytes: int) -> tuple[int, tuple[int, ...]]:
        got = self.by_region.get(region)
        if got is None:
            n = -(-nbytes // BLOCK_BYTES) if nbytes > BLOCK_BYTES else 0
            values = self.rng.integers(0, 1 << 32, n + 1, dtype=np.uint64).tolist()
            got = self.by_region[region] = (values[0], tuple(values[1:]))
        return got

    def as_list(self, region: tuple) -> list[int]:
        """The block checksums of ``region`` as one shared list (a snapshot header's ``blocks``)."""
        got = self.lists.get(region)
        if got is None:
            got = self.lists[region] = list(self.by_region[region][1])
        return got


# -- the files of a commit --------------------------------------------------------------------------


def sparse_rank_files(directory: Path, files: dict) -> None:
    """The rank files a manifest lists, as sparse files of their recorded sizes (``commit_step``
    checks every size)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, size in files.items():
        path = directory / name
        path.touch()
        os.truncate(path, size)


def manifest_files(directory: Path) -> dict[str, int]:
    """Name -> size of the files of a checkpoint directory other than its rank files: what the
    commit wrote (``manifest.json``, the fragment table) and a load reads."""
    return {p.name: p.stat().st_size for p in sorted(directory.iterdir())
            if p.is_file() and not fnmatch.fnmatchcase(p.name, RANK_FILES)}


def reshard_read_plan(piece, slices, index: FragmentIndex, manifest, target_layout) -> int:
    """What ``FragmentReader.read_resharded`` computes before its first read (its own functions:
    the reshard plan, each fragment's byte spans) and the blocks holding them; returns the number of
    blocks it would read."""
    items, _ = resharded_items(piece, slices, index, manifest, target_layout)
    blocks = 0
    for f, sp in byte_spans(items).items():
        need = needed_blocks(sp, len(f.blocks or ()), manifest.block_bytes)
        blocks += len(f.blocks) if need is None else sum(b - a for a, b in need)
    return blocks


def load_read_plan(manifest, plans: list, target_layout) -> dict:
    """What the read phase of ``load._load`` builds before reading a byte: the fragment index over the
    rows the rank read, and each piece's exact fragment or reshard plan."""
    index = FragmentIndex(manifest.fragments)
    exact = resharded = blocks = 0
    for p, res in plans:
        if not p.numel:
            continue
        only = res.slices[0]
        hit = index.exact(only.key, p.box, p.flat) if len(res.slices) == 1 and only.dim is None else None
        if hit is not None:
            exact += 1
        else:
            resharded += 1
            blocks += reshard_read_plan(p, res.slices, index, manifest, target_layout)
    return {"exact": exact, "resharded": resharded, "blocks": blocks}


# -- the durable save and the load of this ucp: phases that report to rank 0 alone ---------------------


@dataclass
class Gather:
    """One ``Collective.gather_phase``: every rank's outcome to rank 0 alone (``Collective.gather``:
    the sizes gathered, then each rank's pickle sent on its own), then rank 0's verdict broadcast to
    every rank. What a non-committing rank sends and receives, and the seconds it spends."""

    name: str
    world: int
    verdict_bytes: int = 0
    sent: dict = field(default_factory=dict)  # sampled rank -> bytes of its pickled outcome
    pickle_s: dict = field(default_factory=dict)
    root_recv_bytes: int = 0  # what rank 0 receives
    root_s: float = 0.0  # rank 0: unpickling every outcome and deciding

    def rank_s(self, rank: int) -> float:
        return self.pickle_s[rank]

    largest: int = 0

    def rank_bytes(self, rank: int) -> int:
        # its size (8 bytes, gathered) and its pickle, the verdict and its size (broadcast_object_list)
        return 8 + self.sent[rank] + 8 + self.verdict_bytes


def gather_to_root(name: str, make, world: int, sample, decide=None, keep=None) -> tuple[list, object, Gather]:
    """Phase ``name`` as ``Collective.gather_phase`` runs it: ``make(rank)`` on every rank, pickled
    as ``gather_object`` pickles it; rank 0 unpickles each (``keep(rank, value)`` may swap a value for
    a smaller equal one: memory, not time) and runs ``decide(values)``, whose verdict every rank receives."""
    g = Gather(name, world)
    values = [None] * world
    for r in range(world):
        t0 = _now()
        blob = pickle.dumps((True, make(r), None))
        t1 = _now()
        if r in sample:
            g.sent[r], g.pickle_s[r] = len(blob), t1 - t0
        value = pickle.loads(blob)[1]
        g.root_s += _now() - t1
        g.root_recv_bytes += len(blob)
        g.largest = max(g.largest, len(blob))
        values[r] = value if keep is None else keep(r, value)
    t0 = _now()
    decision = decide(values) if decide is not None else None
    g.root_s += _now() - t0
    g.verdict_bytes = len(pickle.dumps(({}, decision)))
    return values, decision, g


@dataclass
class Fold:
    """One ``Collective.reduce_phase``: every rank's value folded to rank 0 up a binomial tree (rank ``r``
    sends its subtree's folded value to ``r - lowbit(r)``: its pickled size, then its bytes; a rank
    receives one value from each child, at most ``ceil(log2 W)``), then rank 0's verdict broadcast to
    every rank. What a sampled rank (and rank 0) sends and receives, and its seconds: pickling what it
    sends, unpickling and folding what it receives (rank 0: and deciding)."""

    name: str
    world: int
    verdict_bytes: int = 0
    sent: dict = field(default_factory=dict)  # rank -> bytes it sends (its subtree's value, and the size)
    received: dict = field(default_factory=dict)  # rank -> bytes it receives from its children
    seconds: dict = field(default_factory=dict)
    root_recv_bytes: int = 0
    root_s: float = 0.0

    def rank_s(self, rank: int) -> float:
        return self.seconds.get(rank, 0.0)

    def rank_bytes(self, rank: int) -> int:
        # what it sends and receives, the verdict and its size (broadcast_object_list)
        return self.sent.get(rank, 0) + self.received.get(rank, 0) + 8 + self.verdict_bytes


def _children(rank: int, world: int) -> list[int]:
    """``rank``'s children in the binomial tree of ``Collective.reduce_phase``."""
    low = rank & -rank if rank else 1 << max(world - 1, 1).bit_length()
    out, step = [], 1
    while step < low and rank + step < world:
        out.append(rank + step)
        step *= 2
    return out


def fold_to_root(name: str, make, world: int, sample, combine, decide=None) -> tuple[object, Fold]:
    """Phase ``name`` as ``Collective.reduce_phase`` runs it: ``make(rank)`` on every rank, folded by
    ``combine`` from the leaves up (ranks in descending order: a rank's children are above it, so each
    subtree's value is ready when its parent folds it; only the values not yet folded are held);
    ``decide(folded)`` on rank 0, whose verdict every rank receives. The sends of sampled ranks and
    of rank 0's and the sampled ranks' children are pickled and timed."""
    f = Fold(name, world)
    watched = set(sample) | {0}
    pending: dict[int, object] = {}
    for r in range(world - 1, -1, -1):
        value = make(r)
        for c in _children(r, world):
            got = pending.pop(c)
            if r in watched:
                blob = pickle.dumps((({}), got))
                t0 = _now()
                got = pickle.loads(blob)[1]
                f.seconds[r] = f.seconds.get(r, 0.0) + _now() - t0
                f.received[r] = f.received.get(r, 0) + len(blob) + 8
            t0 = _now()
            value = combine(value, got)
            if r in watched:
                f.seconds[r] = f.seconds.get(r, 0.0) + _now() - t0
        if r in watched and r:
            t0 = _now()
            f.sent[r] = len(pickle.dumps(({}, value))) + 8
            f.seconds[r] = f.seconds.get(r, 0.0) + _now() - t0
        pending[r] = value
    t0 = _now()
    decision = decide(pending[0]) if decide is not None else None
    f.verdict_bytes = len(pickle.dumps(({}, decision)))  # (pickled once, by rank 0, for the broadcast)
    f.seconds[0] = f.seconds.get(0, 0.0) + _now() - t0
    f.root_s, f.root_recv_bytes = f.seconds[0], f.received.get(0, 0)
    return decision, f


def capture_message(job, rank: int, root: str, step: int, plan_id) -> tuple[dict, tuple, list, dict]:
    """What ``save_durable``'s ``capture()`` folds to rank 0 (``capture_offer``: the plan it holds, the
    step and root, its state's digests and values), and what the rank keeps: its structure signature,
    pieces and metadata."""
    pieces = job.pieces(rank)
    metas = {p.key: p.meta for p in pieces}
    pieces = [p for p in pieces if p.numel]
    infos = [PieceInfo(p.key, p.box, p.flat, p.meta.dtype, p.nbytes) for p in pieces]
    offer = capture_offer(rank, plan_id, (step, root), job.state(rank, step))
    return offer, structure_signature(infos, metas, job.layout), infos, metas


def write_report(rank: int, infos: list, share, crcs: Checksums) -> WriteReport:
    """The :class:`WriteReport` rank ``rank`` sends after writing its share (``write_share``), with
    fake checksums: its file's offsets from the header ``write_rank_file`` would write."""
    mine = list(share.writes)
    sums = [crcs.of(infos[k].region, infos[k].nbytes) for k in mine]
    name, size, offsets, head = None, 0, [], 0
    if mine:
        slots = [Slot(entry_name(i.key, i.box, i.flat), DTYPES[i.dtype][1], (i.flat.numel,) if i.flat else i.box.sizes,
                      i.nbytes) for i in (infos[k] for k in mine)]
        header, offsets = plan_file(slots, {"format": RANK_FILE_FORMAT, "rank": str(rank)})
        name, size, head = store.rank_file(rank), len(header) + sum(sl.nbytes for sl in slots), crc32c(header)
    crc_of = {i: crcs.of(infos[i].region, infos[i].nbytes)[0] for i in share.replicated}
    return WriteReport(name, size, head, np.asarray(offsets, dtype=np.int64),
                       np.fromiter((c for c, _ in sums), dtype=np.uint32, count=len(sums)),
                       np.fromiter((len(b) for _, b in sums), dtype=np.int32, count=len(sums)),
                       np.fromiter((x for _, b in sums for x in b), dtype=np.uint32),
                       np.fromiter((crc_of[i] for i in share.replicated), dtype=np.uint32, count=len(share.replicated)))


def save_now(job, step: int, root: Path, directory: Path, crcs: Checksums, sample, plans: SavePlans) -> dict:
    """One durable save as ``save_durable`` runs it now, its phases simulated for every rank with
    ucp's own code: capture (to rank 0), plan (only when rank 0 holds none for these signatures:
    ``plan_save`` on rank 0, each rank's share scattered), prepare, write (reports to rank 0), commit
    (``commit_manifest_of`` and ``commit_step`` on rank 0). Returns the exchanges and rank 0's seconds."""
    world = job.world
    kept: dict = {}

    def capture(r):
        held = plans.shares[r].plan_id if plans.shares is not None else None
        offer, signature, infos, metas = capture_message(job, r, str(root.resolve()), step, held)
        if plans.shares is None:  # (what the plan phase will send: the rank keeps it)
            kept[r] = (infos, metas, signature)
        return offer

    def agree(folded):  # (save_durable's: one target here)
        kept["folded"] = folded
        return plans.commit is None or folded["held"] != {plans.commit.plan_id}

    replan, g_cap = fold_to_root("capture", capture, world, sample, fold_capture, agree)
    t0 = _now()
    state = split_folded_state(kept.pop("folded")["state"], world)
    g_cap.seconds[0] += _now() - t0
    g_cap.root_s = g_cap.seconds[0]
    out = {"capture": g_cap}
    if replan:
        def make(shares):
            pieces, metas = unpack_shares([sh[0] for sh in shares])
            kept["made"] = plan_save(pieces, metas, [sh[2] for sh in shares], plans.made)
            return None

        _, _, g_plan = gather_to_root("plan", lambda r: (pack_share(*kept[r][:2]), job.layout, kept[r][2]), world,
                                      sample, make)
        commit_plan, shares = kept.pop("made")
        plans.commit, plans.fixed, plans.made, plans.shares = commit_plan, None, plans.made + 1, shares
        g_plan.sent_back = {r: len(pickle.dumps(shares[r])) + 8 for r in sample}  # (scatter_object_list)
        out["plan"] = g_plan
        plans.infos = {r: kept[r][0] for r in range(world)}
    _, _, out["prepare"] = gather_to_root("prepare", lambda r: None, world, sample, lambda _: (None, Cleared()))
    written, _, out["write"] = gather_to_root(
        "write", lambda r: write_report(r, plans.infos[r], plans.shares[r], crcs), world, sample)
    sparse_rank_files(directory, {w.file: w.size for w in written if w.file is not None})  # (the writers' files)

    def commit_(_):
        t0 = _now()
        manifest, table = commit_manifest_of(plans, step, job.layout, state, written)
        kept["build_s"] = _now() - t0
        t0 = _now()
        commit_step(directory, manifest, table)
        kept["write_s"] = _now() - t0
        kept["fragments"], kept["blocks"] = table.num_rows, len(table.column("block_crc32c").combine_chunks().values)
        return plans.commit.nbytes

    _, nbytes, out["commit"] = gather_to_root("commit", lambda r: None, world, sample, commit_)
    out.update(build_s=kept["build_s"], write_s=kept["write_s"], fragments=kept["fragments"], blocks=kept["blocks"],
               nbytes=nbytes)
    return out


def save_keys(prefix: str, res: dict, sample) -> dict:
    """Per-rank keys of one simulated save: the worst sampled non-committing rank's seconds and bytes."""
    phases = [res[k] for k in ("capture", "plan", "prepare", "write", "commit") if k in res]
    back = res["plan"].sent_back if "plan" in res else {}
    out = {f"{prefix}metadata_s": max(sum(g.rank_s(r) for g in phases) for r in sample),
           f"{prefix}bytes_per_rank": max(sum(g.rank_bytes(r) for g in phases) + back.get(r, 0) for r in sample)}
    for g in phases:
        out[f"{prefix}{g.name}_bytes"] = max(g.rank_bytes(r) for r in sample)
        out[f"{prefix}{g.name}_root_bytes"] = g.root_recv_bytes
        if isinstance(g, Gather):  # (what a gather of every buffer padded to the largest would move)
            out[f"{prefix}{g.name}_root_padded_bytes"] = g.world * (g.largest + 8)
    return out


def load_now(directory: Path, target, sample) -> dict:
    """A load of the checkpoint in ``directory`` onto ``target`` up to its first read, as ``_load``
    runs it now, on the sampled ranks: the header (``open_manifest``), the targets, the pages of the
    regions the rank loads (``StoredManifest.select``) and its files' sizes, the targets' report to
    rank 0, its own state row, and the read plan over the rows it read."""
    per_rank: dict = {}
    for r in sample:
        t0 = _now()
        stored = open_manifest(directory)
        sources = SourceIndex(stored.tensors)
        plans, missing, taken, _ = _resolve_targets(target.pieces(r), sources, target.layout, directory, False)
        assert not missing, missing[:3]
        manifest = stored.select(RegionQuery(_regions(plans, stored, target.layout)))
        FragmentFiles(directory, manifest=manifest).check_sizes()
        state = stored.rank_state(r)
        counts = load_read_plan(manifest, plans, target.layout)
        per_rank[r] = dict(counts, s=_now() - t0, manifest_bytes=stored.nbytes_read, fragments=len(manifest.fragments),
                           state_entries=len(state), taken=taken | {k for k, m in stored.tensors.items() if m.pattern.flat})
    flat_keys = {k for k, m in stored.tensors.items() if m.pattern.flat}

    def taken_of(r):  # every other rank's targets resolve to their own keys ("same")
        return per_rank[r]["taken"] if r in per_rank else {p.key for p in target.pieces(r)} | flat_keys

    def untaken(taken_all):
        return [k for k in _untaken(stored.tensors, taken_all, SourceIndex(stored.tensors))
                if parse_key(k).kind in (MODEL, "optim")]

    unexpected, g = fold_to_root("targets", taken_of, target.world, sample, operator.or_, untaken)
    assert not unexpected, unexpected[:3]
    ranks = {r: {"total_s": v["s"] + g.rank_s(r), "bytes": v["manifest_bytes"] + g.rank_bytes(r),
                 "manifest_bytes": v["manifest_bytes"], "fragments": v["fragments"],
                 **{k: v[k] for k in ("exact", "resharded", "blocks")}} for r, v in per_rank.items()}
    return {"ranks": ranks, "exchange": g}


def snapshot_header(job, rank: int, step: int, slot: int, crcs: Checksums, token: int) -> dict:
    """The committed header of ``rank``'s snapshot of ``step`` (``Snapshots.save``'s header
    completed by ``MemoryTier.write`` and the agent: fragments placed in the slot, checksummed)."""
    pieces = job.pieces(rank)
    metas = {p.key: p.meta.to_dict() for p in pieces}
    pieces = [p for p in pieces if p.numel]
    placements, nbytes = place([(p.meta.dtype, p.nbytes) for p in pieces])
    seg = shm.segment_name(JOB, f"r{rank}.s{slot}")
    fragments = []
    for p, at in zip(pieces, placements):
        region = (p.key, p.box.offsets, p.box.sizes, None if p.flat is None else (p.flat.start, p.flat.numel))
        crc, _ = crcs.of(region, p.nbytes)
        fragments.append({"key": p.key, "offsets": list(p.box.offsets), "sizes": list(p.box.sizes),
                          "flat": None if p.flat is None else [p.flat.start, p.flat.numel], "dtype": p.meta.dtype,
                          "length": p.nbytes, "file": seg, "offset": at.offset, "crc32c": crc,
                          "blocks": crcs.as_list(region)})
    return {"layout": job.layout.to_dict(), "world_size": job.world, "tensors": metas, "state": job.state(rank, step),
            "fragments": fragments, "created_by": f"ucp {__version__}", "format": SNAPSHOT_FORMAT,
            "format_version": SNAPSHOT_VERSION, "rank": rank, "slot": slot, "host": node_of(rank),
            "file_size": nbytes, "step": step, "complete": True, "token": token}


def node_of(rank: int) -> str:
    return f"node{rank // RANKS_PER_NODE:05d}"


def restore_metadata(job, step: int, crcs: Checksums, sample) -> dict:
    """``checkpoint.memory.Snapshots.source`` on every rank of ``job`` resuming in place (each node's
    agent holding two snapshots of each of its ranks: ``step - 1`` and ``step``, both complete, no
    parity): ``_choose_own``: every rank's offer (``own_offer``: from its node's summaries) folded up
    a tree to rank 0 (``fold_own``), which chooses (``decide_own``); each rank reads its own header from
    its agent and builds its manifest (``manifest_from_headers`` of it alone); the all-true report
    folded to rank 0. Returns per-rank seconds and bytes, and rank 0's."""
    world, token = job.world, 12345

    def offer(r):  # Snapshots._choose_own's: the rank's offer from its node's summaries
        node = node_of(r)
        first = r - r % RANKS_PER_NODE
        held = [{"rank": q, "slot": s, "step": step - 1 + s, "world_size": world, "complete": True, "host": node,
                 "token": token - 1 + s, "adopted": None}
                for q in range(first, min(first + RANKS_PER_NODE, world)) for s in (0, 1)]
        return own_offer(r, world, None, held, {})

    def decide(folded):  # resuming in place
        newest = decide_own(folded, world)
        assert newest == (step, world), newest
        return newest

    chosen, g_find = fold_to_root("memory", offer, world, sample, fold_own, decide)
    ranks = {}
    fragments = 0
    for r in sample:
        header = snapshot_header(job, r, step, 1, crcs, token)
        nbytes = len(json.dumps(header))  # (what the rank reads of its agent: its own header)
        t0 = _now()
        manifest = manifest_from_headers([header], node_of(r), whole=False)
        ranks[r] = {"own_s": _now() - t0, "own_bytes": nbytes}
        fragments = max(fragments, len(manifest.fragments))
    every, g_own = fold_to_root("memory-own", lambda r: True, world, sample, operator.and_, bool)
    assert every
    for r, v in ranks.items():
        v["total_s"] = g_find.rank_s(r) + v["own_s"] + g_own.rank_s(r)
        v["bytes"] = g_find.rank_bytes(r) + v["own_bytes"] + g_own.rank_bytes(r)
    return {"find": g_find, "own": g_own, "root_s": g_find.root_s + g_own.root_s, "fragments": fragments,
            "ranks": ranks}


def restore_resharded(job, target, step: int, crcs: Checksums, sample) -> dict:
    """``Snapshots.source`` on every rank of ``target`` (another world: ``_source_all``) resuming
    ``job``'s snapshot of ``step``, whose headers the surviving nodes hold (old rank ``q`` on new
    node ``(q // 8) % nodes``, as after a parity rebuild), on the sampled ranks: the nodes' summaries
    to rank 0 (``choose_source``, after the fold of ``_choose_own`` found no in-place case), each
    rank's role, each speaker's fragments to their keys' owners
    (``index_messages``, which carry each saving rank's state to the rank of its number), the speakers'
    metadata and states' digests folded to rank 0 (``state_offer``, ``fold_states``, ``decide_states``),
    the rank's own state, its share of the index (``KeyIndex``, in
    ``SnapshotManifest``), its targets and regions, its queries to the owners and their answers
    (``KeyIndex.answer``), and the manifest of its fragments. An owner's answers to every rank
    asking for its keys are timed too (``restore_owner_s``)."""
    world, nodes = target.world, -(-target.world // RANKS_PER_NODE)
    old, token = job.world, 12345
    held_by = {n: [q for q in range(old) if (q // RANKS_PER_NODE) % nodes == n] for n in range(nodes)}

    def node_headers(n):
        return [dict(snapshot_header(job, q, step, 1, crcs, token), host=node_of(n * RANKS_PER_NODE))
                for q in held_by[n]]

    def summaries(r):
        n = r // RANKS_PER_NODE
        return [{"rank": q, "slot": s, "step": step - 1 + s, "world_size": old, "complete": True,
                 "host": node_of(r), "token": token - 1 + s, "adopted": None} for q in held_by[n] for s in (0, 1)]

    # first the fold that looks for the in-place case (``_choose_own``): none here, another world
    own, g_try = fold_to_root("memory", lambda r: own_offer(r, world, None, summaries(r), {}), world, sample,
                              fold_own, lambda folded: decide_own(folded, world))
    assert own is None, own
    (chosen, speakers), g_find = fold_to_root(
        "memory-all", lambda r: node_offer(r, f"{node_of(r)}:4242", summaries(r), [], {}), world, sample, fold_nodes,
        lambda folded: (choose_source(folded, None, step), speaker_mask(folded)))
    assert (chosen["step"], chosen["world"], chosen["rec"]) == (step, old, None), chosen
    assert [r for r in range(world) if speakers >> r & 1] == list(range(0, world, RANKS_PER_NODE))
    ranks = {r: {"s": g_try.rank_s(r) + g_find.rank_s(r),
                 "bytes": g_try.rank_bytes(r) + g_find.rank_bytes(r), "owned": []} for r in sample}
    offers, speaker_of = [], {}
    load = np.zeros(world, dtype=np.int64)  # index entries per owner
    for r in ranks:
        ranks[r]["received"] = {}
    for n in range(nodes):  # each speaker: its node's fragments to their owners (and states to their ranks)
        speaker = n * RANKS_PER_NODE
        headers = node_headers(n)
        t0 = _now()
        msgs = index_messages(headers, world)
        blobs = {o: pickle.dumps(m) for o, m in msgs.items()} if speaker in ranks else \
            {o: pickle.dumps(m) for o, m in msgs.items() if o in ranks}
        t1 = _now()
        offers.append(state_offer(headers))  # (its part of the state's fold)
        if speaker in ranks:
            ranks[speaker]["s"] += _now() - t0
            ranks[speaker]["bytes"] += sum(map(len, blobs.values())) + 8 * world  # (and the counts' all-to-all)
        for o, m in msgs.items():
            load[o] += len(m[0])
        for o in ranks:
            if o in msgs:
                ranks[o]["received"][speaker] = msgs[o]
                ranks[o]["bytes"] += len(blobs[o])
        speaker_of[speaker] = n
        del headers, msgs, blobs
    common, g_state = fold_to_root("memory-state", lambda r: offers[speaker_of[r]] if r in speaker_of else None,
                                   world, sample, fold_states, lambda folded: decide_states(folded, old))
    del offers
    sources = None
    queries = {}
    for r, v in ranks.items():
        v["bytes"] += g_state.rank_bytes(r)
        v["s"] += g_state.rank_s(r)
        t0 = _now()
        received = v.pop("received")
        manifest = SnapshotManifest(common, r, own_state(received, r, common), KeyIndex(received), node_of(r))
        sources = SourceIndex(manifest.tensors)
        plans, missing, _, _ = _resolve_targets(target.pieces(r), sources, target.layout, Path("memory"), False)
        assert not missing, missing[:3]
        query = RegionQuery(_regions(plans, manifest, target.layout))
        asked = {o: pickle.dumps((q, node_of(r))) for o, q in query_messages(query.regions, world).items()}
        v["s"] += _now() - t0
        v["bytes"] += sum(map(len, asked.values())) + 8 * world
        v["manifest"], queries[r] = manifest, query
    # the owners the sampled ranks ask: their entries (a second pass over the headers, keeping those keys)
    busiest = int(load.argmax())  # the owner of the most entries: its answers are timed as well
    wanted = {o for q in queries.values() for o in query_messages(q.regions, world)} | {busiest}
    entries: dict = {o: [] for o in wanted}
    for n in range(nodes):
        for o, (m, _) in index_messages(node_headers(n), world).items():
            if o in entries:
                entries[o] += m
    owners = {o: KeyIndex({0: (e, {})}) for o, e in entries.items()}
    del entries
    answer_s = 0.0
    for r, v in ranks.items():
        got = {}
        for o, q in query_messages(queries[r].regions, world).items():
            t0 = _now()
            got[o] = owners[o].answer(q, node_of(r))
            answer_s = max(answer_s, _now() - t0)
        blobs = [pickle.dumps(a) for a in got.values()]
        v["bytes"] += sum(map(len, blobs))
        t0 = _now()
        fragments, files = [], {}
        for blob in blobs:
            for rank, _, size, f in pickle.loads(blob):
                fragments.append(FragmentRecord.from_dict(f).fragment(rank))
                files[f["file"]] = size
        m = v["manifest"]
        selected = Manifest(m.step, m.layout, m.tensors, tuple(fragments), {"shared": {}, "ranks": {}}, files,
                            block_bytes=BLOCK_BYTES)
        selected.validate_header()
        selected.validate_fragments(cover=False)
        v["s"] += _now() - t0
        v["fragments"] = len(fragments)
    # an owner's work: answering every target rank that asks for its keys
    timed = [*ranks, busiest]
    owner_s = {r: 0.0 for r in timed}
    mine = {r: owners.get(r) or KeyIndex({0: ([], {})}) for r in timed}
    keys = {r: set(index._keys) for r, index in mine.items()}
    any_manifest = next(iter(ranks.values()))["manifest"]
    for q in range(world):
        held = target.pieces(q)
        for r in timed:
            pieces = [p for p in held if p.key in keys[r]]
            if not pieces:
                continue
            plans, _, _, _ = _resolve_targets(pieces, sources, target.layout, Path("memory"), False)
            regions = _regions(plans, any_manifest, target.layout)
            t0 = _now()
            mine[r].answer({k: b for k, b in regions.items() if k in keys[r]}, node_of(q))
            owner_s[r] += _now() - t0
    for r, v in ranks.items():
        v["total_s"] = v["s"] + owner_s[r]
        v.pop("manifest")
    return {"ranks": ranks, "root_s": g_try.root_s + g_find.root_s + g_state.root_s, "owner_s": owner_s,
            "root_choice_s": g_try.root_s + g_find.root_s, "root_choice_bytes": g_find.root_recv_bytes,
            "root_state_s": g_state.root_s, "root_state_bytes": g_state.root_recv_bytes,
            "busiest": {"rank": busiest, "entries": int(load[busiest]), "keys": len(keys[busiest]),
                        "answer_s": owner_s[busiest]},
            "answer_s": answer_s, "common_bytes": g_state.verdict_bytes}


# -- one world ----------------------------------------------------------------------------------------


def _clock_name() -> str:
    return next(name for name, fn in CLOCKS.items() if fn is _clock)


def sampled(world: int) -> list[int]:
    """Rank 1, the middle rank and the last (rank 0 commits)."""
    return sorted({r for r in (1, world // 2, world - 1) if 0 < r < world}) or [0]


def run_world(layout: str, world: int, work: Path, keep: bool = False, layers: int | None = None) -> dict:
    """Measure one world size of ``layout`` (with ``layers`` layers instead of the model's, if given);
    returns its JSON document."""
    t_all = time.perf_counter()
    tp, pp, dp, ep = scale_layouts.sizes_for(layout, world)
    model = scale_layouts.MODELS[layout]
    if layers is not None:
        model = replace(model, layers=layers)
    job = scale_layouts.ScaleJob(model, tp, pp, dp, ep)
    target = scale_layouts.ScaleJob(model, *scale_layouts.smaller(tp, pp, dp, ep))
    sample, tsample = sampled(world), sampled(target.world)
    step = scale_layouts.STEP
    root = work / "root"
    directory = store.step_dir(root, step)
    crcs = Checksums()
    out: dict = {"layout": layout, "layers": model.layers, "clock": _clock_name(), "world": world,
                 "tp": tp, "pp": pp, "dp": dp, "ep": ep,
                 "target_world": target.world, "target_tp": target.tp, "target_pp": target.pp,
                 "target_dp": target.dp, "sampled_ranks": sample, "target_sampled_ranks": tsample,
                 "committing_rank": 0}
    log(f"W={world} ({layout}: tp {tp} pp {pp} dp {dp} ep {ep}; load onto {target.world}): save")

    # SAVE: the first save of a layout (its plan made on rank 0), then a save reusing the plan
    plans = SavePlans()
    plans.shares = None
    first = save_now(job, step, root, store.step_dir(root, step - 1), crcs, sample, plans)
    log(f"W={world}: save again (the plan reused)")
    again = save_now(job, step, root, directory, crcs, sample, plans)
    out["pieces_gathered"] = sum(len(v) for v in plans.infos.values())  # (by rank 0, once per layout)
    out["fragments"] = again["fragments"]
    out["block_crcs"] = again["blocks"]
    out["checkpoint_bytes"] = again["nbytes"]
    out.update(save_keys("save_", first, sample))
    out.update(save_keys("save_cached_", again, sample))
    out["plan_s"] = first["plan"].root_s  # rank 0, once per layout: the shares' unpickling and plan_save
    out["commit_first_s"] = first["build_s"] + first["write_s"]  # (every fragment validated: once per plan)
    out["commit_build_s"] = again["build_s"]
    out["commit_write_s"] = again["write_s"]
    out["commit_s"] = again["build_s"] + again["write_s"]
    out["commit_root_recv_s"] = sum(again[k].root_s for k in ("capture", "write"))
    # what a gather of every rank's whole state would bring rank 0 (each pickled, as before the fold)
    out["save_states_bytes"] = sum(len(pickle.dumps(job.state(r, step))) for r in range(world))
    del first, again, plans
    sizes = manifest_files(directory)
    out["manifest_json_bytes"] = sizes.pop(MANIFEST)
    out["manifest_tables_bytes"] = sum(sizes.values())  # the paged fragment and state tables
    out["manifest_bytes"] = out["manifest_json_bytes"] + out["manifest_tables_bytes"]

    # LOAD onto the smaller world
    log(f"W={world}: load onto {target.world}")
    ld = load_now(directory, target, tsample)
    out["load_targets_exchange_bytes"] = max(ld["exchange"].rank_bytes(r) for r in tsample)
    out["load_targets_root_bytes"] = ld["exchange"].root_recv_bytes  # what rank 0 receives of the targets phase
    out["load_targets_root_s"] = ld["exchange"].root_s
    out["load_metadata_s"] = max(v["total_s"] for v in ld["ranks"].values())
    out["load_metadata_s_by_rank"] = {str(r): v["total_s"] for r, v in ld["ranks"].items()}
    out["manifest_bytes_read_per_rank"] = max(v["manifest_bytes"] for v in ld["ranks"].values())
    out["load_bytes_per_rank"] = max(v["bytes"] for v in ld["ranks"].values())
    out["load_pieces_by_rank"] = {str(r): {k: v[k] for k in ("exact", "resharded", "blocks", "fragments")}
                                  for r, v in ld["ranks"].items()}
    del ld

    # RESTORE from memory (same world)
    log(f"W={world}: restore from memory")
    rs = restore_metadata(job, step, crcs, sample)
    out["restore_summaries_bytes"] = max(rs["find"].rank_bytes(r) for r in sample)
    out["restore_root_s"] = rs["root_s"]  # rank 0: every node's summaries, the choice
    out["restore_own_s"] = max(v["own_s"] for v in rs["ranks"].values())
    out["restore_own_header_bytes"] = max(v["own_bytes"] for v in rs["ranks"].values())
    out["restore_metadata_s"] = max(v["total_s"] for v in rs["ranks"].values())
    out["restore_bytes_per_rank"] = max(v["bytes"] for v in rs["ranks"].values())
    out["restore_fragments_per_rank"] = rs["fragments"]
    del rs
    log(f"W={world}: restore from memory onto {target.world} ranks")
    rr = restore_resharded(job, target, step, crcs, tsample)
    out["restore_resharded_metadata_s"] = max(v["total_s"] for v in rr["ranks"].values())
    out["restore_resharded_metadata_s_by_rank"] = {str(r): round(v["total_s"], 4) for r, v in rr["ranks"].items()}
    out["restore_resharded_bytes_per_rank"] = max(v["bytes"] for v in rr["ranks"].values())
    out["restore_resharded_owner_s"] = max(rr["owner_s"].values())  # (the busiest owner's included)
    out["restore_resharded_busiest_owner"] = rr["busiest"]
    out["restore_resharded_root_s"] = rr["root_s"]
    for k in ("choice_s", "choice_bytes", "state_s", "state_bytes"):  # (the choice's folds; the state's gather)
        out[f"restore_resharded_root_{k}"] = rr[f"root_{k}"]
    out["restore_resharded_common_bytes"] = rr["common_bytes"]
    out["restore_resharded_fragments_per_rank"] = max(v["fragments"] for v in rr["ranks"].values())
    del rr

    if keep:
        out["checkpoint_dir"] = str(directory)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["load_avg_1m"] = (benchlib.load_average() or [None])[0]
    out["ucp"] = __version__
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


# -- several worlds ---------------------------------------------------------------------------------


#: the per-rank metrics whose growth in W the last line fits
GROWTH_KEYS = ("save_metadata_s", "save_bytes_per_rank", "save_cached_metadata_s", "save_cached_bytes_per_rank",
               "save_capture_bytes", "save_write_bytes", "plan_s", "commit_s", "commit_first_s", "manifest_bytes",
               "load_metadata_s", "load_targets_exchange_bytes", "manifest_bytes_read_per_rank", "load_bytes_per_rank",
               "restore_metadata_s", "restore_bytes_per_rank", "restore_own_s", "restore_root_s",
               "restore_resharded_metadata_s", "restore_resharded_bytes_per_rank", "restore_resharded_owner_s",
               "restore_resharded_root_s", "peak_rss_bytes")


def growth(docs: list[dict], lo: int = FIT_RANGE[0], hi: int = FIT_RANGE[1]) -> dict:
    """Least-squares slope of log(metric) over log(W) for the worlds in ``[lo, hi]``."""
    pts = [d for d in docs if lo <= d["world"] <= hi]
    out = {}
    for key in GROWTH_KEYS:
        xy = [(math.log(d["world"]), math.log(d[key])) for d in pts if d.get(key)]
        if len(xy) < 2:
            continue
        mx = sum(x for x, _ in xy) / len(xy)
        my = sum(y for _, y in xy) / len(xy)
        den = sum((x - mx) ** 2 for x, _ in xy)
        out[key] = round(sum((x - mx) * (y - my) for x, y in xy) / den, 3) if den else None
    return {"fit": "growth", "layout": docs[0]["layout"], "worlds": [d["world"] for d in pts],
            "range": [lo, hi], "slopes": out}


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def child(args, world: int) -> dict:
    """Run one world in a fresh process (its own peak RSS); its JSON line."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--world", str(world), "--layout", args.layout,
           "--clock", args.clock]
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    if args.work:
        cmd += ["--work", str(args.work)]
    if args.keep:
        cmd.append("--keep")
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"W={world} failed (exit {p.returncode}; its error is above)")
    return json.loads(p.stdout.strip().splitlines()[-1])


def one(args, world: int) -> dict:
    with benchlib.workdir(args.work, "ucp_bench_scale_", log, args.keep) as work:
        if not args.profile:
            return run_world(args.layout, world, work, args.keep, args.layers)
        import cProfile
        import pstats

        prof = cProfile.Profile()  # (its own clock: a CPU-time clock is a system call per event)
        doc = prof.runcall(run_world, args.layout, world, work, args.keep, args.layers)
        stats = pstats.Stats(prof, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(args.profile)
        stats.sort_stats("cumulative").print_stats(r"/ucp/", args.profile)  # (ucp's own functions, cumulative)
        return doc


def main(argv=None) -> int:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--world", type=int, action="append", help="a world size (repeatable); default: "
                    + ", ".join(map(str, DEFAULT_WORLDS)))
    ap.add_argument("--layout", default="llama70b", choices=sorted(scale_layouts.MODELS))
    ap.add_argument("--max-world", type=int, default=None, help="skip worlds above this")
    ap.add_argument("--layers", type=int, default=None, help="layers of the model instead of its own (quick runs)")
    ap.add_argument("--clock", default="cpu", choices=sorted(CLOCKS),
                    help="what a second is: this process's CPU time (default) or elapsed time")
    ap.add_argument("--profile", type=int, default=0, help="print the N functions of most own time (cProfile)")
    benchlib.add_work(ap)
    benchlib.add_keep(ap, "the checkpoint directories")
    args = ap.parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    worlds = [w for w in (args.world or DEFAULT_WORLDS) if args.max_world is None or w <= args.max_world]
    if not worlds:
        ap.error("no world size left under --max-world")
    if len(worlds) == 1:
        return benchlib.finish(benchlib.attempt(one, args, worlds[0], log=log, trace=True))
    docs = []
    for w in worlds:
        avail = mem_available()
        if docs and avail is not None and w > docs[-1]["world"]:
            need = docs[-1]["peak_rss_bytes"] * w / docs[-1]["world"]  # (memory grows about linearly in W)
            if need > 0.9 * avail:
                log(f"W={w} skipped: it would need about {need / 2**30:.1f} GiB (peak RSS at W={docs[-1]['world']} "
                    f"x {w / docs[-1]['world']:g}), {avail / 2**30:.1f} GiB are available")
                continue
        doc = benchlib.attempt(child, args, w, log=log)
        if isinstance(doc, int):
            return doc
        benchlib.emit(doc)
        docs.append(doc)
    benchlib.emit(growth(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
