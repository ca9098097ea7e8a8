#!/usr/bin/env python
"""What erasure-coded snapshots cost a training loop: step time with and without parity, same loop.

``--nodes`` simulated nodes on this machine, one rank each (each rank its own snapshot agent: a node
is an agent; docs/erasure.md section 6), in one gloo world, train one model sharded with FSDP2 over
all of them: ``--layers`` square ``Linear`` layers sized so that each rank's state (parameters and
AdamW's two moments, fp32) is about ``--mb`` MB, a batch of ``--batch`` rows per rank. Every rank
has two ``Checkpointer`` s of the same model: **plain** (``SnapshotOptions`` alone) and **parity**
(plus ``RedundancyOptions(group=--nodes, parity=--parity)``).

A *round* runs three windows of ``--every`` training steps each, in an order that rotates from round
to round: **none** (no snapshot), **plain** and **parity** (a snapshot taken by ``save`` before the
window's first step, its background work overlapping the window's steps). A window ends with
``wait``, so a snapshot that outlasts its window is paid for in that window. The window's time over
``--every`` is its step time (the slowest rank's). Figures, medians over rounds with their spread
((max - min) / median):

* ``step_none_s``, ``step_plain_s``, ``step_parity_s``: the step times;
* ``slowdown_parity`` : median over rounds of parity / plain - 1, the same round's windows (paired),
  with its ``_min`` / ``_max``; ``slowdown_plain``: plain / none - 1, the snapshot's own cost;
* ``cpu_none_s``, ``cpu_plain_s``, ``cpu_parity_s``: the CPU seconds of a window, all ranks' processes
  together (every thread; the agents are other processes), and ``cpu_parity_extra_s``, the median
  over rounds of parity - plain: what the exchange costs the machine per snapshot, steadier than the
  wall-clock figures when other work shares the cores;
* ``snapshot_plain_s``, ``snapshot_parity_s``, ``snapshot_ratio``: a snapshot timed from ``save`` to
  the end of ``wait`` with the trainers idle, the two kinds alternating (``--snapshots`` each) after
  the rounds;
* ``load_average`` before and after, and what the machine had (``cpus``).

With ``--nodes`` processes on few cores the ranks and their snapshots compete for CPU: the slowdown
measured here is an upper bound of what a node with cores to spare would see.

Output: one JSON line on stdout, progress on stderr; a failure prints nothing on stdout and exits 1.

    python tools/bench_parity_loop.py [--nodes 4] [--parity 1] [--mb 64] [--every 5] [--rounds 8]
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import benchlib

log = benchlib.logger("bench_parity_loop")
KINDS = ("none", "plain", "parity")


def rank_main(rank: int, args, base: str, root: str) -> dict:
    """One simulated node: its windows' times and its idle snapshots' times."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import ucp
    from ucp.snapshot import client

    mesh = init_device_mesh("cpu", (args.nodes,), mesh_dim_names=("dp",))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width, bias=False) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=gen)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    step()  # (the optimizer's state exists from here on)
    checkpointers = {}
    for kind in ("plain", "parity"):
        red = ucp.RedundancyOptions(group=args.nodes, parity=args.parity) if kind == "parity" else None
        checkpointers[kind] = ucp.Checkpointer(Path(root) / kind, model=model, optimizer=opt,
                                               options=ucp.CheckpointOptions(rng=False),
                                               snapshot=ucp.SnapshotOptions(job=f"{base}-{kind}-{rank}", timeout=120),
                                               redundancy=red)
    number = 0
    for ck in checkpointers.values():  # untimed: the slots and parity segments are created
        number += 1
        ck.save(number)
        step()
        ck.wait()
    windows: dict[str, list[float]] = {k: [] for k in KINDS}
    cpu: dict[str, list[float]] = {k: [] for k in KINDS}
    for r in range(args.rounds):
        for kind in KINDS[r % 3:] + KINDS[:r % 3]:
            ck = checkpointers.get(kind)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for i in range(args.every):
                if i == 0 and ck is not None:
                    number += 1
                    ck.save(number)
                step()
            if ck is not None:
                ck.wait()
            windows[kind].append((time.perf_counter() - t0) / args.every)
            cpu[kind].append(time.process_time() - c0)
    snaps: dict[str, list[float]] = {"plain": [], "parity": []}
    for _ in range(args.snapshots):
        for kind, ck in checkpointers.items():
            dist.barrier()
            number += 1
            t0 = time.perf_counter()
            ck.save(number)
            ck.wait()
            snaps[kind].append(time.perf_counter() - t0)
    status = client.connect(f"{base}-parity-{rank}").status()
    for ck in checkpointers.values():
        ck.close()
    nbytes = sum(t.to_local().numel() * 4 for t in model.parameters()) * 3
    return {"windows": windows, "cpu": cpu, "snapshots": snaps, "bytes": nbytes, "parity_bytes": status["parity_bytes"]}


