"""Ranged reads of objects on an object store: the GETs of a load, many at once.

:func:`read_objects` fills the caller's buffers with byte ranges of several objects, every range split
into GETs of at most :data:`GET_BYTES`, ``gets`` of them in flight at once over all of them; on S3 each
GET is read straight into place as its bytes arrive (:func:`_get_into`). :func:`coalesced` chooses which
fragments of one object one GET fetches together. :class:`~ucp.storage.objstore.ObjectPath`'s
``read_into`` and ``read_spans`` and the fragment reader (:mod:`ucp.storage.fragment_files`) read
through them.
"""

from __future__ import annotations

import asyncio
import errno
from contextlib import contextmanager

from ucp.storage.multipart import as_oserror

#: a read over this many bytes is split into ranged GETs of this size, ``GETS`` of them at a time
GET_BYTES = 16 << 20
GETS = 4
#: fragments of one object at most this far apart are fetched by one ranged GET spanning them and the
#: bytes between (:func:`coalesced`): a request's round trip costs more than reading that much more
COALESCE_GAP = 256 << 10
#: the bytes between fragments a GET may fetch in vain whatever its size (past a tenth of those it
#: holds): tiny fragments (step counts) a few hundred bytes apart cost one GET, not one each
COALESCE_SLACK = 64 << 10


def _scatter(views: list[memoryview], at: int, data: bytes) -> None:
    """Copy ``data`` to byte ``at`` of the concatenation of ``views``."""
    src = memoryview(data)
    for v in views:
        if at >= v.nbytes:
            at -= v.nbytes
            continue
        k = min(v.nbytes - at, src.nbytes)
        v[at:at + k] = src[:k]
        src, at = src[k:], 0
        if not src.nbytes:
            return


def _slices(views: list[memoryview], at: int, n: int):
    """The pieces of ``views`` that hold bytes ``[at, at + n)`` of their concatenation, in order."""
    for v in views:
        if n <= 0:
            return
        if at >= v.nbytes:
            at -= v.nbytes
            continue
        k = min(v.nbytes - at, n)
        yield v[at:at + k]
        at, n = 0, n - k


def _reads_into() -> bool:
    """Whether aiobotocore's response bodies take ``readinto`` (2.23 on; s3fs may bring an older one,
    whose GETs are then read whole by s3fs's ``cat_file`` and copied into place)."""
    try:
        from aiobotocore.response import AioStreamingBody
    except ImportError:
        return False
    return hasattr(AioStreamingBody, "readinto")


async def _get_into(fs, key: str, start: int, end: int, views: list[memoryview], at: int) -> int:
    """Bytes ``[start, end)`` of object ``key`` (``bucket/name``) of s3fs file system ``fs``, in one
    ranged GET, read straight into byte ``at`` of the concatenation of ``views`` as they arrive (no
    copy of the whole range first, as s3fs's ``cat_file`` makes); the count of bytes the object had
    (fewer at its end). Retried whole, and its errors translated, as s3fs does for its own reads."""
    from s3fs.core import _error_wrapper

    bucket, name, version = fs.split_path(key)
    version = {"VersionId": version} if version else {}

    async def call_and_read() -> int:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=name, Range=f"bytes={start}-{end - 1}",
                                     **version)
        body, got = response["Body"], 0
        try:
            for view in _slices(views, at, end - start):
                while view.nbytes:
                    k = await body.readinto(view)
                    if not k:
                        return got  # (the object ends here; the body's length was checked by that empty read)
                    got, view = got + k, view[k:]
            await body.readinto(bytearray(1))  # (its end: botocore checks the body's length, and any checksum)
            return got
        finally:
            body.close()

    return await _error_wrapper(call_and_read, retries=fs.retries)


