"""Rank functions for the memory tier (module level: they pickle)."""

from __future__ import annotations

import torch.distributed as dist

from tests.helpers import bit_diffs, build_mlp, full_state, mlp_step


def snapshot_steps(kind: str, root: str, job: str, steps: int = 3) -> dict:
    """Train ``kind`` and take a snapshot after every step (in the node agent's memory); the full
    state at the last step."""
    import ucp

    model, opt = build_mlp(kind, seed=0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    for s in range(steps):
        mlp_step(model, opt, s)
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

    model, opt = build_mlp(kind, seed=1)
    res = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)).load()
    got = full_state(model, opt)
    return {"diffs": bit_diffs(expected, got), "source": res.source, "step": res.step}


def one_rank_fails_its_copy(root: str, job: str) -> dict:
    """Rank 1's snapshot copy fails: the cut fails on every rank, no rank marks it complete, and
    every rank reports it once (then saves durably)."""
    import warnings

    import ucp
    from ucp.snapshot import client, memory

    model, opt = build_mlp("fsdp", seed=0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    mlp_step(model, opt, 0)
    ck.save(1)
    ck.wait()
    real = memory.MemoryTier.write
    if dist.get_rank() == 1:
        def broken(self, *a, **k):
            raise OSError("no space left in /dev/shm")
        memory.MemoryTier.write = broken
    try:
        mlp_step(model, opt, 1)
        ck.save(2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ck.wait()
    finally:
        memory.MemoryTier.write = real
    mine = {k: v for k, v in client.connect(job).status()["snapshots"].items() if k.startswith(f"{dist.get_rank()}.")}
    return {"warnings": [str(w.message) for w in caught], "snapshots": mine, "lost": ck._snapshots.lost}


def persist_steps(kind: str, root: str, job: str, steps: int = 3) -> dict:
    """Train ``kind`` with a snapshot after every step, each written durably by the agents
    (``persist_every=1``); ``wait()`` returns once they are. The full state at the last step."""
    import ucp

    model, opt = build_mlp(kind, seed=0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt, keep=2,
                          snapshot=ucp.SnapshotOptions(persist_every=1, job=job))
    for s in range(steps):
        mlp_step(model, opt, s)
        assert ck.save(s + 1).tier == "memory"
    ck.wait()
    return {k: v.detach().clone() for k, v in full_state(model, opt).items() if not k.startswith("flat/")}


def agent_killed(root: str, job: str) -> dict:
    """Rank 0 SIGKILLs the node's agent after the snapshot of step 1; every rank warns once, goes on
    with durable saves, and a fresh Checkpointer's load comes from the durable tier."""
    import os
    import signal
    import time
    import warnings

    import ucp
    from ucp.snapshot import agent

    model, opt = build_mlp("fsdp", seed=0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job, timeout=10))
    mlp_step(model, opt, 0)
    tiers = [ck.save(1).tier]
    ck.wait()
    info = agent.read_info(job)
    if dist.get_rank() == 0:
        os.kill(info.pid, signal.SIGKILL)
    while agent.is_alive(info):
        time.sleep(0.02)
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in (1, 2, 3):
            mlp_step(model, opt, s)
            tiers.append(ck.save(s + 1).tier)
        ck.wait()
    want = {k: v.detach().clone() for k, v in full_state(model, opt).items() if not k.startswith("flat/")}
    model2, opt2 = build_mlp("fsdp", seed=1)
    res = ucp.Checkpointer(root, model=model2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    return {"tiers": tiers, "warnings": [str(w.message) for w in caught], "source": res.source, "step": res.step,
            "diffs": bit_diffs(want, full_state(model2, opt2))}


def load_from_memory_traced(kind: str, root: str, job: str, expected: dict) -> dict:
    """As :func:`load_from_memory`, tracing what the rank learns of the snapshot's index: the keys
    it owns, the fragments it selects, and how many fragments the node's headers hold in all."""
    import ucp
    from ucp.snapshot import client
    from ucp.snapshot.index import SnapshotManifest

    seen: dict = {}
    real = SnapshotManifest.select

    def select(self, coll, query):
        out = real(self, coll, query)
        seen.update(owned=sorted(self._index._keys), selected=len(out.fragments),
                    keys=sorted({f.key for f in out.fragments}))
        return out

    SnapshotManifest.select = select
    try:
        model, opt = build_mlp(kind, seed=1)
        res = ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)).load()
    finally:
        SnapshotManifest.select = real
    step = res.step
    total = sum(len(h["fragments"]) for h in client.connect(job).request("slots", step=step)["slots"].values()
                if h["world_size"] != dist.get_world_size())
    return {"diffs": bit_diffs(expected, full_state(model, opt)), "source": res.source, "step": step,
            "total": total, **seen}


def persist_to_url(kind: str, url: str, job: str, env: dict, steps: int = 3) -> dict:
    """:func:`persist_steps` onto an object store: the rank (and so the node's agent it starts) first
    points its S3 client at the test server (``env``); the Checkpointer is closed at the end. The
    full state at the last step."""
    import os

    import ucp

    os.environ.update(env)
    model, opt = build_mlp(kind, seed=0)
    with ucp.Checkpointer(url, model=model, optimizer=opt, keep=2,
                          snapshot=ucp.SnapshotOptions(persist_every=1, job=job)) as ck:
        for s in range(steps):
            mlp_step(model, opt, s)
            assert ck.save(s + 1).tier == "memory"
        ck.wait()
    return {k: v.detach().clone() for k, v in full_state(model, opt).items() if not k.startswith("flat/")}
