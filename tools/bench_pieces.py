#!/usr/bin/env python
"""What a load from memory costs per tensor piece: a model of many small tensors, where the bytes are
nothing and every per-piece step (headers, manifest, targets, plans, reads, the optimizer's restore) is
what is measured.

The reference GPT (``ucp.trainer``) with ``--layers`` blocks of width ``--width`` on 2 local ranks
(gloo, FSDP2: ``TrainLayout(dp=2, zero=3)``), AdamW state created by one step; one snapshot into the
node's agent; then ``--repeats`` rounds of two loads from memory each, in alternating order:

* ``paused``: ``Checkpointer.load`` as ucp runs it, with Python's cyclic garbage collector paused
  (``ucp.checkpoint.collector``);
* ``collector_on``: the same load with that pause replaced by a no-op (patched in this script only):
  what the load cost before the pause, side by side.

Before each load the local state is overwritten with a constant; after it, a checksum of every local
tensor must equal the snapshot's (``bit_exact``). A load is timed between two barriers (wall seconds,
the slower rank's) and in the calling thread's CPU seconds (``time.process_time``, the larger rank's);
``collections`` counts the garbage collector's runs during the load, per generation (``gc.callbacks``,
rank 0: ``[young, middle, whole heap]``; a paused load ends with one young collection, of what the
load allocated, as the collector resumes);
``phases`` is rank 0's split of the median load over ucp's collective phases. ``per_piece_us``: the
median load's wall and CPU time over the pieces a rank loads. ``save_call_s``: the median time of the
snapshots' ``save()`` call (the training loop's stall) over ``--saves`` snapshots.

Output: exactly one JSON line on stdout; progress on stderr; a failure prints nothing on stdout and
exits non-zero.

    python tools/bench_pieces.py [--layers 64] [--width 64] [--repeats 5] [--saves 6]
"""

from __future__ import annotations

import gc
import os
import time
import uuid

import benchlib

NPROC = 2
LAYOUT = {"dp": 2, "zero": 3}
KINDS = ("paused", "collector_on")
log = benchlib.logger("bench_pieces")


def rank_main(rank: int, args, job: str, root: str) -> dict:
    import torch.distributed as dist

    import ucp
    from bench_reshard import build_target, scramble
    from bench_save import PhaseTimer
    from ucp.checkpoint import checkpointer as ck_module

    cfg = {"vocab": 256, "seq": 16, "d_model": args.width, "n_heads": 4, "n_layers": args.layers, "global_batch": 8}
    opts, model, opt = build_target(cfg, LAYOUT, 1)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt, options=opts,
                          snapshot=ucp.SnapshotOptions(every=1, persist_every=None, job=job))
    saves = []
    for step in range(1, args.saves + 2):
        t = time.perf_counter()
        ck.save(step)
        if step > 1:  # (the first makes the slots and the agent's connection)
            saves.append(time.perf_counter() - t)
        ck.wait()
    want = sums(model, opt)
    pieces = sum(1 for p in ck.capture()[0] if p.numel)
    phases = PhaseTimer()
    runs = []
    started = []
    gc.callbacks.append(lambda phase, info: started.append(info["generation"]) if phase == "start" else None)
    real = ck_module.collector_paused

    def load(kind: str) -> dict:
        scramble(model, opt)
        ck_module.collector_paused = real if kind == "paused" else _no_pause
        dist.barrier()
        phases.take()
        started.clear()
        t, c = time.perf_counter(), time.process_time()
        res = ck.load()
        cpu, collections = time.process_time() - c, [started.count(g) for g in range(3)]
        dist.barrier()
        wall = time.perf_counter() - t
        ck_module.collector_paused = real
        if res is None or res.source != "memory":
            raise RuntimeError(f"{kind}: the load returned {res!r}, not a restore from memory")
        return {"kind": kind, "wall": wall, "cpu": cpu, "collections": collections, "phases": phases.take(),
                "exact": sums(model, opt) == want}

    load("paused")  # untimed: the first load maps the segments
    for r in range(args.repeats):
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
            runs.append(load(kind))
    ck.close()
    return {"rank": rank, "pieces": pieces, "saves": saves, "runs": runs}


