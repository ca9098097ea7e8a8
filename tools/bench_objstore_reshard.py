#!/usr/bin/env python
"""Resharding loads on object storage (S3): ucp against DCP's fsspec path, saved on ``--save-nproc``
ranks, loaded on ``--load-nproc``.

The state: bench_save's GPT-like model sharded with FSDP2 on mesh ``dp`` (parameters + AdamW
``exp_avg`` + ``exp_avg_sq`` about ``--gb`` GB of fp32, its width a multiple of 64 * 6 so that both
worlds shard it), built on ``--save-nproc`` ranks (gloo on 127.0.0.1) and saved once by each:

* ``ucp``: ``ucp.Checkpointer("s3://...").save``;
* ``dcp``: ``dcp.save`` of ``get_state_dict`` through ``FsspecWriter`` at its best documented settings
  (``thread_count=--dcp-threads``, ``sync_files=False``).

Then ``--load-nproc`` ranks build the same model from another seed and load each, ``--repeats`` rounds
(the order of the two rotating; one untimed round first): ``Checkpointer.load`` (ucp reshards the
fragments, fetching only the runs of checked blocks each rank needs), and ``dcp.load`` into
``get_state_dict`` then ``set_state_dict`` (DCP's resharding; what a user pays). Before each load the
local state is overwritten; after it the CRC-32C of every full tensor (``full_tensor()``, step counts
included) must equal the saved one. Each timing is a barrier, the load, a barrier, on rank 0.

The server: a local SeaweedFS (``tests/s3server.py``) unless ``--endpoint``; its data on this machine's
disk, so both pay the server's work on the same cores. ``--latency-ms`` adds that much to every
request of the loads (an ``asyncio.sleep`` before s3fs's ``_call_s3``, which both clients go through):
the round trip of a store farther away than loopback, where a load's requests in flight at once, not
its CPU, set its time. ucp's GETs are counted per rank, the median round's in ``ucp_gets_per_rank``.

Output: one JSON line (medians, spreads, every sample, load averages before and after);
``speedup`` is DCP seconds over ucp seconds.

    python tools/bench_objstore_reshard.py [--gb 0.5] [--save-nproc 2] [--load-nproc 3] [--repeats 3]
"""

from __future__ import annotations

import asyncio
import collections
import sys
import time
from pathlib import Path

import benchlib
from bench_objstore import s3_location

QUICK = {"gb": 0.02, "repeats": 1}
log = benchlib.logger("bench_objstore_reshard")


def build(args, world: int, seed: int):
    """The FSDP2 model and AdamW (one step taken, so its state exists) on this world."""
    import torch
    from bench_save import build_model, model_dims, shard_model

    dims = model_dims(args.gb, 6)
    torch.manual_seed(seed)
    model = shard_model(build_model(dims), "fsdp", world)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.rand_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt, dims


def full_crcs(model, opt) -> dict:
    """name -> CRC-32C of the full tensor (a collective: every rank calls it; the values on rank 0)."""
    import crc32c
    import torch

    out = {}
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = [(f"model.{n}", p) for n, p in model.named_parameters()]
    for p, st in opt.state.items():
        tensors += [(f"optim.{names[id(p)]}.{k}", v) for k, v in sorted(st.items()) if isinstance(v, torch.Tensor)]
    for name, t in sorted(tensors):
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = crc32c.crc32c(full.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return out


def saver(rank: int, args, root: str) -> dict | None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import ucp

    model, opt, dims = build(args, dist.get_world_size(), seed=0)
    with ucp.Checkpointer(f"{root}/ucp", model=model, optimizer=opt) as ck:
        nbytes = ck.save(1).nbytes
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=FsspecWriter(
        f"{root}/dcp", sync_files=False, thread_count=args.dcp_threads, use_listings_cache=False))
    crcs = full_crcs(model, opt)
    return {"crcs": crcs, "dims": dims, "nbytes": nbytes} if rank == 0 else None


