"""Pipeline-parallel training functions run on every rank of a test world, and the single-process reference."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.helpers import bit_diffs, full_state
from ucp.trainer.model import GPTConfig, batch, init_gpt, loss_fn
from ucp.trainer.pipeline import PipelineTrainer, pipeline_groups, shard_stage, stage_module

LR, WD = 3e-3, 0.1


def build(cfg: GPTConfig, lay: dict, groups, seed: int):
    """This rank's stage of the GPT initialized from ``seed``, its AdamW and its pipeline trainer."""
    stage = stage_module(init_gpt(cfg, seed), groups.pp_rank, groups.pp_size)
    if lay.get("zero", 0) in (2, 3):
        shard_stage(stage, groups.mesh["dp"], reshard_after_forward=lay["zero"] == 3)
    opt = torch.optim.AdamW(stage.parameters(), lr=LR, weight_decay=WD)
    pipe = PipelineTrainer(stage, groups.pp_group, groups.pp_rank, groups.pp_size, loss_fn,
                           n_microbatches=lay.get("mb"), embed_group=groups.embed_group, dp_group=groups.dp_group,
                           schedule=lay.get("schedule", "1f1b"))
    return stage, opt, pipe


def train(cfg: GPTConfig, groups, opt, pipe, seed: int, steps) -> list[float]:
    """Train ``steps`` on this dp rank's rows of each global batch; the global-batch losses."""
    rows = cfg.global_batch // groups.dp_size
    lo = groups.dp_rank * rows
    losses = []
    for step in steps:
        x, y = batch(cfg, seed, step)
        losses.append(pipe.step(x[lo:lo + rows], y[lo:lo + rows]))
        opt.step()
        opt.zero_grad()
    return losses


def detached(state: dict) -> dict:
    """``state`` fit to cross a process boundary (gathered DTensors come back attached to autograd)."""
    return {k: v.detach().clone() for k, v in state.items()}


def tied_state(state: dict) -> dict:
    """The tied embedding copy and its AdamW state in ``state`` (empty on middle stages)."""
    return {k: v for k, v in state.items() if k == "model/wte.weight" or k.startswith("optim/wte.weight/")}


def train_save_resume(lay: dict, root: str, steps: int = 20, save_at: int = 10, seed: int = 0) -> dict:
    """Train ``steps`` saving at ``save_at``; a fresh stage (other init) loads it and trains the rest.

    Returns the losses, this stage's state at ``save_at`` and its final parameters (gathered), the
    tied embedding's final state, the keys that differ after the load (and after the resumed steps),
    the resumed losses and, on rank 0, the manifest's fragments.
    """
    import ucp
    from ucp.format.layout import Layout
    from ucp.storage.directory import step_dir
    from ucp.storage.manifest_io import read_manifest

    cfg = GPTConfig()
    pp, dp, zero = lay["pp"], lay.get("dp", 1), lay.get("zero", 0)
    groups = pipeline_groups(pp, dp)
    options = ucp.CheckpointOptions(layout=Layout.from_sizes(pp=pp, dp=dp, zero=zero))
    stage, opt, pipe = build(cfg, lay, groups, seed)
    first = train(cfg, groups, opt, pipe, seed, range(1, save_at + 1))
    ucp.Checkpointer(root, model=stage, optimizer=opt, options=options).save(save_at)
    saved = detached(full_state(stage, opt))
    rest = train(cfg, groups, opt, pipe, seed, range(save_at + 1, steps + 1))
    final = detached(full_state(stage, opt))

    stage2, opt2, pipe2 = build(cfg, lay, groups, seed + 1)
    res = ucp.Checkpointer(root, model=stage2, optimizer=opt2, options=options).load()
    diffs = bit_diffs(saved, full_state(stage2, opt2))
    resumed = train(cfg, groups, opt2, pipe2, seed, range(save_at + 1, steps + 1))
    diffs_end = bit_diffs(final, full_state(stage2, opt2))

    fragments = None
    if dist.get_rank() == 0:
        m = read_manifest(step_dir(root, save_at))
        fragments = [(f.key, f.box.offsets, f.box.sizes, f.rank) for f in m.fragments]
        fragments = {"fragments": fragments, "tensors": {k: tuple(v.shape) for k, v in m.tensors.items()},
                     "layout": str(m.layout)}
    params = {k: v for k, v in final.items() if k.startswith("model/")}
    return {"losses": first + rest, "resumed": resumed, "diffs": diffs, "diffs_end": diffs_end, "step": res.step,
            "params": params, "saved": saved, "tied": tied_state(final), "stage": groups.pp_rank, "manifest": fragments}


def reference(steps: int = 20, seed: int = 0, dp: int = 1, microbatches: int | None = None) -> dict:
    """The whole GPT trained in one process on the same batches: losses and final parameters.

    With ``microbatches`` each step's gradient is accumulated over the pipeline's split of the
    global batch (``dp`` slices of ``microbatches`` microbatches, each microbatch's mean loss scaled
    by ``1 / (dp * microbatches)``): the same arithmetic as the pipeline, up to the order of the
    floating-point reductions. Without, one backward of the whole batch's mean loss.
    """
    cfg = GPTConfig()
    model = init_gpt(cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    parts = dp * (microbatches or 1)
    losses = []
    for step in range(1, steps + 1):
        x, y = batch(cfg, seed, step)
        if microbatches is None:
            loss = loss_fn(model(x), y)
            loss.backward()
            losses.append(loss.item())
        else:
            total = 0.0
            for xs, ys in zip(x.chunk(parts), y.chunk(parts)):
                loss = loss_fn(model(xs), ys)
                (loss / parts).backward()
                total += loss.item()
            losses.append(total / parts)
        opt.step()
        opt.zero_grad()
    return {"losses": losses, "params": {f"model/{n}": p.detach().clone() for n, p in model.named_parameters()}}
