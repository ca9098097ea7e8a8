"""The reference trainer on large gloo worlds (24 ranks): tp x pp x dp manual TP with the flat
ZeRO-1 optimizer saves, and loads under its own or another layout (rank functions; they pickle).

The model is tiny (:data:`CFG`), so that each rank's state is a few KB and a step of 24 processes on
two cores takes seconds. The gathering is :func:`tests.trainer.convert_workloads.whole_state`: every
parameter and optimizer state this rank holds, whole, in the universal checkpoint's logical form.
"""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist

from tests.trainer.convert_workloads import whole_state
from ucp.trainer.layouts import TrainLayout
from ucp.trainer.model import GPTConfig
from ucp.trainer.train import build, train_steps

#: 6 layers (pp 1, 2, 3 or 6), 4 heads (tp 1, 2 or 4), a vocabulary padded differently under tp 2
#: (80 rows) and tp 4 (96 rows), and a global batch that 2, 4, 6, 8, 12 and 16 dp ranks split.
CFG = dict(vocab=70, seq=8, d_model=8, n_heads=4, n_layers=6, global_batch=48)


def _held_bytes(par, opt) -> int:
    """Bytes of parameters and optimizer state this rank holds (flat ZeRO-1 partitions included)."""
    n = sum(p.numel() * p.element_size() for p in par.model.parameters())
    for states in opt.ucp_flat_state().values():
        n += sum(t.numel() * t.element_size() for t, _ in states.values())
    return n


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_and_gather(lay: dict, root: str, steps: int) -> dict:
    """Train ``steps`` steps from seed 0, save a durable checkpoint of step ``steps`` under ``root``,
    gather the saved state, then train one step more (the reference for a resumed run)."""
    import ucp

    cfg = GPTConfig(**CFG)
    layout = TrainLayout(**lay)
    par, opt = build(cfg, layout, seed=0)
    losses = train_steps(cfg, layout, par, opt, 0, range(1, steps + 1))
    res = ucp.Checkpointer(root, model=par.model, optimizer=opt, options=layout.checkpoint_options(cfg)).save(steps)
    state = whole_state(cfg, layout, par, opt)
    after = train_steps(cfg, layout, par, opt, 0, range(steps + 1, steps + 2))
    return {"state": state, "losses": losses, "next": after[0], "step": getattr(res, "step", steps),
            "held_bytes": _held_bytes(par, opt), "rss_mib": _peak_rss_mib(), "threads": torch.get_num_threads()}


def load_and_gather(lay: dict, path: str) -> dict:
    """A job of layout ``lay`` built from another seed loads ``path`` (strict, no cast); its gathered
    state (and whether it differed from the checkpoint's before the load: the load did the work),
    its param groups' step counts, and the loss of the next step."""
    import ucp

    cfg = GPTConfig(**CFG)
    layout = TrainLayout(**lay)
    par, opt = build(cfg, layout, seed=1)
    before = whole_state(cfg, layout, par, opt)
    res = ucp.Checkpointer(path, model=par.model, optimizer=opt, options=layout.checkpoint_options(cfg)).load()
    state = whole_state(cfg, layout, par, opt)
    group_steps = [g.get("step") for g in opt.param_groups]
    nxt = train_steps(cfg, layout, par, opt, 0, range(res.step + 1, res.step + 2))
    dist.barrier()
    return {"step": res.step, "source": res.source, "state": state, "before": before, "group_steps": group_steps,
            "next": nxt[0], "held_bytes": _held_bytes(par, opt), "rss_mib": _peak_rss_mib(),
            "threads": torch.get_num_threads()}
