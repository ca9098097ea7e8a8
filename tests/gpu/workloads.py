"""Rank functions of the gpu tests (module level: they pickle). Every rank of the gloo world puts
its state on the GPU it is given (several ranks may share one); each rank is its own simulated node
(its own agent), so that parity crosses nodes."""

from __future__ import annotations

import torch
import torch.distributed as dist

STRIPE = 1 << 16


def node_job(base: str, rank: int, replaced=()) -> str:
    return f"{base}-{rank}" + ("x" if rank in replaced else "")


def replicated_model(seed: int):
    """A data-parallel replica on this rank's GPU (every rank the same) and its AdamW."""
    from tests.helpers import tiny_model

    device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    m, _ = tiny_model(seed, (64, 512, 128))
    m = m.to(device)
    return m, torch.optim.AdamW(m.parameters(), lr=0.01)


def step(model, opt, s: int) -> None:
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(s)).to(next(model.parameters()).device)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def snapshots_with_parity(root: str, base: str, steps: int = 3) -> dict:
    """A snapshot with one parity member per group of 4 after every step; the state at the last."""
    import ucp
    from tests.helpers import state_of

    rank = dist.get_rank()
    model, opt = replicated_model(seed=0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=node_job(base, rank)),
                          redundancy=ucp.RedundancyOptions(group=4, parity=1, stripe=STRIPE))
    tiers = []
    for s in range(steps):
        step(model, opt, s)
        tiers.append(ck.save(s + 1).tier)
    ck.wait()
    state = {k: v.cpu() for k, v in state_of(model, opt).items()}
    ck.close()
    return {"state": state, "tiers": tiers}


def recover(root: str, base: str, replaced: list[int], expected: dict) -> dict:
    """A fresh job on the same ranks, ``replaced`` on fresh nodes: load onto the GPU; the differences
    from ``expected`` and where the state landed."""
    import ucp
    from tests.helpers import bit_diffs, state_of

    rank = dist.get_rank()
    model, opt = replicated_model(seed=1)
    step(model, opt, 0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt,
                          snapshot=ucp.SnapshotOptions(job=node_job(base, rank, replaced), timeout=20),
                          redundancy=ucp.RedundancyOptions(group=4, parity=1, stripe=STRIPE))
    res = ck.load()
    got = state_of(model, opt)
    out = {"source": None if res is None else res.source, "step": None if res is None else res.step,
           "rebuilt": None if res is None else list(res.rebuilt),
           "on_gpu": all(v.is_cuda for k, v in got.items() if k.startswith("model/")),
           "diffs": bit_diffs(expected, {k: v.cpu() for k, v in got.items()})}
    ck.close()
    return out
