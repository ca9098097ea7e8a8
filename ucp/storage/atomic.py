"""Atomic commit, in exactly one place.

A file becomes visible under its final name only when its bytes are durable: write to a temporary
name in the same directory, fsync the file, rename over the final name, fsync the directory.
A crash at any point leaves either the old state or the new one, never a torn file.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def with_path(e: OSError, path: Path | str) -> OSError:
    """``e``, naming ``path`` if it names no file: ``os.write``, ``os.fsync`` and a file object's
    ``write`` raise without one (``[Errno 28] No space left on device``), and a user must learn where."""
    if e.filename is not None:
        return e
    named = OSError(e.errno, e.strerror or str(e), str(path))  # (the errno's subclass, as OSError picks it)
    named.__cause__ = e
    return named


def write_atomic(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing (or the old file) or all of it;
    a new file gets permission bits ``mode`` (less the umask) from its creation on.

    Raises:
        OSError: naming ``path`` (a full disk, say); the old file, if any, is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        tmp.unlink(missing_ok=True)  # a leftover keeps its own bits; start afresh
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise with_path(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _writeback_starter():
    """``start(fd, offset, length)``: ask Linux to begin writing a range back now (no waiting), so
    the final fsync finds most of the file already on its way; a no-op where unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        sync_file_range = libc.sync_file_range
        sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    except (OSError, AttributeError):
        return lambda fd, offset, length: None
    return lambda fd, offset, length: sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


_SYNC_FILE_RANGE_WRITE = 2
#: writers start writeback after every this many bytes (see :func:`start_writeback`)
WRITEBACK_EVERY = 32 << 20
start_writeback = _writeback_starter()
