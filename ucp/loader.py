"""Loading a durable checkpoint into the live model, optimizer and state.

Phases: *find* (rank 0 picks the checkpoint, every rank uses that one), *manifest* (read and
validate), *read* (build the destination pieces, plan which fragment bytes fill them, read them
straight into the destination tensors and verify every checksum), *restore* (optimizer, scheduler,
stateful objects, RNG). The source is a distributed checkpoint, or a universal one (``ucp
convert``), from which every rank reads only the chunks its boxes overlap, whatever layout saved it. Model tensors are filled in place; optimizer state is filled into its
existing tensors when they fit, else into new ones handed to ``optimizer.load_state_dict``.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ucp.codecs.checksum import crc32c
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError, LoadError
from ucp.plan.load_plan import FragmentIndex, ReadItem
from ucp.optimizer_load import merged_optimizer_state, optimizer_targets, restore_optimizer, torch_dtype
from ucp.plan.reshard import check_target, chunk_pieces, reshard_plan, source_pieces, target_pieces
from ucp.plan.sources import Resolution, SourceIndex, relocate, to_source
from ucp.snapshot import values
from ucp.snapshot.capture import Piece, model_pieces, normalize_fqn
from ucp.snapshot.rng import restore_rng
from ucp.spec.box import Box
from ucp.spec.dtypes import itemsize
from ucp.spec.keys import EXTRA, MODEL, OPTIM, extra_key, optim_key, parse_key
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest
from ucp.storage.safetensors_file import read_into
from ucp.storage.universal_io import array_reader, is_universal, read_header
from ucp.spec.manifest import TensorMeta
from ucp.spec.universal import UniversalHeader, universal_shape


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
        out = dest if direct else torch.empty(tuple(piece.box.sizes), dtype=dest.dtype)
        raw = out.reshape(-1).view(torch.uint8).numpy().view(np.dtype(meta.stored_dtype)).reshape(piece.box.sizes)
        with array_reader(self.source.path, only.key, meta) as reader:
            reader.read(_slices(piece.box), out=raw)
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


def _byte_span(sub, region: Box, size: int) -> tuple[int, int]:
    """Bytes ``[lo, hi)`` of a source's data spanning ``region`` (relative to ``sub.box``, whose
    elements lie row-major from element ``sub.offset``); elements of ``size`` bytes."""
    sizes = sub.box.sizes
    if not region.ndim:
        return sub.offset * size, (sub.offset + 1) * size
    first = last = 0
    for o, n, s in zip(region.offsets, region.sizes, sizes):
        first = first * s + o
        last = last * s + o + n - 1
    return (sub.offset + first) * size, (sub.offset + last + 1) * size


def _contiguous(sizes, region: Box) -> bool:
    """Whether ``region`` (relative to a box of ``sizes``) is one contiguous run of its row-major order."""
    partial = [i for i, (n, s) in enumerate(zip(region.sizes, sizes)) if n != s]
    return not partial or all(n == 1 for n in region.sizes[:partial[-1]])


def _ravel(sizes, offsets) -> int:
    """Row-major element index of ``offsets`` in a box of ``sizes``."""
    index = 0
    for o, s in zip(offsets, sizes):
        index = index * s + o
    return index


def _check_block(f, b: int, data, path, block_bytes: int) -> None:
    """Verify block ``b`` of fragment ``f`` against its checksum; name file, key and block if it fails."""
    got = crc32c(data)
    if got != f.blocks[b]:
        a = f.offset + b * block_bytes
        raise CorruptCheckpointError(
            f"{path}: fragment of {f.key} {f.box}{f.flat or ''}, block {b} at bytes [{a}, {a + len(data)}) fails "
            f"its checksum (crc32c {got:08x}, expected {f.blocks[b]:08x}); the file is corrupted")


def _needed_blocks(spans, f, block_bytes: int):
    """Runs ``(first, last)`` of the blocks of fragment ``f`` holding the byte ``spans``, or None to
    read ``f`` whole (no block checksums, or every block needed)."""
    if not spans or not f.blocks or block_bytes <= 0:
        return None
    wanted = set()
    for lo, hi in spans:
        if hi > lo:
            wanted.update(range(lo // block_bytes, -(-hi // block_bytes)))
    if len(wanted) >= len(f.blocks):
        return None
    runs: list[list[int]] = []
    for b in sorted(wanted):
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return [tuple(r) for r in runs]


def _chunk_cut(full: torch.Tensor, idx, meta) -> torch.Tensor:
    """A chunk's data cut to the array: chunk pieces' sub-boxes are the chunk cut to the array
    (edge chunks), while a chunk is stored whole."""
    if not meta.shape:
        return full
    lo = [i * c for i, c in zip(idx, meta.chunks)]
    cut = tuple(slice(0, min(c, s - l)) for l, c, s in zip(lo, meta.chunks, meta.shape))
    return full.view(meta.chunks)[cut].contiguous().reshape(-1)


def _slices(box) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))


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
    direct = dest.device.type == "cpu" and dest.is_contiguous()
    out = dest if direct else torch.empty(dest.shape, dtype=dest.dtype)
    flat = out.reshape(-1)
    with torch.no_grad():
        for t in targets:
            if t.universal is None:  # padding the target layout adds (e.g. vocabulary rows): zeros
                view = flat[t.sub.offset:t.sub.offset + t.sub.box.numel].view(t.sub.box.sizes)
                view[_slices(t.region)].zero_()
        by_ref: dict = {}
        for item in items:
            by_ref.setdefault(item.source.ref, []).append(item)
        for group in by_ref.values():
            data = fetch(group[0].source.ref)
            for item in group:
                sp, tp = item.source, item.target
                src = data[sp.sub.offset:sp.sub.offset + sp.sub.box.numel].view(sp.sub.box.sizes)
                dst = flat[tp.sub.offset:tp.sub.offset + tp.sub.box.numel].view(tp.sub.box.sizes)
                dst[_slices(item.dst)].copy_(src[_slices(item.src)])
        if not direct:
            dest.copy_(out)


class FragmentReader:
    """Reads fragments of one checkpoint directory into destination tensors, verifying checksums."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._files: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()
        self.nbytes = 0

    def _open(self, name: str) -> tuple[int, int]:
        with self._lock:
            if name not in self._files:
                path = self.directory / name
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise CorruptCheckpointError(f"{path}: data file is missing") from None
                self._files[name] = (fd, os.fstat(fd).st_size)
            return self._files[name]

    def _open_fragment(self, f) -> tuple[int, Path]:
        """The open file holding fragment ``f`` and its path; a file that ends early is corruption."""
        fd, size = self._open(f.file)
        path = self.directory / f.file
        if f.offset + f.length > size:
            raise CorruptCheckpointError(f"{path}: fragment of {f.key} {f.box}{f.flat or ''} at bytes "
                                         f"[{f.offset}, {f.offset + f.length}) lies past the end of the file "
                                         f"({size} bytes); the file is truncated")
        return fd, path

    def read(self, item: ReadItem, dest: torch.Tensor) -> None:
        """Fill ``dest`` (the destination piece's local tensor) from ``item``."""
        f = item.fragment
        fd, size = self._open(f.file)
        path = self.directory / f.file
        where = f"{path}: fragment of {f.key} {f.box}{f.flat or ''} at bytes [{f.offset}, {f.offset + f.length})"
        if f.offset + f.length > size:
            raise CorruptCheckpointError(f"{where} lies past the end of the file ({size} bytes); the file is truncated")
        direct = (dest.device.type == "cpu" and dest.is_contiguous()
                  and str(dest.dtype).removeprefix("torch.") == f.dtype)
        buf = dest if direct else torch.empty(f.numel, dtype=torch_dtype(f.dtype))
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        read_into(fd, f.offset, view, path)
        got = crc32c(view)
        if got != f.crc32c:
            raise CorruptCheckpointError(f"{where} fails its checksum (crc32c {got:08x}, expected {f.crc32c:08x}); the file is corrupted")
        if not direct:
            with torch.no_grad():
                dest.copy_(buf.view(dest.shape))
        with self._lock:
            self.nbytes += f.length

    def fetch(self, f, spans=None, block_bytes: int = 0) -> torch.Tensor:
        """Fragment ``f`` as a flat tensor of its dtype: whole, its checksum verified; or, when it has
        block checksums, only the blocks holding the byte ``spans`` (``[lo, hi)`` pairs of its data),
        each block verified (the rest of the tensor is left unset)."""
        buf = torch.empty(f.numel, dtype=torch_dtype(f.dtype))
        blocks = _needed_blocks(spans, f, block_bytes)
        if blocks is None:
            self.read(ReadItem(f), buf)
            return buf
        fd, path = self._open_fragment(f)
        view = memoryview(buf.view(torch.uint8).numpy())
        nbytes = 0
        for first, last in blocks:
            lo, hi = first * block_bytes, min(last * block_bytes, f.length)
            read_into(fd, f.offset + lo, view[lo:hi], path)
            nbytes += hi - lo
            for b in range(first, last):
                _check_block(f, b, view[b * block_bytes:min((b + 1) * block_bytes, f.length)], path, block_bytes)
        with self._lock:
            self.nbytes += nbytes
        return buf

    def read_run(self, f, lo: int, hi: int, out: memoryview, block_bytes: int) -> None:
        """Bytes ``[lo, hi)`` of fragment ``f``'s data (which has block checksums) into ``out``: the
        blocks inside the run straight into ``out``, the (at most two) blocks it cuts through a
        scratch buffer; every block read is verified."""
        fd, path = self._open_fragment(f)
        bb, nbytes, scratch = block_bytes, 0, None
        b, end = lo // bb, -(-hi // bb)
        while b < end:
            bl, bh = b * bb, min((b + 1) * bb, f.length)
            if lo <= bl and bh <= hi:  # a run of whole blocks: read in place
                e = b + 1
                while e < end and min((e + 1) * bb, f.length) <= hi:
                    e += 1
                rh = min(e * bb, f.length)
                read_into(fd, f.offset + bl, out[bl - lo:rh - lo], path)
                for k in range(b, e):
                    _check_block(f, k, out[k * bb - lo:min((k + 1) * bb, f.length) - lo], path, bb)
                nbytes += rh - bl
                b = e
                continue
            scratch = scratch if scratch is not None else memoryview(bytearray(bb))
            block = scratch[:bh - bl]
            read_into(fd, f.offset + bl, block, path)
            _check_block(f, b, block, path, bb)
            a, z = max(lo, bl), min(hi, bh)
            out[a - lo:z - lo] = block[a - bl:z - bl]
            nbytes += bh - bl
            b += 1
        with self._lock:
            self.nbytes += nbytes

    def read_resharded(self, piece: Piece, slices, index: FragmentIndex, manifest, target_layout) -> None:
        """Fill ``piece`` from fragments saved under another layout (other boxes, flat partitions,
        fused parts or padding) or another name (``slices``), through the reshard planner. Of each
        fragment it touches only the blocks holding the elements it needs are read (each block
        checksum verified; fragments without block checksums are read whole)."""
        sources = []
        for s in slices:
            meta = manifest.tensors[s.key]
            sources += relocate(source_pieces(index.by_key.get(s.key, []), meta.shape, meta.pattern, manifest.layout), s)
        targets = target_pieces(piece.box, piece.flat, piece.meta.shape, piece.meta.pattern, target_layout)
        items = reshard_plan(sources, targets, piece.key)
        dest = piece.data
        if manifest.block_bytes and dest.device.type == "cpu" and dest.is_contiguous():
            items = self._read_runs(dest, items, manifest.block_bytes)
        spans: dict = {}
        for item in items:
            f = item.source.ref[1]
            spans.setdefault(f, []).append(_byte_span(item.source.sub, item.src, itemsize(f.dtype)))
        fetch = _cached(lambda ref: self.fetch(ref[1], spans.get(ref[1]), manifest.block_bytes))
        _fill_resharded(piece, items, targets, fetch)

    def _read_runs(self, dest: torch.Tensor, items, block_bytes: int) -> list:
        """Read the items that are one contiguous run both in their fragment (with block checksums,
        same dtype) and in ``dest`` straight into ``dest``; returns the others."""
        out = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
        rest = []
        for item in items:
            f, sp, tp = item.source.ref[1], item.source, item.target
            if not (f.blocks and f.dtype == str(dest.dtype).removeprefix("torch.")
                    and _contiguous(sp.sub.box.sizes, item.src) and _contiguous(tp.sub.box.sizes, item.dst)):
                rest.append(item)
                continue
            size = itemsize(f.dtype)
            lo = (sp.sub.offset + _ravel(sp.sub.box.sizes, item.src.offsets)) * size
            at = (tp.sub.offset + _ravel(tp.sub.box.sizes, item.dst.offsets)) * size
            n = item.src.numel * size
            self.read_run(f, lo, lo + n, out[at:at + n], block_bytes)
        return rest

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def _cast_target(p: Piece, res: Resolution, sources: SourceIndex, casts: list) -> tuple[Piece, Resolution]:
    """What to read instead when ``p``'s dtype differs from the checkpoint's: the parameter's fp32
    master if the checkpoint has one of the wanted dtype (exact), else a temporary of the stored
    dtype that is converted into ``p`` after the read (recorded in ``casts``)."""
    kind, fqn, _ = parse_key(p.key)
    if kind == MODEL:
        shape = universal_shape(p.meta.shape, p.meta.pattern)
        master = sources.resolve(optim_key(fqn, "master"), shape, p.meta.pattern, p.meta.dtype)
        if master is not None and master.dtype == p.meta.dtype and master.rule != "master" and \
                all(s.dim is not None or sources.shape(s.key) == shape for s in master.slices):
            return p, master
    temp = torch.empty(p.data.shape, dtype=torch_dtype(res.dtype), device=p.data.device)
    casts.append((temp, p.data))
    return replace(p, data=temp, meta=TensorMeta(p.meta.shape, res.dtype, p.meta.pattern)), res


