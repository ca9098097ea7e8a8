"""Workloads of the DCP import tests: real torch.distributed.checkpoint saves (module level: they pickle)."""

from __future__ import annotations

import torch.distributed as dist

from tests.helpers import bit_diffs, build_mlp, full_state, mlp_step


def dcp_save(kind: str, root: str, steps: int = 2) -> dict:
    """Train ``kind`` for ``steps`` steps and save model and optimizer with DCP (as its docs show:
    ``get_state_dict``, then ``dcp.save``); the full state (every tensor gathered whole)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt = build_mlp(kind, seed=0)
    for s in range(steps):
        mlp_step(model, opt, s)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "step": steps}, checkpoint_id=root)
    dist.barrier()
    return {k: v.detach().clone() for k, v in full_state(model, opt).items()}


def load_universal(kind: str, root: str, expected: dict) -> dict:
    """A fresh ``kind`` model (another seed, one step taken so AdamW has state) loads the universal
    checkpoint ``root``; then one more step."""
    import ucp

    model, opt = build_mlp(kind, seed=1)
    mlp_step(model, opt, 9)
    res = ucp.Checkpointer(root, model=model, optimizer=opt).load()
    diffs = bit_diffs(expected, full_state(model, opt))
    lr = opt.param_groups[0]["lr"]
    loss = mlp_step(model, opt, res.step)
    return {"step": res.step, "source": res.source, "diffs": diffs, "lr": lr, "loss": loss}
