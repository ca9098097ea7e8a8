"""Trainer layouts loading checkpoints saved under other layouts (rank functions; they pickle)."""

from __future__ import annotations

from tests.trainer.convert_workloads import whole_state
from ucp.trainer.layouts import TrainLayout
from ucp.trainer.model import GPTConfig
from ucp.trainer.train import build, train_steps


def load_and_gather(lay: dict, path: str, strict: bool = True) -> dict:
    """A freshly built job of layout ``lay`` (another seed) loads ``path`` (casting where the dtypes
    differ); its gathered state, its param groups' step counts and the next two losses."""
    import ucp

    cfg = GPTConfig()
    layout = TrainLayout(**lay)
    par, opt = build(cfg, layout, seed=1)
    res = ucp.Checkpointer(path, model=par.model, optimizer=opt, options=layout.checkpoint_options(cfg)).load(strict=strict, cast=True)
    state = whole_state(cfg, layout, par, opt)
    group_steps = [g.get("step") for g in opt.param_groups]
    losses = train_steps(cfg, layout, par, opt, 0, range(res.step + 1, res.step + 3))
    return {"step": res.step, "source": res.source, "state": state, "losses": losses, "group_steps": group_steps}


def train_save_continue(lay: dict, root: str, save_at: int = 3, until: int = 5) -> list[float]:
    """Train to ``save_at``, save, and train on to ``until``: the uninterrupted losses of every step."""
    import ucp

    cfg = GPTConfig()
    layout = TrainLayout(**lay)
    par, opt = build(cfg, layout, seed=0)
    before = train_steps(cfg, layout, par, opt, 0, range(1, save_at + 1))
    ucp.Checkpointer(root, model=par.model, optimizer=opt, options=layout.checkpoint_options(cfg)).save(save_at)
    return before + train_steps(cfg, layout, par, opt, 0, range(save_at + 1, until + 1))


def load_model_cast(lay: dict, path: str) -> dict:
    """A model of layout ``lay`` (no optimizer) loads ``path`` with cast=True; its gathered parameters."""
    import ucp
    from tests.trainer.convert_workloads import _bits, _full

    cfg = GPTConfig()
    layout = TrainLayout(**lay)
    par, _ = build(cfg, layout, seed=1)
    # the fp32 model has separate q/k/v projections where manual TP fuses them: those stay unloaded
    ucp.Checkpointer(path, model=par.model, options=layout.checkpoint_options(cfg)).load(strict=False, cast=True)
    return {f"model/{n}": _bits(_full(p)) for n, p in par.model.named_parameters()}
