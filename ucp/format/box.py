"""Boxes: hyper-rectangles of a tensor's global index space, plus flat ranges inside them.

A box is where a fragment lives in the tensor; a flat range narrows a fragment to the elements
``[start, start + numel)`` of the box flattened in row-major order, the way ZeRO and Megatron's
distributed optimizer partition flattened parameters. Pure data, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ucp.errors import SpecError


def _as_int_tuple(values, what: str) -> tuple[int, ...]:
    try:
        values = tuple(values)  # a one-shot iterable must still be checked element by element below
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError) as e:
        raise SpecError(f"{what} must be a sequence of integers, got {values!r}") from e
    for v, orig in zip(out, values):
        if isinstance(orig, bool) or v != orig:
            raise SpecError(f"{what} must be a sequence of integers, got {values!r}")
    return out


@dataclass(frozen=True)
class Box:
    """``offsets`` + ``sizes`` in the global index space of one tensor (0-d tensors: both empty)."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    def __post_init__(self):
        offsets = _as_int_tuple(self.offsets, "box offsets")
        sizes = _as_int_tuple(self.sizes, "box sizes")
        if len(offsets) != len(sizes):
            raise SpecError(f"box offsets {offsets} and sizes {sizes} have different ranks")
        if any(o < 0 for o in offsets) or any(s < 0 for s in sizes):
            raise SpecError(f"box offsets {offsets} and sizes {sizes} must be non-negative")
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "sizes", sizes)

    @classmethod
    def full(cls, shape) -> "Box":
        """The box covering a whole tensor of ``shape``."""
        shape = tuple(shape)
        return cls((0,) * len(shape), shape)

    @property
    def ndim(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @property
    def ends(self) -> tuple[int, ...]:
        return tuple(o + s for o, s in zip(self.offsets, self.sizes))

    def fits(self, shape) -> bool:
        """Whether the box lies inside a tensor of ``shape``."""
        return len(shape) == self.ndim and all(e <= n for e, n in zip(self.ends, shape))

    def intersect(self, other: "Box") -> "Box | None":
        """The common part of two boxes, or None when they do not overlap (or one is empty)."""
        if other.ndim != self.ndim:
            raise SpecError(f"cannot intersect boxes of rank {self.ndim} and {other.ndim}")
        lo = tuple(max(a, b) for a, b in zip(self.offsets, other.offsets))
        hi = tuple(min(a, b) for a, b in zip(self.ends, other.ends))
        if any(h <= l for l, h in zip(lo, hi)):
            return None if self.ndim else Box((), ())
        return Box(lo, tuple(h - l for l, h in zip(lo, hi)))

    def relative_to(self, outer: "Box") -> tuple[slice, ...]:
        """Slices that select this box inside a tensor holding ``outer``."""
        return tuple(slice(o - oo, o - oo + s) for o, s, oo in zip(self.offsets, self.sizes, outer.offsets))

    def __str__(self) -> str:
        if not self.ndim:
            return "[]"
        return "[" + ",".join(f"{o}:{o + s}" for o, s in zip(self.offsets, self.sizes)) + "]"


@dataclass(frozen=True)
class FlatRange:
    """Elements ``[start, start + numel)`` of a box flattened in row-major order."""

    start: int
    numel: int

    def __post_init__(self):
        for name in ("start", "numel"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SpecError(f"flat range {name} must be a non-negative integer, got {v!r}")

    @property
    def end(self) -> int:
        return self.start + self.numel

    def fits(self, box: Box) -> bool:
        return self.end <= box.numel

    def __str__(self) -> str:
        return f"{{{self.start}:{self.end}}}"
