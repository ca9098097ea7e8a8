"""Readers of checkpoint bytes into destination tensors, every checksum verified.

:class:`FragmentReader` reads a distributed checkpoint's fragments (or an in-memory snapshot's,
whose files are the agent's segments): a fragment saved under the same layout straight into its
destination, another layout through the reshard planner, reading only the 64 KiB checksummed
blocks a destination needs. :class:`UniversalReader` reads a universal checkpoint's chunks. Both
fill pieces of the live state that the loader (:mod:`ucp.checkpoint.load`) planned.
"""

from __future__ import annotations

import functools
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ucp.codecs.turns import in_turns
from ucp.format.dtypes import dtype_name, itemsize
from ucp.format.manifest import TensorMeta
from ucp.format.universal import UniversalHeader
from ucp.plan.geometry import box_slices, byte_span, chunk_box, is_contiguous, needed_blocks, ravel
from ucp.plan.load_plan import FragmentIndex, ReadItem
from ucp.plan.reshard import chunk_pieces, reshard_plan, source_pieces, target_pieces
from ucp.plan.sources import Resolution, relocate, to_source
from ucp.state import pages
from ucp.state.capture import Piece
from ucp.state.staging import STAGE_BYTES, DeviceStaging
from ucp.state.tensors import torch_dtype
from ucp.storage.fragment_files import FragmentFiles
from ucp.storage.object_reads import GETS
from ucp.storage.universal_io import array_reader


@dataclass(frozen=True)
class UniversalSource:
    """A universal checkpoint seen through the loader's manifest interface."""

    path: Path
    header: UniversalHeader

    def __post_init__(self):
        object.__setattr__(self, "tensors", {k: TensorMeta(a.shape, a.dtype, a.pattern)
                                             for k, a in self.header.tensors.items()})

    @property
    def step(self) -> int:
        return self.header.step

    @property
    def layout(self):
        return self.header.source_layout

    @property
    def state(self) -> dict:
        return self.header.state


class UniversalReader:
    """Reads boxes of a universal checkpoint's arrays into destination tensors, chunk by chunk
    (every chunk's CRC-32C verified), touching only the chunks a box overlaps."""

    def __init__(self, source: UniversalSource):
        self.source = source
        self._lock = threading.Lock()
        self.nbytes = 0

    def read(self, piece: Piece, res: Resolution, target_layout=None) -> None:
        """Fill ``piece`` from the arrays ``res`` names."""
        only = res.slices[0]
        if len(res.slices) > 1 or only.dim is not None or _needs_reshard(piece):
            self._read_resharded(piece, res.slices, target_layout)
            return
        meta = self.source.header.tensors[only.key]
        dest = piece.data
        direct = dest.device.type == "cpu" and dest.is_contiguous()
        out = dest if direct else pages.empty(tuple(piece.box.sizes), dest.dtype)
        raw = out.reshape(-1).view(torch.uint8).numpy().view(np.dtype(meta.stored_dtype)).reshape(piece.box.sizes)
        with array_reader(self.source.path, only.key, meta) as reader:
            reader.read(box_slices(piece.box), out=raw)
        if not direct:
            with torch.no_grad():
                dest.copy_(out.view(dest.shape))
        with self._lock:
            self.nbytes += raw.nbytes

    def _read_resharded(self, piece: Piece, slices, target_layout) -> None:
        targets = target_pieces(piece.box, piece.flat, piece.meta.shape, piece.meta.pattern, target_layout)
        sources, metas = [], {}
        for s in slices:
            meta = metas[s.key] = self.source.header.tensors[s.key]
            wanted = [b for b in (to_source(t.universal, s) for t in targets if t.universal is not None) if b is not None]
            sources += relocate(_unique_chunks([c for b in wanted for c in chunk_pieces(meta.shape, meta.chunks, b)]), s)
        items = reshard_plan(sources, targets, piece.key)
        dtype = piece.data.dtype
        with ExitStack() as stack:
            opened = {k: stack.enter_context(array_reader(self.source.path, k, m)) for k, m in metas.items()}

            def fetch(ref):
                key, idx = ref
                reader, meta = opened[key], metas[key]
                chunk = reader.chunk(idx) if meta.shape else reader.read()
                data = torch.from_numpy(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).copy()).view(dtype)
                with self._lock:
                    self.nbytes += reader.chunk_nbytes
                return _chunk_cut(data, idx, meta)

            _fill_resharded(piece, items, targets, _cached(fetch))

    def close(self) -> None:
        pass


