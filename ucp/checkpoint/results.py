"""What a save and a load return."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SaveResult:
    """What a save produced: the step, its directory, bytes this job wrote, wall time, and the tier:
    ``"durable"`` (a checkpoint under ``root``; ``path`` is its directory) or ``"memory"`` (a
    snapshot held by the node's agent; ``path`` is the shared-memory directory)."""

    step: int
    path: Path
    nbytes: int
    seconds: float
    tier: str = "durable"


@dataclass(frozen=True)
class LoadResult:
    """What a load restored.

    Attributes:
        step: the checkpoint's step.
        source: which tier it came from (``"durable"``: a checkpoint on storage).
        path: the checkpoint directory.
        extras: the user extras saved with it.
        missing_keys: tensor keys the model/optimizer wanted but the checkpoint lacked (``strict=False``).
        unexpected_keys: tensor keys in the checkpoint that nothing here took (``strict=False``).
        nbytes: bytes this rank read.
        seconds: wall time of the load.
        rebuilt: ranks of the snapshot (``source == "memory"``) whose nodes were lost and whose
            shares were rebuilt from parity (docs/erasure.md section 8).
        optimizer_restored: whether the optimizer's state came from the checkpoint. False without
            an optimizer, and for a checkpoint of weights only (Hugging Face weights, a save without
            an optimizer), which leaves a new optimizer fresh, with a warning.
    """

    step: int
    source: str
    path: Path
    extras: dict = field(default_factory=dict)
    missing_keys: tuple = ()
    unexpected_keys: tuple = ()
    nbytes: int = 0
    seconds: float = 0.0
    rebuilt: tuple = ()
    optimizer_restored: bool = False
