"""``convert``: a distributed checkpoint into a universal one, streaming, in parallel, atomically.

Each tensor key is one task: its universal array is assembled in a buffer carved from one arena
(allocated once, so memory stays bounded by the arena and pages are faulted in once), filled by
reading each source fragment straight into the array positions its plan gives, its checksum
verified on the way, and written out as one zarr shard. Tasks run on a thread pool, largest first;
a task waits for arena space, so peak memory is the arena plus a chunk buffer per worker. Each
array's ``zarr.json`` is written after its shard, recording the chunks' CRC-32C the writer returned.

Before any memory is sized from the source's declared tensor sizes, every fragment's byte range is
checked against the actual size of its file (one ``stat`` each): a manifest declaring more bytes
than the files hold is refused in one line naming the file, instead of allocating for it.

The output is staged in a hidden sibling directory and renamed into place when complete (every
file fsynced first): a killed conversion leaves no DST at all, never a half-valid one.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ucp import __version__
from ucp.codecs.checksum import crc32c
from ucp.convert.foreign import IMPORTERS, SOURCES
from ucp.convert.foreign.source import SourceRecord
from ucp.errors import CheckpointDeletedError, CorruptCheckpointError, OptionsError
from ucp.format.dtypes import itemsize
from ucp.format.fragment import fragments_to_parquet
from ucp.format.keys import MODEL, parse_key
from ucp.format.manifest import Manifest
from ucp.format.universal import (
    COMPRESSORS,
    DEFAULT_CHUNK_BYTES,
    ArrayMeta,
    UniversalHeader,
    array_path,
    chunk_shape,
    stored_dtype,
    universal_shape,
)
from ucp.lang.apply import apply_spec, merge_patterns
from ucp.lang.indices import place_manifest
from ucp.plan.consolidate import Source, TensorPlan, consolidate_plan, source_runs
from ucp.storage import directory as store
from ucp.storage.arena import Arena
from ucp.storage.fragment_files import FragmentFiles
from ucp.storage.manifest_io import read_manifest
from ucp.storage.location import is_url, local_path
from ucp.storage.staging import Staging, UrlTarget
from ucp.storage.universal_io import FRAGMENT_TABLE, ZARR_JSON, create_groups, header_document, put_array, shard_rel

#: runs shorter than this (bytes) are gathered through a temporary box instead of one read each
_MIN_RUN = 64 << 10


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion did: the ``--json`` summary."""

    src: str
    dst: str
    step: int
    tensors: int
    nbytes: int
    source_bytes: int
    files: int
    seconds: float
    memory_bytes: int

    @property
    def gbps(self) -> float:
        return self.source_bytes / self.seconds / 1e9 if self.seconds else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "gbps": round(self.gbps, 3)}


