"""Objects on a real S3 server (SeaweedFS, tests/s3server.py) written by MultipartWriter (parts uploaded
concurrently, the object visible only once complete, none after a failure) and read by
ObjectPath.read_into (ranged GETs in parallel, short at the object's end)."""

from __future__ import annotations

import os

import pytest
from fsspec.asyn import sync

from ucp.storage import object_reads
from ucp.storage.multipart import MultipartWriter
from ucp.storage.objstore import ObjectPath

pytestmark = pytest.mark.s3

MIB = 1 << 20


def _uploads(fs, key: str) -> list:
    bucket, name = key.split("/", 1)
    out = sync(fs.loop, fs._call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=name)
    return out.get("Uploads", [])


def test_parts_uploaded_concurrently_make_one_whole_object(s3):
    path = ObjectPath(s3.url("mp") + "/rank.bin")
    data = os.urandom(5 * MIB) * 3 + os.urandom(MIB + 7)  # (3 full parts and a short last one)
    with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB, concurrency=2) as w:
        for at in range(0, len(data), 3 * MIB + 1):  # (writes that straddle parts)
            w.write(memoryview(data)[at:at + 3 * MIB + 1])
            assert not path.exists()  # (nothing visible before it is complete)
        assert w.tell() == len(data)
    assert path.read_bytes() == data
    assert path.stat().etag.strip('"').endswith("-4")  # (S3's multipart ETag: 4 parts)
    assert _uploads(path.fs, path.key) == []


def test_a_rank_file_of_known_size_goes_up_in_parts_sized_for_10000(s3, monkeypatch, tmp_path):
    """A safetensors file written to an object is of known size, and its parts are sized from it: with
    S3's limit lowered to 2 parts (so the test stays small), 40 MiB and a header go up as 2 parts of
    21 MiB (8 MiB parts would need 6), round trip bit-exact."""
    import numpy as np

    from ucp.storage import multipart
    from ucp.storage.safetensors_file import Entry, read_header, write_file

    monkeypatch.setattr(multipart, "_MAX_PARTS", 2)
    sizes = []
    real = MultipartWriter.__init__

    def recorded(self, *args, **kwargs):
        real(self, *args, **kwargs)
        sizes.append(self.part_bytes)

    monkeypatch.setattr(MultipartWriter, "__init__", recorded)
    path = ObjectPath(s3.url("sized") + "/rank_00000.safetensors")
    data = np.frombuffer(os.urandom(40 * MIB), dtype=np.uint8)
    write_file(path, [Entry("model/w", "U8", data.shape, memoryview(data))], {"format": "test"})
    assert sizes == [21 * MIB]  # (40 MiB and the header in 2 parts: over 20 MiB each, in whole MiB)
    assert path.stat().etag.strip('"').endswith("-2")  # (S3's multipart ETag: 2 parts)
    raw = path.read_bytes()
    local = tmp_path / "sized.safetensors"
    local.write_bytes(raw)
    header, start = read_header(local)
    assert raw[start:] == data.tobytes() and header["model/w"]["data_offsets"] == [0, 40 * MIB]


def test_held_bytes_go_up_from_where_they_lie_between_copied_ones(s3):
    """write_held sends the caller's bytes without a copy (no part buffer is made for them: the
    traced peak stays under one part for 24 MiB in 5 MiB parts), in order with copied writes
    (tiny ones, gathered on the wire), across part boundaries; the object is bit-exact."""
    import tracemalloc

    path = ObjectPath(s3.url("held") + "/rank.bin")
    held = [os.urandom(n) for n in (7 * MIB + 5, 3, 9 * MIB, 100, 8 * MIB - 1)]
    copied = [b"head", b"x" * 1000, b"", b"y" * 60_000, b"tail" * 3]
    with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB, concurrency=2) as w:
        w.write_held(held[0])
        for h in held[1:]:
            w.write_held(h)
    assert path.read_bytes() == b"".join(held)
    tracemalloc.start()
    try:
        path = ObjectPath(s3.url("held") + "/mixed.bin")
        with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB, concurrency=2) as w:
            for c, h in zip(copied, held):
                w.write(c)
                w.write_held(h)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path.read_bytes() == b"".join(c + h for c, h in zip(copied, held))
    assert path.stat().etag.strip('"').endswith("-5")  # (24 MiB and a few bytes in 5 MiB parts)
    assert peak < 5 * MIB, peak  # (copied writes fill part buffers: one at least, were held bytes copied too)