def _renamed_params(plans) -> dict[str, tuple[str, ...]]:
    """fqn of each parameter loaded under other names -> the checkpoint's fqns it came from."""
    out = {}
    for p, res in plans:
        kind = parse_key(p.key)
        if kind.kind == MODEL and res.rule in ("part", "fused"):
            out[kind.name] = tuple(dict.fromkeys(parse_key(k).name for k in res.keys))
    return out


def _taken(res: Resolution) -> set:
    """What a resolution takes of the checkpoint: whole keys, or ``(key, dim, lo, n)`` slices."""
    return {s.key if s.dim is None else (s.key, s.dim, s.lo, s.n) for s in res.slices}


def _untaken(tensors: dict, taken: set, sources: SourceIndex) -> list[str]:
    """Checkpoint keys nothing takes whole: not taken as a key, nor covered by the slices taken of it
    (a fused tensor whose parts are all loaded is taken; one missing a part is not)."""
    spans: dict[str, list] = {}
    for t in taken:
        if isinstance(t, tuple):
            spans.setdefault(t[0], []).append(t[1:])
    out = []
    for key in tensors:
        if key in taken:
            continue
        pieces = sorted(set(spans.get(key, ())), key=lambda d: d[1])
        size = sources.shape(key)[pieces[0][0]] if pieces else None
        at = 0
        for _, lo, n in pieces:
            if lo <= at:
                at = max(at, lo + n)
        if size is None or at < size:
            out.append(key)
    return out


