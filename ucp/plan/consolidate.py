"""The consolidation plan: which part of which fragment fills which part of a universal array.

Pure box arithmetic over one tensor key. A stored tensor differs from its universal form only
along its padded and fused dims; :mod:`ucp.plan.geometry` maps those onto universal positions as a
few runs, and :func:`consolidate_plan` cuts every fragment's box along them into :class:`Copy` s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ucp.errors import FormatError
from ucp.format.box import Box
from ucp.format.fragment import Fragment
from ucp.format.layout import Layout
from ucp.format.manifest import TensorMeta
from ucp.plan.geometry import Run, box_cut, box_slices, pattern_runs


@dataclass(frozen=True)
class Copy:
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
    pieces: tuple[Copy, ...]

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


def box_pieces(box: Box, runs: dict[int, list[Run]]) -> list[Copy]:
    """The copies filling the array from a stored ``box`` (its regions that map somewhere, see
    :func:`ucp.plan.geometry.box_cut`); dims without ``runs`` map to themselves."""
    return [Copy(box_slices(region), box_slices(universal)) for region, universal in box_cut(box, runs)
            if universal is not None and not (region.numel == 0 and box.numel)]


def consolidate_plan(key: str, meta: TensorMeta, fragments, layout: Layout, shape: tuple[int, ...]) -> TensorPlan:
    """Every fragment of tensor ``key`` cut into the pieces that fill its universal array.

    Args:
        key: the tensor key.
        meta: its stored shape, dtype and pattern.
        fragments: all fragments of ``key`` (an exact cover, as a validated manifest guarantees).
        layout: the layout that saved them.
        shape: the universal shape (see ``ucp.format.universal.universal_shape``).

    Raises:
        SpecError: the pattern cannot be consolidated (see :func:`ucp.plan.geometry.dim_runs`).
        FormatError: the pieces do not fill the array exactly once.
    """
    runs = pattern_runs(meta.shape, meta.pattern, layout)
    groups: dict[tuple, list[Fragment]] = {}
    for f in fragments:
        groups.setdefault((f.box, f.flat is not None), []).append(f)
    sources, filled = [], 0
    for (box, flat), frags in groups.items():
        if flat:
            frags.sort(key=lambda f: f.flat.start)
        pieces = box_pieces(box, runs)
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