def convert(src, dst, spec: str | Path | None = None, *, step: int | None = None, workers: int = 4,
            compressor: str = "none", chunk_bytes: int = DEFAULT_CHUNK_BYTES, memory_limit: int | None = None,
            progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None,
            fsync: bool = True, source: str = "ucp", settings: dict[str, int] | None = None) -> ConvertResult:
    """Convert the distributed checkpoint ``src`` into the universal checkpoint ``dst``.

    Args:
        src: a checkpoint directory, or a root (its newest checkpoint, or ``step``); with
            ``source="hf"``, a Hugging Face model directory or ``.safetensors`` file.
        dst: the universal checkpoint to create; must not exist.
        spec: a UCL file (or the name of a packaged spec, ``megatron-gpt`` / ``megatron-llama``) whose
            rules complete the recorded geometry (fused parts, padding) or, for a tensor-parallel
            DeepSpeed save, say how each parameter was split; its export rules are kept for
            ``ucp export``.
        workers: tensors converted at once.
        compressor: ``none`` or ``zstd`` for every chunk.
        chunk_bytes: about how many bytes an inner chunk holds.
        memory_limit: bytes of buffer memory; default twice the largest tensor (at least what
            the largest tensor needs).
        progress: called with byte counts as arrays are written; ``total`` once with the sum.
        fsync: make the result durable before it becomes visible (turn off only for tests).
        source: the format of ``src``: ``"ucp"`` (a ucp distributed checkpoint), ``"hf"``
            (Hugging Face safetensors weights), ``"dcp"`` (a torch.distributed.checkpoint
            directory) or ``"deepspeed"`` (a DeepSpeed ZeRO-1/2/3 save; docs/foreign.md). Foreign
            files carry no checksums: each fragment's CRC-32C is computed while it is read and
            recorded in the fragment table.
        settings: model settings the spec's rules name (``{"vocab": 50257}``), over those in the
            spec and, for a DeepSpeed save, those read from it.

    Returns:
        A :class:`ConvertResult`.

    Raises:
        CheckpointNotFoundError: ``src`` holds no complete checkpoint.
        OptionsError: ``dst`` exists, or an option is out of range.
        UclError: the spec is malformed or contradicts the checkpoint.
        CorruptCheckpointError: a source fragment fails its checksum (named with file and key), or
            lies past the end of its file or over another fragment's bytes (named with the file).
        CheckpointDeletedError: the checkpoint of ``step`` was deleted (by retention) while it was
            read. Without ``step``, a ucp checkpoint deleted meanwhile is not an error: the newest
            one is found again and converted (:data:`DELETED_RETRIES` times at most).
    """
    for attempt in range(DELETED_RETRIES + 1):
        try:
            return _convert_once(src, dst, spec, step, workers, compressor, chunk_bytes, memory_limit, progress,
                                 total, fsync, source, settings)
        except CheckpointDeletedError:
            if step is not None or source != "ucp" or attempt == DELETED_RETRIES:
                raise  # (the step asked for is gone: no other checkpoint is what was asked for)
    raise AssertionError("unreachable")


DELETED_RETRIES = 3
"""How many times :func:`convert` of the newest checkpoint starts over when retention deletes it."""


def _convert_once(src, dst, spec, step, workers, compressor, chunk_bytes, memory_limit, progress, total, fsync,
                  source, settings) -> ConvertResult:
    """One attempt of :func:`convert` (its arguments, positionally)."""
    t0 = time.perf_counter()
    _check_options(workers, compressor, chunk_bytes, memory_limit)
    record = _source(source, src, step, spec, settings)
    path, manifest, facts = record.path, record.manifest, record.facts
    if record.decode is None:
        check_fragment_extents(path, manifest, committed=record.verify)
    target = _target(dst, fsync)
    if record.spec_applied:
        spec_text, patterns = record.spec_text, {}  # (the importer made the manifest's patterns)
    else:
        spec_text, patterns, manifest = _spec_patterns(spec, manifest, settings)
    plans, arrays = _plans(manifest, patterns, compressor, chunk_bytes)
    largest = max((arrays[k].nbytes for k in plans), default=0)
    arena_size = memory_limit if memory_limit is not None else 2 * largest
    if largest > arena_size:
        raise OptionsError(f"memory_limit={memory_limit} is below the {largest} bytes of the largest tensor; raise it")
    needs = {k: _need(p, arrays[k], arena_size) for k, p in plans.items()}
    if total is not None:
        total(sum(a.nbytes for a in arrays.values()))

    with target as out:
        create_groups(out.put, arrays.values())
        arena = Arena(min(arena_size, sum(needs.values())))
        with _Source(record) as files:
            # (each array's metadata, checksum filled in, once its shard is written: the header records it)
            arrays = _run_tasks(plans, arrays, needs, arena, files, out, compressor, workers, progress)
        fragments = manifest.fragments if record.verify else tuple(replace(f, crc32c=files.crcs.get(f, 0)) for f in manifest.fragments)
        table = fragments_to_parquet(fragments)
        out.put(FRAGMENT_TABLE, table)
        header = UniversalHeader(
            step=manifest.step, source_layout=manifest.layout, tensors=arrays, state=manifest.state, source=facts,
            fragment_table={"file": FRAGMENT_TABLE, "crc32c": crc32c(table), "rows": len(manifest.fragments)},
            spec=spec_text, created_by=f"ucp {__version__}")
        header.validate()
        target.commit((ZARR_JSON, header_document(header)))
    nfiles = target.files
    return ConvertResult(str(path), str(dst), manifest.step, len(arrays), sum(a.nbytes for a in arrays.values()),
                         manifest.nbytes, nfiles, time.perf_counter() - t0, arena.size)


