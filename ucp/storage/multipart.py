"""An object on S3 written as a stream of parts uploaded concurrently, in bounded memory: :class:`MultipartWriter`.

s3fs's own file object uploads a streamed object one part at a time, from a buffer it copies twice
per part; a rank file of several GB then waits on one connection. Here each part is filled in a
preallocated buffer and handed to s3fs's event loop at once, up to ``concurrency`` parts in flight:
memory is ``(concurrency + 1) * part_bytes`` per object (16 MiB parts, 4 in flight: 80 MiB; capped
at :data:`MEMORY_BYTES`), the buffers reused, and a writer that gets ahead of the uploads waits for
the oldest. The part size grows with an object's size when the writer is told it (S3 takes 10,000
parts at most): :func:`part_size`. The object appears only when :meth:`MultipartWriter.close`
completes the upload, whole; a failure (or an exception in the ``with`` block) aborts it, so a
partial object is never visible: a writer killed outright leaves an incomplete upload, which no
listing or read sees, and which the next commit under its root aborts once it is idle
(:meth:`ucp.storage.objstore.ObjectPath.abort_orphan_uploads`, format rule 33).

Retries: each request goes through s3fs (``_call_s3``), which retries connection errors and
throttling with backoff, over botocore's own retries (:data:`ucp.storage.objstore.RETRIES`).
"""

from __future__ import annotations

import asyncio
import errno
from collections import deque
from contextlib import contextmanager

#: bytes per part, the least (S3 takes parts of 5 MiB to 5 GiB, at most 10,000 of them): an object of
#: up to 156 GiB; a larger one whose size is known gets larger parts (:func:`part_size`)
PART_BYTES = 16 << 20
#: the largest part S3 takes, and the most parts of one object
MAX_PART_BYTES = 5 << 30
_MAX_PARTS = 10_000
#: parts uploaded at once, per object
UPLOADS = 4
#: the memory one writer's part buffers may hold, ``(concurrency + 1) * part_bytes``: larger parts
#: are uploaded fewer at once (never fewer than one in flight while the next is filled)
MEMORY_BYTES = 512 << 20
_MIB = 1 << 20


