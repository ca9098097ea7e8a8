"""The single writer of a checkpoint root: a lease file, ``ROOT/.ucp-writer``.

Two jobs saving into one root by mistake tear each other's checkpoints: one clears or overwrites
the step directory the other is writing, and both publish. So the writing job's rank 0 holds a
lease on the root (docs/format-checkpoint.md, rules 4c-4e):

- it is created atomically (a whole temporary file hard-linked to the lease's name, or ``O_EXCL``
  where the file system has no hard links) and names its holder: host, pid, job, a random token;
- its mtime is the holder's heartbeat, refreshed at every save and, while it is held, every
  :data:`HEARTBEAT_EVERY` seconds by a daemon thread (so a job that died on another host leaves a
  lease that goes stale in :data:`STALE_AFTER` seconds, and its relaunch, wherever its rank 0 lands,
  can save again);
- a second job's save fails with one line naming the root and the holder;
- a *stale* lease (its holder's pid is dead on this host, or its heartbeat is older than
  :data:`STALE_AFTER`) is taken over under a takeover lock (``ROOT/.ucp-writer.takeover``, a
  directory made with ``mkdir``: one contender at a time): the lease is read again, and if it is
  still the stale one, a new lease is renamed over it and read back to confirm. The lease file
  never disappears during a takeover, so no other contender can create one meanwhile;
- a save publishes its manifest only after checking that the lease is still its own.

Every ``Checkpointer`` of one process writing one root is the same job: they share one lease
(:func:`for_process`), released when the last of them closes or the process exits.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ucp.errors import LeaseError, UcpError
from ucp.format.jsonio import parse_json
from ucp.storage.atomic import fsync_dir
from ucp.storage.objstore import is_object

LEASE = ".ucp-writer"
#: a lease whose heartbeat (its mtime, refreshed every :data:`HEARTBEAT_EVERY` seconds by its holder's
#: heartbeat thread and at every save) is older than this many seconds is stale: it may be taken over
#: even from another host. A holder whose heartbeat thread could not run for this long (a process
#: stopped, a clock off by this much) may lose its lease, and then fails its next save with a
#: :class:`LeaseError` naming the new holder.
STALE_AFTER = 120.0
#: how often a held lease's heartbeat thread refreshes its mtime
HEARTBEAT_EVERY = 15.0
# a lease file that is not a lease (not JSON, fields missing) and this old is stale
_MALFORMED_AFTER = 10.0
# a takeover lock this old was left by a contender that died holding it
_LOCK_STALE = 30.0
# how long acquire() tries, while other contenders hold the takeover lock
_ACQUIRE_FOR = 10.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its file says; ``heartbeat`` is the file's mtime."""

    host: str
    pid: int
    token: str
    job: str
    since: float
    heartbeat: float
    malformed: bool = False
    version: str = ""  # on an object store: the lease object's version tag (ETag) when read

    def describe(self) -> str:
        if self.malformed:
            return "an unreadable lease file"
        job = f" (job {self.job})" if self.job else ""
        return f"host {self.host} pid {self.pid}{job} since {_when(self.since)}"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def read_holder(path: Path) -> Holder | None:
    """The holder a lease file names; None when there is no lease file."""
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 10)
            mtime = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
        return None
    return _holder_of(data, path, mtime)


