#!/usr/bin/env python
"""Resharding loads of ucp against ``torch.distributed.checkpoint`` (DCP): save on 4 ranks, load on 2 and 3.

The source: the reference GPT (``ucp.trainer``) widened so that parameters + AdamW ``exp_avg`` +
``exp_avg_sq`` come to about ``--size-mb`` MB (10^6 bytes) of fp32, built on 4 local ranks (gloo,
torch's elastic launcher) as ``TrainLayout(dp=2, tp=2, zero=3)`` (FSDP2 over DTensor tensor
parallelism), trained one step (``ucp.trainer.train.train_steps``) so that the optimizer state
exists, then saved twice: with ``ucp.Checkpointer.save`` and with ``dcp.save`` of
``get_model_state_dict`` / ``get_optimizer_state_dict``. The ucp checkpoint is also converted once
to the universal form (``ucp.convert.universal.convert(..., workers=4)``; its time is reported, not a target).

Then on 2 ranks (``TrainLayout(dp=2, zero=3)``: FSDP2 alone) and on 3 ranks (``TrainLayout(dp=3,
zero=3)``: rows split unevenly), the same config is built from another seed, its optimizer state
created by one zero-gradient step, each form is loaded once untimed, and, ``--repeats`` times, each
of three forms is loaded warm
(pages still cached from the save / conversion / previous round) and cold (``os.sync()``, then rank 0
drops the page cache of exactly that checkpoint's files with ``posix_fadvise(DONTNEED)``):

* ``ucp_dist``: the distributed checkpoint, resharded directly by ``Checkpointer.load`` (of each
  source fragment a destination region touches it reads the 64 KiB checksummed blocks holding the
  region, straight into the destination where the region is a contiguous run of both);
* ``ucp_univ``: the universal checkpoint, ``Checkpointer(universal_dir).load()`` (it reads only the
  chunks a region overlaps);
* ``dcp``: ``dcp.load`` into ``get_*_state_dict`` of the target, then ``set_model_state_dict`` /
  ``set_optimizer_state_dict`` (DCP's own resharding; what a user pays).

Before every load the local state is overwritten with a constant; after it a checksum of the full
(``full_tensor``) token embedding, a few block weights, ``ln_f`` and the embedding's AdamW moments
must equal the source's after its training step (``bit_exact``). Each timing is a barrier, the load,
a barrier, on rank 0 (so the slowest rank's time); each figure is the best of ``--repeats``.

Bytes read per rank: ucp's ``LoadResult.nbytes``; for DCP, the stored item lengths its
``FileSystemReader`` opens (it reads each saved item it needs whole, then narrows). A rank's share is
the whole state's bytes / the target world size; ``*_read_ratio_max`` is the largest rank's bytes over
its share. ``*_disk_read_max`` is ``/proc/self/io`` ``read_bytes`` of the cold load (storage reads
actually issued, readahead included) for context. GB/s count the state bytes (10^9 bytes/s) over the
load time. Targets (issue): bytes read per rank <= 1.1x share plus the chunks cut by the region's
boundary (``target_read_met``: the stricter ``*_read_ratio_max`` <= 1.1, with no boundary allowance);
load >= 1.5x DCP (``speedup_*`` = DCP seconds / ucp seconds; ``target_speed_met``).

Output: exactly one JSON line on stdout; progress goes to stderr; a failure prints nothing on stdout
and exits non-zero.

    python tools/bench_reshard.py [--size-mb 1000] [--work DIR] [--repeats 2] [--keep]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import benchlib

SRC_LAYOUT = {"dp": 2, "tp": 2, "zero": 3}
SRC_NPROC = 4
TARGETS = {2: {"dp": 2, "zero": 3}, 3: {"dp": 3, "zero": 3}}
FORMS = ("ucp_dist", "ucp_univ", "dcp")
N_LAYERS = 4
SRC_SEED = 1234
DST_SEED = 99
BYTES_PER_PARAM = 12  # fp32 parameter + AdamW exp_avg + exp_avg_sq
log = benchlib.logger("bench_reshard")


def model_config(size_mb: float) -> dict:
    """``GPTConfig`` fields of a reference GPT whose fp32 params + AdamW state are ~``size_mb`` MB
    (``tools/bench_convert.py``'s sizing); global_batch 12 divides by dp = 2 and 3."""
    from bench_convert import model_config as sized

    return sized(size_mb, BYTES_PER_PARAM, global_batch=12)


# -- helpers run inside the ranks -------------------------------------------------------------------


def _local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _check_names(model) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    want = ["wte.weight", "blocks.0.attn.q.weight", "blocks.0.mlp.fc1.weight",
            f"blocks.{N_LAYERS - 1}.mlp.fc2.weight", f"blocks.{N_LAYERS - 1}.attn.out.bias", "ln_f.weight"]
    return [n for n in want if n in names]


def checksums(model, opt) -> dict | None:
    """crc32c of the full tensors of a few params and of wte's AdamW moments (collective; rank 0 returns)."""
    import crc32c
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters())
    out = {}
    for name in _check_names(model):
        p = params[name]
        tensors = {name: p}
        st = opt.state.get(p, {})
        if name == "wte.weight":
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    tensors[f"{name}.{k}"] = st[k]
        for key, t in tensors.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t
            full = full.detach().contiguous().cpu()
            out[key] = crc32c.crc32c(full.reshape(-1).view(torch.uint8).numpy())
    return out if dist.get_rank() == 0 else None