def loader(rank: int, args, root: str, saved: dict) -> dict | None:
    import s3fs
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from bench_save import scramble
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import ucp

    model, opt, _ = build(args, dist.get_world_size(), seed=1)
    made, real, counting = collections.Counter(), s3fs.S3FileSystem._call_s3, [False]

    async def counted(self, method, *a, **kw):
        if counting[0]:
            made[method] += 1
        if args.latency_ms:
            await asyncio.sleep(args.latency_ms / 1000)  # (a far store's round trip, for ucp and DCP alike)
        return await real(self, method, *a, **kw)

    s3fs.S3FileSystem._call_s3 = counted
    samples: dict = {"ucp": [], "dcp": []}
    gets: list = []

    def load_ucp() -> None:
        with ucp.Checkpointer(f"{root}/ucp", model=model, optimizer=opt) as ck:
            ck.load(step=1)

    def load_dcp() -> None:
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, storage_reader=FsspecReader(f"{root}/dcp", use_listings_cache=False))
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    def run(kind: str, warm: bool) -> None:
        scramble(model, opt)
        made.clear()
        counting[0] = kind == "ucp"
        seconds, _ = benchlib.barrier_timed(load_ucp if kind == "ucp" else load_dcp)
        counting[0] = False
        crcs = full_crcs(model, opt)  # (a collective: on every rank)
        ok = torch.tensor([int(crcs == saved["crcs"]) if rank == 0 else 1])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            raise RuntimeError(f"{kind}: the loaded state differs from the saved one")
        if kind == "ucp":
            n = torch.tensor([made["get_object"]])
            every = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
            dist.all_gather(every, n)
            if not warm:
                gets.append([int(x.item()) for x in every])
        if not warm:
            samples[kind].append(seconds)
        if rank == 0:
            log(f"  {kind}_load {seconds:7.3f} s{'  (warm-up)' if warm else ''}")

    for kind in ("ucp", "dcp"):
        run(kind, warm=True)
    for r in range(args.repeats):
        for kind in benchlib.rotated(("ucp", "dcp"), r):
            run(kind, warm=False)
    s3fs.S3FileSystem._call_s3 = real
    return {"samples": samples, "gets": gets} if rank == 0 else None


def parse_args(argv=None):
    ap = benchlib.parser(__doc__)
    ap.add_argument("--gb", type=float, default=0.5, help="params + AdamW state, GB (1e9 bytes) of fp32")
    ap.add_argument("--save-nproc", type=int, default=2, help="ranks that save")
    ap.add_argument("--load-nproc", type=int, default=3, help="ranks that load")
    benchlib.add_repeats(ap, 3, "rounds of each kind (each figure is their median)")
    benchlib.add_work(ap, "--dir", " the server's data (unless --endpoint)")
    ap.add_argument("--dcp-threads", type=int, default=4, help="FsspecWriter's thread_count")
    ap.add_argument("--latency-ms", type=float, default=0.0,
                    help="added to every S3 request of the loads, ucp's and DCP's (s3fs's _call_s3): a store "
                         "farther than loopback")
    ap.add_argument("--endpoint", default=None, help="an S3 endpoint to use instead of starting a local SeaweedFS")
    ap.add_argument("--bucket", default="ucp", help="the bucket on --endpoint")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: " + " ".join(f"--{k} {v:g}" for k, v in QUICK.items()) + " unless given")
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    if args.gb <= 0 or min(args.save_nproc, args.load_nproc, args.repeats, args.dcp_threads) < 1:
        ap.error("--gb must be > 0, --save-nproc, --load-nproc, --repeats and --dcp-threads >= 1")
    return args


def run_worlds(args, work: Path) -> dict:
    """The saving world, then the loading one, on the server of :func:`bench_objstore.s3_location`."""
    t0 = time.perf_counter()
    before = benchlib.load_average()
    with s3_location(args, work, "bench-reshard") as (root, label):
        saved = benchlib.spawn_world(saver, args.save_nproc, args, root, threads=1)[0]
        log(f"saved {saved['nbytes'] / 1e9:.3f} GB on {args.save_nproc} ranks, dims {saved['dims']}")
        res = benchlib.spawn_world(loader, args.load_nproc, args, root, saved, threads=1)[0]
    out = {"bench": "objstore_reshard_load", "save_nproc": args.save_nproc, "load_nproc": args.load_nproc,
           "repeats": args.repeats, "dims": saved["dims"], "gb": round(saved["nbytes"] / 1e9, 4),
           "dcp_threads": args.dcp_threads, "latency_ms": args.latency_ms}
    for kind in ("ucp", "dcp"):
        benchlib.median_of(out, f"{kind}_load", res["samples"][kind], saved["nbytes"])
    out["speedup"] = round(out["dcp_load_s"] / out["ucp_load_s"], 3)
    out["ucp_gets_per_rank"] = res["gets"][len(res["gets"]) // 2]
    out["bit_exact"] = True
    out["load_average"] = {"before": before, "after": benchlib.load_average()}
    out["server"] = label
    return benchlib.versions(out, t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    with benchlib.workdir(args.dir, "ucp_bench_objstore_reshard_", log) as work:
        out = benchlib.attempt(run_worlds, args, work, log=log)
    return benchlib.finish(out)


if __name__ == "__main__":
    sys.exit(main())
