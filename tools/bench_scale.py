#!/usr/bin/env python
"""Metadata cost of ucp's save, load and restore from memory at W simulated ranks, in one process.

Runs ucp's REAL planning, manifest, commit and load-metadata code (not a model of it) on the pieces
every rank of a large job would capture (``tools/scale_layouts.py``: Llama-70B, Llama-405B or an
MoE under tp x pp x dp [x ep], ZeRO-1 flat optimizer state; real byte sizes, fake CRCs, no tensor
data), and prints one JSON line per world size W. Every measured phase is one small function
calling ucp's code, to be pointed at the new code when the save and load are redesigned:

* :func:`save_exchange` -- a collective phase of ``checkpoint.save.save_durable`` ("capture",
  "compare", "write"; and "plan", "prepare", "commit", whose outcome is all they gather): each rank's
  return value in ``Collective.phase``'s outcome tuple, pickled as ``torch.distributed.all_gather_object``
  pickles it; every rank receives (and unpickles) every rank's object. The bytes received are the sum
  of the objects' sizes (``*_wire_bytes``: W x the largest, which is what all_gather_object really
  moves: it pads every object to the largest).
* :func:`save_plan` -- the checksums merged into the pieces, ``merge_metas`` and ``assign_writers`` on
  the gathered input, as every rank computes them (``save_plan_s`` adds ``replicated_regions``, which
  every rank runs between capture and compare).
* :func:`commit` -- rank 0: the ``Manifest`` built from the gathered write results exactly as
  ``save_durable``'s commit does (``Fragment`` s, ``split_state``), ``Manifest.validate()``, and
  ``storage.rank_files.commit_step`` (sizes checked, fragment table, ``manifest.json``) into a work
  directory whose rank files are sparse files of the recorded sizes.
* :func:`load_metadata` -- onto a world 25% smaller (dp reduced): ``read_manifest``, the targets phase
  (``SourceIndex``, ``load._resolve_targets``: ``check_target``, ``resolve``), its all-gather of the
  keys each rank takes, and what the read phase builds before reading a byte (the strictness check
  ``_untaken``, ``FragmentIndex``, per piece the exact fragment or ``FragmentReader.read_resharded``'s
  plan: ``source_pieces``, ``relocate``, ``target_pieces``, ``reshard_plan``, byte spans and blocks).
* :func:`restore_metadata` -- ``checkpoint.memory.Snapshots.source``: the all-gather of every node's
  header summaries (8 ranks a node, two slots each), ``restorable`` / ``find_recoverable``, the
  all-gather of every rank's full snapshot header (the dict ``MemoryTier.write`` commits), and
  ``snapshot.header.manifest_from_headers`` over all of them.

Sampled ranks: rank 1, the middle rank and the last rank (of the target world for the load); rank 0
commits. What every rank receives is the same, so the unpickling of a gathered phase and the work
every rank does alike (the plan, ``read_manifest``, ``manifest_from_headers``) are timed once and
counted for each sampled rank; what differs per rank (pickling its own object, its targets and
reshard plans) is timed per sampled rank. ``*_s`` of a rank are seconds of one core.

Keys (per W): ``save_metadata_s`` / ``save_bytes_per_rank`` (worst sampled non-committing rank:
capture exchange + compare exchange + plan + write exchange + the three outcome-only gathers,
``save_outcomes_*``; bytes sent + received), ``commit_s``, ``manifest_bytes`` (``manifest.json`` +
fragment table on disk), ``load_metadata_s``, ``manifest_bytes_read_per_rank``, ``restore_metadata_s``,
``restore_bytes_per_rank``, each phase's seconds and bytes, ``pieces_gathered`` (every rank's pieces),
``fragments``, ``peak_rss_bytes`` (``ru_maxrss`` of the process running that W), ``load_avg_1m``.
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
import io
import json
import math
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
from ucp.checkpoint.load import _resolve_targets, _untaken
from ucp.codecs.checksum import crc32c
from ucp.format.dtypes import DTYPES, itemsize
from ucp.format.fragment import Fragment
from ucp.format.keys import MODEL, parse_key
from ucp.format.manifest import BLOCK_BYTES, Manifest
from ucp.format.values import split_state
from ucp.plan.geometry import byte_span, needed_blocks
from ucp.plan.load_plan import FragmentIndex
from ucp.plan.reshard import reshard_plan, source_pieces, target_pieces
from ucp.plan.save_plan import PieceInfo, assign_writers, merge_metas, replicated_regions
from ucp.plan.sources import SourceIndex, relocate
from ucp.snapshot import shm
from ucp.snapshot.header import manifest_from_headers, restorable
from ucp.snapshot.memory import FORMAT as SNAPSHOT_FORMAT
from ucp.snapshot.memory import FORMAT_VERSION as SNAPSHOT_VERSION
from ucp.snapshot.memory import place
from ucp.snapshot.recovery import find_recoverable
from ucp.storage import directory as store
from ucp.storage.directory import MANIFEST
from ucp.storage.manifest_io import read_manifest
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


# -- one collective phase -----------------------------------------------------------------------------


@dataclass
class Exchange:
    """One all-gather of W objects: what a rank sends and receives, and the seconds it spends."""

    name: str
    world: int
    recv_bytes: int = 0  # sum of every rank's pickled object (a rank receives all, its own included)
    largest: int = 0  # all_gather_object pads every object to the largest
    recv_s: float = 0.0  # unpickling all W objects (the same on every rank)
    sent: dict = field(default_factory=dict)  # sampled rank -> bytes of its pickled object
    pickle_s: dict = field(default_factory=dict)  # sampled rank -> seconds pickling it

    def rank_s(self, rank: int) -> float:
        return self.recv_s + self.pickle_s[rank]

    def rank_bytes(self, rank: int) -> int:
        return self.sent[rank] + self.recv_bytes

    def wire_bytes(self, rank: int) -> int:
        return self.largest + self.world * self.largest


def all_gather_object(name: str, make, world: int, sample, keep=None) -> tuple[list, Exchange]:
    """Every rank's ``make(rank)`` as ``Collective.phase`` all-gathers it (the outcome tuple
    ``(True, value, None)``, pickled and unpickled as ``torch.distributed.all_gather_object`` does),
    one rank at a time so that only what a receiver keeps stays in memory; ``keep(rank, value)``
    (after the timed unpickle) may swap parts of a value for equal shared objects."""
    x = Exchange(name, world)
    out = [None] * world
    for r in range(world):
        obj = (True, make(r), None)
        t0 = _now()
        f = io.BytesIO()
        pickle.Pickler(f).dump(obj)
        blob = f.getvalue()
        t1 = _now()
        value = pickle.Unpickler(io.BytesIO(blob)).load()[1]
        x.recv_s += _now() - t1
        if r in sample:
            x.sent[r], x.pickle_s[r] = len(blob), t1 - t0
        x.recv_bytes += len(blob)
        x.largest = max(x.largest, len(blob))
        out[r] = value if keep is None else keep(r, value)
    return out, x


# -- what the ranks of a durable save return from its phases (checkpoint.save.save_durable) ---------


def capture_result(job, rank: int, root: str, step: int) -> tuple:
    """What ``save_durable``'s ``capture()`` returns on ``rank``."""
    pieces = job.pieces(rank)
    metas = {p.key: p.meta for p in pieces}
    pieces = [p for p in pieces if p.numel]
    infos = [PieceInfo(p.key, p.box, p.flat, p.meta.dtype, p.nbytes) for p in pieces]
    return infos, metas, job.state(rank, step), job.layout, (step, root)