def check_fragment_extents(directory: Path, manifest: Manifest, committed: bool = False) -> None:
    """Refuse fragments whose byte ranges the files on disk cannot hold: each must end within its
    file's actual size, and no two of one file may share bytes (so the tensors declared hold at most
    the bytes the files hold, whatever a manifest says). One ``stat`` per file; ``committed``: the
    manifest is a ucp checkpoint's, so a file missing with ``manifest.json`` gone too is a checkpoint
    deleted while read (:class:`FragmentFiles` tells them apart).

    Raises:
        CorruptCheckpointError: naming the file, the fragment and its byte range.
    """
    files = FragmentFiles(directory, manifest=manifest if committed else None)
    by_file: dict = {}
    for f in manifest.fragments:
        by_file.setdefault(f.file, []).append(f)
    for name, frags in by_file.items():
        file = directory / name
        size = files.size(name)
        end, last = 0, None
        for f in sorted((f for f in frags if f.length), key=lambda f: f.offset):
            if f.offset + f.length > size:
                raise CorruptCheckpointError(
                    f"{file}: the fragment of {f.key} at bytes [{f.offset}, {f.offset + f.length}) lies past the end "
                    f"of the file ({size} bytes); the file is truncated or the manifest is not its own")
            if f.offset < end:
                raise CorruptCheckpointError(
                    f"{file}: the fragments of {last.key} and {f.key} share bytes "
                    f"[{f.offset}, {min(end, f.offset + f.length)}); the manifest is not this checkpoint's")
            end, last = f.offset + f.length, f


def _source(source: str, src, step: int | None, spec, settings: dict | None) -> SourceRecord:
    """``src`` described for conversion: a ucp checkpoint (the newest complete one, or ``step``, under a
    root), or a foreign one through its importer."""
    if source == "ucp":  # (a local path, or a URL: read by ranged GETs)
        path = store.resolve(src, step)
        manifest = read_manifest(path)
        facts = {"format": "ucp.checkpoint", "format_version": manifest.format_version,
                 "path": str(path.resolve()), "created_by": manifest.created_by}
        return SourceRecord(path, manifest, facts, verify=True)
    src = local_path(src, f"convert --from {source}")
    if source not in IMPORTERS:
        raise OptionsError(f"source={source!r}: use one of {', '.join(SOURCES)}")
    return IMPORTERS[source](src, step, spec, settings)


def _target(dst, fsync: bool):
    """Where the result is built: a local staging directory, or an fsspec URL written in place."""
    if is_url(dst):
        def committed(data: bytes) -> bool:
            return b'"ucp"' in data
        return UrlTarget(dst, ZARR_JSON, committed)
    return Staging(local_path(dst, "convert"), fsync=fsync)


def _check_options(workers, compressor, chunk_bytes, memory_limit) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise OptionsError(f"workers={workers!r}: use an integer from 1 to 64")
    if compressor not in COMPRESSORS:
        raise OptionsError(f"compressor={compressor!r}: use one of {', '.join(COMPRESSORS)}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1024:
        raise OptionsError(f"chunk_bytes={chunk_bytes!r}: use an integer of at least 1024 (1 MiB suits most tensors)")
    if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit < 1):
        raise OptionsError(f"memory_limit={memory_limit!r}: use a positive number of bytes, or None")