def test_a_small_object_is_one_put(s3):
    path = ObjectPath(s3.url("small") + "/x")
    with path.open_write() as w:
        assert isinstance(w, MultipartWriter)
        w.write(b"abc")
    assert path.read_bytes() == b"abc" and "-" not in path.stat().etag


@pytest.mark.parametrize("mib,parts", [(0, 0), (12, 0), (17, 3)])
def test_an_object_of_known_size_under_16_mib_is_one_put(s3, mib, parts):
    """Told its size, a writer sends an object under SINGLE_PUT_BYTES (16 MiB) in one PUT, held bytes
    and all (no multipart upload's two more round trips); 17 MiB goes up in 8 MiB parts."""
    from ucp.storage.multipart import SINGLE_PUT_BYTES

    assert SINGLE_PUT_BYTES == 16 * MIB
    path = ObjectPath(s3.url("sized") + "/rank.bin")
    data = os.urandom(mib * MIB) + b"end"
    with path.open_write(len(data)) as w:
        w.write(b"head")
        w.write_held(memoryview(data)[4:])
    assert path.read_bytes() == b"head" + data[4:]
    etag = path.stat().etag.strip('"')
    assert (etag.endswith(f"-{parts}") if parts else "-" not in etag), etag


def test_a_failed_write_leaves_no_object_and_no_upload(s3):
    path = ObjectPath(s3.url("failed") + "/rank.bin")
    with pytest.raises(RuntimeError, match="producer failed"):
        with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB, concurrency=2) as w:
            w.write(os.urandom(11 * MIB))  # (two parts sent)
            raise RuntimeError("producer failed")
    assert not path.exists()
    assert _uploads(path.fs, path.key) == []  # (aborted: the parts are gone too)


def test_read_into_splits_a_large_read_and_stops_at_the_end(s3, monkeypatch):
    monkeypatch.setattr(object_reads, "GET_BYTES", MIB)
    path = ObjectPath(s3.url("read") + "/obj")
    data = os.urandom(5 * MIB + 123)
    path.write_bytes(data)
    got: list = []
    get = object_reads._get_into

    async def counted(fs, key, start, end, *args):
        got.append((start, end))
        return await get(fs, key, start, end, *args)

    monkeypatch.setattr(object_reads, "_get_into", counted)
    a, b = bytearray(2 * MIB + 5), memoryview(bytearray(2 * MIB))
    assert path.read_into(1000, [a, b]) == len(a) + len(b)
    assert bytes(a) + bytes(b) == data[1000:1000 + len(a) + len(b)]
    assert len(got) == 5 and all(e - s <= MIB for s, e in got)  # (ranged GETs of at most GET_BYTES)
    tail = bytearray(3 * MIB)
    assert path.read_into(3 * MIB, [tail]) == 2 * MIB + 123  # (short: the object ends)
    assert bytes(tail[:2 * MIB + 123]) == data[3 * MIB:]


def test_read_spans_fetches_every_span_with_at_most_gets_in_flight(s3, monkeypatch):
    import asyncio

    monkeypatch.setattr(object_reads, "GET_BYTES", MIB)
    path = ObjectPath(s3.url("spans") + "/obj")
    data = os.urandom(4 * MIB)
    path.write_bytes(data)
    get, flying, most = object_reads._get_into, [0], [0]

    async def counted(*args):
        flying[0] += 1
        most[0] = max(most[0], flying[0])
        await asyncio.sleep(0.01)
        try:
            return await get(*args)
        finally:
            flying[0] -= 1

    monkeypatch.setattr(object_reads, "_get_into", counted)
    spans = [(0, [bytearray(10), bytearray(20)]), (100, [bytearray(2 * MIB + 1)]), (4 * MIB - 5, [bytearray(9)])]
    assert path.read_spans(spans, gets=2) == [30, 2 * MIB + 1, 5]  # (the last is short: the object ends)
    assert bytes(spans[0][1][0] + spans[0][1][1]) == data[:30]
    assert bytes(spans[1][1][0]) == data[100:100 + 2 * MIB + 1]
    assert bytes(spans[2][1][0][:5]) == data[-5:]
    assert most[0] == 2  # (5 GETs, 2 at a time)


