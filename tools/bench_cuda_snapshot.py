#!/usr/bin/env python
"""The memory tier with the training state on a GPU: ucp's per-step stall against DCP's best and
default async saves in the same training loop, the snapshot's device-to-host throughput against the
pinned copy floor, and the restore from memory onto the GPU against the host-to-device floor. Needs a
CUDA device (``tools/device_check.sh`` runs it on the lent GPU machine); one rank.

The state: ``--layers`` Linear(``--width``, ``--width``) layers on the GPU (fp32, no bias) and their
AdamW, so params + ``exp_avg`` + ``exp_avg_sq`` are 12 bytes per parameter. A training step is forward,
backward and ``optimizer.step()`` on ``--tokens`` rows, its end synchronized on the training stream
only (ucp's side stream is not waited for: that is the point of it). A world of one rank (gloo over
127.0.0.1, as DCP's collectives need a group).

* **the loop.** Kinds ``none``, ``ucp`` (``Checkpointer(snapshot=SnapshotOptions(every=1,
  persist_every=None)).save(step)``), ``dcp_best`` and ``dcp_default`` (``benchlib.DcpSaver``: a reused
  ``DefaultStager`` with pinned memory, async staging and non-blocking copies, the upload in a process;
  and DCP's defaults), writing to ``--dcp-dir`` (default /dev/shm). ``--warmup`` untimed steps of each
  kind, then ``--rounds`` rounds of ``--steps / --rounds`` steps of every kind, their order rotated
  round by round; each series starts with an untimed lead-in step. ``K_stall_ms`` = median step of K -
  median step of ``none``; ``K_stall_ms_paired`` the median of each round's difference.
* **idle throughput.** ``--repeats`` rounds: a snapshot (``save`` + ``wait``: the copy, its CRC-32C and the
  commit), and the floors of the same bytes: ``d2h_pinned`` (one ``copy_`` of the state's bytes from a
  device buffer into a pinned host buffer), ``d2h_pinned_crc`` (that copy, then ``crc32c`` over the host
  bytes on ``io_threads`` threads; what a verified snapshot at least costs when the checksum follows
  the copy), ``h2d_pinned`` (the way back).
* **restore.** ``--repeats`` loads from memory (a new ``Checkpointer``, the model scrambled first) onto
  the GPU, each checked bit-exact against the saved state; then as many from a durable checkpoint of
  the same state, its files warm in the page cache (``restore_durable_warm_s``), and
  ``restore_memory_vs_durable_warm``, their medians' ratio (the memory tier's target: >= 2).

Output: one JSON line on stdout (medians, ``*_spread``, ``load_avg``, the GPU's name); progress on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import benchlib
from benchlib import median, ms, rotated, summary

KINDS = ("none", "ucp", "dcp_best", "dcp_default")
log = benchlib.logger("bench_cuda_snapshot")


def build(width: int, layers: int, seed: int):
    import torch
    import torch.nn as nn

    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).cuda()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step(model, opt, x) -> None:
    import torch

    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.current_stream().synchronize()


def state_copy(model, opt) -> list:
    """Copies of every parameter and optimizer state tensor (step counts included), in order."""
    return [p.detach().clone() for p in model.parameters()] + \
        [v.clone() for st in opt.state.values() for v in st.values()]


def same_bits(a: list, b: list) -> bool:
    """Tensor by tensor the same bits (floats compared as integers of their size)."""
    import torch

    ints = {4: torch.int32, 8: torch.int64, 2: torch.int16}
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and
                                    torch.equal(x.view(ints[x.element_size()]), y.view(ints[y.element_size()]))
                                    if x.is_floating_point() else torch.equal(x, y) for x, y in zip(a, b))


def floors(nbytes: int, threads: int, repeats: int) -> dict:
    """Seconds of each floor over the state's bytes, per repeat."""
    from concurrent.futures import ThreadPoolExecutor

    import crc32c
    import torch

    dev = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    view = host.numpy()
    pool = ThreadPoolExecutor(threads)
    part = -(-nbytes // threads)

    def d2h():
        host.copy_(dev, non_blocking=True)
        torch.cuda.current_stream().synchronize()

    def d2h_crc():
        d2h()
        list(pool.map(lambda a: crc32c.crc32c(view[a:a + part]), range(0, nbytes, part)))

    def h2d():
        dev.copy_(host, non_blocking=True)
        torch.cuda.current_stream().synchronize()

    out = {"d2h_pinned": [], "d2h_pinned_crc": [], "h2d_pinned": []}
    for fn in (d2h, h2d):  # warm
        fn()
    for _ in range(repeats):
        for name, fn in (("d2h_pinned", d2h), ("d2h_pinned_crc", d2h_crc), ("h2d_pinned", h2d)):
            t = time.perf_counter()
            fn()
            out[name].append(time.perf_counter() - t)
    pool.shutdown()
    return out


def bench(args, work: Path, dcp_dir: Path) -> dict:
    import torch
    import torch.distributed as dist

    import ucp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{benchlib.free_port()}", rank=0, world_size=1,
                            timeout=timedelta(seconds=300))
    job = "bcs" + uuid.uuid4().hex[:8]
    model, opt = build(args.width, args.layers, 0)
    x = torch.randn(args.tokens, args.width, device="cuda")
    nparams = sum(p.numel() for p in model.parameters())
    log(f"{nparams / 1e6:.0f}M params on {torch.cuda.get_device_name()}, state {nparams * 12 / 1e9:.2f} GB")
    group = dist.new_group(backend="gloo")
    dcps = {k: benchlib.DcpSaver(k, model, opt, dcp_dir, group) for k in ("dcp_best", "dcp_default")}
    snap = ucp.SnapshotOptions(every=1, persist_every=None, job=job)
    ck = ucp.Checkpointer(work / "snap", model=model, optimizer=opt, snapshot=snap)
    step_no = [0]
    out: dict = {"tool": "bench_cuda_snapshot", "gpu": torch.cuda.get_device_name(), "cpus": os.cpu_count(),
                 "params": nparams, "tokens": args.tokens, "load_avg": {"start": benchlib.load_average()}}

    def one(kind: str) -> float:
        step_no[0] += 1
        t0 = time.perf_counter()
        step(model, opt, x)
        if kind == "ucp":
            saved = ck.save(step_no[0])
            if saved is None or saved.tier != "memory":
                raise RuntimeError(f"save({step_no[0]}) returned {saved!r}")
        elif kind in dcps:
            dcps[kind].save(step_no[0])
        return time.perf_counter() - t0

    def drain(kind: str) -> None:
        if kind == "ucp":
            ck.wait()
        elif kind in dcps:
            dcps[kind].drain()

    try:
        for kind in KINDS:
            for _ in range(args.warmup):
                one(kind)
            drain(kind)
        per = args.steps // args.rounds
        loop: dict = {k: [[] for _ in range(args.rounds)] for k in KINDS}
        for r in range(args.rounds):
            for kind in rotated(KINDS, r):
                one(kind)  # lead-in
                loop[kind][r] = [one(kind) for _ in range(per)]
                drain(kind)
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {ms(median(v[r]))} ms" for k, v in loop.items()))
        out["load_avg"]["after_loop"] = benchlib.load_average()
        base = median([s for rr in loop["none"] for s in rr])
        for kind in KINDS:
            flat = [s for rr in loop[kind] for s in rr]
            pre = "" if kind == "ucp" else f"{kind}_"
            out[f"{pre}step_ms"] = ms(median(flat))
            if kind != "none":
                rounds = [median(loop[kind][r]) - median(loop["none"][r]) for r in range(args.rounds)]
                out[f"{pre}stall_ms"] = ms(median(flat) - base)
                out[f"{pre}stall_ms_paired"] = ms(median(rounds))
                out[f"{pre}stall_ms_spread"] = summary(rounds, 1e3, 2)
        for d in dcps.values():
            d.close()
        out["dcp_best_config"] = dcps["dcp_best"].describe()

        # -- idle: the snapshot against the floors of its bytes --
        snaps = []
        for _ in range(args.repeats):
            step_no[0] += 1
            torch.cuda.synchronize()
            t = time.perf_counter()
            nbytes = ck.save(step_no[0]).nbytes
            ck.wait()
            snaps.append(time.perf_counter() - t)
        want = state_copy(model, opt)
        threads = ck.options.io_threads
        fl = floors(nbytes, threads, args.repeats)
        out.update(snapshot_bytes=nbytes, io_threads=threads, snapshot_s=summary(snaps),
                   snapshot_gbps=round(nbytes / 1e9 / median(snaps), 3))
        out["floors_gbps"] = {k: round(nbytes / 1e9 / median(v), 3) for k, v in fl.items()}
        out["snapshot_over_d2h"] = round(out["snapshot_gbps"] / out["floors_gbps"]["d2h_pinned"], 3)
        out["snapshot_over_d2h_crc"] = round(out["snapshot_gbps"] / out["floors_gbps"]["d2h_pinned_crc"], 3)
        ck.close()

        # -- restores onto the GPU: from memory, then from a durable checkpoint of the same state (warm) --
        def restores(root, snapshot, source: str) -> tuple[list, bool]:
            loads, exact = [], True
            for i in range(args.repeats):
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(0.5 + i)
                    for st in opt.state.values():
                        for v in st.values():
                            v.fill_(0.25)  # (the step counts on the host too)
                torch.cuda.synchronize()
                t = time.perf_counter()
                with ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=snapshot) as restorer:
                    res = restorer.load()
                    torch.cuda.synchronize()
                loads.append(time.perf_counter() - t)
                if res is None or res.source != source:
                    raise RuntimeError(f"load returned {res!r}, not a restore from {source}")
                exact = exact and same_bits(state_copy(model, opt), want)
            return loads, exact

        loads, exact = restores(work / "snap", snap, "memory")
        out.update(restore_s=summary(loads), restore_gbps=round(nbytes / 1e9 / median(loads), 3), bit_exact=exact)
        out["restore_over_h2d"] = round(out["restore_gbps"] / out["floors_gbps"]["h2d_pinned"], 3)
        with ucp.Checkpointer(work / "durable", model=model, optimizer=opt,
                              options=ucp.CheckpointOptions(fsync=False)) as saver:
            saver.save(step_no[0])  # (the state is ``want`` again; its files stay in the page cache)
        warm, exact = restores(work / "durable", None, "durable")
        out.update(restore_durable_warm_s=summary(warm), bit_exact=out["bit_exact"] and exact,
                   restore_memory_vs_durable_warm=round(median(warm) / median(loads), 3))
        out["load_avg"]["end"] = benchlib.load_average()
        return out
    finally:
        from ucp.snapshot import client

        client.stop(job, timeout=30)
        dist.destroy_process_group()


def main(argv=None) -> int:
    ap = benchlib.parser(__doc__)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=8, help="Linear layers (12 bytes of state per parameter)")
    ap.add_argument("--tokens", type=int, default=8192, help="rows of a step's batch")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    benchlib.add_repeats(ap, 5, "idle snapshots, floors and restores")
    ap.add_argument("--dcp-dir", default="/dev/shm")
    benchlib.add_work(ap)
    args = ap.parse_args(argv)
    if args.steps % args.rounds:
        ap.error("--rounds must divide --steps")
    stdout = os.fdopen(os.dup(1), "w")  # the JSON line's; everything else goes to stderr
    benchlib.to_stderr()
    with tempfile.TemporaryDirectory(dir=args.work, prefix="ucp-bench-cuda-") as work, \
            tempfile.TemporaryDirectory(dir=args.dcp_dir, prefix="ucp-bench-cuda-dcp-") as dcp_dir:
        out = bench(args, Path(work), Path(dcp_dir))
    stdout.write(json.dumps(out) + "\n")
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