def _unique_chunks(pieces):
    """Chunk pieces overlapping several target regions, once each (by chunk and region)."""
    seen, out = set(), []
    for p in pieces:
        k = (p.ref, p.region)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def _cached(fetch):
    """``fetch`` memoized per source ref: the pieces of one chunk or fragment share one read."""
    cache: dict = {}

    def get(ref):
        if ref not in cache:
            cache[ref] = fetch(ref)
        return cache[ref]

    return get


def _chunk_cut(full: torch.Tensor, idx, meta) -> torch.Tensor:
    """A chunk's data cut to the array: chunk pieces' sub-boxes are the chunk cut to the array
    (edge chunks), while a chunk is stored whole."""
    if not meta.shape:
        return full
    cut = tuple(slice(0, n) for n in chunk_box(meta.shape, meta.chunks, idx).sizes)
    return full.view(meta.chunks)[cut].contiguous().reshape(-1)


def _needs_reshard(piece: Piece) -> bool:
    """Whether a target piece cannot be cut from the universal arrays as a plain box."""
    pat = piece.meta.pattern
    return piece.flat is not None or pat.fused is not None or pat.pad is not None


def _fill_resharded(piece: Piece, items, targets, fetch) -> None:
    """Copy every planned item into ``piece``'s local tensor and zero the padding it holds.

    ``fetch(ref)`` returns the source's data for ``ref`` as a flat tensor (verified); each item's
    source sub-box lies row-major from ``sub.offset`` in it.
    """
    dest = piece.data
    # (with nothing to gather, e.g. a GPU's runs read through staging after this, only padding is zeroed, in place)
    direct = dest.is_contiguous() and (dest.device.type == "cpu" or not items)
    out = dest if direct else pages.empty(dest.shape, dest.dtype)
    flat = out.reshape(-1)
    with torch.no_grad():
        for t in targets:
            if t.universal is None:  # padding the target layout adds (e.g. vocabulary rows): zeros
                view = flat[t.sub.offset:t.sub.offset + t.sub.box.numel].view(t.sub.box.sizes)
                view[box_slices(t.region)].zero_()
        if out.is_cuda and any(t.universal is None for t in targets):  # (zeroed before the load returns, as a
            torch.cuda.current_stream(out.device).synchronize()        # copy from the host would have been)
        by_ref: dict = {}
        for item in items:
            by_ref.setdefault(item.source.ref, []).append(item)
        for group in by_ref.values():
            data = fetch(group[0].source.ref)
            for item in group:
                sp, tp = item.source, item.target
                src = data[sp.sub.offset:sp.sub.offset + sp.sub.box.numel].view(sp.sub.box.sizes)
                dst = flat[tp.sub.offset:tp.sub.offset + tp.sub.box.numel].view(tp.sub.box.sizes)
                dst[box_slices(item.dst)].copy_(src[box_slices(item.src)])
        if not direct:
            dest.copy_(out)


def resharded_items(piece: Piece, slices, index: FragmentIndex, manifest, target_layout) -> tuple[list, list]:
    """The reshard plan of ``piece`` from the fragments of ``index`` that ``slices`` name:
    ``(overlaps, target pieces)`` (each overlap's source ``ref`` is ``(key, fragment)``)."""
    sources = []
    for s in slices:
        meta = manifest.tensors[s.key]
        sources += relocate(source_pieces(index.by_key.get(s.key, []), meta.shape, meta.pattern, manifest.layout), s)
    targets = target_pieces(piece.box, piece.flat, piece.meta.shape, piece.meta.pattern, target_layout)
    return reshard_plan(sources, targets, piece.key), targets


def byte_spans(items) -> dict:
    """fragment -> the ``[lo, hi)`` byte spans of its data that ``items`` read."""
    spans: dict = {}
    for item in items:
        f = item.source.ref[1]
        spans.setdefault(f, []).append(byte_span(item.source.sub.box.sizes, item.src, itemsize(f.dtype),
                                                 item.source.sub.offset))
    return spans


