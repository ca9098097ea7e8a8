"""Rank functions for loading universal checkpoints onto other layouts (module level: they pickle)."""

from __future__ import annotations

from tests.helpers import bit_diffs, build_mlp, full_state, mlp_step


def train_and_save(kind: str, root: str, steps: int = 3) -> dict:
    """Train ``kind`` a few steps, save, and return the full (gathered) state every rank agrees on."""
    import ucp

    model, opt = build_mlp(kind, seed=0)
    for s in range(steps):
        mlp_step(model, opt, s)
    ucp.Checkpointer(root, model=model, optimizer=opt).save(steps)
    return {k: v.detach().clone() for k, v in full_state(model, opt).items() if not k.startswith("flat/")}


def load_and_compare(kind: str, universal: str, expected: dict) -> dict:
    """A fresh ``kind`` model (other seed, optimizer never stepped) loads the universal checkpoint."""
    import ucp

    model, opt = build_mlp(kind, seed=1)
    res = ucp.Checkpointer(universal, model=model, optimizer=opt).load()
    got = full_state(model, opt)
    losses = [mlp_step(model, opt, s) for s in range(3, 5)]
    return {"diffs": bit_diffs(expected, got), "source": res.source, "step": res.step, "losses": losses,
            "read": res.nbytes}


def resume_reference(kind: str, root: str) -> list[float]:
    """The losses of steps 3 and 4 after loading the distributed checkpoint on its own layout."""
    import ucp

    model, opt = build_mlp(kind, seed=1)
    ucp.Checkpointer(root, model=model, optimizer=opt).load()
    return [mlp_step(model, opt, s) for s in range(3, 5)]
