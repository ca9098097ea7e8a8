"""Geometry shared by the plans: stored boxes onto universal index space, and boxes onto bytes.

Pure integer arithmetic, no I/O.

*Stored -> universal.* A stored tensor differs from its universal form (no padding, fused parts in
logical order) along at most two dims: the padded dim (positions past ``keep`` map nowhere) and the
fused dim, where a layout that shards the dim into ``n`` chunks stores each chunk as
``[q_c; k_c; v_c]`` while the universal array holds ``[q; k; v]``. :func:`dim_runs` maps one stored
dim onto universal positions as a few :class:`Run` s; :func:`box_cut` cuts a stored box along them
into regions, each landing on one universal box (or on none: padding). Consolidation
(:mod:`ucp.plan.consolidate`) and resharding (:mod:`ucp.plan.reshard`) both cut boxes this way.

*Boxes -> bytes.* A dense box's elements lie row-major in a flat buffer: :func:`ravel` indexes an
element, :func:`byte_span` bounds a region's bytes, :func:`is_contiguous` says whether a region is
one run of them, :func:`needed_blocks` names the checksummed blocks holding some byte spans, and
:func:`chunk_box` is one chunk of a chunked array.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from ucp.errors import SpecError
from ucp.format.box import Box
from ucp.format.layout import Layout
from ucp.format.pattern import Pattern

# --------------------------------------------------------------------------- stored -> universal


@dataclass(frozen=True)
class Run:
    """Stored positions ``[stored, stored + length)`` of a dim are universal ``[universal, ...)``."""

    stored: int
    universal: int
    length: int


def _merge(runs: list[Run]) -> list[Run]:
    """``runs`` without empty runs, each run that continues the previous one (in both) joined to it."""
    out: list[Run] = []
    for r in runs:
        if r.length == 0:
            continue
        if out and out[-1].stored + out[-1].length == r.stored and out[-1].universal + out[-1].length == r.universal:
            out[-1] = Run(out[-1].stored, out[-1].universal, out[-1].length + r.length)
        else:
            out.append(r)
    return out


def dim_runs(size: int, pattern: Pattern, layout: Layout, dim: int) -> list[Run]:
    """Runs of stored dim ``dim`` (``size`` stored elements) and their universal positions, in
    stored order.

    Padding past ``keep`` maps nowhere (it is in no run). A fused dim sharded into ``n`` chunks (the
    product of the sizes of the axes that shard it) stores, in chunk ``c``, each part's ``c``-th
    ``1/n`` in part order; each part size must divide by ``n``. Any other dim is one identity run.

    Raises:
        SpecError: the pattern fuses and pads the same dim, or a part does not split evenly.
    """
    pad = pattern.pad if pattern.pad is not None and pattern.pad.dim == dim else None
    fused = pattern.fused if pattern.fused is not None and pattern.fused.dim == dim else None
    if pad is not None and fused is not None:
        raise SpecError(f"dim {dim} is both fused and padded; ucp cannot consolidate that combination")
    if pad is not None:
        return [Run(0, 0, pad.keep)]
    if fused is None:
        return [Run(0, 0, size)]
    n = math.prod(layout.size(s.axis) for s in pattern.shards if s.dim == dim)
    uneven = [name for name, part in fused.parts if part % n]
    if uneven:
        raise SpecError(f"fused part(s) {', '.join(uneven)} of dim {dim} do not split into {n} equal chunks "
                        f"(the product of the sizes of the axes sharding the dim)")
    runs, stored = [], 0
    for c in range(n):
        offset = 0
        for _, part in fused.parts:
            runs.append(Run(stored, offset + c * (part // n), part // n))
            stored += part // n
            offset += part
    return _merge(runs)


def pattern_runs(shape, pattern: Pattern, layout: Layout) -> dict[int, list[Run]]:
    """:func:`dim_runs` of the dims of a tensor of stored ``shape`` that ``pattern`` pads or fuses
    under ``layout``; every other dim maps to itself.

    Raises:
        SpecError: as :func:`dim_runs`.
    """
    special = {d for d in (pattern.pad.dim if pattern.pad else None, pattern.fused.dim if pattern.fused else None)
               if d is not None}
    return {d: dim_runs(shape[d], pattern, layout, d) for d in special}


def dim_cut(lo: int, hi: int, runs: list[Run] | None) -> list[tuple[int, int | None, int]]:
    """Stored positions ``[lo, hi)`` of a dim as ``(stored start, universal start, length)`` parts, in
    order; universal None marks a part in no run (padding). ``runs`` None: the identity (one part,
    even when empty)."""
    if runs is None:
        return [(lo, lo, hi - lo)]
    out: list[tuple[int, int | None, int]] = []
    pos = lo
    for r in runs:
        a, b = max(lo, r.stored), min(hi, r.stored + r.length)
        if a >= b:
            continue
        if a > pos:
            out.append((pos, None, a - pos))
        out.append((a, r.universal + a - r.stored, b - a))
        pos = b
    if pos < hi:
        out.append((pos, None, hi - pos))
    return out


def box_cut(box: Box, runs: dict[int, list[Run]]) -> list[tuple[Box, Box | None]]:
    """A stored ``box`` cut along ``runs`` (by dim; other dims map to themselves, see
    :func:`pattern_runs`) into ``(region relative to box, universal box)`` pairs covering ``box``
    exactly, in row-major order of the cuts; universal None marks a region holding padding."""
    per_dim = [dim_cut(lo, lo + n, runs.get(d)) for d, (lo, n) in enumerate(zip(box.offsets, box.sizes))]
    out = []
    for combo in itertools.product(*per_dim):
        sizes = tuple(n for _, _, n in combo)
        region = Box(tuple(s - lo for (s, _, _), lo in zip(combo, box.offsets)), sizes)
        if any(u is None for _, u, _ in combo):
            out.append((region, None))
        else:
            out.append((region, Box(tuple(u for _, u, _ in combo), sizes)))
    return out


# --------------------------------------------------------------------------- boxes -> bytes


def box_slices(box: Box) -> tuple[slice, ...]:
    """The slices selecting ``box`` in an array whose index space is the box's."""
    return tuple(slice(o, o + n) for o, n in zip(box.offsets, box.sizes))