def _cleanup(base: str, nodes: int) -> int:
    """Stop the benchmark's agents and unlink their segments; how many segments were left."""
    from ucp.snapshot import client, discovery, shm

    left = 0
    for r in range(nodes):
        for kind in ("plain", "parity"):
            job = f"{base}-{kind}-{r}"
            info = discovery.read_info(job) if discovery.discovery_path(job).exists() else None
            if info is not None and discovery.is_alive(info):
                client.stop(job, timeout=30)
            names = shm.listing(shm.prefix(job))
            left += len([n for n in names if not n.endswith(".agent.lock")])
            for n in names:
                shm.unlink(n)
    return left


def _figures(xs: list[float]) -> tuple:
    return round(statistics.median(xs), 4), round(benchlib.spread(xs) or 0.0, 3)


def main() -> int:
    p = benchlib.parser(__doc__)
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes, one rank each (default 4)")
    p.add_argument("--parity", type=int, default=1, help="parity stripes per set (default 1: XOR)")
    p.add_argument("--mb", type=float, default=64, help="each rank's state, MB (default 64)")
    p.add_argument("--layers", type=int, default=8, help="Linear layers of the model (default 8)")
    p.add_argument("--batch", type=int, default=16, help="rows per rank per step (default 16)")
    p.add_argument("--every", type=int, default=5, help="training steps per snapshot (default 5)")
    p.add_argument("--rounds", type=int, default=8, help="rounds of the three windows (default 8)")
    p.add_argument("--snapshots", type=int, default=5, help="idle snapshots of each kind, timed (default 5)")
    args = p.parse_args()
    if args.nodes < args.parity + 1 or args.mb <= 0 or min(args.layers, args.batch, args.every, args.rounds,
                                                             args.snapshots) < 1:
        p.error("use --nodes >= parity + 1, --mb > 0 and counts >= 1")
    # parameters of the whole model: 12 bytes each (fp32 + two moments), --mb per rank
    args.width = max(64, round(math.sqrt(args.mb * 1e6 * args.nodes / 12 / args.layers) / 64) * 64)
    base = "bl" + uuid.uuid4().hex[:8]
    t0 = time.time()
    load_before = benchlib.load_average()
    with tempfile.TemporaryDirectory(prefix="ucp-bench-parity-loop-") as root:
        try:
            log(f"{args.nodes} nodes, {args.layers} layers of {args.width}, ~{args.mb:g} MB each, parity "
                f"{args.parity}, a snapshot every {args.every} steps, {args.rounds} rounds")
            results = benchlib.attempt(benchlib.spawn_world, rank_main, args.nodes, args, base, root, timeout=3600,
                                       threads=1, log=log)
        finally:
            left = _cleanup(base, args.nodes)
    if isinstance(results, int):
        return results
    ranks = list(results.values())
    step = {k: [max(d["windows"][k][r] for d in ranks) for r in range(args.rounds)] for k in KINDS}
    ratio = [a / b - 1 for a, b in zip(step["parity"], step["plain"])]
    own = [a / b - 1 for a, b in zip(step["plain"], step["none"])]
    snap = {k: [max(d["snapshots"][k][i] for d in ranks) for i in range(args.snapshots)] for k in ("plain", "parity")}
    import torch

    doc = {"bench": "ucp_parity_loop", "nodes": args.nodes, "ranks_per_node": 1, "parity": args.parity,
           "code": "xor" if args.parity == 1 else "rs_cauchy", "rank_state_mb": round(ranks[0]["bytes"] / 1e6, 3),
           "layers": args.layers, "width": args.width, "batch": args.batch, "every": args.every,
           "rounds": args.rounds}
    for k in KINDS:
        doc[f"step_{k}_s"], doc[f"step_{k}_spread"] = _figures(step[k])
    doc.update({"slowdown_parity": round(statistics.median(ratio), 4), "slowdown_parity_min": round(min(ratio), 4),
                "slowdown_parity_max": round(max(ratio), 4), "slowdown_plain": round(statistics.median(own), 4),
                "slowdown_plain_min": round(min(own), 4), "slowdown_plain_max": round(max(own), 4)})
    # CPU seconds of every rank's process (all its threads) per window: what the snapshot costs the
    # machine, much steadier than wall time when other work shares the cores
    cpu = {k: [sum(d["cpu"][k][r] for d in ranks) for r in range(args.rounds)] for k in KINDS}
    for k in KINDS:
        doc[f"cpu_{k}_s"], doc[f"cpu_{k}_spread"] = _figures(cpu[k])
    doc["cpu_parity_extra_s"] = round(statistics.median(a - b for a, b in zip(cpu["parity"], cpu["plain"])), 4)
    for k in ("plain", "parity"):
        doc[f"snapshot_{k}_s"], doc[f"snapshot_{k}_spread"] = _figures(snap[k])
    doc["snapshot_ratio"] = round(statistics.median(a / b for a, b in zip(snap["parity"], snap["plain"])), 4)
    doc.update({"parity_bytes": sum(d["parity_bytes"] for d in ranks), "load_average_before": load_before,
                "load_average_after": benchlib.load_average(), "cpus": os.cpu_count(), "torch": torch.__version__,
                "shm_left": left, "wall_s": round(time.time() - t0, 1)})
    if left or not doc["parity_bytes"]:
        log(f"FAILED: {doc}")
        return 1
    return benchlib.finish(doc, compact=False)


if __name__ == "__main__":
    sys.exit(main())