class _no_pause:
    """``collector_paused`` replaced: the load runs with the collector as the process has it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def sums(model, opt) -> list:
    """A checksum of every local tensor of ``model`` and ``opt``'s state, in order."""
    import zlib

    import torch

    out = []
    tensors = [p for p in model.parameters()] + [v for s in opt.state.values() for v in s.values()
                                                  if isinstance(v, torch.Tensor)]
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        out.append(zlib.crc32(local.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()))
    return out


def main() -> int:
    p = benchlib.parser(__doc__)
    p.add_argument("--layers", type=int, default=64, help="blocks of the reference GPT (default 64)")
    p.add_argument("--width", type=int, default=64, help="its d_model (default 64)")
    benchlib.add_repeats(p, 5, "rounds of the two loads")
    p.add_argument("--saves", type=int, default=6, help="snapshots timed for the save call (default 6)")
    args = p.parse_args()
    if min(args.layers, args.repeats, args.saves) < 1 or args.width < 8 or args.width % 4:
        p.error("use --layers, --repeats, --saves >= 1 and a --width >= 8 divisible by 4")
    job = "bp" + uuid.uuid4().hex[:8]
    t0 = time.perf_counter()
    load_before = benchlib.load_average()
    with benchlib.workdir(None, "ucp-bench-pieces-", log) as work:
        try:
            results = benchlib.attempt(benchlib.spawn_world, rank_main, NPROC, args, job, str(work / "root"),
                                       timeout=1800, threads=1, log=log)
        finally:
            left = _stop_agent(job)
    if isinstance(results, int):
        return results
    ranks = [results[r] for r in sorted(results)]
    out = {"bench": "ucp_load_pieces", "nproc": NPROC, "layout": LAYOUT, "layers": args.layers, "width": args.width,
           "repeats": args.repeats, "cpus": os.cpu_count(), "pieces_per_rank": max(r["pieces"] for r in ranks)}
    n = len(ranks[0]["runs"])
    for kind in KINDS:
        idx = [i for i in range(n) if ranks[0]["runs"][i]["kind"] == kind]
        wall = [max(r["runs"][i]["wall"] for r in ranks) for i in idx]
        cpu = [max(r["runs"][i]["cpu"] for r in ranks) for i in idx]
        out[f"{kind}_load_s"] = round(benchlib.median(wall), 4)
        out[f"{kind}_load_s_spread"] = benchlib.summary(wall)
        out[f"{kind}_cpu_s"] = round(benchlib.median(cpu), 4)
        out[f"{kind}_cpu_s_spread"] = benchlib.summary(cpu)
        out[f"{kind}_collections"] = [ranks[0]["runs"][i]["collections"] for i in idx]
        mid = sorted(idx, key=lambda i: max(r["runs"][i]["wall"] for r in ranks))[(len(idx) - 1) // 2]
        out[f"{kind}_phases"] = ranks[0]["runs"][mid]["phases"]
        out[f"{kind}_per_piece_us"] = {"wall": round(out[f"{kind}_load_s"] / out["pieces_per_rank"] * 1e6, 1),
                                       "cpu": round(out[f"{kind}_cpu_s"] / out["pieces_per_rank"] * 1e6, 1)}
    out["speedup_paused"] = round(out["collector_on_load_s"] / out["paused_load_s"], 3)
    out["cpu_ratio_paused"] = round(out["paused_cpu_s"] / out["collector_on_cpu_s"], 3)
    saves = [max(s) for s in zip(*(r["saves"] for r in ranks))]
    out["save_call_s"] = round(benchlib.median(saves), 4)
    out["save_call_s_spread"] = benchlib.summary(saves)
    out["bit_exact"] = all(run["exact"] for r in ranks for run in r["runs"])
    out["load_avg"] = {"start": load_before, "end": benchlib.load_average()}
    out["agents_left"] = left
    out["shm_left"] = len([f for f in os.listdir("/dev/shm") if job in f])
    if not out["bit_exact"]:
        log("FAILED: a load from memory was not bit-exact")
        return 1
    return benchlib.finish(benchlib.versions(out, t0))


def _stop_agent(job: str) -> int:
    """Stop the job's agent; how many were left running after (0 expected)."""
    from bench_snapshot import stop_agent

    stop_agent(job)
    from ucp.snapshot import discovery

    info = discovery.read_info(job)
    return int(info is not None and discovery.is_alive(info))


if __name__ == "__main__":
    raise SystemExit(main())
