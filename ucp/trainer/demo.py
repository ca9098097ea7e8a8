"""``ucp demo``: the reference trainer, checkpointed, interrupted and resumed.

Two jobs of the reference GPT run one after the other on N local processes, started by torch's
elastic launcher with gloo: the first trains and checkpoints every few steps; the second starts
from nothing, as a restarted job would, loads a checkpoint and trains on. The demonstration passes
when the second job's losses equal the first job's for the same steps, bit for bit.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import ucp
from ucp.trainer.launch import launch
from ucp.trainer.layouts import TrainLayout
from ucp.trainer.model import GPTConfig
from ucp.trainer.train import build, train_steps


def _job(root: str, layout: dict, steps: int, save_every: int, resume: int | None) -> dict:
    """One rank of a demo job; returns its losses, saves and load."""
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    cfg, lay = GPTConfig(), TrainLayout(**layout)
    par, opt = build(cfg, lay, seed=0)
    ckpt = ucp.Checkpointer(root, model=par.model, optimizer=opt, keep=2, options=lay.checkpoint_options(cfg))
    out = {"saves": [], "load": None}
    start = 1
    if resume is not None:
        res = ckpt.load(step=resume)
        out["load"] = {"step": res.step, "seconds": res.seconds, "nbytes": res.nbytes}
        start = res.step + 1
    bar = tqdm(total=steps - start + 1, desc=f"{'job 2 (resumed)' if resume else 'job 1'} {lay.layout}",
               unit="step", file=sys.stderr, disable=rank != 0, leave=False)

    def on_step(step, loss):
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}")
        if resume is None and step % save_every == 0:
            r = ckpt.save(step)
            out["saves"].append({"step": step, "seconds": r.seconds, "nbytes": r.nbytes, "path": str(r.path)})

    losses = train_steps(cfg, lay, par, opt, 0, range(start, steps + 1), on_step)
    bar.close()
    out["losses"] = dict(zip(range(start, steps + 1), losses))
    ckpt.close()
    # All ranks finish together. The process group is left to process exit: on torch 2.13 with
    # FSDP2 over gloo, teardown after destroy_process_group sometimes aborts the worker.
    dist.barrier()
    return out


def run_demo(nproc: int, steps: int, save_every: int, root: str) -> int:
    """Run both jobs and print a summary; 0 when the resumed run matches the original exactly."""

    layout = dict(dp=nproc // 2, tp=2, zero=3) if nproc % 2 == 0 and nproc >= 4 else dict(dp=nproc, zero=3)
    root_path = Path(root).resolve()
    if root_path.exists():
        shutil.rmtree(root_path)
    print(f"ucp demo: the reference GPT on {nproc} ranks (gloo, FSDP2{' + tensor parallel' if 'tp' in layout else ''}), "
          f"{steps} steps, a checkpoint every {save_every}, into {root_path}", file=sys.stderr)
    t0 = time.perf_counter()
    first = launch(nproc, _job, str(root_path), layout, steps, save_every, None, run_id="ucp-demo")
    t1 = time.perf_counter()
    # The restarted job resumes from the newest checkpoint before the last step (keep=2 retains it).
    resume_step = (steps - 1) // save_every * save_every
    second = launch(nproc, _job, str(root_path), layout, steps, save_every, resume_step, run_id="ucp-demo")
    t2 = time.perf_counter()

    saves, load = first[0]["saves"], second[0]["load"]
    resumed = sorted(second[0]["losses"])
    same = all(first[r]["losses"][s] == second[r]["losses"][s] for r in first for s in resumed)
    kept = sorted(p.name for p in root_path.iterdir())
    print()
    print("ucp demo summary")
    print(f"  job 1  trained steps 1-{steps} on {nproc} ranks in {t1 - t0:.1f} s "
          f"(loss {first[0]['losses'][1]:.3f} -> {first[0]['losses'][steps]:.3f}), saved {len(saves)} checkpoint(s):")
    for s in saves:
        print(f"           step {s['step']:>4}  {s['nbytes'] / 2**20:7.2f} MiB  {s['seconds'] * 1e3:7.1f} ms  {s['path']}")
    print(f"  kept   {', '.join(kept)} (keep=2: older ones pruned)")
    print(f"  job 2  loaded step {load['step']} ({load['nbytes'] / 2**20:.2f} MiB on rank 0) in {load['seconds'] * 1e3:.1f} ms, "
          f"trained steps {resumed[0]}-{resumed[-1]} in {t2 - t1:.1f} s")
    print(f"  check  resumed losses {'equal' if same else 'DIFFER FROM'} the uninterrupted run's, bit for bit "
          f"(step {resumed[-1]}: {second[0]['losses'][resumed[-1]]:.6f})")
    print(f"  next   ucp inspect {root_path}    ucp verify {root_path}")
    return 0 if same else 1