def compare_result(infos: list, shared: set, crcs: Checksums) -> dict:
    """What ``compare()`` returns: ``{piece: (crc, block crcs)}`` of the pieces in replicated regions."""
    return {i: crcs.of(info.region, info.nbytes) for i, info in enumerate(infos) if info.region in shared}


def write_result(rank: int, infos: list, mine: list, crcs: Checksums):
    """What ``write()`` returns: the rank file's name, size, each fragment's offset (the safetensors
    header ``write_rank_file`` would write, from ``plan_file``), the late checksums, the header's CRC."""
    if not mine:
        return None
    slots = [Slot(entry_name(i.key, i.box, i.flat), DTYPES[i.dtype][1], (i.flat.numel,) if i.flat else i.box.sizes,
                  i.nbytes) for i in (infos[k] for k in mine)]
    head, offsets = plan_file(slots, {"format": RANK_FILE_FORMAT, "rank": str(rank)})
    late = {k: crcs.of(infos[k].region, infos[k].nbytes) for k in mine if infos[k].crc32c is None}
    return store.rank_file(rank), len(head) + sum(s.nbytes for s in slots), offsets, late, crc32c(head)


# -- the measured phases --------------------------------------------------------------------------------


def save_exchange(name: str, make, world: int, sample, keep=None) -> tuple[list, Exchange]:
    """Phase ``name`` of a durable save: every rank's ``make(rank)``, all-gathered."""
    return all_gather_object(name, make, world, sample, keep)