#: pieces read from an object store by :meth:`FragmentReader.read_resharded_all` are fetched together up to
#: this many bytes of destination at a time
BATCH_BYTES = 256 << 20


def _piece_nbytes(piece: Piece) -> int:
    return piece.data.numel() * piece.data.element_size()


def _contiguous_runs(dest: torch.Tensor, items, rest: list):
    """``(fragment, lo, hi, at)`` for each of ``items`` that is one contiguous run both in its fragment
    (with block checksums, of ``dest``'s dtype) and in ``dest``: its bytes ``[lo, hi)`` of the
    fragment's data go to byte ``at`` of ``dest``; the other items are appended to ``rest``."""
    for item in items:
        f, sp, tp = item.source.ref[1], item.source, item.target
        if not (f.blocks and f.dtype == dtype_name(dest.dtype)
                and is_contiguous(sp.sub.box.sizes, item.src) and is_contiguous(tp.sub.box.sizes, item.dst)):
            rest.append(item)
            continue
        size = itemsize(f.dtype)
        lo = (sp.sub.offset + ravel(sp.sub.box.sizes, item.src.offsets)) * size
        at = (tp.sub.offset + ravel(tp.sub.box.sizes, item.dst.offsets)) * size
        yield f, lo, lo + item.src.numel * size, at


def _direct(f, dest: torch.Tensor) -> bool:
    """Whether fragment ``f``'s bytes are read straight into ``dest``: a contiguous CPU tensor of its dtype."""
    return dest.device.type == "cpu" and dest.is_contiguous() and dtype_name(dest.dtype) == f.dtype


