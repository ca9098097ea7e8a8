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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from ucp.codecs.checksum import crc32c
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError, LoadError
from ucp.plan.load_plan import FragmentIndex, ReadItem
from ucp.plan.reshard import chunk_pieces, reshard_plan, source_pieces, target_pieces
from ucp.snapshot import values
from ucp.snapshot.capture import Piece, normalize_fqn, flat_state_pieces, model_pieces, optimizer_param_fqns, param_names, tensor_piece
from ucp.snapshot.rng import restore_rng
from ucp.spec.box import Box
from ucp.spec.keys import EXTRA, MODEL, OPTIM, extra_key, optim_key, parse_key
from ucp.spec.manifest import Manifest
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest
from ucp.storage.safetensors_file import read_into
from ucp.storage.universal_io import array_reader, is_universal, read_header
from ucp.spec.manifest import TensorMeta
from ucp.spec.universal import UniversalHeader, universal_shape


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise LoadError(f"dtype {name!r} has no torch equivalent")
    return dtype


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

    def read(self, piece: Piece, target_layout=None) -> None:
        meta = self.source.header.tensors[piece.key]
        if _needs_reshard(piece):
            self._read_resharded(piece, meta, target_layout)
            return
        dest = piece.data
        direct = dest.device.type == "cpu" and dest.is_contiguous()
        out = dest if direct else torch.empty(tuple(piece.box.sizes), dtype=dest.dtype)
        raw = out.reshape(-1).view(torch.uint8).numpy().view(np.dtype(meta.stored_dtype)).reshape(piece.box.sizes)
        region = tuple(slice(o, o + n) for o, n in zip(piece.box.offsets, piece.box.sizes))
        with array_reader(self.source.path, piece.key, meta) as reader:
            reader.read(region, out=raw)
        if not direct:
            with torch.no_grad():
                dest.copy_(out.view(dest.shape))
        with self._lock:
            self.nbytes += raw.nbytes

    def _read_resharded(self, piece: Piece, meta, target_layout) -> None:
        targets = target_pieces(piece.box, piece.flat, piece.meta.shape, piece.meta.pattern, target_layout)
        sources = []
        for t in targets:
            if t.universal is not None:
                sources += chunk_pieces(meta.shape, meta.chunks, t.universal)
        items = reshard_plan(_unique_chunks(sources), targets, piece.key)
        dtype = piece.data.dtype
        with array_reader(self.source.path, piece.key, meta) as reader:
            def fetch(idx):
                chunk = reader.chunk(idx) if meta.shape else reader.read()
                data = torch.from_numpy(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).copy()).view(dtype)
                with self._lock:
                    self.nbytes += reader.chunk_nbytes
                return data
            _fill_resharded(piece, items, targets, _chunk_fetch(fetch, meta))

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


def _chunk_fetch(fetch, meta):
    """``fetch`` keyed by chunk index, cached: chunk pieces of one chunk share one read; sub-boxes of
    chunks are the chunk cut to the array, while the data is the full chunk: re-cut it."""
    cache: dict = {}

    def get(ref):
        if ref not in cache:
            full = fetch(ref)
            if meta.shape:
                lo = [i * c for i, c in zip(ref, meta.chunks)]
                cut = tuple(slice(0, min(c, s - l)) for l, c, s in zip(lo, meta.chunks, meta.shape))
                full = full.view(meta.chunks)[cut].contiguous().reshape(-1)
            cache[ref] = full
        return cache[ref]

    return get


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

    def fetch(self, f) -> torch.Tensor:
        """Fragment ``f`` whole, as a flat tensor of its dtype, checksum verified."""
        buf = torch.empty(f.numel, dtype=torch_dtype(f.dtype))
        self.read(ReadItem(f), buf)
        return buf

    def read_resharded(self, piece: Piece, index: FragmentIndex, manifest, target_layout) -> None:
        """Fill ``piece`` from fragments saved under another layout (other boxes, flat partitions,
        fused parts or padding), through the reshard planner; the fragments it touches are read
        whole, so their checksums are verified."""
        meta = manifest.tensors[piece.key]
        sources = source_pieces(index.by_key.get(piece.key, []), meta.shape, meta.pattern, manifest.layout)
        targets = target_pieces(piece.box, piece.flat, piece.meta.shape, piece.meta.pattern, target_layout)
        items = reshard_plan(sources, targets, piece.key)
        _fill_resharded(piece, items, targets, self.fetch)

    def close(self) -> None:
        for fd, _ in self._files.values():
            os.close(fd)
        self._files.clear()


