"""Staging a new checkpoint directory: build it under a hidden name, rename it into place when done.

Used by ``convert`` and ``export``: a killed process leaves only a hidden ``.NAME.partial-PID``
directory (removed by the next run once that process is gone), never a half-written ``NAME``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ucp.errors import OptionsError
from ucp.storage.atomic import fsync_dir
from ucp.storage.universal_io import fsync_tree

PARTIAL = ".partial-"


class Staging:
    """``with Staging(dst) as stage: ...write into stage...; staging.commit()``.

    Raises:
        OptionsError: ``dst`` exists or its parent directory does not.
    """

    def __init__(self, dst, fsync: bool = True):
        self.dst = Path(dst)
        self.fsync = fsync
        if self.dst.exists():
            raise OptionsError(f"{self.dst}: already exists; give a new path (ucp never overwrites it)")
        if not self.dst.parent.is_dir():
            raise OptionsError(f"{self.dst.parent}: no such directory to create {self.dst.name} in")
        self.path = self.dst.with_name(f".{self.dst.name}{PARTIAL}{os.getpid()}")
        self.committed = False

    def __enter__(self) -> Path:
        remove_stale_partials(self.dst)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        return self.path

    def commit(self) -> None:
        """Make everything staged durable, then rename it to ``dst`` (the moment it becomes visible)."""
        if self.fsync:
            fsync_tree(self.path)
        os.rename(self.path, self.dst)
        self.committed = True
        if self.fsync:
            fsync_dir(self.dst.parent)

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


def remove_stale_partials(dst: Path) -> None:
    """Remove staging directories for ``dst`` whose process is gone (it was killed)."""
    for p in Path(dst).parent.glob(f".{Path(dst).name}{PARTIAL}*"):
        pid = p.name.rsplit(PARTIAL, 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