def save_plan(gathered: list, early: list) -> tuple[list, dict, list, float]:
    """The plan every rank computes after the compare phase, as ``save_durable`` does: the early
    checksums merged into the pieces, ``merge_metas``, ``assign_writers``; returns
    ``(pieces by rank, metas, writers, seconds)``."""
    t0 = _now()
    infos_by_rank = [[replace(info, crc32c=early[r][i][0] if i in early[r] else None) for i, info in enumerate(g[0])]
                     for r, g in enumerate(gathered)]
    layouts = {g[3] for g in gathered}
    targets = {g[4] for g in gathered}
    assert len(layouts) == 1 and len(targets) == 1
    metas = merge_metas([g[1] for g in gathered])
    assignments = assign_writers(infos_by_rank)
    return infos_by_rank, metas, assignments, _now() - t0


def commit(directory: Path, step: int, layout, gathered: list, infos_by_rank: list, early: list, written: list,
           assignments: list, metas: dict) -> tuple[Manifest, dict]:
    """Rank 0's commit, as ``save_durable``'s ``commit()`` does it (without the lease): the manifest
    from the gathered write results, validated, then ``commit_step``. Returns the manifest and
    ``{build_s, write_s}``."""
    t0 = _now()
    fragments, files, heads = [], {}, {}
    for r, w in enumerate(written):
        if w is None:
            continue
        name, size, offsets, late, heads[name] = w
        files[name] = size
        for i, off in zip(assignments[r], offsets):
            info = infos_by_rank[r][i]
            crc, blocks = early[r][i] if i in early[r] else late[i]
            fragments.append(Fragment(info.key, info.box, info.flat, info.dtype, r, name, off, info.nbytes, crc,
                                      blocks))
    manifest = Manifest(step, layout, metas, tuple(fragments), split_state([g[2] for g in gathered]), files,
                        created_by=f"ucp {__version__}", block_bytes=BLOCK_BYTES, file_headers=heads)
    manifest.validate()
    t1 = _now()
    sparse_rank_files(directory, files)  # (the writers' files: not timed)
    t2 = _now()
    commit_step(directory, manifest)
    return manifest, {"build_s": t1 - t0, "write_s": _now() - t2}


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
    """What ``FragmentReader.read_resharded`` computes before its first read: the source and target
    pieces, the reshard plan, each fragment's byte spans and the blocks holding them; returns the
    number of blocks it would read."""
    sources = []
    for s in slices:
        meta = manifest.tensors[s.key]
        sources += relocate(source_pieces(index.by_key.get(s.key, []), meta.shape, meta.pattern, manifest.layout), s)
    targets = target_pieces(piece.box, piece.flat, piece.meta.shape, piece.meta.pattern, target_layout)
    items = reshard_plan(sources, targets, piece.key)
    spans: dict = {}
    for item in items:
        f = item.source.ref[1]
        spans.setdefault(f, []).append(byte_span(item.source.sub.box.sizes, item.src, itemsize(f.dtype),
                                                 item.source.sub.offset))
    blocks = 0
    for f, sp in spans.items():
        need = needed_blocks(sp, len(f.blocks or ()), manifest.block_bytes)
        blocks += len(f.blocks) if need is None else sum(b - a for a, b in need)
    return blocks


