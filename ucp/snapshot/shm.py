"""Shared-memory segments of the snapshot agent, mapped without ``multiprocessing``'s resource tracker.

``multiprocessing.shared_memory`` registers every segment a process opens with that process's
resource tracker, which unlinks it when the process dies (Python 3.11): a trainer SIGKILLed while it
has a snapshot mapped would delete the snapshot. Segments here are plain files of the node's tmpfs
(``/dev/shm``) opened with ``os.open`` and mapped with ``mmap``: only the agent unlinks them, on
request or when it reclaims a crashed job's leftovers.

Names are ``ucp.<uid>.<job>.<what>``: per user and per job, so two jobs on a node never collide.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ucp.errors import OptionsError, UcpError
from ucp.options import check_job

SHM_DIR = Path(os.environ.get("UCP_SHM_DIR", "/dev/shm"))
_PART = re.compile(r"[A-Za-z0-9_.-]{1,128}")


def prefix(job: str) -> str:
    """The name prefix of everything job ``job`` keeps in shared memory on this node."""
    return f"ucp.{os.getuid()}.{check_job(job)}."


def segment_name(job: str, what: str) -> str:
    if not _PART.fullmatch(what) or what.startswith("."):
        raise OptionsError(f"segment name {what!r} must be 1-128 letters, digits, '_', '-' or '.'")
    return prefix(job) + what


@dataclass
class Segment:
    """A mapped segment: ``buf`` is its memory (a writable ``mmap``); ``ino`` the inode of the file
    mapped (a segment freed and made again under its name is another file)."""

    name: str
    nbytes: int
    buf: mmap.mmap = field(repr=False)
    ino: int = 0

    def current(self) -> bool:
        """Whether the segment's name still names the file mapped here."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_ino, st.st_size) == (self.ino, self.nbytes)

    @property
    def path(self) -> Path:
        return SHM_DIR / self.name

    def close(self) -> None:
        """Unmap (the segment stays); views of ``buf`` must be released first."""
        self.buf.close()


def _map(fd: int, nbytes: int) -> mmap.mmap:
    return mmap.mmap(fd, nbytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def create(name: str, nbytes: int) -> Segment:
    """Create segment ``name`` of ``nbytes`` >= 1 (it must not exist) and map it."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise OptionsError(f"a shared-memory segment needs a positive size, got {nbytes!r}")
    path = SHM_DIR / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UcpError(f"{path}: shared-memory segment already exists") from None
    try:
        os.ftruncate(fd, nbytes)
        buf = _map(fd, nbytes)
    except OSError as e:
        os.close(fd)
        unlink(name)
        raise UcpError(f"{path}: cannot create a {nbytes}-byte shared-memory segment: {e.strerror or e}") from None
    ino = os.fstat(fd).st_ino
    os.close(fd)
    return Segment(name, nbytes, buf, ino)


def attach(name: str) -> Segment:
    """Map the existing segment ``name`` (read-write)."""
    path = SHM_DIR / name
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        raise UcpError(f"{path}: no such shared-memory segment (was the snapshot agent restarted?)") from None
    try:
        st = os.fstat(fd)
        if st.st_size < 1:
            raise UcpError(f"{path}: the shared-memory segment is empty")
        return Segment(name, st.st_size, _map(fd, st.st_size), st.st_ino)
    finally:
        os.close(fd)


def unlink(name: str) -> bool:
    """Remove segment ``name``; False if it was not there."""
    try:
        os.unlink(SHM_DIR / name)
        return True
    except FileNotFoundError:
        return False


def listing(job_prefix: str) -> dict[str, int]:
    """Segments (and other files) whose names start with ``job_prefix``: name -> size in bytes."""
    out = {}
    try:
        entries = list(os.scandir(SHM_DIR))
    except FileNotFoundError:
        return out
    for e in entries:
        if e.name.startswith(job_prefix):
            try:
                out[e.name] = e.stat().st_size
            except FileNotFoundError:
                continue
    return dict(sorted(out.items()))
