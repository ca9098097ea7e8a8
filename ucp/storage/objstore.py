"""Checkpoints on object storage (S3 and its compatibles, any fsspec URL): :class:`ObjectPath`.

An object store has keys, not directories, and no rename: a checkpoint there is the objects under
``ROOT/step_<N>/``, written in place, and becomes visible by one last *conditional* write, its
``manifest.json`` created only if absent (S3's ``If-None-Match: *``); docs/format-checkpoint.md,
section 7. :class:`ObjectPath` gives the durable tier the few operations of :class:`pathlib.Path` it
uses (``/``, ``name``, ``parent``, ``exists``, ``is_file``, ``is_dir``, ``iterdir``, ``read_bytes``,
``stat``), plus ranged reads (:meth:`ObjectPath.read_range`: a loading rank GETs only the bytes it
needs), streamed writes and conditional ones; local paths stay :class:`~pathlib.Path` and keep
their code (fsync, rename, ``preadv``). It has no ``__fspath__``: an ``os`` call handed one fails
instead of writing a local file named after the URL.

Credentials and the endpoint come from the usual places (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``~/.aws``), read when a location is opened: a process that changes them
gets a client of the new ones (:func:`_in_effect`); s3fs is ucp's optional ``[s3]`` dependency.
"""

from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from ucp.errors import LocationError
from ucp.storage.location import is_url, local_path
from ucp.storage.multipart import MultipartWriter, as_oserror, checksum_setting
from ucp.storage.object_reads import GETS, read_objects


@dataclass(frozen=True)
class ObjectStat:
    """What :meth:`ObjectPath.stat` tells: the object's size, its version tag and its age."""

    st_size: int
    st_mtime: float
    etag: str


#: botocore's retries of every S3 request unless the environment sets them (``AWS_RETRY_MODE``,
#: ``AWS_MAX_ATTEMPTS``): throttling (SlowDown, 503) and transient errors (5xx, connection errors,
#: timeouts) retried up to 5 attempts with exponential backoff and jitter (1, 2, 4, 8 s at most),
#: s3fs adding its own retries of dropped connections; a request still failing after them fails
#: the save or load, in one line naming the object
RETRIES = {"mode": "standard", "max_attempts": 5}


def _options(protocol: str) -> dict:
    """fsspec options by protocol: s3fs must not answer from a cached listing (other ranks and jobs
    write under the same prefixes), retries as :data:`RETRIES` says, and the endpoint and
    credentials in effect now (:func:`_in_effect`)."""
    if protocol not in ("s3", "s3a"):
        return {}
    options = {"use_listings_cache": False, **_in_effect()}
    config = {}
    if "AWS_RETRY_MODE" not in os.environ and "AWS_MAX_ATTEMPTS" not in os.environ:
        config["retries"] = RETRIES
    plain = str(options.get("endpoint_url", "")).lower().startswith("http://")
    chosen = checksum_setting()
    if _botocore_knows("request_checksum_calculation"):
        if chosen:  # (the user's, passed on: a client made under another setting is another instance)
            config["request_checksum_calculation"] = chosen
        elif plain:
            # over plain HTTP botocore signs every payload with SHA-256 (SigV4): its default CRC32 of the
            # requests ucp sends no checksum with would be a second hash of their bytes
            config["request_checksum_calculation"] = "when_required"
    if config:
        options["config_kwargs"] = config
    return options


def _botocore_knows(option: str) -> bool:
    """Whether the installed botocore's ``Config`` takes ``option`` (older ones raise on one they
    do not know, at the client's creation)."""
    try:
        from botocore.config import Config
    except ImportError:
        return False
    return option in getattr(Config, "OPTION_DEFAULTS", {})


