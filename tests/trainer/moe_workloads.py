"""Rank functions for the reference trainer's mixture of experts (module level: they pickle)."""

from __future__ import annotations

D, E = 8, 4


def layer(seed: int = 0):
    """A top-2 MoE of E small GELU-MLP experts, the same on every rank (built from ``seed``)."""
    import torch
    from torch import nn

    from ucp.trainer.moe import MoE

    torch.manual_seed(seed)
    return MoE(D, E, lambda: nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)))


def inputs(seed: int):
    """A fixed ``[8, 3, D]`` batch (8 sequences of 3 tokens)."""
    import torch

    return torch.randn(8, 3, D, generator=torch.Generator().manual_seed(seed))


def run_layer(moe, rows: slice) -> dict:
    """``moe`` on ``rows`` of the batch, then backward of ``(out * c).sum()`` for a fixed ``c``: its
    output and its gradients by global name (experts by their global index)."""
    out = moe(inputs(1)[rows])
    (out * inputs(2)[rows]).sum().backward()
    grads = {"router.weight": moe.router.weight.grad}
    for j, expert in enumerate(moe.experts):
        for n, p in expert.named_parameters():
            grads[f"experts.{moe.first + j}.{n}"] = p.grad
    return {"out": out.detach(), "grads": {k: g.detach().clone() for k, g in grads.items()}}


def placed_layer(rows_per_rank: int) -> dict:
    """The layer with its experts placed over an ep group of the whole world; rank ``r`` runs rows
    ``[r * rows_per_rank, (r + 1) * rows_per_rank)``."""
    import torch.distributed as dist

    moe = layer()
    moe.place(dist.group.WORLD)
    lo = dist.get_rank() * rows_per_rank
    return run_layer(moe, slice(lo, lo + rows_per_rank))


def train_losses(world: int, ep: int, steps: int = 3) -> list[float]:
    """The reference GPT with 8 experts at ``dp = world``, ``ep``: the losses of steps 1..steps."""
    import torch.distributed as dist

    from ucp.trainer.layouts import TrainLayout
    from ucp.trainer.model import GPTConfig
    from ucp.trainer.train import build, train_steps

    assert dist.get_world_size() == world
    cfg, lay = GPTConfig(experts=8), TrainLayout(dp=world, ep=ep)
    par, opt = build(cfg, lay, seed=0)
    return train_steps(cfg, lay, par, opt, 0, range(1, steps + 1))


def synced_grads(world: int, ep: int, zero: int = 0) -> dict:
    """The reference GPT with 8 experts at ``dp = world``, ``ep``, ``zero``: this rank's gradients of step
    1 after the trainer's reduction (whole, where FSDP2 shards them), by global name (experts by their
    global index)."""
    import torch.distributed as dist

    from ucp.trainer.layouts import TrainLayout
    from ucp.trainer.model import GPTConfig, batch, loss_fn
    from ucp.trainer.train import build

    assert dist.get_world_size() == world
    cfg, lay = GPTConfig(experts=8), TrainLayout(dp=world, ep=ep, zero=zero)
    par, _ = build(cfg, lay, seed=0)
    rows = cfg.global_batch // world
    x, y = batch(cfg, 0, 1)
    lo = par.dp_rank * rows
    loss_fn(par.module(x[lo:lo + rows]), y[lo:lo + rows]).backward()
    if par.after_backward is not None:
        par.after_backward()
    return {global_name(par.model, n): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in par.model.named_parameters()}


def global_name(model, name: str) -> str:
    """``name`` of ``model`` with a local expert index made global."""
    parts = name.split(".")
    if len(parts) > 4 and parts[2:4] == ["mlp", "experts"]:
        parts[4] = str(model.blocks[int(parts[1])].mlp.first + int(parts[4]))
    return ".".join(parts)


def _job(world: int, ep: int, zero: int, seed: int):
    import torch.distributed as dist

    from ucp.trainer.layouts import TrainLayout
    from ucp.trainer.model import GPTConfig
    from ucp.trainer.train import build

    assert dist.get_world_size() == world
    cfg, lay = GPTConfig(experts=8), TrainLayout(dp=world, ep=ep, zero=zero)
    par, opt = build(cfg, lay, seed=seed)
    return cfg, lay, par, opt


def _checkpointer(root: str, cfg, lay, par, opt):
    from dataclasses import replace

    import ucp

    return ucp.Checkpointer(root, model=par.model, optimizer=opt, options=replace(lay.checkpoint_options(cfg), fsync=False),
                            spec=lay.spec(cfg))


def train_save_continue(world: int, ep: int, zero: int, root: str) -> list[float]:
    """Steps 1-2, a save, step 3: the losses of the uninterrupted run."""
    from ucp.trainer.train import train_steps

    cfg, lay, par, opt = _job(world, ep, zero, seed=0)
    losses = train_steps(cfg, lay, par, opt, 0, range(1, 3))
    _checkpointer(root, cfg, lay, par, opt).save(2)
    return losses + train_steps(cfg, lay, par, opt, 0, range(3, 4))


def resume(world: int, ep: int, zero: int, root: str) -> list[float]:
    """A job of another seed loads step 2 and trains step 3: its loss."""
    from ucp.trainer.train import train_steps

    cfg, lay, par, opt = _job(world, ep, zero, seed=1)
    assert _checkpointer(root, cfg, lay, par, opt).load().step == 2
    return train_steps(cfg, lay, par, opt, 0, range(3, 4))
