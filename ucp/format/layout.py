"""Layouts: how ranks are arranged on named mesh axes, and how data parallelism shards state.

Ranks enumerate the mesh in row-major order over ``axes`` (first axis outermost), so with
``axes=(("pp", 2), ("dp", 2), ("tp", 2))`` tensor-parallel peers are neighbours, as in Megatron.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ucp.errors import SpecError

#: Data-parallel sharding modes, the meaning of ``zero``.
ZERO_MODES = {
    0: "replicated (DDP)",
    1: "optimizer state sharded",
    2: "gradients and optimizer state sharded (FSDP2 reshard_after_forward=False)",
    3: "parameters, gradients and optimizer state sharded (FSDP2)",
}

#: Canonical order of the well-known axes when a layout is built from sizes.
CANONICAL_AXES = ("pp", "dp", "ep", "tp")

_AXIS_NAME = re.compile(r"[a-z][a-z0-9_]*")  # (fullmatch: "$" would also match before a final newline)


@dataclass(frozen=True)
class Layout:
    """Named mesh axes with sizes, plus the data-parallel sharding mode.

    Args:
        axes: ``((name, size), ...)``, outermost first. Names are lower-case identifiers
            (``dp``, ``tp``, ``pp``, ``ep``, or others such as ``cp``).
        zero: data-parallel sharding mode, see :data:`ZERO_MODES`.
    """

    axes: tuple[tuple[str, int], ...]
    zero: int = 0

    def __post_init__(self):
        try:
            axes = tuple((str(n), s) for n, s in self.axes)
        except (TypeError, ValueError) as e:
            raise SpecError(f"layout axes must be (name, size) pairs, got {self.axes!r}") from e
        seen = set()
        for name, size in axes:
            if not _AXIS_NAME.fullmatch(name):
                raise SpecError(f"layout axis name {name!r} must be a lower-case identifier such as 'dp' or 'tp'")
            if name in seen:
                raise SpecError(f"layout axis {name!r} appears twice; give each axis once")
            seen.add(name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise SpecError(f"layout axis {name!r} has size {size!r}; sizes must be integers >= 1")
        if isinstance(self.zero, bool) or not isinstance(self.zero, int) or self.zero not in ZERO_MODES:
            raise SpecError(f"layout zero={self.zero!r} is not a sharding mode; use one of 0, 1, 2, 3")
        object.__setattr__(self, "axes", axes)

    @classmethod
    def from_sizes(cls, zero: int = 0, order=CANONICAL_AXES, **sizes: int) -> "Layout":
        """Build ``Layout`` from axis sizes, e.g. ``Layout.from_sizes(dp=2, tp=2, zero=1)``.

        Axes in ``order`` come first in that order; other axes follow in the order given.
        Axes of size 1 are kept only if named explicitly.
        """
        unknown = [n for n in sizes if n not in order]
        names = [n for n in order if n in sizes] + unknown
        return cls(tuple((n, sizes[n]) for n in names), zero=zero)

    @classmethod
    def single(cls) -> "Layout":
        """The layout of one process."""
        return cls((("dp", 1),))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.axes)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(self.axes)

    @property
    def world_size(self) -> int:
        return math.prod(s for _, s in self.axes)

    def size(self, axis: str) -> int:
        """Size of ``axis``; axes the layout does not name have size 1."""
        return self.sizes.get(axis, 1)

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank`` on every axis."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise SpecError(f"rank {rank!r} is outside this layout of {self.world_size} ranks")
        out = {}
        for name, size in reversed(self.axes):
            rank, out[name] = divmod(rank, size)
        return {n: out[n] for n in self.names}

    def rank(self, coords: dict[str, int]) -> int:
        """The rank at ``coords``; every axis must be given."""
        missing = [n for n in self.names if n not in coords]
        extra = [n for n in coords if n not in self.sizes]
        if missing or extra:
            raise SpecError(f"coordinates {coords} must name exactly the axes {list(self.names)}")
        rank = 0
        for name, size in self.axes:
            c = coords[name]
            if not 0 <= c < size:
                raise SpecError(f"coordinate {name}={c} is outside 0..{size - 1}")
            rank = rank * size + c
        return rank

    def to_dict(self) -> dict:
        return {"axes": [[n, s] for n, s in self.axes], "zero": self.zero}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        if not isinstance(d, dict) or "axes" not in d:
            raise SpecError(f"layout must be an object with 'axes', got {d!r}")
        try:
            axes = tuple((a[0], a[1]) for a in d["axes"])
        except (TypeError, IndexError, KeyError) as e:
            raise SpecError(f"layout axes must be [name, size] pairs, got {d['axes']!r}") from e
        return cls(axes, zero=d.get("zero", 0))

    def __str__(self) -> str:
        return " ".join(f"{n}={s}" for n, s in self.axes) + f" zero={self.zero}"
