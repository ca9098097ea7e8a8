"""Trainer layouts saved for conversion, run on every rank of a test world.

Each layout saves its step-0 state and a trained one, and each rank returns the full tensors it can
gather, under the universal checkpoint's keys and in its logical form, for the test to compare
with the arrays ``ucp.convert.universal`` makes of the checkpoints. The gathering is written here from the
trainer's own description of its geometry (DTensor placements, the flat ZeRO-1 partitions of
``ucp_flat_state()``, the manual-TP patterns), not from the converter.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ucp.trainer.layouts import TrainLayout
from ucp.trainer.manual_tp import ucp_patterns
from ucp.trainer.model import GPTConfig
from ucp.trainer.train import build, train_steps


def save_and_gather(lay: dict, root: str, steps: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Build the trainer at step 0 and save it, train ``steps`` steps and save again (both under
    ``root``); then this rank's gathered full tensors of the trained state (:func:`whole_state`)."""
    import ucp

    cfg = GPTConfig()
    layout = TrainLayout(**lay)
    par, opt = build(cfg, layout, seed)
    ckpt = ucp.Checkpointer(root, model=par.model, optimizer=opt, options=layout.checkpoint_options(cfg))
    ckpt.save(0)
    train_steps(cfg, layout, par, opt, seed, range(1, steps + 1))
    ckpt.save(steps)
    return whole_state(cfg, layout, par, opt)


def whole_state(cfg: GPTConfig, layout: TrainLayout, par, opt) -> dict[str, np.ndarray]:
    """Every parameter and optimizer state this rank holds, gathered whole (a collective).

    Keys are ``model/<fqn>`` and ``optim/<fqn>/<state>`` (tied parameters once, under their first
    name); values are numpy copies of the bits (bfloat16 as uint16), so they pickle by value.
    A pipeline stage returns its own parameters; the tied embedding comes from both end stages.
    """
    model = par.model
    names = {id(p): n for n, p in model.named_parameters()}
    local: dict[str, torch.Tensor] = {}  # key -> whole over dp, still tp-local under manual TP
    for n, p in model.named_parameters():
        local[f"model/{n}"] = _full(p)
    for p, states in opt.state.items():
        for s, v in states.items():
            if isinstance(v, torch.Tensor):
                local[f"optim/{names[id(p)]}/{s}"] = _full(v)
    if hasattr(opt, "ucp_flat_state"):
        local.update(_flat_whole(model, opt, par.dp_group))
    if layout.manual_tp:
        local = _tp_whole(cfg, layout.tp, model.tp_group, local)
    return {k: _bits(v) for k, v in sorted(local.items())}


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16).copy()
    return t.numpy().copy()


def _flat_whole(model, opt, dp_group) -> dict[str, torch.Tensor]:
    """The flat ZeRO-1 state, all-gathered over ``dp_group`` and reshaped like each parameter.

    ``ucp_flat_state()`` gives this rank's elements ``[start, start + n)`` of each parameter's
    flattened (tp-local) tensor; the dp peers' ranges must tile it exactly.
    """
    mine = [(fqn, s, start, t.detach().clone()) for fqn, states in opt.ucp_flat_state().items()
            for s, (t, start) in states.items()]
    every = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(every, mine, group=dp_group)
    out: dict[str, torch.Tensor] = {}
    covered: dict[str, torch.Tensor] = {}
    for pieces in every:
        for fqn, s, start, t in pieces:
            shape = model.get_parameter(fqn).shape
            key = f"optim/{fqn}/{s}"
            if key not in out:
                out[key] = torch.zeros(shape.numel(), dtype=t.dtype)
                covered[key] = torch.zeros(shape.numel(), dtype=torch.int32)
            out[key][start:start + t.numel()] = t
            covered[key][start:start + t.numel()] += 1
    for key, c in covered.items():
        assert bool((c == 1).all()), f"{key}: the dp partitions do not tile the parameter once ({c.tolist()[:8]}...)"
        fqn = key.split("/")[1]
        out[key] = out[key].view(model.get_parameter(fqn).shape)
    return out


def _tp_whole(cfg: GPTConfig, tp: int, group, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Manual-TP tensors (parameters and their states) in the universal form: shards concatenated
    over ``group``, the padded vocabulary cut to ``cfg.vocab`` rows, and each fused q/k/v, stored as
    every rank's ``[q_r; k_r; v_r]`` in rank order, regrouped into ``[q; k; v]``."""
    globs = ucp_patterns(cfg, tp)
    out = {}
    for key in sorted(local):  # the same order on every tp peer: the all-gathers pair up
        t = local[key]
        fqn = key.split("/")[1]
        pattern = next((p for g, p in globs.items() if fnmatch.fnmatchcase(fqn, g)), None)
        if pattern is None:  # replicated over tp
            out[key] = t
            continue
        for s in pattern.shards if tp > 1 else ():
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t.contiguous(), group=group)
            t = torch.cat(parts, s.dim)
        if pattern.pad is not None:
            t = t.narrow(pattern.pad.dim, 0, pattern.pad.keep)
        if pattern.fused is not None:
            f = pattern.fused
            ranks = [block.split([n // tp for _, n in f.parts], f.dim) for block in t.chunk(tp, f.dim)]
            t = torch.cat([r[i] for i in range(len(f.parts)) for r in ranks], f.dim)
        out[key] = t.contiguous()
    return out
