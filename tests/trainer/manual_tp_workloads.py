"""Manual (plain-tensor) tensor parallelism, run on every rank of a test world.

Each function compares the tensor-parallel model with the whole GPT built from the same seed, which
every rank can afford to hold. ``tp`` smaller than the world splits it into ``dp`` replicas of the
``tp`` group (``Layout.from_sizes(dp=..., tp=...)``: tp peers are neighbouring ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.helpers import bit_diffs, full_state
from ucp.format.layout import Layout
from ucp.trainer.manual_tp import ManualTPGPT, gather_whole_state, tp_group, ucp_patterns
from ucp.trainer.model import GPTConfig, batch, init_gpt, loss_fn

_GROUPS: dict = {}  # the worker processes outlive a test: create each layout's groups once


def group_for(tp: int):
    """This rank's tp group when the world is split into groups of ``tp`` neighbouring ranks."""
    world = dist.get_world_size()
    if tp == world:
        return None  # the default group
    if tp not in _GROUPS:
        _GROUPS[tp] = tp_group(Layout.from_sizes(dp=world // tp, tp=tp))
    return _GROUPS[tp]


def perturbed_gpt(cfg: GPTConfig, seed: int):
    """The whole model from ``seed`` with non-trivial biases and norms (``init_gpt`` zeroes biases, so a
    bias added on every tp rank instead of once would go unseen)."""
    model = init_gpt(cfg, seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "ln" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def whole_grads(model) -> dict[str, torch.Tensor]:
    """The whole GPT's gradients under its state-dict names (``head.weight``: the tied ``wte``)."""
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads["head.weight"] = grads["wte.weight"]
    return grads


def slices_reassemble(tp: int, dtype_name: str, seed: int = 0) -> dict:
    """Build from the whole model, gather back: the keys that differ in any bit, and the local shapes."""
    dtype = getattr(torch, dtype_name)
    whole = perturbed_gpt(GPTConfig(), seed)
    model = ManualTPGPT.from_whole(whole, group_for(tp), dtype=dtype)
    want = {k: v.to(dtype) for k, v in whole.state_dict().items()}
    got = gather_whole_state(model, group_for(tp))
    return {
        "diffs": bit_diffs(want, got),
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "shapes": {n: list(p.shape) for n, p in model.named_parameters()},
        "tied": model.head.weight is model.wte.weight,
    }


def fp32_forward_backward(tp: int, seed: int = 0) -> dict:
    """Logits, loss and reassembled gradients of float32 TP against the whole model (relative errors)."""
    cfg = GPTConfig()
    x, y = batch(cfg, seed, 1)
    whole = perturbed_gpt(cfg, seed)
    model = ManualTPGPT.from_whole(whole, group_for(tp), dtype=torch.float32)
    ref_logits = whole(x)
    ref_loss = loss_fn(ref_logits, y)
    ref_loss.backward()
    logits = model(x)
    loss = loss_fn(logits, y)
    loss.backward()
    ref_grads = whole_grads(whole)
    grads = gather_whole_state(model, group_for(tp), grads=True)
    bad = sorted(n for n in ref_grads if n not in grads
                 or not torch.allclose(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6))
    return {
        "shape": list(logits.shape),
        "dtype": str(logits.dtype),
        "logits_rel": ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item(),
        "loss": loss.item(),
        "ref_loss": ref_loss.item(),
        "bad_grads": bad,
        "grad_keys": sorted(grads) == sorted(ref_grads),
    }


def bf16_loss(tp: int, seed: int = 0) -> dict:
    """The bf16 model's loss (and that it backpropagates) against the float32 whole model's."""
    cfg = GPTConfig()
    x, y = batch(cfg, seed, 1)
    whole = init_gpt(cfg, seed)
    model = ManualTPGPT.from_whole(whole, group_for(tp))
    loss = loss_fn(model(x), y)
    loss.backward()
    finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters())
    return {"loss": loss.item(), "ref_loss": loss_fn(whole(x), y).item(), "finite_grads": finite,
            "grad_dtype": str(model.wte.weight.grad.dtype)}


def train_step(model, opt, cfg: GPTConfig, seed: int, step: int) -> float:
    x, y = batch(cfg, seed, step)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def save_load_roundtrip(root: str, tp: int, seed: int = 0) -> dict:
    """Train a step, save with the TP patterns, load into a fresh model (other seed): bit-exact?"""
    import ucp

    cfg = GPTConfig()
    world = dist.get_world_size()
    options = ucp.CheckpointOptions(layout=Layout.from_sizes(dp=world // tp, tp=tp) if tp < world
                                    else Layout.from_sizes(tp=tp), patterns=ucp_patterns(cfg, tp))
    model = ManualTPGPT.from_whole(init_gpt(cfg, seed), group_for(tp))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, cfg, seed, 1)
    ucp.Checkpointer(root, model=model, optimizer=opt, options=options).save(1)
    saved = full_state(model, opt)
    ref = train_step(model, opt, cfg, seed, 2)

    model2 = ManualTPGPT.from_whole(init_gpt(cfg, seed + 1), group_for(tp))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    before = bit_diffs(saved, full_state(model2, opt2))
    res = ucp.Checkpointer(root, model=model2, optimizer=opt2, options=options).load()
    return {"step": res.step, "diffs": bit_diffs(saved, full_state(model2, opt2)), "differed_before": len(before),
            "ref": ref, "got": train_step(model2, opt2, cfg, seed, 2)}
