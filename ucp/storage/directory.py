"""Where checkpoints live: ``root/step_<step:08d>/`` holding ``manifest.json``, the fragment table
and one data file per writing rank.

A checkpoint directory is *complete* iff its ``manifest.json`` exists: the manifest is committed
last (see :mod:`ucp.storage.atomic`), so a directory without one is a save that has not finished
(or never will) and is invisible to every reader.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ucp.errors import CheckpointNotFoundError
from ucp.storage.atomic import fsync_dir

MANIFEST = "manifest.json"
FRAGMENT_TABLE = "fragments.parquet"
_STEP_DIR = re.compile(r"step_([0-9]{8,})")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def is_complete(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def list_steps(root: Path, complete: bool = True) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the checkpoints under ``root``, oldest first; only complete ones by default."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and (is_complete(p) or not complete):
            out.append((int(m.group(1)), p))
    return sorted(out)


def resolve(path: Path, step: int | None = None) -> Path:
    """The complete checkpoint directory ``path`` names: itself, or the newest (or ``step``) under a root."""
    path = Path(path)
    if is_complete(path) and step is None:
        return path
    if not path.exists():
        wanted = f" (looking for step {step})" if step is not None else ""
        raise CheckpointNotFoundError(f"{path}: no such file or directory{wanted}")
    if not path.is_dir():
        raise CheckpointNotFoundError(f"{path}: not a checkpoint directory")
    steps = list_steps(path)
    if step is not None:
        for s, p in steps:
            if s == step:
                return p
        raise CheckpointNotFoundError(f"{path}: no complete checkpoint for step {step} (have: {[s for s, _ in steps] or 'none'})")
    if not steps:
        partial = list_steps(path, complete=False)
        hint = f"; {len(partial)} incomplete save(s) found (no {MANIFEST})" if partial else ""
        raise CheckpointNotFoundError(f"{path}: no complete checkpoint here{hint}")
    return steps[-1][1]


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint so that it is never seen half-deleted: the manifest goes first."""
    path = Path(path)
    manifest = path / MANIFEST
    if manifest.exists():
        manifest.unlink()
        fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def prune(root: Path, keep: int | None, current: int | None = None) -> list[Path]:
    """Retention after the checkpoint of step ``current`` was committed.

    Keeps the newest ``keep`` complete checkpoints (all if ``keep`` is None) and deletes older complete
    ones and incomplete saves older than the newest complete one. With ``keep`` set, checkpoints of
    steps *after* ``current`` belong to a run that was rolled back (it resumed from an earlier step
    and saved again): they are deleted first, so the checkpoint just saved is never pruned and
    ``load()`` finds it as the newest. Returns what was removed.
    """
    complete = list_steps(root)
    removed = []
    if keep and current is not None:
        for s, p in [(s, p) for s, p in complete if s > current]:
            remove_checkpoint(p)
            removed.append(p)
        complete = [(s, p) for s, p in complete if s <= current]
    if keep and len(complete) > keep:
        for _, p in complete[:-keep]:
            remove_checkpoint(p)
            removed.append(p)
    if complete:
        newest = complete[-1][0]
        for s, p in list_steps(root, complete=False):
            if s < newest and not is_complete(p):
                remove_checkpoint(p)
                removed.append(p)
    return removed
