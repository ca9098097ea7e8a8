"""Rank functions for the memory tier (module level: they pickle)."""

from __future__ import annotations

from tests.dist.workloads import bit_diffs, build, full_state, train_step


def snapshot_steps(kind: str, root: str, job: str, steps: int = 3) -> dict:
    """Train ``kind`` and take a snapshot after every step (in the node agent's memory); the full
    state at the last step."""
    import ucp

    model, opt = build(kind, seed=0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    for s in range(steps):
        train_step(model, opt, s)
        res = ck.save(s + 1)
        assert res.tier == "memory", res
    ck.wait()  # the cut of the last snapshot (the earlier ones finished at the next save)
    return {k: v.detach().clone() for k, v in full_state(model, opt).items() if not k.startswith("flat/")}


def load_from_memory(kind: str, root: str, job: str, expected: dict) -> dict:
    """A fresh job of ``kind`` (other seed) loads: from the agents' memory."""
    import ucp

    model, opt = build(kind, seed=1)
    res = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)).load()
    got = full_state(model, opt)
    return {"diffs": bit_diffs(expected, got), "source": res.source, "step": res.step}