def test_a_failed_get_stops_the_others_before_read_spans_raises(s3, monkeypatch):
    """The views belong to the caller (a model's tensors): once read_spans has raised, no GET still in
    flight may write into them."""
    import asyncio
    import time

    monkeypatch.setattr(object_reads, "GET_BYTES", MIB)
    path = ObjectPath(s3.url("failing") + "/obj")
    path.write_bytes(os.urandom(3 * MIB))
    get = object_reads._get_into

    async def failing(fs, key, start, end, *args):
        if start == 0:
            await asyncio.sleep(0.05)
            raise OSError("connection reset")
        await asyncio.sleep(0.3)
        return await get(fs, key, start, end, *args)

    monkeypatch.setattr(object_reads, "_get_into", failing)
    views = [bytearray(3 * MIB)]
    with pytest.raises(OSError, match="connection reset"):
        path.read_spans([(0, views)], gets=3)
    time.sleep(0.5)
    assert not any(views[0])  # (the two slower GETs were cancelled, not left to land)


def test_a_get_is_read_into_place_as_it_arrives_not_copied_whole_first(s3):
    """A ranged GET's bytes go straight into the caller's views: the read's traced memory stays far
    under the GET's size (s3fs's cat_file would hold the whole range as one bytes, then copy it)."""
    import tracemalloc

    path = ObjectPath(s3.url("into") + "/obj")
    data = os.urandom(object_reads.GET_BYTES)
    path.write_bytes(data)
    views = [bytearray(5), memoryview(bytearray(len(data) - 5))]
    path.read_into(0, views[:1])  # (the client made, its first request's allocations done)
    tracemalloc.start()
    try:
        assert path.read_into(0, views) == len(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert bytes(views[0]) + bytes(views[1]) == data
    assert peak < len(data) // 4, peak


def test_a_get_whose_body_breaks_off_is_read_again_whole(s3, monkeypatch):
    """The connection drops after part of a GET's body arrived: the GET is sent again (as s3fs retries
    its reads) and the views hold the object's bytes, every one from the second answer onward."""
    from aiobotocore.response import AioStreamingBody
    from botocore.exceptions import ResponseStreamingError

    path = ObjectPath(s3.url("broken") + "/obj")
    data = os.urandom(3 * MIB + 11)
    path.write_bytes(data)
    real, calls = AioStreamingBody.readinto, []

    async def readinto(self, b):
        calls.append(id(self))
        if len(set(calls)) == 1 and len(calls) == 3:  # (the first GET: two reads landed, then it breaks)
            raise ResponseStreamingError(error="connection reset by peer")
        return await real(self, b)

    monkeypatch.setattr(AioStreamingBody, "readinto", readinto)
    view = bytearray(len(data))
    assert path.read_into(0, [view]) == len(data)
    assert bytes(view) == data and len(set(calls)) == 2


class _Sink:
    """A stream writer that only counts what a payload writes to it."""

    def __init__(self):
        self.nbytes = 0

    async def write(self, chunk, *_args, **_kwargs) -> None:
        self.nbytes += memoryview(chunk).nbytes


@pytest.mark.parametrize("retried_by,checksums", [("botocore", None), ("s3fs", None), ("s3fs", "when_supported")])
def test_a_part_whose_connection_drops_after_its_body_goes_again_whole(s3, monkeypatch, retried_by, checksums):
    """A part's request whose body went out (read as aiohttp reads a body) and whose connection then
    dropped is sent again, every byte of it: by botocore (which rewinds the body), or, with botocore's
    retries off (``AWS_MAX_ATTEMPTS=1``), by s3fs, which calls again with the same body object. The
    object is bit-exact; a body read from where the last attempt left it would go again short, or empty.
    Parts go as views of the writer's buffers (PartBody) whatever botocore's checksum setting: each
    carries its own CRC-32C, so botocore never wraps a body in a chunked stream of its own."""
    from aiobotocore.httpsession import AIOHTTPSession
    from aiohttp.payload import get_payload
    from botocore.exceptions import ConnectionClosedError

    from ucp.storage.multipart import PartBody

    if retried_by == "s3fs":
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    if checksums:
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", checksums)
    real, dropped, bodies = AIOHTTPSession.send, [], set()

    async def send(self, request):
        if request.method == "PUT" and "partNumber=" in request.url:
            bodies.add(type(request.body))
        if not dropped and request.method == "PUT" and "partNumber=" in request.url:
            sink = _Sink()
            dropped.append(sink)
            await get_payload(request.body).write(sink)
            raise ConnectionClosedError(endpoint_url=request.url)
        return await real(self, request)

    monkeypatch.setattr(AIOHTTPSession, "send", send)
    path = ObjectPath(s3.url("retry") + "/rank.bin")
    data = os.urandom(5 * MIB) * 2 + os.urandom(MIB + 3)
    with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB, concurrency=2) as w:
        w.write(data[:MIB + 1])  # (parts of copied and held bytes together)
        w.write_held(memoryview(data)[MIB + 1:])
    assert [sink.nbytes for sink in dropped] == [5 * MIB]  # (a part's whole body went out, then its connection dropped)
    assert path.read_bytes() == data
    assert path.stat().etag.strip('"').endswith("-3")
    assert bodies == {PartBody}