def _holder_of(data: bytes, path, heartbeat: float, version: str = "") -> Holder:
    try:
        d = parse_json(data, str(path))
        return Holder(str(d["host"]), int(d["pid"]), str(d["token"]), str(d.get("job", "")), float(d["since"]),
                      heartbeat, version=version)
    except (UcpError, KeyError, TypeError, ValueError, OverflowError):
        return Holder("", 0, "", "", heartbeat, heartbeat, malformed=True, version=version)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _job_id() -> str:
    """The scheduler's name of this job, for the holder's description only."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return os.environ.get("SLURM_JOB_ID") or ("" if run in ("", "none") else run)


class Lease:
    """A job's lease on a checkpoint root (rank 0 of the job holds it).

    Args:
        root: the checkpoint root.
        token, host, pid, job: who holds it (defaults: a random token, this host and process, the
            scheduler's job id); tests give two leases distinct ones to play two jobs.
        stale_after: see :data:`STALE_AFTER`.
    """

    def __init__(self, root, *, token: str | None = None, host: str | None = None, pid: int | None = None,
                 job: str | None = None, stale_after: float = STALE_AFTER):
        self.root = root if is_object(root) else Path(root)
        self.path = self.root / LEASE
        self.token = token or secrets.token_hex(8)
        self.host = host or socket.gethostname()
        self.pid = pid or os.getpid()
        self.job = _job_id() if job is None else job
        self.stale_after = stale_after
        self._held = False
        self._beat: threading.Event | None = None  # set to stop the heartbeat thread
        self.committed: set[int] = set()  # the steps saved under this lease: this job's own
        self.users = 0  # the Checkpointers sharing it (see for_process)

    # -- taking and keeping it ---------------------------------------------------------------

    @property
    def held(self) -> bool:
        """Whether this lease believes it holds the file (:meth:`check` confirms it)."""
        return self._held

    @held.setter
    def held(self, value: bool) -> None:
        self._held = value
        if value and self._beat is None:
            self._beat = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._beat,), name=f"ucp-lease {self.root}",
                             daemon=True).start()
        elif not value and self._beat is not None:
            self._beat.set()
            self._beat = None

    def _heartbeat(self, stop: threading.Event) -> None:
        """Refresh the lease file's mtime every :data:`HEARTBEAT_EVERY` s while it names this lease."""
        while not stop.wait(HEARTBEAT_EVERY):
            try:
                if not self.holds():
                    return  # taken over or released: the next save says so
                self._touch()
            except OSError:
                pass  # (storage away for a moment: the next beat tries again)

    def acquire(self) -> str | None:
        """Hold the lease, or refresh its heartbeat when held (every save calls this first).

        Returns:
            None, or a one-line note saying whose stale lease was taken over and why.

        Raises:
            LeaseError: another live job holds it, or took it over from this one.
            OSError: the root cannot be written.
        """
        if self.held:
            self.check()
            self._touch()
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _ACQUIRE_FOR
        while time.monotonic() < deadline:
            if self._create():
                self.held = True
                return None
            holder = self._read()
            if holder is None:
                continue  # released meanwhile
            if holder.token == self.token:  # (ours, from before a check that failed to read it)
                self.held = True
                self._touch()
                return None
            why = self.stale(holder)
            if why is None:
                raise LeaseError(self.held_message(holder))
            if self._replace(holder, self._content()):
                self.check()  # read back: still ours (a lock taken from a contender judged dead may race)
                self.held = True
                return f"{self.root}: took over the writer lease of {holder.describe()}: {why}"
        raise LeaseError(f"{self.path}: the writer lease keeps changing hands; is another job saving into "
                         f"{self.root}? Two jobs must not save into one checkpoint root")

    def check(self) -> None:
        """Raise unless the lease file still names this lease (called before publishing a save).

        Raises:
            LeaseError: the lease was taken over or removed.
        """
        holder = self._read()
        if holder is None or holder.token != self.token:
            self.held = False
            who = holder.describe() if holder is not None else "nobody: its file was removed"
            raise LeaseError(f"{self.root}: this job lost the checkpoint root's writer lease ({self.path} names "
                             f"{who}); nothing was published. Two jobs must not save into one checkpoint root")

    def holds(self) -> bool:
        """Whether the lease file names this lease now."""
        holder = self._read()
        return holder is not None and holder.token == self.token

    def release(self) -> None:
        """Give the lease up (a no-op unless held)."""
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder is not None and holder.token == self.token:
            deadline = time.monotonic() + _ACQUIRE_FOR
            while not self._replace(holder, None) and time.monotonic() < deadline:
                holder = self._read()
                if holder is None or holder.token != self.token:
                    return  # taken over meanwhile: not ours to remove

    # -- judging another holder --------------------------------------------------------------

    def stale(self, holder: Holder) -> str | None:
        """Why ``holder``'s lease may be taken over, or None while it may be alive."""
        age = time.time() - holder.heartbeat
        if holder.malformed:
            return "it is not a lease file" if age > _MALFORMED_AFTER else None
        if holder.host == self.host and holder.pid != self.pid and not _pid_alive(holder.pid):
            return f"process {holder.pid} is not running on this host"
        if age > self.stale_after:
            return f"its heartbeat is {age:.0f} s old (stale after {self.stale_after:g} s)"
        return None

    def held_message(self, holder: Holder) -> str:
        age = time.time() - holder.heartbeat
        return (f"{self.root}: another job saves into this checkpoint root: its writer lease {self.path} is held by "
                f"{holder.describe()}, last heartbeat {age:.0f} s ago; if that job is dead, delete {self.path} "
                f"(or wait: the lease goes stale {self.stale_after:g} s after its last heartbeat)")

    # -- files ---------------------------------------------------------------------------------

    def _read(self) -> Holder | None:
        """The holder the lease file names now (None: no lease file)."""
        return read_holder(self.path)

    def _touch(self) -> None:
        """The heartbeat: the lease file's mtime set to now."""
        os.utime(self.path)

    def _content(self) -> bytes:
        return json.dumps({"host": self.host, "pid": self.pid, "job": self.job, "token": self.token,
                           "since": time.time()}).encode()

    def _create(self) -> bool:
        """Create the lease file naming this lease, whole, iff there is none."""
        tmp = self.root / f"{LEASE}.{self.token}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(self._content())
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                if not self._create_exclusive():  # a file system without hard links
                    return False
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(self.root)
        return True

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with open(fd, "wb") as f:
            f.write(self._content())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _replace(self, holder: Holder, content: bytes | None) -> bool:
        """Under the takeover lock: if the lease file is still ``holder``'s (same token, same
        heartbeat), rename ``content`` over it (None: remove it). Whether it was done; False also
        when another contender holds the lock (the caller judges the lease again)."""
        lock = self.root / f"{LEASE}.takeover"
        try:
            os.mkdir(lock)
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > _LOCK_STALE:
                    os.rmdir(lock)  # (its contender died in there)
            except FileNotFoundError:
                pass
            time.sleep(0.01)
            return False
        try:
            now = self._read()
            if now is None or now.token != holder.token or now.heartbeat != holder.heartbeat:
                return False  # taken, refreshed or released meanwhile
            if content is None:
                self.path.unlink()
            else:
                tmp = self.root / f"{LEASE}.{self.token}.tmp"
                try:
                    with open(tmp, "wb") as f:
                        f.write(content)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, self.path)
                finally:
                    tmp.unlink(missing_ok=True)
            fsync_dir(self.root)
            return True
        finally:
            try:
                os.rmdir(lock)
            except FileNotFoundError:
                pass


