"""Where checkpoints live: ``root/step_<step:08d>/`` holding ``manifest.json``, the fragment table
and one data file per writing rank.

A checkpoint directory is *complete* iff its ``manifest.json`` exists: the manifest is committed
last (see :mod:`ucp.storage.atomic`), so a directory without one is a save that has not finished
(or never will) and is invisible to every reader.

Checkpoints of an abandoned run (steps after the one a resumed run saves again) are retired into
``root/.abandoned/`` (docs/format-checkpoint.md, rule 4b): readers never look there.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from ucp.errors import CheckpointNotFoundError
from ucp.storage.atomic import fsync_dir
from ucp.storage.objstore import as_location, is_object

MANIFEST = "manifest.json"
FRAGMENT_TABLE = "fragments.parquet"  # format 1.0-1.2
FRAGMENT_PAGES = "fragments.pages"  # format 1.3: the paged fragment table
STATE_PAGES = "states.pages"  # format 1.3: the paged per-rank state
ABANDONED = ".abandoned"  # where the checkpoints of an abandoned run are moved (never read from)
_STEP_DIR = re.compile(r"step_([0-9]{8,})")


def step_dir(root: Path, step: int) -> Path:
    return as_location(root) / f"step_{step:08d}"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.safetensors"


def is_complete(path: Path) -> bool:
    return (as_location(path) / MANIFEST).is_file()


def list_steps(root: Path, complete: bool = True) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the checkpoints under ``root``, oldest first; only complete ones by default."""
    root = as_location(root)
    if is_object(root):
        return _object_steps(root, complete)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and (is_complete(p) or not complete):
            out.append((int(m.group(1)), p))
    return sorted(out)


def _object_steps(root, complete: bool) -> list[tuple[int, Path]]:
    """:func:`list_steps` on an object store: one listing of the objects under ``root`` (no request per
    step), a step counted by its objects only, never by a prefix an empty directory leaves (format
    rule 29), complete by its manifest object."""
    try:
        found = root.fs.find(root.key, detail=True)
    except FileNotFoundError:
        return []
    done: dict[str, bool] = {}
    for key, info in found.items():
        parts = key[len(root.key) + 1:].split("/")
        if info.get("type") != "directory" and len(parts) >= 2 and _STEP_DIR.fullmatch(parts[0]):
            done[parts[0]] = done.get(parts[0], False) or parts[1:] == [MANIFEST]
    return sorted((int(name[5:]), root / name) for name, whole in done.items() if whole or not complete)


def resolve(path: Path, step: int | None = None) -> Path:
    """The complete checkpoint directory ``path`` names: itself, or the newest (or ``step``) under a root."""
    path = as_location(path)
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
    path = as_location(path)
    manifest = path / MANIFEST
    if is_object(path):
        manifest.unlink(missing_ok=True)
        path.remove_tree()
        return
    if manifest.exists():
        manifest.unlink()
        fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


def retire(path: Path) -> Path:
    """Move a complete checkpoint, whole, out of its readers' sight: to
    ``root/.abandoned/<its name>.<UTC time>`` (one rename; on an object store, which has none, a
    server-side copy, then the checkpoint's deletion, manifest first). Returns where it went."""
    path = as_location(path)
    into = path.parent / ABANDONED
    into.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest, n = into / f"{path.name}.{stamp}", 1
    while dest.exists():
        dest, n = into / f"{path.name}.{stamp}.{n}", n + 1
    if is_object(path):
        path.copy_tree(dest)
        remove_checkpoint(path)
        return dest
    os.rename(path, dest)
    fsync_dir(into)
    fsync_dir(path.parent)
    return dest


def retire_checkpoint(path: Path, keep: int | None) -> Path | None:
    """Retire a checkpoint of an abandoned run: deleted under retention (``keep`` set), else moved
    aside (:func:`retire`). Returns where it went (None: deleted)."""
    if keep:
        remove_checkpoint(path)
        return None
    return retire(path)


def roll_back(root: Path, current: int, keep: int | None) -> list[tuple[Path, Path | None]]:
    """After the commit of step ``current``: complete checkpoints of *later* steps belong to a run
    that was rolled back (it resumed from an earlier step and saved again), so they are retired
    (:func:`retire_checkpoint`) and the checkpoint just saved is the newest. Returns
    ``(checkpoint, where it went or None)`` for each."""
    return [(p, retire_checkpoint(p, keep)) for s, p in list_steps(root) if s > current]


def clear_partials(root: Path, but: Path | None = None) -> list[Path]:
    """Remove every incomplete step directory under ``root`` (other than ``but``): what failed or
    killed saves left. Only the root's single writer may (it knows no other save is in flight)."""
    removed = []
    for _, p in list_steps(root, complete=False):
        if p != but and not is_complete(p):
            remove_checkpoint(p)
            removed.append(p)
    return removed


def prune(root: Path, keep: int | None, current: int | None = None) -> list[Path]:
    """Retention after the checkpoint of step ``current`` was committed (after :func:`roll_back`).

    Keeps the newest ``keep`` complete checkpoints (all if ``keep`` is None) and deletes older complete
    ones and incomplete saves older than the newest complete one; never the checkpoint of ``current``.
    Returns what was removed.
    """
    complete = list_steps(root)
    removed = []
    if keep and len(complete) > keep:
        for s, p in complete[:-keep]:
            if s != current:
                remove_checkpoint(p)
                removed.append(p)
    if complete:
        newest = complete[-1][0]
        for s, p in list_steps(root, complete=False):
            if s < newest and not is_complete(p):
                remove_checkpoint(p)
                removed.append(p)
    return removed