def part_size(size: int | None) -> int:
    """Bytes per part for an object of ``size`` bytes (None: not known): :data:`PART_BYTES`, or for an
    object over ``10,000 * PART_BYTES`` (156 GiB) the least whole number of MiB that takes it in
    10,000 parts.

    Raises:
        ValueError: the object is over 10,000 parts of 5 GiB (48.8 TiB), more than one S3 object holds.
    """
    if size is None or size <= _MAX_PARTS * PART_BYTES:
        return PART_BYTES
    part = -(-size // (_MAX_PARTS * _MIB)) * _MIB  # (ceil(size / 10,000), rounded up to whole MiB)
    if part > MAX_PART_BYTES:
        raise ValueError(f"{size} bytes: over {_MAX_PARTS} parts of {MAX_PART_BYTES} bytes, the most one S3 object "
                         "holds")
    return part


def uploads(part_bytes: int, concurrency: int = UPLOADS) -> int:
    """Parts in flight at once for parts of ``part_bytes``: ``concurrency``, fewer where
    ``(concurrency + 1) * part_bytes`` would exceed :data:`MEMORY_BYTES`, and at least 1."""
    return max(1, min(concurrency, MEMORY_BYTES // part_bytes - 1))
#: the S3 client's packages below fsspec, whose errors (a refused connection after botocore's
#: retries, say) are not OSErrors
_CLIENT = frozenset({"botocore", "aiobotocore", "aiohttp"})


#: the errno of an OSError s3fs raises without one (a refused request: ``PermissionError('Forbidden')``)
_ERRNO = {PermissionError: errno.EACCES, FileNotFoundError: errno.ENOENT, FileExistsError: errno.EEXIST}


@contextmanager
def as_oserror(name: str):
    """The S3 client's own errors raised as ``OSError(EIO)`` naming ``name`` (a URL): ucp's callers
    handle a storage failure as an OSError (a save's becomes one line, a :class:`~ucp.errors.StorageError`;
    the CLI prints one line), whatever library failed below fsspec. An OSError naming no object (s3fs
    translates a refusal to ``PermissionError('Forbidden')``) is raised as the same type, naming ``name``."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or type(e).__module__ != "builtins":
            raise
        code = e.errno if e.errno is not None else _ERRNO.get(type(e), errno.EIO)
        raise type(e)(code, e.strerror or str(e), name) from e
    except Exception as e:
        if type(e).__module__.split(".")[0] not in _CLIENT:
            raise
        raise OSError(errno.EIO, f"{type(e).__name__}: {e}", name) from e


class MultipartWriter:
    """A binary file object (``write``, ``tell``, ``close``; a context manager) writing object ``key``
    of s3fs file system ``fs``: see the module's docstring. An object smaller than one part is one PUT.

    Memory: ``(concurrency + 1) * part_bytes`` at most (the parts in flight and the one being filled),
    and ``concurrency`` is lowered so that this stays within :data:`MEMORY_BYTES`, down to one part in
    flight: parts over half of it (256 MiB, which only objects over 2.5 TiB get) hold two parts' memory,
    over the cap.

    Args:
        fs: an ``s3fs.S3FileSystem``.
        key: ``bucket/key``.
        part_bytes: bytes per part (the last may be fewer); at least 5 MiB on S3. None: chosen from
            ``size`` (:func:`part_size`).
        concurrency: parts uploaded at once, at most (:func:`uploads`).
        size: the object's size in bytes when known (a rank file's is): a part size that takes it in
            10,000 parts. Unknown, an object over 156 GiB fails at its 10,001st part.

    Raises:
        OSError: ``size`` is more than one S3 object holds (naming the object).
    """

    def __init__(self, fs, key: str, part_bytes: int | None = None, concurrency: int = UPLOADS,
                 size: int | None = None):
        self.fs, self.name = fs, f"s3://{key}"
        self.bucket, self.key = key.split("/", 1)
        if part_bytes is None:
            try:
                part_bytes = part_size(size)
            except ValueError as e:
                raise OSError(errno.EFBIG, str(e), self.name) from None
        self.part_bytes, self.concurrency = part_bytes, uploads(part_bytes, concurrency)
        self._buf, self._fill, self._pos = bytearray(part_bytes), 0, 0
        self._spare: list[bytearray] = []
        self._inflight: deque = deque()  # (future, buffer) of the parts being uploaded, oldest first
        self._parts: list[dict] = []
        self._upload_id: str | None = None
        self.closed = False

    def __enter__(self) -> "MultipartWriter":
        return self

    def __exit__(self, kind, *_exc) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def write(self, data) -> int:
        """Append ``data`` (any buffer); a full part goes out at once, and waits only when
        ``concurrency`` parts are in flight already."""
        view = memoryview(data).cast("B")
        n, at = view.nbytes, 0
        while at < n:
            k = min(n - at, self.part_bytes - self._fill)
            self._buf[self._fill:self._fill + k] = view[at:at + k]
            self._fill += k
            at += k
            if self._fill == self.part_bytes:
                self._send(self._buf)
        self._pos += n
        return n

    def _call(self, method: str, **kwargs):
        """Request ``method`` on the object, sent to s3fs's event loop: its future (see :meth:`_wait`)."""
        return asyncio.run_coroutine_threadsafe(self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs),
                                                self.fs.loop)

    def _wait(self, future):
        with as_oserror(self.name):
            return future.result()

    def _send(self, body: bytearray | bytes) -> None:
        """Upload ``body`` as the next part; the buffer to fill next is a spare one, a new one while
        fewer than ``concurrency`` exist, else the oldest upload's once it is done."""
        try:
            if self._upload_id is None:
                self._upload_id = self._wait(self._call("create_multipart_upload"))["UploadId"]
            number = len(self._parts) + len(self._inflight) + 1
            if number > _MAX_PARTS:
                raise OSError(f"{self.name}: over {_MAX_PARTS} parts of {self.part_bytes} bytes")
            self._inflight.append((self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body),
                                   body))
            self._fill = 0
            if self._spare:
                self._buf = self._spare.pop()
            elif len(self._inflight) <= self.concurrency:
                self._buf = bytearray(self.part_bytes)
            else:
                self._buf = self._retire()
        except BaseException:
            self.abort()
            raise

    def _retire(self):
        """Wait for the oldest part in flight, record it; its buffer."""
        future, body = self._inflight.popleft()
        out = self._wait(future)
        self._parts.append({"PartNumber": len(self._parts) + 1, "ETag": out["ETag"]})
        return body

    def close(self) -> None:
        """Upload what is left and complete the object (it appears now, whole).

        Raises:
            OSError: the store refused (the upload is aborted: no object appears).
        """
        if self.closed:
            return
        try:
            if self._upload_id is None:  # (smaller than a part: one PUT)
                self._wait(self._call("put_object", Body=bytes(memoryview(self._buf)[:self._fill])))
            else:
                if self._fill:
                    self._send(bytes(memoryview(self._buf)[:self._fill]))
                while self._inflight:
                    self._spare.append(self._retire())
                self._wait(self._call("complete_multipart_upload", UploadId=self._upload_id,
                                      MultipartUpload={"Parts": self._parts}))
        except BaseException:
            self.abort()
            raise
        self._release()

    def abort(self) -> None:
        """Give the object up: wait for the parts in flight, abort the upload (best effort: an
        abandoned upload is invisible anyway)."""
        if self.closed:
            return
        for future, _ in self._inflight:
            future.cancel()
        for future, _ in self._inflight:
            try:
                future.result()
            except BaseException:  # noqa: BLE001 - giving up: the first error is the one raised
                pass
        if self._upload_id is not None:
            try:
                self._call("abort_multipart_upload", UploadId=self._upload_id).result()
            except Exception:  # noqa: BLE001 - best effort (the store may be the reason of the abort)
                pass
        self._release()

    def _release(self) -> None:
        self.closed = True
        self._inflight.clear()
        self._buf, self._spare = bytearray(), []
