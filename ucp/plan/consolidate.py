"""The consolidation plan: which part of which fragment fills which part of a universal array.

Pure box arithmetic over one tensor key. A stored tensor differs from its universal form only
along at most two dims: the padded dim (rows past ``keep`` are dropped) and the fused dim, where a
layout that shards the dim into ``n`` chunks stores each chunk as ``[q_c; k_c; v_c]`` and the
universal array holds ``[q; k; v]``. :func:`dim_segments` maps one stored dim onto universal
positions as a few runs; :func:`consolidate_plan` cuts every fragment's box along those runs.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ucp.errors import FormatError, SpecError
from ucp.spec.box import Box
from ucp.spec.fragment import Fragment
from ucp.spec.layout import Layout
from ucp.spec.manifest import TensorMeta
from ucp.spec.pattern import Pattern


@dataclass(frozen=True)
class Segment:
    """Stored positions ``[stored, stored + length)`` of a dim are universal ``[universal, ...)``."""

    stored: int
    universal: int
    length: int


@dataclass(frozen=True)
class Piece:
    """Copy the ``src`` region of a source box (slices relative to it) to ``dst`` of the array."""

    src: tuple[slice, ...]
    dst: tuple[slice, ...]

    @property
    def numel(self) -> int:
        return math.prod(s.stop - s.start for s in self.src)


@dataclass(frozen=True)
class Source:
    """One box of the stored tensor: a dense fragment, or flat fragments that fill it together."""

    box: Box
    fragments: tuple[Fragment, ...]
    pieces: tuple[Piece, ...]

    @property
    def flat(self) -> bool:
        return self.fragments[0].flat is not None

    @property
    def whole(self) -> bool:
        """The box lands unchanged in one region of the array (one piece covering all of it)."""
        return len(self.pieces) == 1 and self.pieces[0].numel == self.box.numel


@dataclass(frozen=True)
class TensorPlan:
    """How one universal array of ``shape`` is filled from ``sources``."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    sources: tuple[Source, ...]

    @property
    def nbytes(self) -> int:
        return sum(f.length for s in self.sources for f in s.fragments)