def _resolve_targets(pieces: list[Piece], sources: SourceIndex, layout, where: Path, cast: bool):
    """For each piece the checkpoint tensors that fill it (:mod:`ucp.plan.sources`), after checking
    that ``layout`` can hold it and the shape and dtype checks; returns ``(plans, missing keys, checkpoint keys taken, casts)``."""
    plans, missing, taken, casts = [], [], set(), []
    for p in pieces:
        check_target(p.key, p.meta.shape, p.meta.pattern, layout)
        shape = universal_shape(p.meta.shape, p.meta.pattern)
        res = sources.resolve(p.key, shape, p.meta.pattern, p.meta.dtype)
        if res is None:
            missing.append(p.key)
            continue
        # compared without padding: a layout may pad a dim (vocabulary) to a multiple of its tp
        if res.rule == "same" and sources.shape(p.key) != shape:
            raise LoadError(f"{where}: {p.key} has shape {list(sources.shape(p.key))} in the checkpoint, "
                            f"{list(shape)} here")
        taken.update(_taken(res))
        if res.dtype != p.meta.dtype:
            if not cast:
                raise LoadError(f"{where}: {p.key} is {res.dtype} in the checkpoint, {p.meta.dtype} here; "
                                "ucp does not cast silently: pass cast=True to convert")
            p, res = _cast_target(p, res, sources, casts)
        taken.update(_taken(res))
        plans.append((p, res))
    return plans, missing, taken, casts