def _new_like(key: str, meta, param_piece: Piece | None, param) -> tuple[object, Piece]:
    """A fresh destination for optimizer state ``key``: sharded like its parameter when shaped like it."""
    dtype = torch_dtype(meta.dtype)
    if param_piece is not None and tuple(meta.shape) == tuple(param_piece.meta.shape):
        if isinstance(param, DTensor):
            local = torch.empty(param.to_local().shape, dtype=dtype, device=param.device)
            value = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                       shape=param.shape, stride=param.stride())
            return value, tensor_piece(key, "", value, None)
        local = torch.empty(param_piece.data.shape, dtype=dtype, device=param_piece.data.device)
        return local, Piece(key, local, meta, param_piece.box, param_piece.flat)
    value = torch.empty(meta.shape, dtype=dtype)
    return value, Piece(key, value, meta, Box.full(meta.shape))


def _optimizer_targets(ckpt, manifest: Manifest, model_by_key: dict[str, Piece]):
    """Destination pieces for optimizer state, and the index-keyed state they will form."""
    optimizer = ckpt.optimizer
    fqns = optimizer_param_fqns(optimizer, param_names(ckpt.model))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    wanted: dict[str, list[str]] = {}
    for key in manifest.tensors:
        k = parse_key(key)
        if k.kind == OPTIM:
            wanted.setdefault(k.name, []).append(k.state)
    pieces = flat_state_pieces(optimizer, model_by_key)  # filled in place, outside state_dict()
    flat_owner = hasattr(optimizer, "ucp_flat_state")
    state = {}
    for idx, (fqn, param) in enumerate(zip(fqns, params)):
        existing = optimizer.state.get(param, {})
        for name in wanted.get(fqn, ()):
            key = optim_key(fqn, name)
            if flat_owner and manifest.tensors[key].pattern.flat:
                continue  # this rank's partitions are among ``pieces``; the others belong to other ranks
            meta = manifest.tensors[key]
            cur = existing.get(name)
            if isinstance(cur, torch.Tensor) and tuple(cur.shape) == tuple(meta.shape) and str(cur.dtype) == f"torch.{meta.dtype}":
                value, piece = cur, tensor_piece(key, fqn, cur.detach(), None)
                if not isinstance(cur, DTensor):
                    piece = _like_param(piece, model_by_key.get(f"{MODEL}/{fqn}"))
            else:
                value, piece = _new_like(key, meta, model_by_key.get(f"{MODEL}/{fqn}"), param)
            pieces.append(piece)
            state.setdefault(idx, {})[name] = value
    return fqns, pieces, state


def _like_param(piece: Piece, param_piece: Piece | None) -> Piece:
    if param_piece is not None and tuple(piece.data.shape) == tuple(param_piece.data.shape):
        return Piece(piece.key, piece.data, piece.meta, param_piece.box, param_piece.flat)
    return piece


def _restore_optimizer(optimizer, fqns: list[str], tensor_state: dict, saved: dict, where: Path, strict: bool) -> None:
    """Load state keyed by the *current* parameter indices, so group order and membership map by fqn.

    With ``strict=False`` parameters the checkpoint lacks start fresh, and param groups that cannot
    be matched keep their current hyperparameters.
    """
    scalars = saved.get("scalars", {})
    index = {fqn: i for i, fqn in enumerate(fqns)}
    state = {i: dict(v) for i, v in tensor_state.items()}
    for fqn, named in scalars.items():
        if fqn in index:
            state.setdefault(index[fqn], {}).update(named)
    current = optimizer.state_dict()["param_groups"]
    groups = saved.get("param_groups", [])
    if len(groups) != len(current):
        if strict:
            raise LoadError(f"{where}: the checkpoint's optimizer has {len(groups)} param group(s), this one has {len(current)}")
        groups = [None] * len(current)
    new_groups = []
    for g, (old, cur) in enumerate(zip(groups, current)):
        if old is None:
            new_groups.append(cur)
            continue
        if strict and sorted(old["params"]) != sorted(fqns[i] for i in cur["params"]):
            raise LoadError(f"{where}: optimizer param group {g} holds different parameters than the checkpoint's; "
                            "pass strict=False to load the state of the parameters both have")
        new_groups.append({**{k: v for k, v in old.items() if k != "params"}, "params": list(cur["params"])})
    optimizer.load_state_dict({"state": state, "param_groups": new_groups})


def _cast_target(p: Piece, manifest, casts: list) -> Piece:
    """The piece to read instead of ``p`` when dtypes differ: the parameter's fp32 master if the
    checkpoint has one of the wanted dtype (exact), else a temporary of the stored dtype that is
    converted into ``p`` after the read (recorded in ``casts``)."""
    kind, fqn, _ = parse_key(p.key)
    master = manifest.tensors.get(optim_key(fqn, "master")) if kind == MODEL else None
    if master is not None and master.dtype == p.meta.dtype and \
            universal_shape(master.shape, master.pattern) == universal_shape(p.meta.shape, p.meta.pattern):
        return replace(p, key=optim_key(fqn, "master"))
    stored = manifest.tensors[p.key].dtype
    temp = torch.empty(p.data.shape, dtype=torch_dtype(stored), device=p.data.device)
    casts.append((temp, p.data))
    return replace(p, data=temp, meta=TensorMeta(p.meta.shape, stored, p.meta.pattern))


