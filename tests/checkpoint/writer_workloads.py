"""Rank functions for two jobs saving into one checkpoint root (tests/checkpoint/test_single_writer.py)."""

from __future__ import annotations

import time

import torch
from torch import nn

_OPEN: list = []  # the Checkpointers a job keeps open (its lease held) until close_all


def save_steps(root: str, seed: int, steps: list[int], pause: float) -> list[str]:
    """Save each of ``steps`` (a job of its own); per step "ok" or the error's type and message.
    The Checkpointer stays open: the job keeps its lease until :func:`close_all`."""
    import ucp

    torch.manual_seed(seed)
    model = nn.Linear(64, 64)
    ck = ucp.Checkpointer(root, model=model, options=ucp.CheckpointOptions(fsync=False))
    _OPEN.append(ck)
    out = []
    for step in steps:
        with torch.no_grad():
            model.weight.add_(1.0)
        try:
            ck.save(step)
            out.append("ok")
        except Exception as e:  # noqa: BLE001 - reported to the test, whatever it is
            out.append(f"{type(e).__name__}: {e}")
        time.sleep(pause)
    return out


def close_all() -> None:
    while _OPEN:
        _OPEN.pop().close()


def full_disk_on_rank(root: str, victim: int) -> dict:
    """Save step 1; then step 2 with rank ``victim``'s file write failing as a full disk fails it
    (ENOSPC naming no file); then step 3 normally. Returns the step-2 error and what was on storage."""
    import errno

    import ucp
    import ucp.checkpoint.save as save_module
    import torch.distributed as dist
    from ucp.storage import directory as store

    torch.manual_seed(0)
    ck = ucp.Checkpointer(root, model=nn.Linear(16, 16), options=ucp.CheckpointOptions(fsync=False))
    ck.save(1)
    real = save_module.write_rank_file
    if dist.get_rank() == victim:
        def full(directory, rank, *a, **k):
            (directory / store.rank_file(rank)).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

        save_module.write_rank_file = full
    try:
        ck.save(2)
        error = None
    except Exception as e:  # noqa: BLE001 - reported to the test
        error = f"{type(e).__name__}: {e}"
    finally:
        save_module.write_rank_file = real
    dist.barrier()
    after_failure = [s for s, _ in store.list_steps(root, complete=False)]
    ck.save(3)
    ck.close()
    return {"error": error, "after_failure": after_failure, "complete": [s for s, _ in store.list_steps(root)]}