def state_bytes(model, opt) -> int:
    """Bytes of the whole (global) state: every parameter and every optimizer state tensor, once."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()  # DTensor.numel() is the global count
        for v in opt.state.get(p, {}).values():
            if hasattr(v, "numel"):
                total += v.numel() * v.element_size()
    return total


def scramble(model, opt) -> None:
    import torch

    with torch.no_grad():
        for p in model.parameters():
            _local(p).fill_(-3.0)
            for v in opt.state.get(p, {}).values():
                if hasattr(v, "fill_"):
                    _local(v).fill_(-3.0)


def drop_cache(root: Path) -> None:
    """Make the next read of ``root``'s files cold (``tools/bench_save.py``'s cache drop, on rank 0)."""
    import torch.distributed as dist

    from bench_save import drop_cache as drop

    drop(benchlib.files_under(root), dist.get_rank())


def build_target(cfg_fields: dict, layout: dict, seed: int):
    """The reference GPT of ``cfg_fields`` built on ``TrainLayout(**layout)`` from ``seed``, with AdamW's
    state created (as training would) by one zero-gradient step, no forward: (checkpoint options, model,
    optimizer), ready to be loaded into."""
    import torch

    from ucp.trainer.layouts import TrainLayout
    from ucp.trainer.model import GPTConfig
    from ucp.trainer.train import build

    cfg = GPTConfig(**cfg_fields)
    lay = TrainLayout(**layout)
    par, opt = build(cfg, lay, seed)
    for p in par.model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return lay.checkpoint_options(cfg), par.model, opt


def check_sums(sums: dict | None, want: dict, key: str, out: dict) -> None:
    """On rank 0 (``sums`` not None): record in ``out`` (``exact``, ``mismatch``) whether the checksums
    taken after the load ``key`` are the saved ones."""
    if sums is not None and sums != want:
        out["exact"] = False
        out["mismatch"].append([key, sorted(k for k in sums if sums[k] != want.get(k))])


# -- the source: 4 ranks ----------------------------------------------------------------------------


def make_source(cfg_fields: dict, work: str, threads: int) -> dict | None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    import ucp
    from ucp.trainer.layouts import TrainLayout
    from ucp.trainer.model import GPTConfig
    from ucp.trainer.train import build, train_steps

    with benchlib.elastic_rank(threads):
        cfg = GPTConfig(**cfg_fields)
        lay = TrainLayout(**SRC_LAYOUT)
        t0 = time.perf_counter()
        par, opt = build(cfg, lay, SRC_SEED)
        losses = train_steps(cfg, lay, par, opt, SRC_SEED, range(1, 2))
        t1 = time.perf_counter()
        total = state_bytes(par.model, opt)
        sums = checksums(par.model, opt)
        ckpt = ucp.Checkpointer(Path(work) / "ucp", model=par.model, optimizer=opt,
                                options=lay.checkpoint_options(cfg))
        dist.barrier()
        t2 = time.perf_counter()
        res = ckpt.save(1)
        dist.barrier()
        t3 = time.perf_counter()
        ckpt.close()
        msd = get_model_state_dict(par.model)
        osd = get_optimizer_state_dict(par.model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=Path(work) / "dcp")
        dist.barrier()
        t4 = time.perf_counter()
        if dist.get_rank() == 0:
            return {"ucp_path": str(res.path), "ucp_nbytes": res.nbytes, "state_bytes": total, "checksums": sums,
                    "losses": losses, "train_s": round(t1 - t0, 2), "ucp_save_s": round(t3 - t2, 3),
                    "dcp_save_s": round(t4 - t3, 3),
                    "params": sum(p.numel() for p in par.model.parameters())}
        return None


# -- the targets: 2 or 3 ranks ----------------------------------------------------------------------


def load_target(cfg_fields: dict, layout: dict, paths: dict, repeats: int, threads: int) -> dict:
    """Every rank returns its own figures; the timings (barrier to barrier) are the same on all."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import filesystem as dcp_fs
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    import ucp

    # count the bytes DCP's reader opens (each stored item it needs is read whole, then narrowed)
    dcp_read = [0]
    orig_slice = dcp_fs.FileSystemReader._slice_file

    def counting_slice(self, file, sinfo):
        dcp_read[0] += sinfo.length
        return orig_slice(self, file, sinfo)

    dcp_fs.FileSystemReader._slice_file = counting_slice

    with benchlib.elastic_rank(threads):
        opts, model, opt = build_target(cfg_fields, layout, DST_SEED)
        rank = dist.get_rank()
        ckpts = {"ucp_dist": ucp.Checkpointer(paths["ucp_root"], model=model, optimizer=opt, options=opts),
                 "ucp_univ": ucp.Checkpointer(paths["ucp_univ"], model=model, optimizer=opt, options=opts)}
        dirs = {"ucp_dist": paths["ucp_dir"], "ucp_univ": paths["ucp_univ"], "dcp": paths["dcp"]}

        def dcp_load():
            dcp_read[0] = 0
            sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(sd, checkpoint_id=paths["dcp"])
            set_model_state_dict(model, sd["model"])
            set_optimizer_state_dict(model, opt, sd["optim"])
            return dcp_read[0]

        def one(form: str):
            if form == "dcp":
                return dcp_load()
            res = ckpts[form].load()
            if res is None or res.step != 1:
                raise RuntimeError(f"{form}: load returned {res!r}")
            return res.nbytes

        out = {"rank": rank, "samples": {}, "nbytes": {}, "disk": {}, "exact": True, "mismatch": []}
        # one untimed load of each form first: first-call costs (lazy imports, allocator warm-up)
        # would otherwise land on whichever form goes first
        for form in FORMS:
            one(form)
        dist.barrier()
        for r in range(repeats):
            order = FORMS[r % 3:] + FORMS[:r % 3]
            for form in order:
                for temp in ("warm", "cold"):
                    scramble(model, opt)
                    if temp == "cold":
                        drop_cache(Path(dirs[form]))
                    io0 = benchlib.io_read_bytes()
                    dist.barrier()
                    t = time.perf_counter()
                    nbytes = one(form)
                    dist.barrier()
                    s = time.perf_counter() - t
                    key = f"{form}_{temp}"
                    out["samples"].setdefault(key, []).append(s)
                    out["nbytes"][form] = nbytes
                    if temp == "cold":
                        out["disk"][form] = benchlib.io_read_bytes() - io0
                    check_sums(checksums(model, opt), paths["checksums"], key, out)
                    if rank == 0:
                        log(f"  world {dist.get_world_size()} {key:<14} {s:7.3f} s  rank0 read "
                            f"{nbytes / 1e6:.1f} MB")
        for c in ckpts.values():
            c.close()
        dist.barrier()
        return out