def _restore_extra_state(model, extra_state: dict) -> None:
    modules = {normalize_fqn(name): m for name, m in model.named_modules()}
    for key, value in extra_state.items():
        prefix = normalize_fqn(key.removesuffix("_extra_state").rstrip("."))
        if prefix not in modules:
            raise LoadError(f"the checkpoint holds extra state of module {prefix!r}, which this model lacks")
        modules[prefix].set_extra_state(value)


def load_checkpoint(ckpt, step: int | None, strict: bool, cast: bool = False):
    """Implementation of :meth:`ucp.Checkpointer.load`."""
    from ucp.checkpointer import LoadResult, rank_state

    t0 = time.perf_counter()
    coll = ckpt.coll

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
    manifest = result["manifest"]

    def targets():
        pieces: list[Piece] = []
        model_by_key: dict[str, Piece] = {}
        if ckpt.model is not None:
            mp, _, _ = model_pieces(ckpt.model, ckpt.geometry)
            model_by_key = {p.key: p for p in mp}
            pieces += mp
        fqns, opt_state = [], {}
        if ckpt.optimizer is not None:
            fqns, op, opt_state = _optimizer_targets(ckpt, manifest, model_by_key)
            pieces += op
        extras = {}
        for key, meta in manifest.tensors.items():
            if parse_key(key).kind == EXTRA:
                extras[parse_key(key).name] = t = torch.empty(meta.shape, dtype=torch_dtype(meta.dtype))
                pieces.append(Piece(extra_key(parse_key(key).name), t, meta, Box.full(meta.shape)))
        result.update(pieces=pieces, fqns=fqns, opt_state=opt_state, extras=extras)
        # keys this rank takes; a flat-partitioned optimizer vouches for all of its partitions
        flat_owner = ckpt.optimizer is not None and hasattr(ckpt.optimizer, "ucp_flat_state")
        return {p.key for p in pieces} | {k for k, m in manifest.tensors.items() if flat_owner and m.pattern.flat}

    taken_by_rank = coll.phase("targets", targets)

    def read():
        # Strictness is judged for the job: a key is unexpected only if no rank takes it (pipeline
        # stages and flat partitions spread the keys over ranks), missing if this rank wants it.
        have = taken_by_rank[coll.rank]
        taken = set().union(*taken_by_rank)
        missing = sorted(have - set(manifest.tensors))
        unexpected = sorted(k for k in set(manifest.tensors) - taken
                            if parse_key(k).kind == MODEL or (parse_key(k).kind == OPTIM and ckpt.optimizer is not None))
        if strict and (missing or unexpected):
            raise LoadError(
                f"{path}: checkpoint and model do not match: missing {_few(missing)}, unexpected {_few(unexpected)}; "
                "pass strict=False to load what matches"
            )
        pieces, casts = [], []
        for p in (p for p in result["pieces"] if p.key in manifest.tensors):
            meta = manifest.tensors[p.key]
            # compared without padding: a layout may pad a dim (vocabulary) to a multiple of its tp
            if universal_shape(meta.shape, meta.pattern) != universal_shape(p.meta.shape, p.meta.pattern):
                raise LoadError(f"{path}: {p.key} has shape {list(universal_shape(meta.shape, meta.pattern))} in the "
                                f"checkpoint, {list(universal_shape(p.meta.shape, p.meta.pattern))} here")
            if meta.dtype != p.meta.dtype:
                if not cast:
                    raise LoadError(f"{path}: {p.key} is {meta.dtype} in the checkpoint, {p.meta.dtype} here; "
                                    "ucp does not cast silently: pass cast=True to convert")
                p = _cast_target(p, manifest, casts)
            pieces.append(p)

        target_layout = ckpt.geometry.layout
        if universal:
            reader = UniversalReader(manifest)
            jobs = [(reader.read, (p, target_layout)) for p in pieces if p.numel]
        else:
            index = FragmentIndex(manifest.fragments)
            reader = FragmentReader(path)
            jobs = []
            for p in pieces:
                if not p.numel:
                    continue
                exact = index.exact(p.key, p.box, p.flat)
                if exact is not None:  # the same layout: straight into the destination
                    jobs.append((reader.read, (ReadItem(exact), p.data)))
                else:
                    jobs.append((reader.read_resharded, (p, index, manifest, target_layout)))
        try:
            with ThreadPoolExecutor(ckpt.options.io_threads) as pool:
                for f in [pool.submit(fn, *a) for fn, a in jobs]:
                    f.result()
        finally:
            reader.close()
        with torch.no_grad():
            for temp, dest in casts:
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
            _restore_optimizer(ckpt.optimizer, result["fqns"], result["opt_state"], state.get("optimizer", {}), path, strict)
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
    return LoadResult(manifest.step, "universal" if universal else "durable", Path(path), extras, tuple(result["missing"]),
                      tuple(result["unexpected"]), result["nbytes"], time.perf_counter() - t0)


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
