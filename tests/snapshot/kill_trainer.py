"""A 2-rank trainer for the fault tests, run under torchrun: trains the tiny MLP with a snapshot
after every step and, in the trial's victim rank, dies by SIGKILL in the middle of one snapshot's
copy; or (``--restore``) loads from memory and trains on, logging the losses.

    torchrun --nproc-per-node 2 tests/snapshot/kill_trainer.py ROOT JOB SEED LOG [--restore | --no-kill]
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading

import numpy
import torch
import torch.distributed as dist

STEPS = 8


def build():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    return m, torch.optim.AdamW(m.parameters(), lr=0.01)


def step(m, opt, s: int) -> float:
    """One data-parallel step (the gradient all-reduced), the same on every rank and every run."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(s * 10 + dist.get_rank()))
    loss = m(x).pow(2).mean()
    loss.backward()
    for p in m.parameters():
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
    opt.step()
    opt.zero_grad()
    t = loss.detach().clone()
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def main() -> None:
    import ucp

    root, job, seed, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    restore = "--restore" in sys.argv
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    m, opt = build()
    ck = ucp.Checkpointer(root, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))

    def note(**kw):
        with open(log, "a") as f:
            f.write(json.dumps({"rank": rank, **kw}) + "\n")

    first = 1
    if restore:
        res = ck.load()
        note(restored=res.step, source=res.source)
        first = res.step + 1
    else:
        rng = random.Random(seed)
        victim_rank, victim = rng.randint(0, 1), rng.randint(3, 6)
        after = rng.randint(1, 10)  # tensor copies into the snapshot before the kill (it has 12)
        if "--no-kill" in sys.argv:
            victim_rank = -1
        copies = [0]
        real = numpy.copyto  # (a snapshot copies its pieces chunk by chunk with it: ucp.codecs.checksum)

        def copyto(dst, src, *a, **k):
            out = real(dst, src, *a, **k)
            if rank == victim_rank and threading.current_thread().name == f"ucp-snapshot-{victim}":
                copies[0] += 1
                if copies[0] == after:
                    os.kill(os.getpid(), signal.SIGKILL)
            return out

        numpy.copyto = copyto
    for s in range(first, STEPS + 1):
        note(step=s, loss=step(m, opt, s))
        ck.save(s)
        if s > first:
            note(complete=s - 1)  # save(s) first finished the cut of s - 1
    ck.wait()  # (no close(): a trainer that leaves its Checkpointer open must exit cleanly too)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
