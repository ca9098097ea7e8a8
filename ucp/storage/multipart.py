"""An object on S3 written as a stream of parts uploaded concurrently, in bounded memory: :class:`MultipartWriter`.

s3fs's own file object uploads a streamed object one part at a time, from a buffer it copies twice
per part; a rank file of several GB then waits on one connection. Here each part is handed to s3fs's
event loop as soon as it is full, up to ``concurrency`` parts in flight, and a writer that gets ahead
of the uploads waits for the oldest. A part is made of the bytes given to
:meth:`MultipartWriter.write_held`, sent from where they lie (a save's tensors: no copy, no buffer),
and of copies of those given to :meth:`MultipartWriter.write` (bytes that change once written: a
preallocated part buffer, reused; memory ``(concurrency + 1) * part_bytes`` per object at most, 8 MiB
parts and 4 in flight: 40 MiB, capped at :data:`MEMORY_BYTES`). The part size grows with an object's
size when the writer is told it (S3 takes 10,000 parts at most): :func:`part_size`. The object appears
only when :meth:`MultipartWriter.close` completes the upload, whole; a failure (or an exception in the
``with`` block) aborts it, so a partial object is never visible: a writer killed outright leaves an
incomplete upload, which no listing or read sees, and which the next commit under its root aborts once
it is idle (:meth:`ucp.storage.objstore.ObjectPath.abort_orphan_uploads`, format rule 33).

Retries: each request goes through s3fs (``_call_s3``), which retries connection errors and
throttling with backoff, over botocore's own retries (:data:`ucp.storage.objstore.RETRIES`).

Each part (and a small object's one PUT) carries the CRC-32C of its bytes where botocore would add a
checksum of its own (:func:`checksums_sent`: over HTTPS by default; over plain HTTP botocore signs every
body with SHA-256 instead), which the store checks (:func:`part_checksum`); botocore, given it, wraps no
body in a checksum stream of its own, and over HTTPS signs the request without hashing the body
(:func:`_unsigned_over_tls`). A part goes out as views of its bytes (:class:`PartBody`): aiohttp
would otherwise copy a bytearray body twice per request (slicing it to its length, then joining it to
the headers), each copy a fresh allocation of a part's size whose pages the kernel zeroes.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import errno
import functools
import itertools
import os
import weakref
from collections import deque
from contextlib import contextmanager

from ucp.codecs.checksum import crc32c

try:
    from aiohttp.payload import Payload as _Payload
except ImportError:  # (no aiohttp below s3fs: parts go out as bytes-like bodies)
    _Payload = None

#: bytes per part, the least (S3 takes parts of 5 MiB to 5 GiB, at most 10,000 of them): an object of
#: up to 78 GiB; a larger one whose size is known gets larger parts (:func:`part_size`). 8 MiB is the
#: AWS CLI's and boto3's own part size; on the local SeaweedFS of the benchmarks, two ranks' 512 MB
#: went up in 6.7 s with 8 MiB parts against 7.1 s with 16 MiB (the server's CPU seconds 10.9 against
#: 11.9; 32 MiB: 7.9 s, 13.7): the server's work per byte grows with the part
PART_BYTES = 8 << 20
#: an object of known size under this many bytes goes up in one PUT, not a multipart upload of a few
#: parts (whose creation and completion are two more round trips: ~0.1 s on the benchmarks' server)
SINGLE_PUT_BYTES = 16 << 20
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
    object over ``10,000 * PART_BYTES`` (78 GiB) the least whole number of MiB that takes it in
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


#: the bytes a :class:`PartBody` hands aiohttp's writer at a time (each waits for the socket to drain)
SEND_BYTES = 1 << 20
#: a part's pieces under this many bytes go to the socket gathered, not one send each
GATHER_BYTES = 64 << 10


if _Payload is not None:
    class PartBody(_Payload):
        """A part's bytes as an S3 request body, sent from where they lie (the writer's buffer, or the
        caller's memory given to :meth:`MultipartWriter.write_held`) without a copy.

        botocore sees a seekable file (``read``, ``seek``, ``tell``, ``len``): it hashes it for the
        signature from the current position and seeks back; aiohttp sees a payload and writes it whole,
        whatever that position, in :data:`SEND_BYTES` views (pieces under :data:`GATHER_BYTES` gathered
        first). A request retried with the same body (botocore rewinds it; s3fs calls again with the
        same arguments) therefore sends every byte again. The bytes must not change until the request
        is done (the writer reuses a buffer only after the part's upload has returned or failed for good).

        Args:
            pieces: the part's bytes, in order (buffers).
        """

        _autoclose = True  # (nothing to close: views of memory others own)

        def __init__(self, pieces: list):
            views = [memoryview(x).cast("B") for x in pieces]
            super().__init__(views, content_type="application/octet-stream")
            self._pieces = views
            self._starts = list(itertools.accumulate((v.nbytes for v in views), initial=0))
            self._size, self._pos = self._starts[-1], 0

        def __len__(self) -> int:
            return self._size

        def __bool__(self) -> bool:  # (botocore takes a false body for none)
            return True

        def read(self, n: int | None = -1):
            """Up to ``n`` bytes from the position (fewer at a piece's end; ``b""`` at the end), a view."""
            if self._pos >= self._size or n == 0:
                return b""
            i = bisect.bisect_right(self._starts, self._pos) - 1
            at = self._pos - self._starts[i]
            piece = self._pieces[i]
            end = piece.nbytes if n is None or n < 0 else min(piece.nbytes, at + n)
            self._pos += end - at
            return piece[at:end]

        def seek(self, offset: int, whence: int = 0) -> int:
            base = (0, self._pos, self._size)[whence]
            self._pos = max(0, min(self._size, base + offset))
            return self._pos

        def tell(self) -> int:
            return self._pos

        def seekable(self) -> bool:
            return True

        def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
            return b"".join(self._pieces).decode(encoding, errors)

        async def write(self, writer) -> None:
            await self.write_with_length(writer, None)

        async def write_with_length(self, writer, content_length: int | None) -> None:
            left = self._size if content_length is None else min(self._size, content_length)
            small = bytearray()
            for piece in self._pieces:
                if left <= 0:
                    break
                piece = piece[:left]
                left -= piece.nbytes
                if piece.nbytes < GATHER_BYTES:
                    small += piece
                    if len(small) < GATHER_BYTES:
                        continue
                    piece, small = memoryview(small), bytearray()
                elif small:
                    await writer.write(bytes(small))
                    small = bytearray()
                for at in range(0, piece.nbytes, SEND_BYTES):
                    await writer.write(piece[at:at + SEND_BYTES])
            if small:
                await writer.write(bytes(small))
else:
    PartBody = None


#: the header a part's CRC-32C travels in (:func:`part_checksum`)
CHECKSUM_HEADER = "x-amz-checksum-crc32c"
_UPLOADS = ("UploadPart", "PutObject")


def _unsigned_over_tls(request, **_) -> None:
    """botocore's ``before-sign`` hook on ucp's uploads: one that carries its CRC-32C
    (:data:`CHECKSUM_HEADER`, which the signature covers) over HTTPS is marked as carrying a checksum
    in a header, as botocore marks those it checksums itself, so its S3 signer sends it
    ``UNSIGNED-PAYLOAD`` rather than hashing the body with SHA-256: TLS guards the bytes on the way
    and the store checks the CRC. Over plain HTTP the body is still signed (botocore's rule)."""
    if not request.url.startswith("https://") or CHECKSUM_HEADER not in request.headers:
        return
    checksum = request.context.setdefault("checksum", {})
    checksum.setdefault("request_algorithm", {"in": "header", "name": CHECKSUM_HEADER, "algorithm": "crc32c"})


_HOOKED: "weakref.WeakSet" = weakref.WeakSet()  # (the clients whose hook is registered, or about to be)


def _prepare(client, loop) -> None:
    """Register :func:`_unsigned_over_tls` on S3 client ``client``, once per client, from its event
    loop ``loop``: botocore's event emitter is not thread-safe (a registration from a writer's thread
    while the loop emits could leave a stale handler list cached for the client's life). Scheduled
    before the writer's first request, so it runs first."""
    if client in _HOOKED:
        return
    _HOOKED.add(client)

    def register() -> None:
        for operation in _UPLOADS:
            client.meta.events.register(f"before-sign.s3.{operation}", _unsigned_over_tls,
                                        unique_id=f"ucp-unsigned-over-tls-{operation}")

    loop.call_soon_threadsafe(register)


def checksum_setting() -> str:
    """The user's ``request_checksum_calculation`` (lower case; ``""``: none): the environment's
    ``AWS_REQUEST_CHECKSUM_CALCULATION``, else the AWS config file's for the profile in effect, as
    botocore reads them."""
    chosen = os.environ.get("AWS_REQUEST_CHECKSUM_CALCULATION", "").strip().lower()
    return chosen or _configured(os.environ.get("AWS_PROFILE"), os.environ.get("AWS_CONFIG_FILE"))


@functools.lru_cache(maxsize=8)
def _configured(profile: str | None, config_file: str | None) -> str:
    """The config file's ``request_checksum_calculation`` for ``profile`` (read once per process)."""
    try:
        import botocore.session

        value = botocore.session.Session(profile=profile).get_scoped_config().get("request_checksum_calculation")
    except Exception:  # noqa: BLE001 - no botocore, no such profile, an unreadable file: nothing chosen
        return ""
    return str(value or "").strip().lower()


def checksums_sent(client) -> bool:
    """Whether uploads through botocore client ``client`` carry their CRC-32C (:func:`part_checksum`):
    where botocore would add a checksum of its own, its ``request_checksum_calculation`` being
    ``when_supported`` (its default; over HTTPS the CRC-32C then stands in for the body's SHA-256). Not
    where it is ``when_required``: the user's setting (:func:`checksum_setting`) for a store that takes
    no flexible checksums, or ucp's own over plain HTTP, where botocore signs every body with SHA-256
    anyway (:func:`ucp.storage.objstore._options`)."""
    return getattr(client.meta.config, "request_checksum_calculation", None) != "when_required"


def part_checksum(pieces: list) -> str:
    """The ``x-amz-checksum-crc32c`` of a part made of ``pieces`` (buffers, in order): the base64 of
    its CRC-32C, big-endian. Sent with every part and single PUT where :func:`checksums_sent`: the
    store checks the bytes it received against it (a part damaged on the way is refused: the upload
    fails, naming the object, and nothing appears), and botocore, seeing a checksum given, computes
    none of its own; over HTTPS the request is then signed without hashing the body
    (``UNSIGNED-PAYLOAD``, the SDKs' way for uploads that carry a checksum: :func:`_unsigned_over_tls`),
    so a part costs the client one CRC-32C pass (~14 GB/s per core here), not a SHA-256 (~1.1 GB/s)."""
    value = 0
    for piece in pieces:
        value = crc32c(piece, value)
    return base64.b64encode(value.to_bytes(4, "big")).decode()


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

    Bytes given to :meth:`write` are copied into a part buffer; bytes given to :meth:`write_held` are
    sent from where they lie, and must stay unchanged until :meth:`close` returns.

    Memory: ``(concurrency + 1) * part_bytes`` at most (the parts in flight and the one being filled),
    and ``concurrency`` is lowered so that this stays within :data:`MEMORY_BYTES`, down to one part in
    flight: parts over half of it (256 MiB, which only objects over 2.5 TiB get) hold two parts' memory,
    over the cap. A part buffer is made when a :meth:`write` first needs one: an object written held
    takes none.

    Args:
        fs: an ``s3fs.S3FileSystem``.
        key: ``bucket/key``.
        part_bytes: bytes per part (the last may be fewer); at least 5 MiB on S3. None: chosen from
            ``size`` (:func:`part_size`).
        concurrency: parts uploaded at once, at most (:func:`uploads`).
        size: the object's size in bytes when known (a rank file's is): a part size that takes it in
            10,000 parts, or one PUT under :data:`SINGLE_PUT_BYTES`. Unknown, an object over 78 GiB
            fails at its 10,001st part.

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
        if size is not None and size < SINGLE_PUT_BYTES:
            part_bytes = max(part_bytes, size + 1)  # (the whole object is the part being filled: one PUT at close)
        self.part_bytes, self.concurrency = part_bytes, uploads(part_bytes, concurrency)
        self._pos = 0
        self._pieces: list[memoryview] = []  # (the part being filled, in order: views of the buffer and held bytes)
        self._filled = 0  # (its bytes)
        self._buf: bytearray | None = None  # (the buffer copied writes fill, from _fill; made when first needed)
        self._fill = 0
        self._run: int | None = None  # (where in the buffer the part's last piece starts, if it is the buffer's)
        self._buffers = 0  # (part buffers made)
        self._spare: list[bytearray] = []
        self._inflight: deque = deque()  # (future, buffer or None, checksum parameter) per part in flight, oldest first
        self._parts: list[dict] = []
        self._upload_id: str | None = None
        self._checksums: bool | None = None  # (parts sent with their CRC-32C: known at the first request)
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
        """Append a copy of ``data`` (any buffer, free to change once this returns); a full part goes
        out at once, and waits only when ``concurrency`` parts are in flight already. A write under
        :data:`GATHER_BYTES` (a file's header) is a copy of its own: it takes no part buffer."""
        view = memoryview(data).cast("B")
        n, at = view.nbytes, 0
        if n < GATHER_BYTES:
            return self.write_held(bytes(view))
        while at < n:
            if self._buf is None:
                self._buf = self._take_buffer()
            k = min(n - at, self.part_bytes - self._filled)
            start = self._fill
            self._buf[start:start + k] = view[at:at + k]
            self._fill += k
            if self._run is None:  # (a new run of the buffer's bytes in the part)
                self._run = start
                self._pieces.append(memoryview(self._buf)[start:self._fill])
            else:
                self._pieces[-1] = memoryview(self._buf)[self._run:self._fill]
            self._add(k)
            at += k
        self._pos += n
        return n

    def write_held(self, data) -> int:
        """Append ``data`` (any buffer) without a copy: its bytes are sent from where they lie, so
        they must not change until :meth:`close` returns (a blocking save's tensors)."""
        view = memoryview(data).cast("B")
        n, at = view.nbytes, 0
        while at < n:
            k = min(n - at, self.part_bytes - self._filled)
            self._pieces.append(view[at:at + k])
            self._run = None
            self._add(k)
            at += k
        self._pos += n
        return n

    def _add(self, k: int) -> None:
        self._filled += k
        if self._filled == self.part_bytes:
            self._send()

    def _take_buffer(self) -> bytearray:
        """A part buffer to fill: a spare one, a new one while fewer than ``concurrency + 1`` exist,
        else the first freed by the oldest uploads."""
        if self._spare:
            return self._spare.pop()
        if self._buffers <= self.concurrency:
            self._buffers += 1
            return bytearray(self.part_bytes)
        while not self._spare:
            self._retire()
        return self._spare.pop()

    def _call(self, method: str, **kwargs):
        """Request ``method`` on the object, sent to s3fs's event loop: its future (see :meth:`_wait`)."""
        return asyncio.run_coroutine_threadsafe(self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs),
                                                self.fs.loop)

    def _wait(self, future):
        with as_oserror(self.name):
            return future.result()

    def _body(self):
        """The part being filled as a request body: a :class:`PartBody` of its pieces (aiohttp there);
        else bytes-like (the buffer itself where the part is all of it, else the pieces joined). A
        PartBody is safe to hand botocore: it computes no checksum of its own for a part, which would
        wrap the body in a chunked stream that reads it once from where it stands (an s3fs retry would
        then send it short), as the part carries its CRC-32C or the client asks for no checksums
        (:func:`checksums_sent`)."""
        if PartBody is not None and self._filled:
            return PartBody(self._pieces)
        if len(self._pieces) == 1 and self._pieces[0].obj is self._buf and self._pieces[0].nbytes == len(self._buf):
            return self._buf
        return b"".join(self._pieces)

    def _start(self) -> None:
        """Before the first request: the S3 client made (s3fs makes it at its first call) and asked
        whether parts carry their CRC-32C; the signing hook registered."""
        if self._checksums is None:
            client = self._wait(asyncio.run_coroutine_threadsafe(self._client(), self.fs.loop))
            self._checksums = checksums_sent(client)
            _prepare(client, self.fs.loop)

    async def _client(self):
        """The S3 client this upload's requests go through: s3fs's, or with ``cache_regions`` its
        client for the bucket's region (made on first use)."""
        await self.fs.set_session()
        return await self.fs.get_s3(self.bucket)

    def _create(self) -> str:
        """Start the multipart upload (asking for CRC-32C checksums where :func:`checksums_sent`): its
        id. A store that refuses the creation so asked is told how to turn the checksums off (not where
        the refusal is for want of permission, or of the bucket)."""
        self._start()
        algorithm = {"ChecksumAlgorithm": "CRC32C"} if self._checksums else {}
        try:
            return self._wait(self._call("create_multipart_upload", **algorithm))["UploadId"]
        except (PermissionError, FileNotFoundError):
            raise
        except OSError as e:
            if not algorithm:
                raise
            raise type(e)(e.errno, f"{e.strerror or e} (a store that takes no flexible checksums: set "
                                   "AWS_REQUEST_CHECKSUM_CALCULATION=when_required)", e.filename) from e

    def _checksum(self) -> dict:
        """The request parameter carrying the CRC-32C of the part being filled (none where
        :func:`checksums_sent` says not)."""
        return {"ChecksumCRC32C": part_checksum(self._pieces)} if self._checksums else {}

    def _send(self) -> None:
        """Upload the part being filled as the next part; then wait for the oldest while more than
        ``concurrency`` are in flight. The buffer it used, if any, is the part's until its upload is done."""
        try:
            if self._upload_id is None:
                self._upload_id = self._create()
            number = len(self._parts) + len(self._inflight) + 1
            if number > _MAX_PARTS:
                raise OSError(f"{self.name}: over {_MAX_PARTS} parts of {self.part_bytes} bytes")
            checksum = self._checksum()
            body = self._body()
            used = self._buf if self._fill else None
            self._inflight.append((self._call("upload_part", UploadId=self._upload_id, PartNumber=number, Body=body,
                                              **checksum), used, checksum))
            self._pieces, self._filled, self._run = [], 0, None
            if used is not None:
                self._buf, self._fill = None, 0
            while len(self._inflight) > self.concurrency:
                self._retire()
        except BaseException:
            self.abort()
            raise

    def _retire(self) -> None:
        """Wait for the oldest part in flight, record it; its buffer becomes a spare."""
        future, buffer, checksum = self._inflight.popleft()
        out = self._wait(future)
        self._parts.append({"PartNumber": len(self._parts) + 1, "ETag": out["ETag"], **checksum})
        if buffer is not None:
            self._spare.append(buffer)

    def close(self) -> None:
        """Upload what is left and complete the object (it appears now, whole).

        Raises:
            OSError: the store refused (the upload is aborted: no object appears).
        """
        if self.closed:
            return
        try:
            if self._upload_id is None:  # (smaller than a part: one PUT)
                self._start()
                self._wait(self._call("put_object", Body=self._body(), **self._checksum()))
            else:
                if self._filled:
                    self._send()
                while self._inflight:
                    self._retire()
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
        for future, *_ in self._inflight:
            future.cancel()
        for future, *_ in self._inflight:
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
        self._pieces, self._buf, self._spare = [], None, []
