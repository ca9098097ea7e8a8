"""``ucp demo``: a short multi-process save/load demonstration.

Two jobs run one after the other on N local processes, started by torch's elastic launcher (what
``torchrun`` runs) with gloo: the first trains a small FSDP2 model and checkpoints it every few
steps; the second starts from nothing, as a restarted job would, loads the newest checkpoint and
trains on. The demonstration passes when the restarted job's losses equal the first job's for the
same steps, bit for bit.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch
from torch import nn

WIDTH, DEPTH = 256, 4


class DemoModel(nn.Module):
    """A stack of pre-norm MLP blocks: small, but sharded like a real model."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))
            for _ in range(DEPTH)
        )
        self.head = nn.Linear(WIDTH, 1)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(10_000 * step + rank)  # data depends on the step alone
    x = torch.randn(16, WIDTH, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def _job(root: str, steps: int, save_every: int, resume: int | None) -> dict:
    """One rank of a demo job: optionally resume from step ``resume``, train, checkpoint; returns losses and timings."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from tqdm import tqdm

    import ucp

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = DemoModel()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp",))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    ckpt = ucp.Checkpointer(root, model=model, optimizer=opt, scheduler=sched, keep=2)
    out = {"losses": {}, "saves": [], "load": None}
    start = 1
    if resume is not None:
        res = ckpt.load(step=resume)
        out["load"] = {"step": res.step, "seconds": res.seconds, "nbytes": res.nbytes, "path": str(res.path)}
        start = res.step + 1
    bar = tqdm(range(start, steps + 1), desc=f"{'resumed' if resume is not None else 'training'} (rank 0 of {dist.get_world_size()})",
               unit="step", file=sys.stderr, disable=rank != 0, leave=False)
    for step in bar:
        x, y = _batch(step, rank)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        out["losses"][step] = loss.item()
        if resume is None and step % save_every == 0:
            r = ckpt.save(step)
            out["saves"].append({"step": step, "seconds": r.seconds, "nbytes": r.nbytes, "path": str(r.path)})
    ckpt.close()
    dist.destroy_process_group()
    return out


def _launch(nproc: int, fn, *args) -> dict:
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"ucp-demo-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    return elastic_launch(config, fn)(*args)


def run_demo(nproc: int, steps: int, save_every: int, root: str) -> int:
    """Run the two jobs, print a summary; 0 when the resumed run matches the original exactly."""
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    root_path = Path(root).resolve()
    if root_path.exists():
        shutil.rmtree(root_path)
    print(f"ucp demo: {nproc} ranks (gloo, FSDP2), {steps} steps, a checkpoint every {save_every}, into {root_path}",
          file=sys.stderr)
    t0 = time.perf_counter()
    first = _launch(nproc, _job, str(root_path), steps, save_every, None)
    t1 = time.perf_counter()
    # The restarted job resumes from the newest checkpoint before the last step (keep=2 retains it).
    resume_step = (steps - 1) // save_every * save_every
    second = _launch(nproc, _job, str(root_path), steps, save_every, resume_step)
    t2 = time.perf_counter()

    saves = first[0]["saves"]
    load = second[0]["load"]
    resumed = sorted(second[0]["losses"])
    same = all(first[r]["losses"][s] == second[r]["losses"][s] for r in first for s in resumed)
    kept = sorted(p.name for p in root_path.iterdir())
    print()
    print("ucp demo summary")
    print(f"  job 1  trained steps 1-{steps} on {nproc} ranks in {t1 - t0:.1f} s, saved {len(saves)} checkpoint(s):")
    for s in saves:
        print(f"           step {s['step']:>4}  {s['nbytes'] / 2**20:7.2f} MiB  {s['seconds'] * 1e3:7.1f} ms  {s['path']}")
    print(f"  kept   {', '.join(kept)} (keep=2: older ones pruned)")
    print(f"  job 2  loaded step {load['step']} ({load['nbytes'] / 2**20:.2f} MiB on rank 0) in {load['seconds'] * 1e3:.1f} ms, "
          f"trained steps {resumed[0]}-{resumed[-1]} in {t2 - t1:.1f} s")
    print(f"  check  resumed losses {'equal' if same else 'DIFFER FROM'} the uninterrupted run's, bit for bit "
          f"(step {resumed[-1]}: {second[0]['losses'][resumed[-1]]:.6f})")
    print(f"  next   ucp inspect {root_path}    ucp verify {root_path}")
    return 0 if same else 1
