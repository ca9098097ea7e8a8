"""Reference-trainer functions run on every rank of a test world."""

from __future__ import annotations

from torch.distributed.tensor import DTensor

from tests.helpers import bit_diffs, full_state
from ucp.trainer.layouts import TrainLayout
from ucp.trainer.model import GPTConfig, init_gpt
from ucp.trainer.train import build, train_steps


def init_matches_whole_model(lay: dict, seed: int = 0) -> dict:
    """This rank's gathered initial parameters against the whole model built from the seed: the keys
    it holds (a pipeline stage holds some) and those that differ."""
    cfg = GPTConfig()
    par, _ = build(cfg, TrainLayout(**lay), seed)
    got = {f"model/{n}": (p.full_tensor() if isinstance(p, DTensor) else p).detach() for n, p in par.model.named_parameters()}
    whole = {f"model/{n}": p.detach() for n, p in init_gpt(cfg, seed).named_parameters() if f"model/{n}" in got}
    return {"keys": sorted(got), "diffs": bit_diffs(whole, got),
            "all": sorted(f"model/{n}" for n, _ in init_gpt(cfg, seed).named_parameters())}


def train_save_resume(lay: dict, root: str, steps: int = 20, save_at: int = 10, seed: int = 0) -> dict:
    """Train ``steps`` saving at ``save_at``; a fresh job (other init) loads it and trains the rest."""
    import ucp

    cfg = GPTConfig()
    layout = TrainLayout(**lay)
    options = layout.checkpoint_options(cfg)
    par, opt = build(cfg, layout, seed)
    first = train_steps(cfg, layout, par, opt, seed, range(1, save_at + 1))
    ucp.Checkpointer(root, model=par.model, optimizer=opt, options=options).save(save_at)
    saved = full_state(par.model, opt)
    rest = train_steps(cfg, layout, par, opt, seed, range(save_at + 1, steps + 1))

    par2, opt2 = build(cfg, layout, seed + 1)
    res = ucp.Checkpointer(root, model=par2.model, optimizer=opt2, options=options).load()
    diffs = bit_diffs(saved, full_state(par2.model, opt2))
    resumed = train_steps(cfg, layout, par2, opt2, seed, range(save_at + 1, steps + 1))
    return {"losses": first + rest, "resumed": resumed, "diffs": diffs, "step": res.step}
