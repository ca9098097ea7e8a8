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