def _spec_patterns(spec, manifest: Manifest, settings: dict | None):
    """The spec's text, ``{tensor key: pattern}`` after applying it and the manifest with the tensors of
    its ``expert()`` / ``stage()`` rules under their global names (None, {}, ``manifest`` without a spec)."""
    if spec is None:
        return None, {}, manifest
    checked, text = apply_spec(spec, manifest.layout, settings)
    manifest = place_manifest(checked, manifest)
    params = {parse_key(k).name: (m.shape, m.pattern) for k, m in manifest.tensors.items() if k.startswith(MODEL + "/")}
    merged = merge_patterns(checked, params)
    out = {}
    for key, meta in manifest.tensors.items():
        fqn = parse_key(key).name
        if fqn in merged and parse_key(key).kind != "extra" and meta.shape == params[fqn][0]:
            p = merged[fqn]
            out[key] = type(p)(meta.pattern.shards, meta.pattern.flat, p.fused, p.pad)
    return text, out, manifest


def _plans(manifest: Manifest, patterns: dict, compressor: str, chunk_bytes: int):
    by_key: dict[str, list] = {}
    for f in manifest.fragments:
        by_key.setdefault(f.key, []).append(f)
    plans, arrays = {}, {}
    for key, meta in manifest.tensors.items():
        if key in patterns:
            meta = type(meta)(meta.shape, meta.dtype, patterns[key])
            meta.pattern.validate(meta.shape, manifest.layout.names, key)
        shape = universal_shape(meta.shape, meta.pattern)
        plans[key] = consolidate_plan(key, meta, by_key.get(key, []), manifest.layout, shape)
        arrays[key] = ArrayMeta(array_path(key), shape, meta.dtype,
                                chunk_shape(shape, itemsize(stored_dtype(meta.dtype)), chunk_bytes), meta.pattern, compressor)
    return plans, arrays


def _gathered(runs: np.ndarray, item: int) -> bool:
    """Whether a source with these ``source_runs`` goes through a temporary box (its runs are too
    short to read one by one)."""
    return len(runs) > 1 and float(runs[:, 2].mean()) * item < _MIN_RUN


def _need(plan: TensorPlan, meta: ArrayMeta, budget: int) -> int:
    """Arena bytes a tensor's task takes: its array, plus the largest box it gathers through when
    that fits the budget (otherwise short runs are read one by one)."""
    temp = max((s.box.numel * itemsize(meta.dtype) for s in plan.sources if _gathered(source_runs(s, plan.shape), itemsize(meta.dtype))), default=0)
    return meta.nbytes + temp if meta.nbytes + temp <= budget else meta.nbytes


class _Source:
    """The source checkpoint's fragments, read through :class:`~ucp.storage.fragment_files.FragmentFiles`
    from any thread (every data file opened at once: a missing one fails before any work). Without
    ``record.verify`` (foreign files, which carry no checksums), the CRC-32C computed of each fragment
    read is kept in ``crcs`` instead of being checked; ``record.decode`` (fragment -> its bytes, or None
    when they lie raw in its file) serves sources whose files are not raw."""

    def __init__(self, record: SourceRecord):
        self.files = FragmentFiles(record.path, sorted({f.file for f in record.manifest.fragments}),
                                   record.manifest if record.verify else None)  # (sizes, headers checked)
        self.verify = record.verify
        self.decode = record.decode
        self.crcs: dict = {}  # fragment -> its CRC-32C, as read (verify off)

    def __enter__(self) -> "_Source":
        return self

    def __exit__(self, *exc) -> None:
        self.files.close()

    def read(self, frag, views: list) -> None:
        """Read ``frag``'s bytes, in order, into ``views``; its CRC-32C checked (or kept)."""
        if self.decode is not None and _read_decoded(self, frag, views):
            return
        crc = self.files.read(frag, views, self.verify)
        if not self.verify:
            self.crcs[frag] = crc


