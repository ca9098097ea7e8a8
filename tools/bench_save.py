#!/usr/bin/env python
"""Save/load throughput of ucp against ``torch.distributed.checkpoint`` (DCP) on a sharded training state.

Spawns ``--nproc`` ranks (gloo on 127.0.0.1), each building the same GPT-like model (token embedding,
per layer qkv / attention out / MLP fc1, fc2 and layer norms, an untied head) sharded with FSDP2
(``--layout fsdp``, a 1-D mesh ``dp``) or DTensor tensor parallelism (``--layout tp``, a 1-D mesh
``tp``), sized so that parameters + AdamW ``exp_avg`` + ``exp_avg_sq`` come to about ``--gb`` GB
(10^9 bytes) of fp32 over all ranks. Then, ``--repeats`` times, each into a fresh directory:

* save with ucp (``Checkpointer.save``) and with DCP (``dcp.save``, FileSystemWriter defaults:
  ``sync_files=True``, so both sides fsync their data before returning);
* load each warm (pages still cached from the save) and cold (``os.sync()``, then rank 0 drops the
  page cache of exactly that checkpoint's files with ``posix_fadvise(DONTNEED)``);

before every load the local state is overwritten and after it its checksum must equal the one taken
before the save, so neither side can be timed doing nothing. Every timing is a barrier, the
operation, a barrier, on rank 0; each figure is the best of ``--repeats``, after one untimed
warm-up round of each side. The order of ucp, DCP and the floor below rotates between repeats (a
save right after another one can find the storage still busy), and old checkpoints are deleted
(and the deletion synced) between repeats, outside the timings. Shared or virtual disks are noisy:
use more ``--repeats`` before drawing conclusions from the save and cold-load figures.

For scale, ``raw_save`` / ``raw_load_cold`` time the storage floor: each rank writing its local
state bytes in sequence to one file with plain ``write`` + ``fsync``, and reading them back cold
(one thread, ``preadv``). No checkpointer that writes/reads the same bytes can go much below it.

Output: exactly one JSON line on stdout (rank 0's figures, printed by the launcher once every rank
has exited cleanly, so a failed run prints nothing on stdout and exits non-zero); progress goes to
stderr. Ratios ``speedup_*`` are DCP seconds / ucp seconds (> 1: ucp is faster); the target is
>= 1.5 for save and for both loads. ``ucp_phases_*`` break the best ucp call down by ucp's
collective phases (capture, plan, prepare, write, commit; find, manifest, read, restore).

    python tools/bench_save.py [--gb 1.0] [--nproc 2] [--repeats 3] [--dir DIR] [--layout fsdp|tp]
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path

import benchlib
from benchlib import files_under

FIGURES = ("save", "load_warm", "load_cold")
log = benchlib.logger("bench_save")


# -- the model --------------------------------------------------------------------------------------


def model_dims(gb: float, nproc: int) -> dict:
    """Width, depth and vocabulary of a GPT-like model whose params + AdamW state are ~``gb`` GB.

    fp32 parameters plus two AdamW moments are 12 bytes per parameter. Per layer a block holds
    12 d^2 weights (qkv 3d^2, out d^2, fc1 4d^2, fc2 4d^2); embedding and untied head 2 V d with
    V = 32 d. With 4 layers that is 112 d^2; d is rounded to a multiple of 64 (and of nproc, so every
    tensor-parallel split is even), then the depth is adjusted to land near the target.
    """
    params = gb * 1e9 / 12
    step = 64 * nproc // math.gcd(64, nproc)
    d = max(step, round(math.sqrt(params / 112) / step) * step)
    vocab = 32 * d
    layers = max(1, round((params - 2 * vocab * d) / (12 * d * d)))
    return {"d": d, "vocab": vocab, "layers": layers}


def build_model(dims: dict):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.out = nn.Linear(d, d, bias=False)
            self.ln2 = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, 4 * d, bias=False)
            self.fc2 = nn.Linear(4 * d, d, bias=False)

    class GPT(nn.Module):
        def __init__(self, d, vocab, layers):
            super().__init__()
            self.tok = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
            self.ln_f = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)

    with torch.device("meta"):  # no memory, no init; each rank materializes only its shard
        return GPT(dims["d"], dims["vocab"], dims["layers"])


def shard_model(model, layout: str, nproc: int):
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    if layout == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (nproc,), mesh_dim_names=("dp",))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    else:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (nproc,), mesh_dim_names=("tp",))
        plan = {
            "tok": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "head": ColwiseParallel(),
        }
        for i in range(len(model.blocks)):
            plan.update({
                f"blocks.{i}.qkv": ColwiseParallel(),
                f"blocks.{i}.out": RowwiseParallel(),
                f"blocks.{i}.fc1": ColwiseParallel(),
                f"blocks.{i}.fc2": RowwiseParallel(),
            })
        parallelize_module(model, mesh, plan)
    model.to_empty(device=torch.device("cpu"))
    return model


def local(t):
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor) and any(p.is_shard() for p in t.placements)


def fill(t, seed: int, kind: str = "normal") -> None:
    """Fill ``t`` in place from its own generator: quick, deterministic, and not all zeros."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if kind == "uniform":
            t.uniform_(0.0, 1e-4, generator=g)
        else:
            t.normal_(0.0, 0.02, generator=g)