def read_objects(requests: list, gets: int = GETS) -> list[list[int]]:
    """Fill the views of the spans of several objects at once: ``requests`` is ``[(object, spans)]``,
    objects (:class:`~ucp.storage.objstore.ObjectPath`) of one file system, ``spans`` as
    ``ObjectPath.read_spans`` takes them; every span's ranged GETs (of at most :data:`GET_BYTES`, each
    read into place as its bytes arrive: :func:`_get_into` on S3) ``gets`` in flight at once over all
    of them. The count of bytes each span had, per object. A failed GET stops the others before this
    raises (the views are the caller's); its error names its object (a missing one:
    :class:`FileNotFoundError` with the object's URL as filename)."""
    outs = [[[memoryview(v).cast("B") for v in views] for _, views in spans] for _, spans in requests]
    totals = [[sum(v.nbytes for v in out) for out in spans] for spans in outs]
    fs = requests[0][0].fs if requests else None
    if fs is None or not getattr(fs, "async_impl", False):
        got = []
        for (path, spans), out, total in zip(requests, outs, totals):
            got.append([])
            for (offset, _), views, n in zip(spans, out, total):
                with _named(path):
                    data = path.fs.cat_file(path.key, start=offset, end=offset + n) if n else b""
                _scatter(views, 0, data)
                got[-1].append(len(data))
        return got
    from fsspec.asyn import sync

    pieces = [(j, i, lo, min(lo + GET_BYTES, n)) for j, total in enumerate(totals) for i, n in enumerate(total)
              for lo in range(0, n, GET_BYTES)]
    direct = hasattr(fs, "_call_s3") and _reads_into()  # (s3fs: each GET read into place as it arrives)

    async def fetch() -> list[int]:
        gate = asyncio.Semaphore(max(1, gets))

        async def one(j: int, i: int, lo: int, hi: int) -> int:
            path, start = requests[j][0], requests[j][1][i][0]
            async with gate:
                with _named(path):
                    if direct:
                        return await _get_into(fs, path.key, start + lo, start + hi, outs[j][i], lo)
                    data = await fs._cat_file(path.key, start=start + lo, end=start + hi)
            _scatter(outs[j][i], lo, data)
            return len(data)

        tasks = [asyncio.ensure_future(one(*piece)) for piece in pieces]
        try:
            return await asyncio.gather(*tasks)
        except BaseException:  # (the first failure: the others stopped before the views go back to the caller)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    got = [[0] * len(total) for total in totals]
    ended = [[False] * len(total) for total in totals]
    for (j, i, lo, hi), n in zip(pieces, sync(fs.loop, fetch) if pieces else ()):
        if not ended[j][i]:
            got[j][i] += n
        ended[j][i] = ended[j][i] or n < hi - lo  # (the object ends here)
    return got


@contextmanager
def _named(path):
    """A request's failure named by its object: the client's errors as :func:`as_oserror` raises
    them, a missing object as :class:`FileNotFoundError` whose filename is the object's URL."""
    try:
        with as_oserror(str(path)):
            yield
    except FileNotFoundError as e:
        if e.filename == str(path):
            raise
        raise FileNotFoundError(errno.ENOENT, "no such object", str(path)) from e


def coalesced(extents: list[tuple[int, int]], gap: int = COALESCE_GAP) -> list[tuple[int, int, list[int]]]:
    """The ranges to fetch for byte ranges ``extents`` (``(offset, length)`` pairs of one object, in
    any order): ``(start, end, indices)`` each, ``indices`` the extents it holds in order of offset.
    An extent joins the range before it when the bytes between them are at most ``gap`` and the
    range's skipped bytes stay within a tenth of those it holds or :data:`COALESCE_SLACK`: a range
    fetches at most 1.1x the bytes asked of it, or 64 KiB more. Overlapping extents are fetched apart."""
    out: list[tuple[int, int, list[int]]] = []
    held = skipped = 0
    for i in sorted(range(len(extents)), key=lambda k: extents[k][0]):
        offset, length = extents[i]
        if out:
            start, end, indices = out[-1]
            between = offset - end
            if 0 <= between <= gap and skipped + between <= max((held + length) // 10, COALESCE_SLACK):
                indices.append(i)
                out[-1] = (start, offset + length, indices)
                held, skipped = held + length, skipped + between
                continue
        out.append((offset, offset + length, [i]))
        held, skipped = length, 0
    return out