def ravel(sizes, offsets) -> int:
    """Row-major element index of ``offsets`` in a box of ``sizes`` (0 for a 0-d box)."""
    index = 0
    for o, s in zip(offsets, sizes):
        index = index * s + o
    return index


def is_contiguous(sizes, region: Box) -> bool:
    """Whether ``region`` (relative to a box of ``sizes``) is one contiguous run of the box's
    row-major order: whole in every dim after the last one it cuts, one wide in every dim before."""
    partial = [i for i, (n, s) in enumerate(zip(region.sizes, sizes)) if n != s]
    return not partial or all(n == 1 for n in region.sizes[:partial[-1]])


def byte_span(sizes, region: Box, itemsize: int, start: int = 0) -> tuple[int, int]:
    """Bytes ``[lo, hi)`` spanning a non-empty ``region`` of a box of ``sizes`` whose elements (of
    ``itemsize`` bytes) lie row-major in a buffer from element ``start``: from the region's first
    element to past its last."""
    first = ravel(sizes, region.offsets)
    last = ravel(sizes, tuple(o + n - 1 for o, n in zip(region.offsets, region.sizes)))
    return (start + first) * itemsize, (start + last + 1) * itemsize


def needed_blocks(spans, nblocks: int, block_bytes: int) -> list[tuple[int, int]] | None:
    """Runs ``(first, last)`` (``last`` excluded) of the ``block_bytes`` blocks of a buffer of
    ``nblocks`` checksummed blocks that hold the byte ``spans`` (``[lo, hi)`` pairs), in order and
    merged where they touch; None to take the buffer whole (no spans, no blocks, or every block
    needed)."""
    if not spans or nblocks <= 0 or block_bytes <= 0:
        return None
    wanted = set()
    for lo, hi in spans:
        if hi > lo:
            wanted.update(range(lo // block_bytes, -(-hi // block_bytes)))
    if len(wanted) >= nblocks:
        return None
    runs: list[list[int]] = []
    for b in sorted(wanted):
        if runs and runs[-1][1] == b:
            runs[-1][1] = b + 1
        else:
            runs.append([b, b + 1])
    return [tuple(r) for r in runs]


def chunk_box(shape, chunks, idx) -> Box:
    """The box of chunk ``idx`` (its grid index) of an array of ``shape`` chunked by ``chunks``:
    edge chunks cut to the array."""
    lo = tuple(i * c for i, c in zip(idx, chunks))
    return Box(lo, tuple(min(c, s - o) for o, c, s in zip(lo, chunks, shape)))