def seed_for(name: str, t, rank: int) -> int:
    """Replicated tensors get the same seed on every rank (ucp checks replicas agree); shards differ."""
    import zlib

    return zlib.crc32(name.encode()) * 64 + (rank + 1 if is_sharded(t) else 0)


def build_state(args, rank: int):
    import torch

    dims = model_dims(args.gb, args.nproc)
    model = shard_model(build_model(dims), args.layout, args.nproc)
    for name, p in model.named_parameters():
        if name.endswith(".weight") and ".ln" not in name and not name.startswith("ln"):
            fill(local(p), seed_for(name, p, rank))
        else:
            with torch.no_grad():
                local(p).fill_(1.0 if name.endswith("weight") else 0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # One real step makes AdamW create its state (step, exp_avg, exp_avg_sq) exactly as training
    # would; gradients are set directly, no forward/backward (and no collectives) are needed.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        fill(local(st["exp_avg"]), seed_for(names[id(p)] + ".exp_avg", p, rank))
        fill(local(st["exp_avg_sq"]), seed_for(names[id(p)] + ".exp_avg_sq", p, rank), "uniform")
    return model, opt, dims


def built_state(args, rank: int, say=None) -> tuple:
    """:func:`build_state`, timed, its size said on rank 0 through ``say`` (a logger) with the
    figures every bench prints: ``(model, opt, dims, parameter count, state GB, checksum)``."""
    t0 = time.perf_counter()
    model, opt, dims = build_state(args, rank)
    n_params = sum(p.numel() for p in model.parameters())
    state_gb = 3 * 4 * n_params / 1e9  # fp32 parameters + AdamW's two moments
    if rank == 0 and say is not None:
        say(f"layout={args.layout} nproc={args.nproc} dims={dims} params={n_params / 1e6:.1f}M "
            f"state={state_gb:.3f} GB built in {time.perf_counter() - t0:.1f}s")
    return model, opt, dims, n_params, state_gb, checksum(model, opt)


def local_tensors(model, opt):
    """(name, local tensor) of everything a checkpoint must restore on this rank."""
    out = [(f"model.{n}", local(t)) for n, t in model.state_dict().items()]
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if hasattr(v, "shape"):
                out.append((f"optim.{names[id(p)]}.{k}", local(v)))
    return out


def checksum(model, opt) -> list:
    import crc32c
    import torch

    out = []
    for name, t in local_tensors(model, opt):
        t = t.detach().contiguous()
        out.append((name, tuple(t.shape), str(t.dtype), crc32c.crc32c(t.reshape(-1).view(torch.uint8).numpy())))
    return out


def scramble(model, opt) -> None:
    """Overwrite the local state with a constant no tensor holds, so a load that skips anything fails
    verification."""
    import torch

    with torch.no_grad():
        for _, t in local_tensors(model, opt):
            t.fill_(-3.0)


# -- one rank ---------------------------------------------------------------------------------------


class PhaseTimer:
    """Times ucp's named collective phases by wrapping ``Collective.phase``, ``gather_phase``,
    ``reduce_phase`` and ``exchange_phase`` (ucp itself is untouched)."""

    KINDS = ("phase", "gather_phase", "reduce_phase", "exchange_phase")

    def __init__(self):
        from ucp.comm import collective

        self.current: dict = {}
        for kind in self.KINDS:
            setattr(collective.Collective, kind, self._timed(getattr(collective.Collective, kind)))

    def _timed(self, orig):
        timer = self

        def timed(self_, name, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(self_, name, *args, **kwargs)
            finally:
                timer.current[name] = timer.current.get(name, 0.0) + time.perf_counter() - t0

        return timed

    def take(self) -> dict:
        out, self.current = self.current, {}
        return {k: round(v, 4) for k, v in out.items()}


def drop_cache(paths: list[Path], rank: int) -> None:
    """Make the next read of ``paths`` cold (collective): rank 0 flushes dirty pages, then drops these
    files' cached pages (``benchlib.drop_cache``)."""
    import torch.distributed as dist

    dist.barrier()
    if rank == 0:
        benchlib.drop_cache(paths)
    dist.barrier()


def raw_write(path: Path, tensors) -> None:
    """The storage floor of a save: this rank's local bytes written in sequence to one file, fsynced."""
    import torch

    with open(path, "wb", buffering=0) as f:
        for t in tensors:
            view = memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < view.nbytes:
                done += f.write(view[done:])
        os.fsync(f.fileno())


def raw_read(path: Path, tensors) -> None:
    """The storage floor of a load: the same bytes read back in sequence (one thread) into the tensors."""
    import torch

    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        for t in tensors:
            view = memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())
            done = 0
            while done < view.nbytes:
                n = os.preadv(fd, [view[done:]], pos + done)
                if n == 0:
                    raise RuntimeError(f"{path}: short read")
                done += n
            pos += view.nbytes
    finally:
        os.close(fd)


def worker(rank: int, args, workdir: str) -> dict | None:
    """One rank of the world ``benchlib.spawn_world`` launched; rank 0 returns the figures."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import ucp

    t0 = time.perf_counter()
    model, opt, dims, n_params, state_gb, reference = built_state(args, rank, log)
    phases = PhaseTimer()
    root = Path(workdir)
    ckpt = ucp.Checkpointer(root / "ucp", model=model, optimizer=opt)
    samples: dict = {f"{s}_{f}": [] for s in ("ucp", "dcp") for f in FIGURES}
    samples.update(raw_save=[], raw_load_cold=[])
    warming = [False]
    ucp_phases: dict = {}
    nbytes = {"ucp": 0, "dcp": 0, "raw": 0}

    def verify(what: str) -> None:
        got = checksum(model, opt)
        ok = torch.tensor([int(got == reference)])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            bad = [a[0] for a, b in zip(got, reference) if a != b][:5] if len(got) == len(reference) else "structure"
            raise RuntimeError(f"{what}: the loaded state differs from the saved one (rank {rank}: {bad})")

    def record(name: str, seconds: float, ph: dict | None = None) -> None:
        if warming[0]:
            return
        samples[name].append(seconds)
        if ph is not None and seconds <= min(samples[name]):
            ucp_phases[name] = ph
        if rank == 0:
            log(f"  {name:<14} {seconds:7.3f} s" + (f"  phases {ph}" if ph else ""))

    # --- ucp -------------------------------------------------------------------------------
    def ucp_round(step: int) -> Path:
        phases.take()
        s, res = benchlib.barrier_timed(lambda: ckpt.save(step))
        record("ucp_save", s, phases.take())
        nbytes["ucp"] = res.nbytes
        for figure in ("load_warm", "load_cold"):
            scramble(model, opt)
            if figure == "load_cold":
                drop_cache(files_under(res.path), rank)
            phases.take()
            s, loaded = benchlib.barrier_timed(lambda: ckpt.load())
            record(f"ucp_{figure}", s, phases.take())
            if loaded is None or loaded.step != step:
                raise RuntimeError(f"ucp load returned {loaded!r}, expected step {step}")
            verify(f"ucp {figure}")
        return res.path

    # --- DCP ---------------------------------------------------------------------------------
    # DCP's times include get_state_dict (save and load) and set_state_dict (load): the
    # documented way to checkpoint an FSDP2/TP model and optimizer, and what a user pays.
    def dcp_save(path: Path) -> None:
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)

    def dcp_load(path: Path) -> None:
        msd, osd = get_state_dict(model, opt)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    def dcp_round(step: int) -> Path:
        path = root / "dcp" / f"step_{step:08d}"
        s, _ = benchlib.barrier_timed(lambda: dcp_save(path))
        record("dcp_save", s)
        nbytes["dcp"] = sum(p.stat().st_size for p in files_under(path))
        for figure in ("load_warm", "load_cold"):
            scramble(model, opt)
            if figure == "load_cold":
                drop_cache(files_under(path), rank)
            s, _ = benchlib.barrier_timed(lambda: dcp_load(path))
            record(f"dcp_{figure}", s)
            verify(f"dcp {figure}")
        return path

    # --- the storage floor: plain sequential write+fsync / cold read of this rank's bytes ---
    def raw_round(step: int) -> Path:
        path = root / "raw" / f"step_{step:08d}"
        if rank == 0:
            path.mkdir(parents=True)
        dist.barrier()
        tensors = [t for _, t in local_tensors(model, opt)]
        s, _ = benchlib.barrier_timed(lambda: raw_write(path / f"rank_{rank}", tensors))
        record("raw_save", s)
        nbytes["raw"] = sum(p.stat().st_size for p in files_under(path))
        drop_cache(files_under(path), rank)
        s, _ = benchlib.barrier_timed(lambda: raw_read(path / f"rank_{rank}", tensors))
        record("raw_load_cold", s)
        verify("raw read")
        return path

    def clean(paths) -> None:
        dist.barrier()
        if rank == 0:
            for path in paths:
                shutil.rmtree(path)
            os.sync()  # the deletion's writeback is not charged to the next save
        dist.barrier()

    # One untimed round of each side first: first-call costs (lazy imports, allocator warm-up,
    # a fresh file system area) would otherwise land on whichever side goes first.
    warming[0] = True
    clean([ucp_round(10**6), dcp_round(10**6), raw_round(10**6)])
    warming[0] = False
    for r in range(args.repeats):
        if rank == 0:
            log(f"repeat {r + 1}/{args.repeats}")
        # Each side takes each position in turn (see the module docstring).
        sides = (ucp_round, dcp_round, raw_round)
        rounds = sides[r % 3:] + sides[:r % 3]
        clean([fn(r) for fn in rounds])
    ckpt.close()

    if rank == 0:
        out = {
            "bench": "ucp_vs_dcp_save_load",
            "layout": args.layout, "nproc": args.nproc, "repeats": args.repeats,
            "dims": dims, "params": n_params, "state_gb": round(state_gb, 4),
            "ucp_gb": round(nbytes["ucp"] / 1e9, 4), "dcp_gb": round(nbytes["dcp"] / 1e9, 4),
        }
        for f in FIGURES:
            for side in ("ucp", "dcp"):
                benchlib.best_of(out, f"{side}_{f}", samples[f"{side}_{f}"], nbytes[side])
        for f in ("save", "load_cold"):
            benchlib.best_of(out, f"raw_{f}", samples[f"raw_{f}"], nbytes["raw"])
        for f in FIGURES:
            out[f"speedup_{f}"] = round(out[f"dcp_{f}_s"] / out[f"ucp_{f}_s"], 3)
        out["target_met"] = all(out[f"speedup_{f}"] >= 1.5 for f in FIGURES)
        for f in FIGURES:
            out[f"ucp_phases_{f}"] = ucp_phases.get(f"ucp_{f}", {})
        out["verified"] = True
        benchlib.versions(out, t0)
    dist.barrier()
    return out if rank == 0 else None


# -- launcher ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = benchlib.parser(__doc__)
    ap.add_argument("--gb", type=float, default=1.0, help="params + AdamW state, GB (1e9 bytes) of fp32 over all ranks")
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn")
    benchlib.add_repeats(ap, 3)
    benchlib.add_work(ap, "--dir", " the checkpoints")
    ap.add_argument("--layout", choices=("fsdp", "tp"), default="fsdp", help="FSDP2 on mesh 'dp' or tensor parallel on mesh 'tp'")
    ap.add_argument("--timeout", type=float, default=900, help="collective timeout, seconds")
    args = ap.parse_args(argv)
    if args.gb <= 0 or args.nproc < 1 or args.repeats < 1:
        ap.error("--gb must be > 0, --nproc and --repeats >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // args.nproc)
    with benchlib.workdir(args.dir, "ucp_bench_", log) as work:
        ranks = benchlib.attempt(benchlib.spawn_world, worker, args.nproc, args, str(work), threads=threads,
                                 pg_timeout=args.timeout, log=log)
    return benchlib.finish(ranks if isinstance(ranks, int) else ranks[0])


if __name__ == "__main__":
    sys.exit(main())