def _restore_extra_state(model, extra_state: dict) -> None:
    modules = {normalize_fqn(name): m for name, m in model.named_modules()}
    for key, value in extra_state.items():
        prefix = normalize_fqn(key.removesuffix("_extra_state").rstrip("."))
        if prefix not in modules:
            raise LoadError(f"the checkpoint holds extra state of module {prefix!r}, which this model lacks")
        modules[prefix].set_extra_state(value)


def load_checkpoint(ckpt, step: int | None, strict: bool, cast: bool = False, memory=None):
    """Implementation of :meth:`ucp.Checkpointer.load`; ``memory`` is ``(directory, manifest)`` of an
    in-memory snapshot (its fragments in the agent's segments) to load instead of searching storage."""
    t0 = time.perf_counter()
    coll = ckpt.coll
    if memory is not None:
        return _load(ckpt, coll, t0, Path(memory[0]), memory[1], False, strict, cast, "memory")

    def find():
        if coll.rank != 0:
            return None
        if is_universal(ckpt.root):
            if step is not None and step != read_header(ckpt.root).step:
                raise CheckpointNotFoundError(f"{ckpt.root}: a universal checkpoint of step "
                                              f"{read_header(ckpt.root).step}, not {step}")
            return Path(ckpt.root)
        try:
            return store.resolve(ckpt.root, step)
        except CheckpointNotFoundError:
            if step is None and not store.list_steps(ckpt.root):
                return None
            raise

    path = coll.phase("find", find)[0]
    if path is None:
        return None
    result: dict = {}
    universal = is_universal(path)

    def read_source():
        return UniversalSource(Path(path), read_header(path)) if universal else read_manifest(path)

    coll.phase("manifest", lambda: result.update(manifest=read_source()))
    return _load(ckpt, coll, t0, Path(path), result["manifest"], universal, strict, cast,
                 "universal" if universal else "durable")