def _merge(segments: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segments:
        if s.length == 0:
            continue
        if out and out[-1].stored + out[-1].length == s.stored and out[-1].universal + out[-1].length == s.universal:
            out[-1] = Segment(out[-1].stored, out[-1].universal, out[-1].length + s.length)
        else:
            out.append(s)
    return out


def dim_segments(size: int, pattern: Pattern, layout: Layout, dim: int) -> list[Segment]:
    """Runs of stored dim ``dim`` (``size`` stored elements) and their universal positions.

    Padding past ``keep`` maps nowhere. A fused dim sharded into ``n`` chunks (the product of the
    sizes of the axes that shard it) stores, in chunk ``c``, each part's ``c``-th ``1/n`` in part
    order; each part size must divide by ``n``.

    Raises:
        SpecError: the pattern fuses and pads the same dim, or a part does not split evenly.
    """
    pad = pattern.pad if pattern.pad is not None and pattern.pad.dim == dim else None
    fused = pattern.fused if pattern.fused is not None and pattern.fused.dim == dim else None
    if pad is not None and fused is not None:
        raise SpecError(f"dim {dim} is both fused and padded; ucp cannot consolidate that combination")
    if pad is not None:
        return [Segment(0, 0, pad.keep)]
    if fused is None:
        return [Segment(0, 0, size)]
    n = math.prod(layout.size(s.axis) for s in pattern.shards if s.dim == dim)
    uneven = [name for name, part in fused.parts if part % n]
    if uneven:
        raise SpecError(f"fused part(s) {', '.join(uneven)} of dim {dim} do not split into {n} equal chunks "
                        f"(the product of the sizes of the axes sharding the dim)")
    segments, stored = [], 0
    for c in range(n):
        offset = 0
        for _, part in fused.parts:
            segments.append(Segment(stored, offset + c * (part // n), part // n))
            stored += part // n
            offset += part
    return _merge(segments)


def _cut(lo: int, hi: int, segments: list[Segment]) -> list[tuple[int, int, int]]:
    """``(stored start, universal start, length)`` of the parts of ``[lo, hi)`` that map somewhere."""
    out = []
    for s in segments:
        a, b = max(lo, s.stored), min(hi, s.stored + s.length)
        if a < b:
            out.append((a, s.universal + a - s.stored, b - a))
    return out


def box_pieces(box: Box, segments: dict[int, list[Segment]]) -> list[Piece]:
    """The pieces of a stored ``box``; dims without ``segments`` map to themselves."""
    per_dim = []
    for d, (lo, n) in enumerate(zip(box.offsets, box.sizes)):
        per_dim.append(_cut(lo, lo + n, segments[d]) if d in segments else [(lo, lo, n)])
    pieces = []
    for combo in itertools.product(*per_dim):
        if any(n == 0 for _, _, n in combo) and box.numel:
            continue
        src = tuple(slice(s - lo, s - lo + n) for (s, _, n), lo in zip(combo, box.offsets))
        dst = tuple(slice(u, u + n) for _, u, n in combo)
        pieces.append(Piece(src, dst))
    return pieces


def consolidate_plan(key: str, meta: TensorMeta, fragments, layout: Layout, shape: tuple[int, ...]) -> TensorPlan:
    """Every fragment of tensor ``key`` cut into the pieces that fill its universal array.

    Args:
        key: the tensor key.
        meta: its stored shape, dtype and pattern.
        fragments: all fragments of ``key`` (an exact cover, as a validated manifest guarantees).
        layout: the layout that saved them.
        shape: the universal shape (see ``ucp.spec.universal.universal_shape``).

    Raises:
        SpecError: the pattern cannot be consolidated (see :func:`dim_segments`).
        FormatError: the pieces do not fill the array exactly once.
    """
    special = {d for d in (meta.pattern.pad.dim if meta.pattern.pad else None,
                           meta.pattern.fused.dim if meta.pattern.fused else None) if d is not None}
    segments = {d: dim_segments(meta.shape[d], meta.pattern, layout, d) for d in special}
    groups: dict[tuple, list[Fragment]] = {}
    for f in fragments:
        groups.setdefault((f.box, f.flat is not None), []).append(f)
    sources, filled = [], 0
    for (box, flat), frags in groups.items():
        if flat:
            frags.sort(key=lambda f: f.flat.start)
        pieces = box_pieces(box, segments)
        filled += sum(p.numel for p in pieces)
        sources.append(Source(box, tuple(frags), tuple(pieces)))
    if filled != math.prod(shape):
        raise FormatError(f"{key}: its fragments fill {filled} of the {math.prod(shape)} elements of the "
                          f"universal array {list(shape)}")
    sources.sort(key=lambda s: (s.fragments[0].file, s.fragments[0].offset))
    return TensorPlan(key, tuple(shape), meta.dtype, tuple(sources))


def source_runs(source: Source, shape: tuple[int, ...]) -> np.ndarray:
    """``(box_start, array_start, length)`` rows, sorted by ``box_start``: every piece of ``source``
    cut into runs of elements contiguous both in the box and in the array (both row-major).

    Trailing dims a piece covers whole in both the box and the array merge into one run, so a box
    of whole rows is one run per piece, and a column block is one run per row.
    """
    rows = []
    bsizes, ndim = source.box.sizes, len(shape)
    for p in source.pieces:
        sizes = [s.stop - s.start for s in p.src]
        if not ndim:
            rows.append(np.array([[0, 0, 1]], dtype=np.int64))
            continue
        d0 = ndim - 1
        while d0 > 0 and sizes[d0] == bsizes[d0] == shape[d0]:
            d0 -= 1
        length = math.prod(sizes[d0:])
        if length == 0:
            continue
        outer = np.indices(sizes[:d0], dtype=np.int64).reshape(d0, -1) if d0 else np.zeros((0, 1), dtype=np.int64)
        bidx = [outer[d] + p.src[d].start for d in range(d0)] + [np.full(outer.shape[1], p.src[d].start) for d in range(d0, ndim)]
        aidx = [outer[d] + p.dst[d].start for d in range(d0)] + [np.full(outer.shape[1], p.dst[d].start) for d in range(d0, ndim)]
        bstart = np.ravel_multi_index(bidx, bsizes) if source.box.numel else np.zeros(outer.shape[1], np.int64)
        astart = np.ravel_multi_index(aidx, shape)
        rows.append(np.stack([bstart, astart, np.full_like(bstart, length)], axis=1))
    if not rows:
        return np.zeros((0, 3), dtype=np.int64)
    out = np.concatenate(rows)
    return out[np.argsort(out[:, 0], kind="stable")]