def _staged(f, dest: torch.Tensor) -> bool:
    """Whether fragment ``f``'s bytes reach ``dest`` through page-locked staging buffers
    (:class:`~ucp.state.staging.DeviceStaging`): a contiguous tensor of its dtype on a GPU."""
    return dest.is_cuda and dest.is_contiguous() and dtype_name(dest.dtype) == f.dtype


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of contiguous CPU tensor ``t``, writable."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class FragmentReader:
    """Reads fragments of one checkpoint directory into destination tensors, verifying checksums
    (the bytes through :class:`~ucp.storage.fragment_files.FragmentFiles`; with the ``manifest`` of
    a committed checkpoint, each file's size and header are checked as it is opened, and a file
    pruned while being read is told from corruption: :class:`~ucp.errors.CheckpointDeletedError`).

    With ``maps`` (a snapshot in memory: ``maps(name)`` maps an agent's segment), fragments are
    copied from the mappings straight into their destinations and checksummed in the same pass,
    each read split over the calling thread and ``helpers`` tasks on ``pool``; ``block_bytes`` is
    the manifest's block size, whose block checksums are then checked too. On an object store,
    :meth:`read_all` has ``gets`` ranged GETs in flight, and ``sizes`` are the objects' sizes found
    already (``FragmentFiles.check_sizes``), not asked again. Destinations on a GPU are filled through
    page-locked staging buffers (:meth:`read_staged`), read on the calling thread and ``pool``'s.
    """

    def __init__(self, directory: Path, manifest=None, maps=None, pool=None, helpers: int = 0, block_bytes: int = 0,
                 gets: int = GETS, sizes: dict[str, int] | None = None):
        self.files = FragmentFiles(directory, manifest=manifest, maps=maps, pool=pool, helpers=helpers, sizes=sizes)
        self.block_bytes, self.gets = block_bytes, gets
        self._pool, self._helpers = pool, helpers
        self._stagings: dict = {}  # device -> DeviceStaging (see staging)
        self._staging_lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes read so far."""
        return self.files.nbytes

    def read(self, item: ReadItem, dest: torch.Tensor) -> None:
        """Fill ``dest`` (the destination piece's local tensor) from ``item``."""
        f = item.fragment
        direct = _direct(f, dest)
        buf = dest if direct else pages.empty(f.numel, torch_dtype(f.dtype))
        self.files.read(f, [_bytes_of(buf)], block_bytes=self.block_bytes)
        if not direct:
            with torch.no_grad():
                dest.copy_(buf.view(dest.shape))

    def batches(self, item: ReadItem, dest: torch.Tensor) -> bool:
        """Whether :meth:`read_all` reads ``item`` into ``dest`` together with the others: always
        from a snapshot in memory; from an object store into a destination of the fragment's bytes
        (a CPU tensor, contiguous, of its dtype); from files into a GPU's tensor of its bytes
        (through staging buffers)."""
        f = item.fragment
        return self.files.has_maps or (_direct(f, dest) if self.files.remote else
                                       _staged(f, dest) and self._stageable(f))

    def read_all(self, reads: list) -> None:
        """Fill each ``(item, dest)`` of ``reads`` as :meth:`read` does; those on a GPU through
        staging buffers (:meth:`read_staged`); those copied from a mapping straight into their
        destination in one pass over them all (:meth:`FragmentFiles.read_mapped`), those on an
        object store in ranged GETs that each fetch many (:meth:`FragmentFiles.read_spans`, ``gets``
        in flight)."""
        mapped, remote, staged = [], [], []
        for item, dest in reads:
            f = item.fragment
            if _direct(f, dest) and (self.files.remote or self.files.mapped(f)):
                (remote if self.files.remote else mapped).append((f, _bytes_of(dest)))
            elif _staged(f, dest) and not self.files.remote and self._stageable(f):
                staged.append((f, dest))
            else:
                self.read(item, dest)
        self.read_staged(staged)
        self.files.read_mapped(mapped, self.block_bytes)
        self.files.read_spans(remote, self.gets)

    def read_staged(self, reads: list, staging: DeviceStaging | None = None) -> None:
        """Fill each ``(fragment, dest)`` of ``reads`` (``dest`` contiguous, of the fragment's dtype,
        on a device) through page-locked staging buffers, so that the copies to the device are
        asynchronous and overlap the reads: the fragment in chunks of whole blocks, each block
        verified by its checksum, or whole (its CRC-32C) when it fits a buffer. This thread and up
        to ``helpers + 1`` of the pool's take the chunks in turn, each reading one into a free buffer
        and queueing its copy; the first failure stops them and is raised. A fragment larger than a
        buffer and without block checksums is read as :meth:`read` does. ``staging``: the buffers
        to use (else this reader's for the destination's device, :meth:`staging`); returns once
        every copy has landed."""
        jobs, used = [], {}
        for f, dest in reads:
            into = staging or self.staging(dest.device)
            chunks = self._chunks(f, into.nbytes)
            if chunks is None:
                self.read(ReadItem(f), dest)
                continue
            if id(into) not in used:
                used[id(into)] = into
                into.follow()
            out = dest.reshape(-1).view(torch.uint8)
            jobs += [(into, out[lo:hi], fill) for lo, hi, fill in chunks]
        try:  # (a staging has helpers + 3 buffers: a read beyond those, a resharded piece's on the pool, waits)
            in_turns(lambda i: jobs[i][0].put(jobs[i][1], jobs[i][2]), len(jobs), self._pool, self._helpers + 1)
        finally:
            for into in used.values():  # (no copy still reads a buffer, nor is one still to land, after this)
                into.wait()

    def staging(self, device) -> DeviceStaging:
        """This reader's staging buffers for ``device`` (made on first use: on the loading thread
        first, :meth:`stage_to`, so that their copies follow what its current stream had queued),
        ``helpers + 3`` buffers of :data:`~ucp.state.staging.STAGE_BYTES` (or a block, if larger)."""
        device = torch.device(device)
        with self._staging_lock:
            into = self._stagings.get(device)
            if into is None:
                into = self._stagings[device] = DeviceStaging(device, self._helpers + 3, self._stage_bytes)
            return into

    def stage_to(self, devices) -> None:
        """Make the staging buffers of each GPU of ``devices`` now (see :meth:`staging`)."""
        for device in set(devices):
            if torch.device(device).type == "cuda":
                self.staging(device)

    def _stageable(self, f) -> bool:
        """Whether fragment ``f`` can go through staging buffers: it fits one, or has block checksums."""
        return f.length <= self._stage_bytes or bool(f.blocks and self.block_bytes)

    @property
    def _stage_bytes(self) -> int:
        """Bytes of this reader's staging buffers: :data:`~ucp.state.staging.STAGE_BYTES`, or a block if larger."""
        return max(STAGE_BYTES, self.block_bytes)

    def _chunks(self, f, cap: int) -> list | None:
        """``(lo, hi, fill)`` for chunks ``[lo, hi)`` of fragment ``f``'s bytes of at most ``cap``
        bytes each, ``fill(view)`` reading one and verifying it: the whole fragment (its CRC-32C)
        when it fits, else runs of whole blocks (their block checksums); None when neither can."""
        bb = self.block_bytes
        if f.length <= cap:
            return [(0, f.length, lambda view: self.files.read(f, [view], block_bytes=bb))]
        if not (f.blocks and bb) or cap < bb:
            return None
        step = cap // bb * bb
        return [(lo, min(lo + step, f.length),
                 lambda view, lo=lo: self.files.read_run(f, lo, min(lo + step, f.length), view, bb))
                for lo in range(0, f.length, step)]

    def _stage_runs(self, dest: torch.Tensor, runs, block_bytes: int) -> None:
        """Each ``(fragment, lo, hi, at)`` of ``runs`` (bytes ``[lo, hi)`` of the fragment's data, for
        byte ``at`` of ``dest``: contiguous, on a GPU) through this reader's staging buffers, on this
        thread, in chunks that end on the fragment's block boundaries (every block read verified)."""
        into = self.staging(dest.device)
        out = dest.reshape(-1).view(torch.uint8)
        per = into.nbytes // block_bytes  # whole blocks per chunk
        if per < 1:
            raise ValueError(f"blocks of {block_bytes} bytes do not fit staging buffers of {into.nbytes}")
        for f, lo, hi, at in runs:
            a = lo
            while a < hi:
                z = min((a // block_bytes + per) * block_bytes, hi)
                into.put(out[at + a - lo:at + z - lo],
                         lambda view, f=f, a=a, z=z: self.files.read_run(f, a, z, view, block_bytes))
                a = z

    def fetch(self, f, spans=None, block_bytes: int = 0) -> torch.Tensor:
        """Fragment ``f`` as a flat tensor of its dtype: whole, its checksum verified; or, when it has
        block checksums, only the blocks holding the byte ``spans`` (``[lo, hi)`` pairs of its data),
        each block verified (the rest of the tensor is left unset)."""
        buf = pages.empty(f.numel, torch_dtype(f.dtype))
        blocks = needed_blocks(spans, len(f.blocks or ()), block_bytes)
        if blocks is None:
            self.read(ReadItem(f), buf)
        else:
            self.files.read_blocks(f, blocks, memoryview(buf.view(torch.uint8).numpy()), block_bytes)
        return buf

    def read_resharded(self, piece: Piece, slices, index: FragmentIndex, manifest, target_layout) -> None:
        """Fill ``piece`` from fragments saved under another layout (other boxes, flat partitions,
        fused parts or padding) or another name (``slices``), through the reshard planner. Of each
        fragment it touches only the blocks holding the elements it needs are read (each block
        checksum verified; fragments without block checksums are read whole)."""
        if self.files.remote:
            self.read_resharded_all([(piece, slices)], index, manifest, target_layout)
            return
        items, targets = resharded_items(piece, slices, index, manifest, target_layout)
        dest, runs = piece.data, []
        if manifest.block_bytes and dest.device.type == "cpu" and dest.is_contiguous():
            items = self._read_runs(dest, items, manifest.block_bytes)
        elif manifest.block_bytes and dest.is_cuda and dest.is_contiguous():  # (after the rest, below)
            rest: list = []
            runs = list(_contiguous_runs(dest, items, rest))
            items = rest
        spans = byte_spans(items)
        fetch = _cached(lambda ref: self.fetch(ref[1], spans.get(ref[1]), manifest.block_bytes))
        _fill_resharded(piece, items, targets, fetch)  # (a copy of its whole buffer, if any: before the runs)
        if runs:
            self._stage_runs(dest, runs, manifest.block_bytes)

    def read_resharded_all(self, pieces: list, index: FragmentIndex, manifest, target_layout) -> None:
        """:meth:`read_resharded` for each ``(piece, slices)`` of ``pieces`` from an object store: the
        runs of blocks they need asked first (straight into a destination where a run is contiguous on
        both sides, else into a buffer per fragment), then fetched together for pieces of up to
        :data:`BATCH_BYTES` at a time (:meth:`FragmentFiles.read_block_runs`: fragments side by side in
        few GETs, ``gets`` in flight), so a resharded load costs a few round trips and GETs, not one
        GET per run of every piece; the memory held is about a batch's bytes."""
        batch, held = [], 0
        for piece, slices in pieces:
            items, targets = resharded_items(piece, slices, index, manifest, target_layout)
            batch.append((piece, items, targets))
            held += _piece_nbytes(piece)
            if held >= BATCH_BYTES:
                self._fill_remote(batch, manifest.block_bytes)
                batch, held = [], 0
        if batch:
            self._fill_remote(batch, manifest.block_bytes)

    def _fill_remote(self, batch: list, block_bytes: int) -> None:
        """Fill each ``(piece, items, targets)`` of ``batch`` from its fragments on an object store,
        every block run fetched in one go (see :meth:`read_resharded_all`)."""
        runs, after, planned = [], [], []
        for piece, items, targets in batch:
            dest = piece.data
            if block_bytes and dest.device.type == "cpu" and dest.is_contiguous():
                items = self._plan_runs(dest, items, block_bytes, runs, after)
            planned.append((piece, items, targets))
        spans, buffers = byte_spans(item for _, items, _ in planned for item in items), {}
        for f, wanted in spans.items():
            buffers[f] = buf = pages.empty(f.numel, torch_dtype(f.dtype))
            view = _bytes_of(buf)
            blocks = needed_blocks(wanted, len(f.blocks or ()), block_bytes)
            if blocks is None:
                runs.append((f, None, view))
            else:
                runs += [(f, first, view[first * block_bytes:min(last * block_bytes, f.length)])
                         for first, last in blocks]
        self.files.read_block_runs(runs, block_bytes, self.gets)
        for copy in after:
            copy()
        for piece, items, targets in planned:
            _fill_resharded(piece, items, targets, lambda ref: buffers[ref[1]])

    def _plan_runs(self, dest: torch.Tensor, items, block_bytes: int, runs: list, after: list) -> list:
        """:meth:`_read_runs` planned rather than read: for each item that is one contiguous run in
        its fragment (with block checksums, same dtype) and in ``dest``, its whole blocks asked
        straight into ``dest`` and the (at most two) blocks it cuts through into scratch buffers
        (added to ``runs``), whose bytes ``after`` copies into ``dest`` once read; returns the others."""
        out, rest, bb = _bytes_of(dest), [], block_bytes
        for f, lo, hi, at in _contiguous_runs(dest, items, rest):
            first, last = -(-lo // bb), hi // bb + (hi == f.length and hi % bb != 0)  # (blocks wholly inside)
            if first < last:
                runs.append((f, first, out[at + first * bb - lo:at + min(last * bb, f.length) - lo]))
            for b in sorted({lo // bb, (hi - 1) // bb} - set(range(first, last))):
                bl, bh = b * bb, min((b + 1) * bb, f.length)
                scratch = memoryview(bytearray(bh - bl))
                runs.append((f, b, scratch))
                a, z = max(lo, bl), min(hi, bh)
                into, part = out[at + a - lo:at + z - lo], scratch[a - bl:z - bl]
                after.append(functools.partial(into.__setitem__, slice(None), part))
        return rest

    def _read_runs(self, dest: torch.Tensor, items, block_bytes: int) -> list:
        """Read the items that are one contiguous run both in their fragment (with block checksums,
        same dtype) and in ``dest`` straight into ``dest``; returns the others."""
        out, rest = _bytes_of(dest), []
        for f, lo, hi, at in _contiguous_runs(dest, items, rest):
            self.files.read_run(f, lo, hi, out[at:at + hi - lo], block_bytes)
        return rest

    def close(self) -> None:
        """Wait for every copy to a device still in flight, then close the files."""
        try:
            for into in self._stagings.values():
                into.close()
        finally:
            self.files.close()