def _load(ckpt, coll, t0: float, path: Path, manifest, universal: bool, strict: bool, cast: bool, source: str):
    """The phases after the manifest: targets, read, restore."""
    from ucp.checkpointer import LoadResult, rank_state

    result: dict = {}

    def targets():
        pieces: list[Piece] = []
        model_by_key: dict[str, Piece] = {}
        sources = SourceIndex(manifest.tensors)
        if ckpt.model is not None:
            mp, _, _ = model_pieces(ckpt.model, ckpt.geometry)
            model_by_key = {p.key: p for p in mp}
            pieces += mp
        fqns, opt_state = [], {}
        if ckpt.optimizer is not None:
            fqns, op, opt_state = optimizer_targets(ckpt.optimizer, ckpt.model, sources, model_by_key)
            pieces += op
        extras = {}
        for key, meta in manifest.tensors.items():
            if parse_key(key).kind == EXTRA:
                extras[parse_key(key).name] = t = torch.empty(meta.shape, dtype=torch_dtype(meta.dtype))
                pieces.append(Piece(extra_key(parse_key(key).name), t, meta, Box.full(meta.shape)))
        plans, missing, taken, casts = _resolve_targets(pieces, sources, ckpt.geometry.layout, path, cast)
        result.update(plans=plans, missing=missing, casts=casts, fqns=fqns, opt_state=opt_state, extras=extras)
        # a flat-partitioned optimizer vouches for all of its partitions
        flat_owner = ckpt.optimizer is not None and hasattr(ckpt.optimizer, "ucp_flat_state")
        return taken | {k for k, m in manifest.tensors.items() if flat_owner and m.pattern.flat}

    taken_by_rank = coll.phase("targets", targets)

    def read():
        # Strictness is judged for the job: a key is unexpected only if no rank takes it (pipeline
        # stages and flat partitions spread the keys over ranks), missing if this rank wants it.
        taken = set().union(*taken_by_rank)
        missing = sorted(result["missing"])
        unexpected = sorted(k for k in _untaken(manifest.tensors, taken, SourceIndex(manifest.tensors))
                            if parse_key(k).kind == MODEL or (parse_key(k).kind == OPTIM and ckpt.optimizer is not None))
        if strict and (missing or unexpected):
            raise LoadError(
                f"{path}: checkpoint and model do not match: missing {_few(missing)}, unexpected {_few(unexpected)}; "
                "pass strict=False to load what matches"
            )
        target_layout = ckpt.geometry.layout
        plans = [(p, res) for p, res in result["plans"] if p.numel]
        if universal:
            reader = UniversalReader(manifest)
            jobs = [(reader.read, (p, res, target_layout)) for p, res in plans]
        else:
            index = FragmentIndex(manifest.fragments)
            reader = FragmentReader(path)
            jobs = []
            for p, res in plans:
                only = res.slices[0]
                exact = index.exact(only.key, p.box, p.flat) if len(res.slices) == 1 and only.dim is None else None
                if exact is not None:  # the same layout: straight into the destination
                    jobs.append((reader.read, (ReadItem(exact), p.data)))
                else:
                    jobs.append((reader.read_resharded, (p, res.slices, index, manifest, target_layout)))
        try:
            with ThreadPoolExecutor(ckpt.options.io_threads) as pool:
                for f in [pool.submit(fn, *a) for fn, a in jobs]:
                    f.result()
        finally:
            reader.close()
        with torch.no_grad():
            for temp, dest in result["casts"]:
                dest.copy_(temp)
        result.update(missing=missing, unexpected=unexpected, nbytes=reader.nbytes)

    coll.phase("read", read)

    def restore():
        state = {k: values.decode(v, k) for k, v in rank_state(manifest.state, coll.rank).items()}
        if universal and manifest.layout.world_size != coll.world_size:
            # Per-rank RNG streams belong to the ranks that saved them: with another number of ranks
            # there is no rank to give them to, so each rank keeps its own (docs/format-universal.md).
            state.pop("rng", None)
        if ckpt.model is not None and "model" in state:
            _restore_extra_state(ckpt.model, state["model"].get("extra_state", {}))
        if ckpt.optimizer is not None:
            saved = state.get("optimizer", {})
            if manifest.layout != ckpt.geometry.layout:  # parameters moved between ranks: every rank's groups
                saved = merged_optimizer_state(manifest.state, path)
            restore_optimizer(ckpt.optimizer, result["fqns"], result["opt_state"], saved, path, strict,
                              _renamed_params(result["plans"]))
        if ckpt.scheduler is not None:
            if "scheduler" not in state:
                raise LoadError(f"{path}: the checkpoint holds no scheduler state")
            ckpt.scheduler.load_state_dict(state["scheduler"])
        for name, obj in ckpt.state.items():
            if f"state.{name}" not in state:
                raise LoadError(f"{path}: the checkpoint holds no state named {name!r}")
            obj.load_state_dict(state[f"state.{name}"])
        if ckpt.options.rng and "rng" in state:
            restore_rng(state["rng"])
        return state.get("extras", {})

    extras = {**coll.phase("restore", restore)[coll.rank], **result["extras"]}
    return LoadResult(manifest.step, source, Path(path), extras, tuple(result["missing"]),
                      tuple(result["unexpected"]), result["nbytes"], time.perf_counter() - t0)


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