def load_targets(manifest, target, rank: int, path: Path) -> tuple[list, set]:
    """The targets phase of ``load._load`` on ``rank`` of ``target``: its pieces resolved to the
    checkpoint's tensors (a flat-partitioned optimizer vouches for every flat key)."""
    sources = SourceIndex(manifest.tensors)
    plans, missing, taken, _ = _resolve_targets(target.pieces(rank), sources, target.layout, path, False)
    assert not missing, missing[:3]
    return plans, taken | {k for k, m in manifest.tensors.items() if m.pattern.flat}


def load_read_plan(manifest, plans: list, taken_by_rank: list, target_layout) -> dict:
    """What the read phase of ``load._load`` builds before reading a byte: the strictness check over
    every rank's taken keys, the fragment index, and each piece's exact fragment or reshard plan."""
    taken = set().union(*taken_by_rank)
    unexpected = [k for k in _untaken(manifest.tensors, taken, SourceIndex(manifest.tensors))
                  if parse_key(k).kind == MODEL or parse_key(k).kind == "optim"]
    assert not unexpected, unexpected[:3]
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


def load_metadata(directory: Path, target, sample) -> dict:
    """A load of the checkpoint in ``directory`` onto ``target`` up to its first read, on the
    sampled ranks; returns per-rank seconds and bytes and the parts."""
    t0 = _now()
    manifest = read_manifest(directory)  # (every rank reads the same manifest: timed once)
    read_s = _now() - t0
    nbytes = sum(manifest_files(directory).values())
    per_rank: dict = {}
    for r in sample:
        t0 = _now()
        per_rank[r] = load_targets(manifest, target, r, directory)
        per_rank[r] = (*per_rank[r], _now() - t0)
    flat_keys = {k for k, m in manifest.tensors.items() if m.pattern.flat}

    def taken_of(r):  # every other rank's targets resolve to their own keys ("same"): checked on the sampled ones
        if r in per_rank:
            return per_rank[r][1]
        return {p.key for p in target.pieces(r)} | flat_keys

    for r in sample:
        assert per_rank[r][1] == {p.key for p in target.pieces(r)} | flat_keys
    taken_by_rank, x = all_gather_object("targets", taken_of, target.world, sample)
    out = {"read_manifest_s": read_s, "manifest_bytes_read": nbytes, "exchange": x, "ranks": {}}
    for r in sample:
        plans, _, targets_s = per_rank[r]
        t0 = _now()
        counts = load_read_plan(manifest, plans, taken_by_rank, target.layout)
        out["ranks"][r] = dict(counts, targets_s=targets_s, read_plan_s=_now() - t0,
                               total_s=read_s + targets_s + x.rank_s(r) + (_now() - t0),
                               bytes=nbytes + x.rank_bytes(r))
    return out


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
    """``Snapshots.source`` on every rank of ``job`` (each node's agent holding two snapshots of each
    of its ranks: ``step - 1`` and ``step``, both complete, no parity): the summaries' all-gather and
    choice, the all-gather of the chosen snapshot's headers (sent by each node's lowest rank), and
    ``manifest_from_headers``; returns per-rank seconds and bytes."""
    world, token = job.world, 12345

    def summaries(r):
        node = node_of(r)
        first = r - r % RANKS_PER_NODE
        held = [{"rank": q, "slot": s, "step": step - 1 + s, "world_size": world, "complete": True, "host": node,
                 "token": token - 1 + s, "adopted": None}
                for q in range(first, min(first + RANKS_PER_NODE, world)) for s in (0, 1)]
        status = {"adopted": {}, "discarded": {}, "predecessor": None}
        return f"{node}:4242", held, [], status, (step if r == 0 else None)

    gathered, x_memory = all_gather_object("memory", summaries, world, sample)
    t0 = _now()
    nodes = [(n, h, rec) for n, h, rec, _, _ in gathered]
    per_node = {n: (held, records) for n, held, records in nodes}
    unique = [h for held, _ in per_node.values() for h in held if h["step"] == step]
    newest = restorable(unique)
    rec, _ = find_recoverable([(n, held, records) for n, (held, records) in per_node.items()], step)
    assert newest == (step, world) and rec is None, (newest, rec)
    choose_s = _now() - t0
    del gathered, nodes, per_node, unique

    def headers(r):
        if r % RANKS_PER_NODE:
            return []
        return [snapshot_header(job, q, step, 1, crcs, token) for q in range(r, min(r + RANKS_PER_NODE, world))]

    def share(_, held):  # the received block lists swapped for equal shared ones (memory, not time)
        for h in held:
            for f in h["fragments"]:
                flat = None if f["flat"] is None else tuple(f["flat"])
                f["blocks"] = crcs.as_list((f["key"], tuple(f["offsets"]), tuple(f["sizes"]), flat))
        return held

    got, x_headers = all_gather_object("memory-headers", headers, world, sample, share)
    t0 = _now()
    chosen = list({h["rank"]: h for held in got for h in held}.values())
    manifest = manifest_from_headers(chosen, node_of(sample[0]))
    build_s = _now() - t0
    ranks = {r: {"total_s": x_memory.rank_s(r) + choose_s + x_headers.rank_s(r) + build_s,
                 "bytes": x_memory.rank_bytes(r) + x_headers.rank_bytes(r)} for r in sample}
    return {"memory": x_memory, "headers": x_headers, "choose_s": choose_s, "manifest_s": build_s,
            "fragments": len(manifest.fragments), "ranks": ranks}


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

    # SAVE: capture, (replicated regions), compare, plan, write, commit
    cap, x_cap = save_exchange("capture", lambda r: capture_result(job, r, str(root.resolve()), step), world, sample)
    infos_by_rank = [g[0] for g in cap]
    t0 = _now()
    shared = replicated_regions(infos_by_rank)
    regions_s = _now() - t0

    def same_crcs(r, got):  # (the received checksums swapped for the equal shared ones: memory, not time)
        return {i: crcs.of(infos_by_rank[r][i].region, infos_by_rank[r][i].nbytes) for i in got}

    early, x_cmp = save_exchange("compare", lambda r: compare_result(infos_by_rank[r], shared, crcs), world, sample,
                                 same_crcs)
    infos_by_rank, metas, assignments, plan_s = save_plan(cap, early)
    plan_s += regions_s

    def same_late(r, got):
        if got is None:
            return None
        name, size, offsets, late, head = got
        return name, size, offsets, {i: crcs.of(infos_by_rank[r][i].region, infos_by_rank[r][i].nbytes)
                                     for i in late}, head

    written, x_wr = save_exchange("write", lambda r: write_result(r, infos_by_rank[r], assignments[r], crcs), world,
                                  sample, same_late)
    log(f"W={world}: commit")
    manifest, commit_parts = commit(directory, step, job.layout, cap, infos_by_rank, early, written, assignments, metas)
    # the phases whose outcome is all a rank receives: plan (None), prepare and commit (rank 0's result)
    _, x_plan = save_exchange("plan", lambda r: None, world, sample)
    _, x_prep = save_exchange("prepare", lambda r: (None, Cleared()) if r == 0 else None, world, sample)
    _, x_done = save_exchange("commit", lambda r: manifest.nbytes if r == 0 else None, world, sample)
    out["pieces_gathered"] = sum(len(i) for i in infos_by_rank)
    out["fragments"] = len(manifest.fragments)
    out["replicated_regions"] = len(shared)
    out["block_crcs"] = sum(len(f.blocks) for f in manifest.fragments)
    out["checkpoint_bytes"] = manifest.nbytes
    out["state_ranks_stored"] = len(manifest.state.get("ranks", {}))
    del cap, early, written, manifest, infos_by_rank, metas, assignments, shared
    phases = {"capture": x_cap, "compare": x_cmp, "write": x_wr}
    for name, x in phases.items():
        out[f"save_{name}_s"] = max(x.rank_s(r) for r in sample)
        out[f"save_{name}_bytes"] = max(x.rank_bytes(r) for r in sample)
        out[f"save_{name}_wire_bytes"] = max(x.wire_bytes(r) for r in sample)
        out[f"save_{name}_largest_object_bytes"] = x.largest
    out["save_plan_s"] = plan_s
    small = (x_plan, x_prep, x_done)
    out["save_outcomes_s"] = max(sum(x.rank_s(r) for x in small) for r in sample)
    out["save_outcomes_bytes"] = max(sum(x.rank_bytes(r) for x in small) for r in sample)
    every = (*phases.values(), *small)
    save_s = {r: sum(x.rank_s(r) for x in every) + plan_s for r in sample}
    out["save_metadata_s"] = max(save_s.values())
    out["save_metadata_s_by_rank"] = {str(r): v for r, v in save_s.items()}
    out["save_bytes_per_rank"] = max(sum(x.rank_bytes(r) for x in every) for r in sample)
    out["save_wire_bytes_per_rank"] = max(sum(x.wire_bytes(r) for x in every) for r in sample)
    out["commit_build_s"] = commit_parts["build_s"]
    out["commit_write_s"] = commit_parts["write_s"]
    out["commit_s"] = commit_parts["build_s"] + commit_parts["write_s"]
    sizes = manifest_files(directory)
    out["manifest_json_bytes"] = sizes.pop(MANIFEST)
    out["manifest_tables_bytes"] = sum(sizes.values())  # the fragment table (and whatever else the commit wrote)
    out["manifest_bytes"] = out["manifest_json_bytes"] + out["manifest_tables_bytes"]

    # LOAD onto the smaller world
    log(f"W={world}: load onto {target.world}")
    ld = load_metadata(directory, target, tsample)
    out["load_read_manifest_s"] = ld["read_manifest_s"]
    out["load_targets_s"] = max(v["targets_s"] for v in ld["ranks"].values())
    out["load_targets_exchange_s"] = max(ld["exchange"].rank_s(r) for r in tsample)
    out["load_targets_exchange_bytes"] = max(ld["exchange"].rank_bytes(r) for r in tsample)
    out["load_read_plan_s"] = max(v["read_plan_s"] for v in ld["ranks"].values())
    out["load_metadata_s"] = max(v["total_s"] for v in ld["ranks"].values())
    out["load_metadata_s_by_rank"] = {str(r): v["total_s"] for r, v in ld["ranks"].items()}
    out["manifest_bytes_read_per_rank"] = ld["manifest_bytes_read"]
    out["load_bytes_per_rank"] = max(v["bytes"] for v in ld["ranks"].values())
    out["load_pieces_by_rank"] = {str(r): {k: v[k] for k in ("exact", "resharded", "blocks")}
                                  for r, v in ld["ranks"].items()}
    del ld

    # RESTORE from memory (same world)
    log(f"W={world}: restore from memory")
    rs = restore_metadata(job, step, crcs, sample)
    out["restore_summaries_s"] = max(rs["memory"].rank_s(r) for r in sample)
    out["restore_summaries_bytes"] = max(rs["memory"].rank_bytes(r) for r in sample)
    out["restore_choose_s"] = rs["choose_s"]
    out["restore_headers_s"] = max(rs["headers"].rank_s(r) for r in sample)
    out["restore_headers_bytes"] = max(rs["headers"].rank_bytes(r) for r in sample)
    out["restore_headers_wire_bytes"] = max(rs["headers"].wire_bytes(r) for r in sample)
    out["restore_manifest_s"] = rs["manifest_s"]
    out["restore_metadata_s"] = max(v["total_s"] for v in rs["ranks"].values())
    out["restore_bytes_per_rank"] = max(v["bytes"] for v in rs["ranks"].values())
    out["restore_fragments"] = rs["fragments"]
    del rs

    if keep:
        out["checkpoint_dir"] = str(directory)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["load_avg_1m"] = (benchlib.load_average() or [None])[0]
    out["ucp"] = __version__
    out["wall_s"] = round(time.perf_counter() - t_all, 1)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


# -- several worlds ---------------------------------------------------------------------------------


#: the per-rank metrics whose growth in W the last line fits
GROWTH_KEYS = ("save_metadata_s", "save_bytes_per_rank", "save_wire_bytes_per_rank", "save_capture_s",
               "save_capture_bytes", "save_compare_s", "save_compare_bytes", "save_plan_s", "save_write_s",
               "save_write_bytes", "commit_s", "manifest_bytes", "load_metadata_s", "load_read_manifest_s",
               "load_targets_exchange_s", "load_targets_exchange_bytes", "load_read_plan_s",
               "manifest_bytes_read_per_rank", "load_bytes_per_rank", "restore_metadata_s", "restore_bytes_per_rank",
               "restore_headers_s", "restore_manifest_s", "peak_rss_bytes")


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