def _in_effect() -> dict:
    """The S3 endpoint and credentials the environment sets now, as s3fs options.

    fsspec keeps one file system instance per set of options (its instance cache), and an s3fs
    instance reads the environment once, when it is made: a process that changes ``AWS_ENDPOINT_URL``
    or the credentials after its first use would get the first instance, talking to the old endpoint
    as the old user. Passed as options, they are what botocore would read from the environment, and
    the cache tells them apart: ``AWS_ENDPOINT_URL_S3`` (else ``AWS_ENDPOINT_URL``, unless
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true), ``AWS_ACCESS_KEY_ID`` with
    ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), and ``AWS_PROFILE``. What is not set is left
    to botocore's own chain (``~/.aws``, instance roles)."""
    env = os.environ
    out = {}
    if env.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() != "true":
        endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if endpoint:
            out["endpoint_url"] = endpoint
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        out.update(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"])
        if env.get("AWS_SESSION_TOKEN"):
            out["token"] = env["AWS_SESSION_TOKEN"]
    if env.get("AWS_PROFILE"):
        out["profile"] = env["AWS_PROFILE"]
    return out


#: an incomplete multipart upload under a root's step prefixes that shows no activity (neither its
#: creation nor its newest part) for this many seconds is an orphan, aborted by the next commit's
#: retention (format rule 33): a writer killed mid-upload left it. A live upload adds a part every
#: few seconds (8 MiB parts; a part over 15 minutes would need a link under 20 KB/s)
ORPHAN_AFTER = 900.0
#: the keys (below a root) whose incomplete uploads a root's writer owns: its checkpoints' objects
_STEP_KEY = re.compile(r"step_\d+/")


def _filesystem(url: str):
    """``(fsspec file system, path without the protocol)`` of ``url``; the instance caches no
    listing (other ranks and jobs write the same prefixes), and is the one of the endpoint and
    credentials in effect now (:func:`_in_effect`)."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **_options(url.split("://", 1)[0]))
    except ImportError as e:
        raise LocationError(f"{url}: ucp reaches this URL through fsspec, and {e} (for s3://: pip install "
                            "'ucp[s3]', which installs s3fs)") from None
    except (ValueError, TypeError) as e:
        raise LocationError(f"{url}: fsspec cannot open this URL ({e})") from None
    return fs, path.rstrip("/")


def _io(method):
    """``method`` of an :class:`ObjectPath` with the S3 client's errors raised as OSErrors naming it
    (:func:`~ucp.storage.multipart.as_oserror`)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with as_oserror(str(self)):
            return method(self, *args, **kwargs)
    return run


class ObjectPath:
    """A key prefix (a "directory") or a key on an object store; see the module's docstring.

    Args:
        url: ``scheme://bucket/prefix``.
    """

    def __init__(self, url: str, _fs=None, _path: str | None = None):
        if _fs is None:
            _fs, _path = _filesystem(url)
        self.fs, self.key = _fs, _path
        self.protocol = url.split("://", 1)[0]

    # -- naming ------------------------------------------------------------------------------

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectPath) and str(other) == str(self)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other) -> bool:
        return str(self) < str(other)

    def __truediv__(self, name: str) -> "ObjectPath":
        return ObjectPath(f"{self}/{name}", self.fs, f"{self.key}/{name}")

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "ObjectPath":
        up = self.key.rsplit("/", 1)[0]
        return ObjectPath(f"{self.protocol}://{up}", self.fs, up)

    def resolve(self) -> "ObjectPath":
        return self

    # -- reading -----------------------------------------------------------------------------

    @_io
    def exists(self) -> bool:
        return self.fs.exists(self.key)

    @_io
    def is_file(self) -> bool:
        return self.fs.isfile(self.key)

    @_io
    def is_dir(self) -> bool:
        return self.fs.isdir(self.key)

    @_io
    def iterdir(self) -> list["ObjectPath"]:
        """The objects and prefixes right under this prefix (none when there is none)."""
        try:
            names = self.fs.ls(self.key, detail=False)
        except FileNotFoundError:
            return []
        return [self / n.rstrip("/").rsplit("/", 1)[-1] for n in names if n.rstrip("/") != self.key]

    def _objects(self) -> dict[str, dict]:
        """``{name: listing entry}`` of the objects right under this prefix, in one listing (S3: a LIST
        per 1,000 objects; none when there is none; a prefix below it is not listed)."""
        try:
            found = self.fs.ls(self.key, detail=True)
        except FileNotFoundError:
            return {}
        return {info["name"].rstrip("/").rsplit("/", 1)[-1]: info
                for info in found if info.get("type") != "directory" and info["name"].rstrip("/") != self.key}

    @_io
    def versions(self) -> dict[str, str]:
        """``{name: version}`` of the objects right under this prefix, in one listing: the version tag
        (ETag), or where the store has none (fsspec's ``memory://``) the size and time of the object's
        creation."""
        return {name: str(info.get("ETag") or info.get("etag") or f"{info.get('size')}@{info.get('created')}")
                for name, info in self._objects().items()}

    @_io
    def sizes(self) -> dict[str, int]:
        """``{name: size in bytes}`` of the objects right under this prefix, in one listing, not a
        HEAD per object."""
        return {name: int(info["size"]) for name, info in self._objects().items()}

    @_io
    def stat(self) -> ObjectStat:
        """Size, age and version tag of the object (:class:`FileNotFoundError` when there is none)."""
        info = self.fs.info(self.key)
        if info.get("type") == "directory":
            raise FileNotFoundError(f"{self}: a prefix, not an object")
        modified = info.get("LastModified") or info.get("mtime") or info.get("created") or 0
        when = modified.timestamp() if hasattr(modified, "timestamp") else float(modified)
        return ObjectStat(int(info["size"]), when, str(info.get("ETag") or info.get("etag") or ""))

    @_io
    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.key)

    @_io
    def read_range(self, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the object, in one ranged GET (fewer at its end)."""
        if end <= start:
            return b""
        return self.fs.cat_file(self.key, start=start, end=end)

    @_io
    def read_into(self, offset: int, views: list) -> int:
        """Fill ``views`` (buffers) in order with the object's bytes from ``offset``; the count of
        bytes the object had (fewer at its end). A read over
        :data:`~ucp.storage.object_reads.GET_BYTES` is ranged GETs of that size,
        :data:`~ucp.storage.object_reads.GETS` in flight at once (on an asynchronous file system,
        s3fs), each read into place as its bytes arrive: one connection's speed does not bound a large
        fragment's read, and no memory of the read's size is held besides the views (on S3; another
        asynchronous file system's GETs are held whole, ``GETS * GET_BYTES`` at most, then copied).
        The range must start inside the object."""
        return self.read_spans([(offset, views)])[0]

    @_io
    def read_spans(self, spans: list, gets: int = GETS) -> list[int]:
        """Fill the ``views`` of each ``(offset, views)`` of ``spans`` as :meth:`read_into` does, all
        the spans' ranged GETs (of at most :data:`~ucp.storage.object_reads.GET_BYTES`) ``gets`` in
        flight at once: many small reads cost about one round trip, not one each. The count of bytes
        each span had."""
        return read_objects([(self, spans)], gets)[0]

    # -- writing -----------------------------------------------------------------------------

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to make: a prefix exists while an object is under it."""

    def open_write(self, size: int | None = None):
        """A binary file object writing the object, streamed; the object appears whole when it is
        closed, never in part, and not at all if the ``with`` block that writes it raises. On S3 a
        :class:`~ucp.storage.multipart.MultipartWriter` (parts uploaded concurrently, in bounded
        memory; ``size``, the object's size when known, chooses the part size); elsewhere the file
        system's own."""
        if hasattr(self.fs, "_call_s3"):
            with as_oserror(str(self)):
                return MultipartWriter(self.fs, self.key, size=size)
        return self.fs.open(self.key, "wb")

    @_io
    def write_bytes(self, data: bytes) -> None:
        self.fs.pipe_file(self.key, bytes(data))

    @_io
    def create(self, data: bytes) -> bool:
        """Write the object iff there is none (a conditional PUT, ``If-None-Match: *``): whether this
        call created it. The one operation that publishes (a manifest) or takes (a lease) on an
        object store.

        Raises:
            OSError: the store refused for another reason.
        """
        data = bytes(data)
        try:
            self.fs.pipe_file(self.key, data, mode="create")
            return True
        except OSError:  # (s3fs reports a failed precondition as FileExistsError or, from some servers, EINVAL)
            try:
                there = self.fs.cat_file(self.key)
            except FileNotFoundError:
                raise  # (the original error: the write failed, and nothing is there)
            return there == data  # (ours: a retried PUT whose first try had landed, its answer lost)

    @_io
    def replace_if(self, version: str, data: bytes | None) -> bool:
        """Overwrite the object with ``data`` (None: delete it) iff its version tag is still
        ``version`` (S3's ``If-Match``): whether it was done. The lease's heartbeat, takeover and
        release (:mod:`ucp.storage.object_lease`). A store without conditional writes (fsspec's
        memory file system, in tests) compares, then writes: not atomic.

        Raises:
            OSError: the store refused for another reason.
        """
        call = getattr(self.fs, "_call_s3", None)
        if call is None:
            try:
                if self.stat().etag != version:
                    return False
            except FileNotFoundError:
                return False
            if data is None:
                self.unlink(missing_ok=True)
            else:
                self.write_bytes(data)
            return True
        from fsspec.asyn import sync

        bucket, key = self.key.split("/", 1)
        try:
            if data is None:
                sync(self.fs.loop, call, "delete_object", Bucket=bucket, Key=key, IfMatch=version)
            else:
                sync(self.fs.loop, call, "put_object", Bucket=bucket, Key=key, Body=bytes(data), IfMatch=version)
            return True
        except OSError:
            try:
                changed = self.stat().etag != version
            except FileNotFoundError:
                changed = True
            if changed:
                return False  # (the precondition failed: someone else's version is there, or none)
            raise

    @_io
    def abort_orphan_uploads(self, idle: float | None = None) -> list[str]:
        """Abort the incomplete multipart uploads of this root's checkpoint objects (keys
        ``step_<N>/...`` below this prefix) idle for ``idle`` seconds (None: :data:`ORPHAN_AFTER`):
        neither created nor given a part since, by the store's clock compared with this host's (as
        the lease's heartbeat is; format rule 33).
        A writer killed mid-upload leaves one (its parts cost storage and no reader ever sees them);
        an upload in progress is never idle that long, and one that completes or is aborted meanwhile
        is left alone. The URLs of the objects whose uploads were aborted; none on a store without
        multipart uploads (not S3).

        Raises:
            OSError: the store refused a listing or an abort.
        """
        call = getattr(self.fs, "_call_s3", None)
        if call is None:
            return []
        from fsspec.asyn import sync

        idle = ORPHAN_AFTER if idle is None else idle
        bucket, _, base = self.key.partition("/")
        prefix = f"{base}/" if base else ""

        def request(method: str, **kwargs):
            return sync(self.fs.loop, call, method, Bucket=bucket, **kwargs)

        found, marker = [], {}
        while True:
            page = request("list_multipart_uploads", Prefix=prefix + "step_", **marker)
            found += [u for u in page.get("Uploads", []) if _STEP_KEY.match(u["Key"][len(prefix):])]
            if not page.get("IsTruncated") or not page.get("NextKeyMarker"):
                break
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page.get("NextUploadIdMarker", "")}
        aborted = []
        for upload in found:
            key, upload_id = upload["Key"], upload["UploadId"]
            try:
                if (time.time() - upload["Initiated"].timestamp() < idle  # (young: no need to list its parts)
                        or time.time() - _last_activity(request, key, upload_id, upload["Initiated"]) < idle):
                    continue
                request("abort_multipart_upload", Key=key, UploadId=upload_id)
            except FileNotFoundError:
                continue  # (completed or aborted since the listing)
            aborted.append(f"{self.protocol}://{bucket}/{key}")
        return aborted

    def __reduce__(self):
        return ObjectPath, (str(self),)  # (sent between ranks by its URL: each opens its own file system)

    @_io
    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    @_io
    def remove_tree(self) -> None:
        """Delete every object under this prefix (best effort: a vanished object is no error)."""
        try:
            keys = [k for k, info in self.fs.find(self.key, detail=True, withdirs=False).items()
                    if info.get("type") != "directory"]
        except FileNotFoundError:
            return
        if keys:
            self.fs.rm(keys)

    @_io
    def copy_tree(self, dest: "ObjectPath") -> None:
        """Copy every object under this prefix to the same names under ``dest`` (server-side)."""
        for key, info in self.fs.find(self.key, detail=True, withdirs=False).items():
            if info.get("type") != "directory":
                self.fs.copy(key, dest.key + key[len(self.key):])


def _last_activity(request, key: str, upload_id: str, initiated) -> float:
    """The time of the newest event of an incomplete upload: its creation or its newest part."""
    newest, marker = initiated.timestamp(), {}
    while True:
        page = request("list_parts", Key=key, UploadId=upload_id, **marker)
        for part in page.get("Parts", []):
            newest = max(newest, part["LastModified"].timestamp())
        if not page.get("IsTruncated") or not page.get("NextPartNumberMarker"):
            return newest
        marker = {"PartNumberMarker": page["NextPartNumberMarker"]}


def as_location(where) -> Path | ObjectPath:
    """A checkpoint location: an :class:`ObjectPath` for a URL (``s3://bucket/run``), an ObjectPath
    as it is, else a local path (``file://`` stripped; a ``Path`` made of a URL refused, see
    :func:`~ucp.storage.location.local_path`)."""
    if isinstance(where, ObjectPath):
        return where
    if is_url(where):
        return ObjectPath(where)
    return local_path(where, "ucp")


def is_object(where) -> bool:
    """Whether ``where`` is on an object store (an :class:`ObjectPath`)."""
    return isinstance(where, ObjectPath)