class ObjectLease(Lease):
    """A lease on a checkpoint root on an object store (docs/format-checkpoint.md, rule 31): the
    object ``ROOT/.ucp-writer``, created only if absent (``If-None-Match``); its heartbeat, takeover
    and release overwrite or delete it only if its version tag (ETag) is still the one read
    (``If-Match``), so no takeover lock is needed; its heartbeat is its last-modified time."""

    def _read(self) -> Holder | None:
        try:
            stat = self.path.stat()  # (first: a change after it fails the If-Match of what follows)
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return _holder_of(data[:64 << 10], self.path, stat.st_mtime, stat.etag)

    def _touch(self) -> None:
        holder = self._read()
        if holder is not None and holder.token == self.token:
            self.path.replace_if(holder.version, self._content())

    def __init__(self, root, **kwargs):
        super().__init__(root, **kwargs)
        self.since = time.time()

    def _content(self) -> bytes:  # ("beat" changes the bytes, so the ETag, at every heartbeat)
        return json.dumps({"host": self.host, "pid": self.pid, "job": self.job, "token": self.token,
                           "since": self.since, "beat": time.time()}).encode()

    def _create(self) -> bool:
        return self.path.create(self._content())

    def _replace(self, holder: Holder, content: bytes | None) -> bool:
        return self.path.replace_if(holder.version, content)


# -- one lease per process and root -------------------------------------------------------------

_SHARED: dict[tuple[int, str], Lease] = {}
_LOCK = threading.Lock()


def for_process(root) -> Lease:
    """The lease this process holds (or will hold) on ``root``, shared by every caller in the
    process; each call is matched by one :func:`leave`."""
    key = (os.getpid(), str(root) if is_object(root) else os.path.realpath(root))
    with _LOCK:
        lease = _SHARED.get(key)
        if lease is None:
            lease = _SHARED[key] = ObjectLease(root) if is_object(root) else Lease(root)
        lease.users += 1
        return lease


def leave(lease: Lease) -> None:
    """One user of a :func:`for_process` lease is done; the last one releases it."""
    with _LOCK:
        lease.users -= 1
        if lease.users > 0:
            return
        for key, value in list(_SHARED.items()):
            if value is lease:
                del _SHARED[key]
    try:
        lease.release()
    except OSError:
        pass  # (a root gone or unwritable: the lease goes stale with this process)


@atexit.register
def _release_all() -> None:
    for (pid, _), lease in list(_SHARED.items()):
        if pid == os.getpid():
            try:
                lease.release()
            except OSError:
                pass