def _run_tasks(plans, arrays, needs, arena: Arena, files: _Source, out, compressor: str, workers: int,
               progress) -> dict:
    """Assemble, write and describe every array; returns ``arrays`` with their metadata checksums."""
    order = sorted(plans, key=lambda k: needs[k], reverse=True)
    lock = threading.Lock()
    failed = threading.Event()
    written: dict = {}

    def task(key: str) -> None:
        if failed.is_set():
            return
        plan, meta = plans[key], arrays[key]
        offset, view = arena.take(needs[key])
        try:
            data = np.frombuffer(view, dtype=np.uint8)
            array = data[:meta.nbytes].view(np.dtype(meta.stored_dtype)).reshape(meta.shape)
            temp = data[meta.nbytes:]
            for source in plan.sources:
                if failed.is_set():
                    return
                _fill(source, plan, array, temp, files)
            shard = out.write_shard(shard_rel(meta), array, meta.chunks, compressor)
        finally:
            arena.give_back(offset, needs[key])
        crcs = shard.chunk_crc32c if array.size else ()
        described = put_array(out.put, key, meta, crcs)
        with lock:
            written[key] = described
        if progress is not None:
            with lock:
                progress(meta.nbytes)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ucp-convert")
    try:
        futures = [pool.submit(task, k) for k in order]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                raise f.exception()
    except BaseException:  # a failed task, or Ctrl-C: queued tasks never start, running ones finish
        failed.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return {k: written[k] for k in arrays}


def _fill(source: Source, plan: TensorPlan, array: np.ndarray, temp: np.ndarray, files: _Source) -> None:
    """Read every fragment of ``source`` into its places in ``array``, verifying each checksum."""
    item = array.dtype.itemsize
    flat = array.reshape(-1).view(np.uint8)
    runs = source_runs(source, plan.shape)
    if _gathered(runs, item) and temp.nbytes >= source.box.numel * item:
        box = temp[:source.box.numel * item]
        for frag in source.fragments:
            start = frag.flat.start * item if frag.flat is not None else 0
            files.read(frag, [memoryview(box[start:start + frag.length])])
        boxed = box.view(array.dtype).reshape(source.box.sizes)
        for p in source.pieces:
            array[p.dst] = boxed[p.src]
        return
    runs = runs * item  # (box byte start, array byte start, byte length)
    for frag in source.fragments:
        lo = frag.flat.start * item if frag.flat is not None else 0
        hi = lo + frag.length
        views, pos = [], lo
        first = int(np.searchsorted(runs[:, 0] + runs[:, 2], lo, side="right"))
        for b, a, n in runs[first:]:
            if b >= hi:
                break
            b0, b1 = max(b, lo), min(b + n, hi)
            if b0 > pos:
                views.append(bytearray(b0 - pos))  # bytes the universal array drops (padding)
            views.append(memoryview(flat[a + b0 - b:a + b1 - b]))
            pos = b1
        if pos < hi:
            views.append(bytearray(hi - pos))
        files.read(frag, views)


def _read_decoded(files: _Source, frag, views: list) -> bool:
    """``frag``'s bytes from the source's decoder, in order, into ``views``; their CRC-32C kept. False:
    the decoder has none for ``frag`` (its bytes lie in place in its file)."""
    data = files.decode(frag)
    if data is None:
        return False
    pos, crc = 0, 0
    for v in views:
        n = len(v) if isinstance(v, bytearray) else v.nbytes
        if isinstance(v, bytearray):
            v[:] = data[pos:pos + n].tobytes()
        else:
            np.frombuffer(v, np.uint8)[:] = data[pos:pos + n]
        crc = crc32c(data[pos:pos + n], crc)
        pos += n
    files.crcs[frag] = crc
    return True


