#!/usr/bin/env python
"""What erasure-coded snapshots cost: snapshot time, memory and step time with and without parity, same run.

``--nodes`` simulated nodes on this machine, one rank each (each rank's own snapshot agent: a node
is an agent; docs/erasure.md section 6), in one gloo world. Every rank holds a distinct state of
``--mb`` MB (10^6 bytes: one fp32 parameter plus AdamW's two moments, so a third of it each) and
takes ``--snapshots`` snapshots of it, one after the other, timed from ``save`` to the end of
``wait`` (the copy, checksums, cut and, with parity, the exchange: the whole background work):

* **plain**: ``SnapshotOptions`` alone;
* **parity**: the same with ``RedundancyOptions(group=--nodes, parity=--parity)``; the agents' own
  accounts (``ucp agent status``: ``data_bytes``, ``parity_bytes``) give the memory overhead, to
  compare with ``g / (g - m)``.

The two kinds alternate snapshot by snapshot, and each figure is the median. ``parity_extra_s`` =
parity - plain, the exchange's cost per snapshot; ``exchange_gbps`` = one rank's snapshot bytes over
it; ``snapshot_parity_over_plain`` = parity / plain.

What the training loop feels: before those, the ranks train the state (FSDP2 forward, backward,
``optimizer.step()``) in ``--rounds`` rounds of ``--steps / --rounds`` steps of each kind: ``none`` (no
snapshot), ``plain`` and ``parity`` (a snapshot after every step), the kinds' order rotated from round
to round; each series starts with an untimed lead-in step (every timed step overlaps the previous
snapshot's background work) and ends waiting for its last snapshot. A step's time is the slower
rank's, from its start to the return of ``save``. ``step_ms_<kind>`` are the medians;
``step_slowdown_parity`` = median parity step / median plain step - 1 (what parity adds to a step
that snapshots anyway), ``step_slowdown_parity_rounds`` the same per round, its median
``step_slowdown_parity_paired`` and quantiles ``step_slowdown_parity_spread``; ``step_slowdown_plain``
the same for plain snapshots against none. ``load_avg``: the load average (1, 5, 15 min) at the start,
after the loop and at the end.

``memcpy_gbps``: one rank's copy of the same bytes into a preallocated buffer, in the same run, for
scale. ``exchange_floor_s``: the exchange's floor, gloo moving the same bytes with no coding: every
rank sends its state to the next rank while receiving the previous one's (a ring, all at once; about
what a rank sends and receives in the exchange), the median of 3, slowest rank;
``parity_extra_over_exchange_floor`` = ``parity_extra_s`` over it. Every snapshot of the parity kind is checked: after the run, the ranks of node 1 are
treated as lost and rebuilt from parity (``rebuilt_bit_exact``), so a cheap exchange that stored
nothing cannot pass. Nothing is left in /dev/shm afterwards (``shm_left``).

With ``--nodes`` processes on few cores the ranks compete for CPU: read the figures as the cost of
the exchange on a loaded machine, not as a network's speed.

Output: one JSON line on stdout, progress on stderr; a failure prints nothing on stdout and exits 1.

    python tools/bench_parity.py [--nodes 4] [--parity 1] [--mb 64] [--snapshots 5] [--steps 8] [--rounds 4]
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import benchlib

log = benchlib.logger("bench_parity")


def rank_main(rank: int, args, base: str, root: str) -> dict:
    """One simulated node of the world ``benchlib.spawn_world`` launched: its times, bytes and rebuild."""
    import numpy as np
    import torch
    import torch.distributed as dist

    import ucp
    from ucp.snapshot import client
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    n = int(args.mb * 1e6) // 12  # this rank's shard: fp32 parameter + two AdamW moments
    mesh = init_device_mesh("cpu", (args.nodes,), mesh_dim_names=("dp",))

    def build(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Linear(1, n * args.nodes, bias=False)  # FSDP2: each rank a distinct shard
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(2, 1)).sum().backward()
        opt.step()
        return model, opt

    def local(model, opt) -> dict:
        return {"w": model.weight.to_local().detach().clone(),
                **{k: v.to_local().clone() for k, v in opt.state[model.weight].items() if k != "step"}}

    model, opt = build(0)
    kinds = {}
    for kind in ("plain", "parity"):
        job = f"{base}-{kind}-{rank}"
        red = ucp.RedundancyOptions(group=args.nodes, parity=args.parity) if kind == "parity" else None
        kinds[kind] = (job, ucp.Checkpointer(Path(root) / kind, model=model, optimizer=opt,
                                             options=ucp.CheckpointOptions(rng=False),
                                             snapshot=ucp.SnapshotOptions(job=job, timeout=120), redundancy=red))
    step_no = [0]
    loop = train_loop(args, model, opt, {k: ck for k, (_, ck) in kinds.items()}, step_no)
    load_after_loop = benchlib.load_average()
    times = {"plain": [], "parity": []}
    for s in range(args.snapshots + 1):  # the first of each kind: untimed (segments created)
        for kind, (_, ck) in kinds.items():
            step_no[0] += 1
            dist.barrier()
            t0 = time.perf_counter()
            ck.save(step_no[0])
            ck.wait()
            dt = time.perf_counter() - t0
            if s:
                times[kind].append(dt)
    src = np.frombuffer(bytearray(n * 12), np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    copies = []
    for _ in range(3):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        copies.append(time.perf_counter() - t0)
    # the exchange's floor: gloo moving the same bytes, every rank sending its state to the next rank
    # while receiving the previous one's (about what a rank sends and receives in the exchange), no coding
    world = dist.get_world_size()
    sbuf, rbuf = torch.from_numpy(src), torch.from_numpy(dst)
    rings = []
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        for work in (dist.isend(sbuf, (rank + 1) % world), dist.irecv(rbuf, (rank - 1) % world)):
            work.wait()
        dist.barrier()
        rings.append(time.perf_counter() - t0)
    status = client.connect(kinds["parity"][0]).status()
    for _, ck in kinds.values():
        ck.close()
    # node 1 lost: every other rank rebuilds from parity (a fresh Checkpointer on a fresh node for rank 1)
    from ucp.snapshot import discovery

    dist.barrier()
    if rank == 1:
        info = discovery.read_info(kinds["parity"][0])
        client.stop(kinds["parity"][0], timeout=30)
        while discovery.is_alive(info):
            time.sleep(0.02)
    dist.barrier()
    want = local(model, opt)
    model2, opt2 = build(1000)
    job = kinds["parity"][0] + ("x" if rank == 1 else "")
    ck = ucp.Checkpointer(Path(root) / "parity", model=model2, optimizer=opt2,
                          options=ucp.CheckpointOptions(rng=False), snapshot=ucp.SnapshotOptions(job=job, timeout=120),
                          redundancy=ucp.RedundancyOptions(group=args.nodes, parity=args.parity))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ck.load()
    got = local(model2, opt2)
    exact = res is not None and res.source == "memory" and res.rebuilt == (1,) and all(
        torch.equal(want[k], got[k]) for k in want)
    ck.close()
    return {"times": times, "memcpy_s": min(copies), "ring_s": statistics.median(rings), "bytes": n * 12, "status": status, "exact": exact,
            "loop": loop, "load_avg": load_after_loop}


KINDS = ("none", "plain", "parity")


def train_loop(args, model, opt, cks: dict, step_no: list) -> dict:
    """The training loop with each kind of snapshot (module docstring): ``{kind: [step seconds, the slower
    rank's]}``, the same on every rank. ``cks``: the Checkpointer of each kind that snapshots;
    ``step_no[0]``: the last step number used (advanced)."""
    import torch
    import torch.distributed as dist

    x = torch.ones(2, 1)

    def step(kind: str) -> float:
        step_no[0] += 1
        t0 = time.perf_counter()
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        if kind in cks:
            cks[kind].save(step_no[0])
        return time.perf_counter() - t0

    per = args.steps // args.rounds
    for kind in KINDS:  # untimed: the slots of each kind, the first all-gathers
        step(kind)
        step(kind)
        if kind in cks:
            cks[kind].wait()
    out: dict = {k: [] for k in KINDS}
    for r in range(args.rounds):
        for kind in [*KINDS[r % len(KINDS):], *KINDS[:r % len(KINDS)]]:
            step(kind)  # the lead-in
            out[kind] += [step(kind) for _ in range(per)]
            if kind in cks:
                cks[kind].wait()
    slower = torch.tensor([out[k] for k in KINDS], dtype=torch.float64)
    dist.all_reduce(slower, op=dist.ReduceOp.MAX)
    return {k: row for k, row in zip(KINDS, slower.tolist())}


def loop_figures(loop: dict, per: int) -> dict:
    """The training loop's figures (module docstring) from each kind's step seconds."""
    med = {k: statistics.median(v) for k, v in loop.items()}
    rounds = [statistics.median(loop["parity"][i:i + per]) / statistics.median(loop["plain"][i:i + per]) - 1
              for i in range(0, len(loop["plain"]), per)]
    out = {f"step_ms_{k}": round(v * 1e3, 2) for k, v in med.items()}
    out.update({f"step_ms_{k}_all": [round(x * 1e3, 2) for x in v] for k, v in loop.items()})
    out["step_slowdown_plain"] = round(med["plain"] / med["none"] - 1, 4)
    out["step_slowdown_parity"] = round(med["parity"] / med["plain"] - 1, 4)
    out["step_slowdown_parity_rounds"] = [round(x, 4) for x in rounds]
    out["step_slowdown_parity_paired"] = round(statistics.median(rounds), 4)
    out["step_slowdown_parity_spread"] = benchlib.summary(rounds)
    return out


def main() -> int:
    p = benchlib.parser(__doc__)
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes, one rank each (default 4)")
    p.add_argument("--parity", type=int, default=1, help="parity stripes per set (default 1: XOR)")
    p.add_argument("--mb", type=float, default=64, help="each rank's state, MB (default 64)")
    p.add_argument("--snapshots", type=int, default=5, help="timed snapshots of each kind (default 5)")
    p.add_argument("--steps", type=int, default=8, help="timed training steps of each kind (default 8)")
    p.add_argument("--rounds", type=int, default=4,
                   help="the kinds' steps alternate in this many rounds (must divide --steps; default 4)")
    args = p.parse_args()
    if args.nodes < args.parity + 2 or args.mb <= 0 or args.snapshots < 1:
        p.error("use --nodes >= parity + 2 (node 1 is rebuilt from the others), --mb > 0, --snapshots >= 1")
    if args.rounds < 1 or args.steps < 1 or args.steps % args.rounds:
        p.error(f"--rounds {args.rounds} must be >= 1 and divide --steps {args.steps} (>= 1)")
    from ucp.snapshot import discovery
    from ucp.snapshot import client, shm

    base = "bp" + uuid.uuid4().hex[:8]
    t0 = time.time()
    load_start = benchlib.load_average()
    with tempfile.TemporaryDirectory(prefix="ucp-bench-parity-") as root:
        try:
            log(f"{args.nodes} nodes, {args.mb:g} MB each, parity {args.parity}, {args.snapshots} snapshots per kind")
            results = benchlib.attempt(benchlib.spawn_world, rank_main, args.nodes, args, base, root, timeout=1800,
                                       threads=1, log=log)
        finally:
            left = 0
            for r in range(args.nodes):
                for kind in ("plain", "parity"):
                    for job in (f"{base}-{kind}-{r}", f"{base}-{kind}-{r}x"):
                        info = discovery.read_info(job) if discovery.discovery_path(job).exists() else None
                        if info is not None and discovery.is_alive(info):
                            client.stop(job, timeout=30)
                        left += len([n for n in shm.listing(shm.prefix(job)) if not n.endswith(".agent.lock")])
                        for n in shm.listing(shm.prefix(job)):
                            shm.unlink(n)
    if isinstance(results, int):  # a rank failed (logged)
        return results
    plain = statistics.median(t for d in results.values() for t in d["times"]["plain"])
    parity = statistics.median(t for d in results.values() for t in d["times"]["parity"])
    nbytes = results[0]["bytes"]
    data = sum(d["status"]["data_bytes"] for d in results.values())
    par = sum(d["status"]["parity_bytes"] for d in results.values())
    extra = parity - plain
    memcpy = min(d["memcpy_s"] for d in results.values())
    ring = max(d["ring_s"] for d in results.values())
    import torch

    doc = {"bench": "ucp_parity_exchange", "nodes": args.nodes, "ranks_per_node": 1, "group": args.nodes,
           "parity": args.parity, "code": "xor" if args.parity == 1 else "rs_cauchy",
           "rank_state_mb": round(nbytes / 1e6, 3), "snapshots": args.snapshots,
           "snapshot_plain_s": round(plain, 4), "snapshot_parity_s": round(parity, 4),
           "parity_extra_s": round(extra, 4),
           "exchange_gbps": round(nbytes / extra / 1e9, 3) if extra > 0 else None,
           "memcpy_gbps": round(nbytes / memcpy / 1e9, 3),
           "exchange_floor_s": round(ring, 4), "parity_extra_over_exchange_floor": round(extra / ring, 4),
           "snapshot_bytes": data, "parity_bytes": par, "memory_overhead": round((data + par) / data, 4),
           "memory_overhead_ideal": round(args.nodes / (args.nodes - args.parity), 4),
           "rebuilt_bit_exact": all(d["exact"] for d in results.values()),
           **loop_figures(results[0]["loop"], args.steps // args.rounds),
           "snapshot_parity_over_plain": round(parity / plain, 4),
           "load_avg": {"start": load_start, "after_loop": results[0]["load_avg"], "end": benchlib.load_average()},
           "cpus": os.cpu_count(), "torch": torch.__version__, "shm_left": left, "wall_s": round(time.time() - t0, 1)}
    if not doc["rebuilt_bit_exact"] or left:
        log(f"FAILED: {doc}")
        return 1
    return benchlib.finish(doc, compact=False)


if __name__ == "__main__":
    sys.exit(main())