def _uploads_seen(fs) -> list[dict]:
    """The upload requests (PutObject, UploadPart) ``fs``'s client sends from now on, as they leave
    (signed): their payload hash, CRC-32C header and body type."""
    seen = []

    def record(request, **_):
        if request.method == "PUT" and "uploadId=" not in request.url or "partNumber=" in request.url:
            seen.append({"sha256": request.headers.get("X-Amz-Content-SHA256", b"").decode(),
                         "crc32c": (request.headers.get("x-amz-checksum-crc32c") or b"").decode(),
                         "body": type(request.body).__name__})

    fs.s3.meta.events.register("before-send.s3", record)
    return seen


def _crc32c_b64(data: bytes) -> str:
    import base64

    import crc32c

    return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()


@pytest.mark.parametrize("setting", [None, "when_supported"])
def test_over_plain_http_parts_are_signed_and_carry_a_crc32c_where_botocore_would_add_one(s3, monkeypatch,
                                                                                           setting):
    """Over plain HTTP botocore signs every body (a SHA-256 payload hash), and ucp's client adds no
    checksum there (``when_required``): parts go without one. Where the user asks botocore for checksums
    (``when_supported``), each part and a small object's one PUT carries the CRC-32C of its bytes
    (``x-amz-checksum-crc32c``, checked by the store, in place of botocore's CRC32), and the object
    records it (a composite of its parts')."""
    if setting:
        monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", setting)
    else:
        monkeypatch.delenv("AWS_REQUEST_CHECKSUM_CALCULATION", raising=False)
    path = ObjectPath(s3.url("crc") + "/rank.bin")
    sync(path.fs.loop, path.fs.set_session)
    seen = _uploads_seen(path.fs)
    data = os.urandom(5 * MIB) * 2 + os.urandom(MIB + 5)
    with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB, concurrency=2) as w:
        w.write_held(data)
    small = ObjectPath(s3.url("crc") + "/small.bin")
    with MultipartWriter(small.fs, small.key, size=100) as w:
        w.write(data[:100])
    assert path.read_bytes() == data and small.read_bytes() == data[:100]
    parts = [data[:5 * MIB], data[5 * MIB:10 * MIB], data[10 * MIB:], data[:100]]
    assert all(len(r["sha256"]) == 64 and r["body"] == "PartBody" for r in seen), seen
    if setting is None:
        assert [r["crc32c"] for r in seen] == [""] * 4
        return
    assert [r["crc32c"] for r in seen] == [_crc32c_b64(b) for b in parts]
    bucket, key = path.key.split("/", 1)
    head = sync(path.fs.loop, path.fs._call_s3, "head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"].endswith("-3")  # (S3's composite checksum: of 3 parts)


