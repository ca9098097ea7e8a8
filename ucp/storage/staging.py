"""Where a new checkpoint is built so that it is never seen half-written.

Locally (:class:`Staging`): under a hidden ``.NAME.partial-PID`` directory, renamed to ``NAME``
when complete; a killed process leaves only the hidden directory (removed by the next run once that
process is gone). On an object store reached by an fsspec URL (:class:`UrlTarget`), where there is
no rename: in place, with the commit marker (the file readers check for completeness) written last.
Used by ``convert`` and ``export``.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from ucp.errors import OptionsError
from ucp.storage.atomic import fsync_dir, write_atomic
from ucp.storage.location import local_path
from ucp.storage.universal_io import fsync_tree, local_put
from ucp.storage.zarr_shard import write_shard

PARTIAL = ".partial-"


class Staging:
    """``with Staging(dst) as s: ...write into s.path (or s.put)...; s.commit()``.

    Raises:
        OptionsError: ``dst`` exists or its parent directory does not.
    """

    def __init__(self, dst, fsync: bool = True):
        self.dst = local_path(dst, "a staged write")
        self.fsync = fsync
        if self.dst.exists():
            raise OptionsError(f"{self.dst}: already exists; give a new path (ucp never overwrites it)")
        if not self.dst.parent.is_dir():
            raise OptionsError(f"{self.dst.parent}: no such directory to create {self.dst.name} in")
        self.path = self.dst.with_name(f".{self.dst.name}{PARTIAL}{os.getpid()}")
        self.committed = False
        self.files = 0  # written through put / write_shard / commit
        self._lock = threading.Lock()

    def __enter__(self) -> "Staging":
        remove_stale_partials(self.dst)
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir()
        return self

    def put(self, rel: str, data: bytes) -> None:
        """Write a small file at ``rel`` (parents created)."""
        local_put(self.path)(rel, data)
        with self._lock:
            self.files += 1

    def write_shard(self, rel: str, array, chunks, compressor: str) -> int:
        with self._lock:
            self.files += bool(array.size)
        # (made durable by commit's fsync of the whole tree, before anything becomes visible)
        return write_shard(self.path / rel, array, chunks, compressor, fsync=False, writeback=self.fsync)

    def commit(self, marker: tuple[str, bytes] | None = None) -> None:
        """Make everything staged durable (``marker`` written last, atomically), then rename it to
        ``dst``: the moment it becomes visible."""
        if self.fsync:
            fsync_tree(self.path)
        if marker is not None:
            existed = (self.path / marker[0]).exists()
            write_atomic(self.path / marker[0], marker[1])
            self.files += not existed
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


class UrlTarget:
    """``with UrlTarget(url, marker) as target: ...; target.commit((marker, data))``: files written in
    place through fsspec; the checkpoint is complete once ``marker`` holds the commit data.

    A location whose marker is not committed (an interrupted earlier run) is cleared first.

    Raises:
        OptionsError: a committed checkpoint is already there, or fsspec cannot reach the URL.
    """

    def __init__(self, url: str, marker: str, committed):
        try:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            raise OptionsError(f"{url}: fsspec cannot open this URL ({e})") from None
        self.url, self.marker, self.committed_test = url, marker, committed
        self.committed = False
        self.written: set[str] = set()

    @property
    def files(self) -> int:
        return len(self.written)

    def _path(self, rel: str) -> str:
        return f"{self.root.rstrip('/')}/{rel}"

    def __enter__(self) -> "UrlTarget":
        marker = self._path(self.marker)
        if self.fs.exists(marker):
            if self.committed_test(self.fs.cat_file(marker)):
                raise OptionsError(f"{self.url}: already holds a complete checkpoint; give a new location")
            self.fs.rm(self.root, recursive=True)  # an uncommitted leftover of an interrupted run
        elif self.fs.exists(self.root) and self._holds_objects():
            raise OptionsError(f"{self.url}: not empty and not an unfinished ucp checkpoint; give a new location "
                               "(ucp never deletes data it did not write)")
        return self

    def _holds_objects(self) -> bool:
        """Whether any object lies under the location: empty directories do not count (some stores,
        SeaweedFS's among them, keep a directory entry after its last object is deleted)."""
        return any(info.get("type") != "directory" for info in self.fs.find(self.root, detail=True).values())

    def put(self, rel: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(rel), data)
        self.written.add(rel)

    def write_shard(self, rel: str, array, chunks, compressor: str) -> int:
        if not array.size:
            return 0
        self.written.add(rel)
        with self.fs.open(self._path(rel), "wb") as f:
            return write_shard(f, array, chunks, compressor)

    def commit(self, marker: tuple[str, bytes]) -> None:
        self.put(*marker)
        self.committed = True

    def __exit__(self, *exc) -> None:
        if not self.committed and self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)
