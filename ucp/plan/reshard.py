"""The reshard plan: which bytes of a source fill which part of a target rank's tensor.

Pure functions, in three steps, all meeting in the *universal* index space (the consolidated tensor:
no padding, fused parts in logical order):

1. :func:`source_pieces` cuts every source fragment (dense box, or flat range of a box) into dense
   sub-boxes contiguous in the fragment's bytes, and those into pieces mapped onto universal regions
   (padding dropped, fused parts de-interleaved for the *source* layout). A universal checkpoint's
   chunks are sources of the same form (:func:`chunk_pieces`).
2. :func:`target_pieces` does the same for the region one target rank holds under the *target*
   layout and pattern: its box, optionally a flat range of it (ZeRO-1), fused parts re-split for the
   new tp, padding re-added for the new tp (padding elements map to no universal element: they are
   left zero-filled, see :attr:`TargetPiece.universal` None).
3. :func:`reshard_plan` intersects the two in universal space and yields :class:`Overlap` s: read
   this region of that source sub-box, write it to this region of that target sub-box.

Both sides cut their boxes with :func:`ucp.plan.geometry.box_cut`.

Tensors held by several target ranks (replicas, tied parameters on several pipeline stages) are
planned per rank; which tensors a rank holds is the caller's (its live model's) business.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass

from ucp.errors import LoadError, SpecError
from ucp.format.box import Box, FlatRange
from ucp.format.layout import Layout
from ucp.format.pattern import Pattern, chunk_bounds, local_box
from ucp.plan.geometry import box_cut, chunk_box, pattern_runs
from ucp.plan.sources import to_source


@dataclass(frozen=True)
class SubBox:
    """A dense box whose elements lie row-major from element ``offset`` of a flat buffer (a
    fragment's data, or a target's flat partition)."""

    box: Box
    offset: int = 0


@dataclass(frozen=True)
class SourcePiece:
    """Region ``region`` (relative to ``sub.box``) of source ``ref`` holds universal ``universal``."""

    ref: object
    sub: SubBox
    region: Box
    universal: Box


@dataclass(frozen=True)
class TargetPiece:
    """Region ``region`` (relative to ``sub.box``) of the target holds universal ``universal``;
    ``universal`` None marks padding the target layout adds."""

    sub: SubBox
    region: Box
    universal: Box | None


@dataclass(frozen=True)
class Overlap:
    """Where a source piece and a target piece meet in universal space: copy ``src`` (relative to
    ``source.sub.box``) of ``source.ref`` into ``dst`` (relative to ``target.sub.box``)."""

    source: SourcePiece
    src: Box
    target: TargetPiece
    dst: Box


def flat_boxes(box: Box, flat: FlatRange | None) -> list[SubBox]:
    """The elements ``flat`` of ``box`` (all of them if None) as dense sub-boxes, each a contiguous
    run of the flattened order; ``offset`` counts from ``flat.start``."""
    if flat is None:
        return [SubBox(box, 0)]
    if flat.numel == 0:
        return []
    if not box.ndim:
        return [SubBox(box, 0)]
    out: list[SubBox] = []
    _split(box.offsets, box.sizes, flat.start, flat.end, 0, out, flat.start)
    return out


def _split(offsets, sizes, lo: int, hi: int, dim: int, out: list, base: int) -> None:
    """Append sub-boxes of the row-major range ``[lo, hi)`` of the box ``offsets``/``sizes`` (from ``dim``)."""
    if lo >= hi:
        return
    inner = math.prod(sizes[dim + 1:])
    if dim == len(sizes) - 1:
        out.append(SubBox(Box(offsets[:dim] + (offsets[dim] + lo,) + offsets[dim + 1:],
                              sizes[:dim] + (hi - lo,) + sizes[dim + 1:]), lo - base))
        return
    first, last = lo // inner, (hi - 1) // inner
    if first == last:  # within one slice of this dim: recurse into it
        fixed_off = offsets[:dim] + (offsets[dim] + first,) + offsets[dim + 1:]
        fixed_size = sizes[:dim] + (1,) + sizes[dim + 1:]
        _split(fixed_off, fixed_size, lo - first * inner, hi - first * inner, dim + 1, out, base - first * inner)
        return
    head_end = (first + 1) * inner if lo % inner else lo
    tail_start = last * inner if hi % inner else hi
    if lo < head_end:
        _split(offsets, sizes, lo, head_end, dim, out, base)
    if head_end < tail_start:
        rows = (tail_start - head_end) // inner
        out.append(SubBox(Box(offsets[:dim] + (offsets[dim] + head_end // inner,) + offsets[dim + 1:],
                              sizes[:dim] + (rows,) + sizes[dim + 1:]), head_end - base))
    if tail_start < hi:
        _split(offsets, sizes, tail_start, hi, dim, out, base)


def source_pieces(fragments, shape: tuple[int, ...], pattern: Pattern, layout: Layout) -> list[SourcePiece]:
    """Pieces of a distributed checkpoint's fragments of one tensor of stored ``shape``.

    ``ref`` of each piece is its fragment; ``sub.offset`` is the element offset of the sub-box's
    data inside the fragment's bytes.
    """
    runs = pattern_runs(shape, pattern, layout)
    out = []
    for f in fragments:
        for sub in flat_boxes(f.box, f.flat):
            for region, universal in box_cut(sub.box, runs):
                if universal is not None and region.numel:
                    out.append(SourcePiece(f, sub, region, universal))
    return out


def chunk_pieces(shape: tuple[int, ...], chunks: tuple[int, ...], box: Box) -> list[SourcePiece]:
    """Pieces of a universal array's chunks that overlap ``box``; ``ref`` is the chunk's grid index
    and ``sub.box`` the chunk's box (edge chunks cut to the array)."""
    if not shape:
        return [SourcePiece((), SubBox(Box((), ())), Box((), ()), Box((), ()))]
    ranges = [range(o // c, -(-(o + n) // c)) for o, n, c in zip(box.offsets, box.sizes, chunks)]
    out = []
    for idx in itertools.product(*ranges):
        cbox = chunk_box(shape, chunks, idx)
        ov = cbox.intersect(box)
        if ov is None or not ov.numel:
            continue
        out.append(SourcePiece(idx, SubBox(cbox), Box(tuple(a - b for a, b in zip(ov.offsets, cbox.offsets)), ov.sizes), ov))
    return out


def target_box(shape: tuple[int, ...], pattern: Pattern, layout: Layout, rank: int) -> tuple[Box, FlatRange | None]:
    """The box (and flat range, under a flat pattern) rank ``rank`` of ``layout`` holds of a tensor of
    stored ``shape``; the flat range follows ``torch.chunk`` sizes over the flat axis."""
    coords = layout.coords(rank)
    box = local_box(pattern, shape, layout.sizes, coords)
    if pattern.flat is None:
        return box, None
    lo, hi = chunk_bounds(box.numel, layout.size(pattern.flat), coords.get(pattern.flat, 0))
    return box, FlatRange(lo, hi - lo)


def target_pieces(box: Box, flat: FlatRange | None, shape: tuple[int, ...], pattern: Pattern,
                  layout: Layout) -> list[TargetPiece]:
    """Pieces of the region a target rank holds (``box``, optionally its ``flat`` range) of a tensor
    stored as ``shape`` with ``pattern`` under ``layout``; ``sub.offset`` counts into the rank's buffer."""
    runs = pattern_runs(shape, pattern, layout)
    out = []
    for sub in flat_boxes(box, flat):
        for region, universal in box_cut(sub.box, runs):
            if region.numel or not region.ndim:
                out.append(TargetPiece(sub, region, universal))
    return out


def check_target(key: str, shape: tuple[int, ...], pattern: Pattern, layout: Layout) -> None:
    """Refuse, before any read, a target layout that cannot hold tensor ``key`` of stored ``shape``
    as ``pattern`` says (e.g. a tp that does not divide the fused q/k/v parts: the heads).

    Raises:
        LoadError: saying which tensor and why.
    """
    try:
        pattern_runs(shape, pattern, layout)
    except SpecError as e:
        raise LoadError(f"{key}: this layout cannot hold it: {e}") from None


def _within(outer: Box, sub_region: Box, universal: Box, part: Box) -> Box:
    """The region of ``outer``-relative coordinates holding universal ``part`` (inside ``universal``)."""
    return Box(tuple(r + p - u for r, p, u in zip(sub_region.offsets, part.offsets, universal.offsets)), part.sizes)


def reshard_plan(sources: list[SourcePiece], targets: list[TargetPiece], key: str = "") -> list[Overlap]:
    """Overlaps filling every non-padding target element exactly once.

    Raises:
        LoadError: some target element has no source (the source lacks part of the tensor).
    """
    items = []
    if not sources:
        need = sum(t.region.numel for t in targets if t.universal is not None)
        if need:
            raise LoadError(f"{key}: the source holds none of the {need} elements this rank needs")
        return items
    ndim = sources[0].universal.ndim
    dim = 0 if ndim else None
    ordered = sorted(sources, key=lambda s: s.universal.offsets[dim]) if dim is not None else sources
    starts = [s.universal.offsets[dim] for s in ordered] if dim is not None else []
    longest = max((s.universal.sizes[dim] for s in ordered), default=0) if dim is not None else 0
    for t in targets:
        if t.universal is None:
            continue
        covered = 0
        if dim is None:
            candidates = ordered
        else:
            lo = bisect.bisect_left(starts, t.universal.offsets[dim] - longest + 1)
            hi = bisect.bisect_left(starts, t.universal.ends[dim])
            candidates = ordered[lo:hi]
        for s in candidates:
            ov = s.universal.intersect(t.universal)
            if ov is None or (ov.ndim and not ov.numel):
                continue
            items.append(Overlap(s, _within(s.sub.box, s.region, s.universal, ov), t,
                                 _within(t.sub.box, t.region, t.universal, ov)))
            covered += ov.numel
        if covered != t.universal.numel:
            raise LoadError(f"{key}: the source covers {covered} of the {t.universal.numel} elements of universal "
                            f"region {t.universal} (overlapping or missing fragments)")
    return items


def stored_regions(universal: list[Box], shape: tuple[int, ...], pattern: Pattern, layout: Layout) -> list[Box]:
    """The boxes of a tensor stored as ``shape`` with ``pattern`` under ``layout`` that hold the
    universal boxes ``universal``: the inverse of the cut :func:`source_pieces` makes (padding
    dropped, fused parts found in each shard); what a rank loading those boxes must read."""
    if not shape:
        return [Box((), ())]
    runs = pattern_runs(shape, pattern, layout)
    if not runs:
        return list(universal)
    out = []
    for region, u in box_cut(Box.full(shape), runs):
        if u is None:
            continue
        for want in universal:
            ov = u.intersect(want)
            if ov is not None and ov.numel:
                out.append(Box(tuple(r + o - a for r, o, a in zip(region.offsets, ov.offsets, u.offsets)), ov.sizes))
    return out


def load_regions(box: Box, flat: FlatRange | None, shape: tuple[int, ...], pattern: Pattern, target: Layout,
                 slices, tensors: dict, source: Layout) -> dict[str, list[Box]]:
    """What a target rank holding ``box`` (and ``flat``) of a tensor of ``shape`` and ``pattern``
    under layout ``target`` reads of the checkpoint tensors ``slices`` name (:mod:`ucp.plan.sources`):
    checkpoint key -> boxes in its stored index space (``tensors``: the checkpoint's metadata, saved
    under layout ``source``). A reader fetches only the fragments overlapping these."""
    wanted = [t.universal for t in target_pieces(box, flat, shape, pattern, target) if t.universal is not None]
    out: dict[str, list[Box]] = {}
    for s in slices:
        meta = tensors[s.key]
        boxes = [b for b in (to_source(u, s) for u in wanted) if b is not None]
        out.setdefault(s.key, []).extend(stored_regions(boxes, meta.shape, meta.pattern, source))
    return out
