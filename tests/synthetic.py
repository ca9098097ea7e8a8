"""Synthetic distributed checkpoints, built without processes: universal tensors placed by hand.

``place`` is the forward direction of consolidation, written independently of the converter: it
turns a universal tensor into the tensor a layout *stores* (fused parts interleaved per shard,
padding rows appended) and cuts it into each rank's box and flat range the way the saver does.
``write_checkpoint`` then writes real safetensors files and a committed manifest.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ucp.codecs.checksum import block_crc32c, crc32c
from ucp.format.box import Box, FlatRange
from ucp.format.fragment import Fragment
from ucp.format.layout import Layout
from ucp.format.manifest import BLOCK_BYTES, Manifest, TensorMeta
from ucp.format.pattern import Pattern, chunk_bounds, local_box
from ucp.storage import directory as store
from ucp.storage.manifest_io import commit_manifest
from ucp.storage.safetensors_file import Entry, write_file

NP_DTYPE = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32,
            "bfloat16": np.uint16, "float16": np.float16, "uint8": np.uint8}
ST_CODE = {"float32": "F32", "float64": "F64", "int64": "I64", "int32": "I32", "bfloat16": "BF16", "float16": "F16",
           "uint8": "U8"}


def stored_tensor(u: np.ndarray, pattern: Pattern, layout: Layout, rng: np.random.Generator) -> np.ndarray:
    """The global tensor a layout stores for universal ``u``: fused parts interleaved, padding added."""
    s = u
    if pattern.fused is not None:
        d = pattern.fused.dim
        n = math.prod(layout.size(sh.axis) for sh in pattern.shards if sh.dim == d)
        parts, at = [], 0
        for _, size in pattern.fused.parts:
            parts.append(np.split(np.take(s, range(at, at + size), axis=d), n, axis=d))
            at += size
        s = np.concatenate([p[c] for c in range(n) for p in parts], axis=d)
    if pattern.pad is not None:
        d = pattern.pad.dim
        extra = list(s.shape)
        extra[d] = pattern.pad.to - pattern.pad.keep
        garbage = rng.integers(0, 255, size=int(np.prod(extra)) * s.itemsize, dtype=np.uint8).view(s.dtype).reshape(extra)
        s = np.concatenate([s, garbage], axis=d)
    return s.copy(order="C")  # np.ascontiguousarray would turn a 0-d array into 1-d


def place(key: str, u: np.ndarray, pattern: Pattern, layout: Layout, rng) -> list[tuple[int, Box, FlatRange | None, np.ndarray]]:
    """``(rank, box, flat, bytes)`` of every stored piece of one tensor, each region written once."""
    s = stored_tensor(u, pattern, layout, rng)
    out, seen = [], set()
    for rank in range(layout.world_size):
        coords = layout.coords(rank)
        box = local_box(pattern, s.shape, layout.sizes, coords)
        local = np.ascontiguousarray(s[tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))]).reshape(-1)
        flat = None
        if pattern.flat is not None:
            lo, hi = chunk_bounds(box.numel, layout.size(pattern.flat), coords[pattern.flat])
            flat = FlatRange(lo, hi - lo)
            local = local[lo:hi]
        region = (box, None if flat is None else (flat.start, flat.numel))
        if region in seen:
            continue
        seen.add(region)
        out.append((rank, box, flat, local))
    return out


def write_checkpoint(root: Path, step: int, tensors: dict, layout: Layout, seed: int = 0,
                     state: dict | None = None, block_bytes: int = BLOCK_BYTES) -> Path:
    """Write ``{key: (universal array, dtype name, pattern)}`` as a complete checkpoint under ``root``
    (with block checksums of ``block_bytes``; 0 writes none, as format 1.0 did)."""
    rng = np.random.default_rng(seed)
    directory = store.step_dir(root, step)
    directory.mkdir(parents=True)
    per_rank: dict[int, list] = {}
    metas = {}
    for key, (u, dtype, pattern) in tensors.items():
        s_shape = stored_tensor(u, pattern, layout, rng).shape
        metas[key] = TensorMeta(tuple(s_shape), dtype, pattern)
        for rank, box, flat, data in place(key, u, pattern, layout, rng):
            per_rank.setdefault(rank, []).append((key, box, flat, data))
    fragments, files, heads = [], {}, {}
    for rank, items in sorted(per_rank.items()):
        name = store.rank_file(rank)
        entries = [Entry(f"{k}#{i}", ST_CODE[metas[k].dtype], (d.size,), memoryview(d).cast("B"))
                   for i, (k, _, _, d) in enumerate(items)]
        size, offsets, heads[name] = write_file(directory / name, entries, fsync=False)
        files[name] = size
        for (k, box, flat, d), off in zip(items, offsets):
            data = memoryview(d).cast("B")
            crc, blocks = block_crc32c(data, block_bytes) if block_bytes else (crc32c(data), ())
            fragments.append(Fragment(k, box, flat, metas[k].dtype, rank, name, off, d.nbytes, crc, blocks))
    manifest = Manifest(step, layout, metas, tuple(fragments), state or {"shared": {}, "ranks": {}}, files,
                        created_by="tests.synthetic", block_bytes=block_bytes, file_headers=heads)
    manifest.validate()
    commit_manifest(directory, manifest)
    return directory
