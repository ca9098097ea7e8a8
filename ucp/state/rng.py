"""Random number generator states of one rank: Python, NumPy, torch CPU and CUDA (when in use)."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> dict:
    """The RNG states of this process, as plain values (tensors, tuples, arrays)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Restore what :func:`capture_rng` captured; absent generators are left alone."""
    if "python" in state:
        random.setstate(state["python"])
    if "numpy" in state:
        np.random.set_state(state["numpy"])
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