def test_no_checksum_goes_with_a_part_where_the_environment_asks_for_none(s3_tls, monkeypatch):
    """``AWS_REQUEST_CHECKSUM_CALCULATION=when_required`` (the AWS SDKs' setting for a store that takes no
    flexible checksums), over HTTPS: parts and PUTs carry no CRC-32C, their bodies signed (SHA-256), still
    go as views, and the object is whole."""
    for name, value in s3_tls.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    s3 = s3_tls
    path = ObjectPath(s3.url("nocrc") + "/rank.bin")
    sync(path.fs.loop, path.fs.set_session)
    seen = _uploads_seen(path.fs)
    data = os.urandom(5 * MIB) + os.urandom(7)
    with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB) as w:
        w.write_held(data)
    small = ObjectPath(s3.url("nocrc") + "/small.bin")
    with MultipartWriter(small.fs, small.key, size=10) as w:
        w.write(data[:10])
    assert path.read_bytes() == data and small.read_bytes() == data[:10]
    assert [(r["crc32c"], r["body"]) for r in seen] == [("", "PartBody")] * 3
    assert all(len(r["sha256"]) == 64 for r in seen), seen


@pytest.mark.parametrize("server", ["s3", "s3_tls"])
@pytest.mark.parametrize("size", [20 * MIB, 1000])
def test_a_part_whose_crc32c_does_not_match_is_refused_and_nothing_appears(request, monkeypatch, size, server):
    """The store checks each part (or PUT) against the CRC-32C it carries: a mismatch fails the write,
    naming the object, and leaves neither an object nor an upload. Over HTTPS, where the body goes
    unsigned, the CRC-32C is what the store checks it by."""
    from ucp.storage import multipart

    store = request.getfixturevalue(server)
    for name, value in store.environ().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")  # (plain HTTP: asked for)
    monkeypatch.setattr(multipart, "part_checksum", lambda pieces: "AAAAAA==")  # (the CRC-32C of no bytes)
    path = ObjectPath(store.url("badcrc") + "/rank.bin")
    with pytest.raises(OSError) as info:
        with MultipartWriter(path.fs, path.key, size=size) as w:
            w.write_held(os.urandom(size))
    assert str(path) in str(info.value)
    assert not path.exists() and _uploads(path.fs, path.key) == []


def test_a_refused_upload_creation_says_how_to_turn_checksums_off(s3, monkeypatch):
    """A store that refuses the upload's creation (which asks for CRC-32C checksums) gets the one line
    with the AWS SDKs' switch for stores without flexible checksums; a refusal for want of permission
    does not."""
    from concurrent.futures import Future

    def refusing(error):
        def call(self, method, **kwargs):
            future = Future()
            future.set_exception(error if method == "create_multipart_upload" else AssertionError(method))
            return future
        return call

    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_supported")  # (plain HTTP: asked for)
    path = ObjectPath(s3.url("refused") + "/rank.bin")
    monkeypatch.setattr(MultipartWriter, "_call", refusing(OSError(22, "NotImplemented: ChecksumAlgorithm")))
    with pytest.raises(OSError, match="AWS_REQUEST_CHECKSUM_CALCULATION=when_required") as info:
        with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB) as w:
            w.write_held(bytes(5 * MIB))
    assert "NotImplemented" in str(info.value)
    monkeypatch.setattr(MultipartWriter, "_call", refusing(PermissionError(13, "Forbidden")))
    with pytest.raises(PermissionError) as info:
        with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB) as w:
            w.write_held(bytes(5 * MIB))
    assert "AWS_REQUEST_CHECKSUM_CALCULATION" not in str(info.value)