# -- launcher ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = benchlib.parser(__doc__)
    benchlib.add_size_mb(ap, 1000.0)
    benchlib.add_work(ap)
    benchlib.add_repeats(ap, 2, "each load figure is the best of this many")
    benchlib.add_keep(ap)
    args = ap.parse_args(argv)
    if args.size_mb <= 0 or args.repeats < 1:
        ap.error("--size-mb must be > 0 and --repeats >= 1")
    return args


def bench(args, work: Path) -> dict:
    from ucp.convert import convert
    from ucp.trainer.launch import launch

    t_all = time.perf_counter()
    cfg = model_config(args.size_mb)
    threads = max(1, (os.cpu_count() or 1) // SRC_NPROC)
    log(f"source: {SRC_NPROC} ranks, layout {SRC_LAYOUT}, config {cfg}")
    src = launch(SRC_NPROC, make_source, cfg, str(work), threads, run_id="ucp-bench-reshard")[0]
    total = src["state_bytes"]
    log(f"  params {src['params'] / 1e6:.1f}M, state {total / 1e9:.3f} GB; trained 1 step in {src['train_s']} s "
        f"(loss {src['losses'][0]:.3f}); saved: ucp {src['ucp_save_s']} s, dcp {src['dcp_save_s']} s")
    univ = work / "universal"
    t0 = time.perf_counter()
    conv = convert(src["ucp_path"], univ, workers=4)
    convert_s = time.perf_counter() - t0
    log(f"  converted to universal in {convert_s:.2f} s")
    paths = {"ucp_root": str(work / "ucp"), "ucp_dir": src["ucp_path"], "ucp_univ": str(univ),
             "dcp": str(work / "dcp"), "checksums": src["checksums"]}

    out = {
        "bench": "ucp_vs_dcp_reshard_load", "src_layout": SRC_LAYOUT, "src_nproc": SRC_NPROC,
        "targets": {str(w): lay for w, lay in TARGETS.items()}, "config": cfg, "repeats": args.repeats,
        "params": src["params"], "state_gb": round(total / 1e9, 4),
        "ucp_dist_gb": round(benchlib.dir_bytes(paths["ucp_dir"]) / 1e9, 4),
        "ucp_univ_gb": round(benchlib.dir_bytes(univ) / 1e9, 4),
        "dcp_gb": round(benchlib.dir_bytes(paths["dcp"]) / 1e9, 4),
        "train_s": src["train_s"], "ucp_save_s": src["ucp_save_s"], "dcp_save_s": src["dcp_save_s"],
        "convert_s": round(convert_s, 3),
        "convert_source_gb": round(getattr(conv, "source_bytes", 0) / 1e9, 4),
    }
    exact = True
    for world, layout in TARGETS.items():
        log(f"target: {world} ranks, layout {layout}")
        threads = max(1, (os.cpu_count() or 1) // world)
        ranks = launch(world, load_target, cfg, layout, paths, args.repeats, threads,
                       run_id=f"ucp-bench-reshard-{world}")
        share = total / world
        r0 = ranks[0]
        exact = exact and r0["exact"]
        if r0["mismatch"]:
            out[f"w{world}_mismatch"] = r0["mismatch"]
        out[f"w{world}_share_gb"] = round(share / 1e9, 4)
        for form in FORMS:
            read = [ranks[r]["nbytes"][form] for r in sorted(ranks)]
            disk = [ranks[r]["disk"].get(form, 0) for r in sorted(ranks)]
            pre = f"w{world}_{form}"
            out[f"{pre}_read_gb_per_rank"] = [round(b / 1e9, 4) for b in read]
            out[f"{pre}_read_ratio_max"] = round(max(read) / share, 3)
            out[f"{pre}_disk_read_max_gb"] = round(max(disk) / 1e9, 4)
            for temp in ("warm", "cold"):
                benchlib.best_of(out, f"{pre}_{temp}", r0["samples"][f"{form}_{temp}"], total)
        for form in ("ucp_dist", "ucp_univ"):
            for temp in ("warm", "cold"):
                out[f"w{world}_speedup_{form}_{temp}"] = round(out[f"w{world}_dcp_{temp}_s"] /
                                                               out[f"w{world}_{form}_{temp}_s"], 3)
    out["bit_exact"] = exact
    out["target_read_met"] = {form: all(out[f"w{w}_{form}_read_ratio_max"] <= 1.1 for w in TARGETS)
                              for form in ("ucp_dist", "ucp_univ")}
    out["target_speed_met"] = {form: all(out[f"w{w}_speedup_{form}_{t}"] >= 1.5 for w in TARGETS
                                         for t in ("warm", "cold")) for form in ("ucp_dist", "ucp_univ")}
    return benchlib.versions(out, t_all)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with benchlib.workdir(args.work, "ucp_bench_reshard_", log, args.keep) as work:
        out = benchlib.attempt(bench, args, work, log=log)
    return benchlib.finish(out)


if __name__ == "__main__":
    sys.exit(main())
