"""One rank of the reference trainer; run N of them with ``ucp train --nproc N`` or ``torchrun``.

Prints one JSON line per step on rank 0's stdout (``{"step": .., "loss": ..}``, the loss over the
whole global batch); everything else goes to stderr.

    torchrun --nproc-per-node 4 -m ucp.trainer.train --tp 2 --zero 3 --steps 20 --ckpt ckpts/
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import ucp
from ucp.trainer.layouts import TrainLayout, parallelize
from ucp.trainer.model import GPTConfig, batch, init_gpt, loss_fn
from ucp.trainer.options import add_arguments
from ucp.trainer.zero1 import FlatAdamW


def build(cfg: GPTConfig, lay: TrainLayout, seed: int, lr: float = 3e-3):
    """The whole model initialized from ``seed``, made parallel for ``lay``, and its AdamW."""
    lay.check(cfg, dist.get_world_size())
    par = parallelize(init_gpt(cfg, seed), lay)
    if lay.zero == 1:
        # the tied embedding lives on the first and last pipeline stage: partition it alike on both
        return par, FlatAdamW(par.model.named_parameters(), par.dp_group, lr=lr, weight_decay=0.1,
                              own_bucket={"wte.weight"} if lay.pp > 1 else ())
    return par, torch.optim.AdamW(par.model.parameters(), lr=lr, weight_decay=0.1)


def train_steps(cfg: GPTConfig, lay: TrainLayout, par, opt, seed: int, steps, on_step=None) -> list[float]:
    """Train ``steps`` (an iterable of step numbers); returns the global-batch loss of each."""
    rows = cfg.global_batch // lay.dp
    losses = []
    for step in steps:
        x, y = batch(cfg, seed, step)
        lo = par.dp_rank * rows
        if par.pipeline is not None:  # forward and backward through the schedule; the global loss
            losses.append(par.pipeline.step(x[lo:lo + rows], y[lo:lo + rows]))
            opt.step()
            opt.zero_grad()
        else:
            loss = loss_fn(par.module(x[lo:lo + rows]), y[lo:lo + rows])
            loss.backward()
            if par.after_backward is not None:
                par.after_backward()
            opt.step()
            opt.zero_grad()
            total = loss.detach().clone()
            dist.all_reduce(total, group=par.dp_group)
            losses.append(total.item() / lay.dp)
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


def run(args) -> list[float]:
    """Train on the already initialized process group; returns the losses."""
    cfg, lay = GPTConfig(experts=args.moe), TrainLayout.of(args, dist.get_world_size())
    par, opt = build(cfg, lay, args.seed, args.lr)
    options, spec = lay.checkpoint_options(cfg), lay.spec(cfg)
    start = 1
    if args.resume:
        # cast: --manual-tp trains bf16 with fp32 masters, the other layouts fp32 (see ucp.load's cast)
        res = ucp.Checkpointer(args.resume, model=par.model, optimizer=opt, options=options,
                               spec=spec).load(cast=True)
        if res is None:
            raise ucp.UcpError(f"{args.resume}: no checkpoint to resume from")
        start = res.step + 1
        if dist.get_rank() == 0:  # every rank loaded the same checkpoint: said once
            print(f"resumed from step {res.step} ({res.path})", file=sys.stderr)
    ckpt = ucp.Checkpointer(args.ckpt, model=par.model, optimizer=opt, keep=args.keep, options=options,
                             spec=spec) if args.ckpt else None

    def on_step(step, loss):
        if dist.get_rank() == 0:
            print(json.dumps({"step": step, "loss": loss}), flush=True)
        if ckpt is not None and args.save_every and step % args.save_every == 0:
            ckpt.save(step)

    return train_steps(cfg, lay, par, opt, args.seed, range(start, args.steps + 1), on_step)


def main(argv: list[str] | None = None) -> int:
    args = add_arguments(argparse.ArgumentParser(prog="python -m ucp.trainer.train", description=__doc__)).parse_args(argv)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    try:
        run(args)
        dist.barrier()  # no rank tears down while a peer's FSDP2 collectives are still in flight
    finally:
        dist.destroy_process_group()
    # torch 2.13 + FSDP2 on gloo: the interpreter's teardown after destroy_process_group sometimes
    # aborts the process ("terminate called without an active exception", ~1 run in 15). Everything
    # is done and flushed here, so leave without running C++ static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