def test_gets_are_read_whole_then_copied_where_aiobotocore_cannot_read_into(s3, monkeypatch):
    """An aiobotocore before 2.23 has no ``readinto``: a load's GETs then go through s3fs's cat_file,
    bytes still exact."""
    monkeypatch.setattr(object_reads, "_reads_into", lambda: False)
    monkeypatch.setattr(object_reads, "_get_into", None)  # (not called)
    path = ObjectPath(s3.url("whole") + "/obj")
    data = os.urandom(MIB + 3)
    path.write_bytes(data)
    view = bytearray(len(data) + 10)
    assert path.read_into(0, [view]) == len(data) and bytes(view[:len(data)]) == data


@pytest.fixture(scope="module")
def s3_tls(tmp_path_factory):
    """A second local server, serving S3 over HTTPS (a self-signed certificate), as S3 is reached in
    production."""
    from tests.s3server import S3Server, require_weed

    require_weed()
    with S3Server(tmp_path_factory.mktemp("s3tls"), tls=True) as server:
        yield server


def test_over_https_a_part_with_its_crc32c_goes_unsigned_from_where_it_lies(s3_tls, monkeypatch):
    """Over HTTPS a part that carries its CRC-32C is signed without hashing its body
    (``UNSIGNED-PAYLOAD``, as the AWS SDKs send an upload with a checksum over TLS): the client spends one
    CRC-32C pass per byte, not a SHA-256, and the part still goes as views of the caller's memory.
    A Checkpointer round trip over HTTPS is bit-exact."""
    import torch

    import ucp

    for name, value in s3_tls.environ().items():
        monkeypatch.setenv(name, value)
    path = ObjectPath(s3_tls.url("tls") + "/rank.bin")
    sync(path.fs.loop, path.fs.set_session)
    seen = _uploads_seen(path.fs)
    data = os.urandom(5 * MIB) + os.urandom(MIB + 1)
    with MultipartWriter(path.fs, path.key, part_bytes=5 * MIB) as w:
        w.write_held(data)
    assert path.read_bytes() == data
    assert [(r["sha256"], r["body"]) for r in seen] == [("UNSIGNED-PAYLOAD", "PartBody")] * 2
    assert [r["crc32c"] for r in seen] == [_crc32c_b64(data[:5 * MIB]), _crc32c_b64(data[5 * MIB:])]

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    url = s3_tls.url("tlsrun")
    with ucp.Checkpointer(url, model=model) as ck:
        ck.save(1)
    fresh = torch.nn.Linear(256, 256)
    with ucp.Checkpointer(url, model=fresh) as ck:
        assert ck.load().step == 1
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)


def test_with_cache_regions_the_bucket_clients_uploads_go_unsigned_over_https(s3_tls, monkeypatch):
    """s3fs with ``cache_regions`` sends each bucket's requests through a client of the bucket's region,
    not its own: that client is the one asked whether parts carry their CRC-32C and given the hook."""
    import s3fs

    for name, value in s3_tls.environ().items():
        monkeypatch.setenv(name, value)
    plain = ObjectPath(s3_tls.url("regions") + "/rank.bin")
    fs = s3fs.S3FileSystem(cache_regions=True, skip_instance_cache=True, client_kwargs=plain.fs.client_kwargs,
                           config_kwargs=plain.fs.config_kwargs)
    fs.mkdir("regions")

    async def regional():  # what s3fs does for a bucket whose HEAD names another region (SeaweedFS names none)
        cache = fs._s3creator
        cache._buckets["regions"] = await cache._stack.enter_async_context(
            cache._session.create_client("s3", region_name="eu-north-1", **cache._client_kwargs))
        return await fs.get_s3("regions")

    bucket_client = sync(fs.loop, regional)
    assert bucket_client is not fs.s3  # (else this test would not tell the two apart)
    seen = []

    def record(request, **_):
        if "partNumber=" in request.url:
            seen.append(request.headers.get("X-Amz-Content-SHA256", b"").decode())

    bucket_client.meta.events.register("before-send.s3", record)
    data = os.urandom(5 * MIB + 7)
    with MultipartWriter(fs, "regions/rank.bin", part_bytes=5 * MIB) as w:
        w.write_held(data)
    assert fs.cat_file("regions/rank.bin") == data
    assert seen == ["UNSIGNED-PAYLOAD"] * 2
