"""Rank functions for the memory tier (module level: they pickle)."""

from __future__ import annotations

import torch.distributed as dist

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
    # the cut runs in the background: the last snapshot becomes complete without another ucp call
    import time

    from ucp.snapshot import client

    agent = client.connect(job)
    deadline = time.monotonic() + 30
    while not any(v == {"step": steps, "complete": True} for k, v in agent.status()["snapshots"].items()
                  if k.startswith(f"{dist.get_rank()}.")):
        assert time.monotonic() < deadline, agent.status()
        time.sleep(0.02)
    return {k: v.detach().clone() for k, v in full_state(model, opt).items() if not k.startswith("flat/")}


def load_from_memory(kind: str, root: str, job: str, expected: dict) -> dict:
    """A fresh job of ``kind`` (other seed) loads: from the agents' memory."""
    import ucp

    model, opt = build(kind, seed=1)
    res = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)).load()
    got = full_state(model, opt)
    return {"diffs": bit_diffs(expected, got), "source": res.source, "step": res.step}


def one_rank_fails_its_copy(root: str, job: str) -> dict:
    """Rank 1's snapshot copy fails: the cut fails on every rank, no rank marks it complete, and
    every rank reports it once (then saves durably)."""
    import warnings

    import ucp
    from ucp.snapshot import client, memory

    model, opt = build("fsdp", seed=0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    train_step(model, opt, 0)
    ck.save(1)
    ck.wait()
    real = memory.MemoryTier.write
    if dist.get_rank() == 1:
        def broken(self, *a, **k):
            raise OSError("no space left in /dev/shm")
        memory.MemoryTier.write = broken
    try:
        train_step(model, opt, 1)
        ck.save(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ck.wait()
    finally:
        memory.MemoryTier.write = real
    mine = {k: v for k, v in client.connect(job).status()["snapshots"].items() if k.startswith(f"{dist.get_rank()}.")}
    return {"warnings": [str(w.message) for w in caught], "snapshots": mine, "lost": ck._memory_lost}
