"""Patterns: how one tensor is spread over a layout.

A :class:`Pattern` is the per-tensor geometry both our saver and the checkpoint language produce:
which mesh axes shard which dims (outermost split first), whether the tensor is additionally
flattened and partitioned over an axis (ZeRO-1 / distributed optimizer), and the facts a
converter needs to produce the universal form (fused sub-parameters, vocabulary padding).
Axes a pattern does not shard over hold replicas. :func:`local_box` turns a pattern plus a rank's
coordinates into the box that rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ucp.errors import SpecError
from ucp.format.box import Box


@dataclass(frozen=True)
class Shard:
    """Split tensor dim ``dim`` into equal chunks (``torch.chunk`` sizes) over mesh axis ``axis``."""

    axis: str
    dim: int

    def __post_init__(self):
        if not isinstance(self.axis, str) or isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 0:
            raise SpecError(f"shard needs an axis name and a dim >= 0, got axis={self.axis!r} dim={self.dim!r}")


@dataclass(frozen=True)
class Fused:
    """Dim ``dim`` concatenates named sub-parameters (e.g. q, k, v) of the given global sizes."""

    dim: int
    parts: tuple[tuple[str, int], ...]

    def __post_init__(self):
        try:
            parts = tuple((str(n), s) for n, s in self.parts)
        except (TypeError, ValueError) as e:
            raise SpecError(f"fused parts must be (name, size) pairs, got {self.parts!r}") from e
        if not parts or any(isinstance(n, bool) or not isinstance(n, int) or n < 0 for _, n in parts):
            raise SpecError(f"fused parts need non-negative integer sizes, got {self.parts!r}")
        object.__setattr__(self, "parts", parts)


@dataclass(frozen=True)
class Pad:
    """Dim ``dim`` is padded to ``to`` elements of which the first ``keep`` are real."""

    dim: int
    to: int
    keep: int


@dataclass(frozen=True)
class Pattern:
    """Geometry of one tensor over a layout.

    Args:
        shards: ``Shard`` splits applied outermost first; several may split the same dim.
        flat: mesh axis over which the tensor's flattened elements are partitioned, or None.
        fused: fused sub-parameters along one dim, or None.
        pad: padding along one dim, or None.
    """

    shards: tuple[Shard, ...] = ()
    flat: str | None = None
    fused: Fused | None = None
    pad: Pad | None = None

    def __post_init__(self):
        object.__setattr__(self, "shards", tuple(self.shards))
        axes = [s.axis for s in self.shards]
        if len(set(axes)) != len(axes):
            raise SpecError(f"pattern shards over axis {axes} more than once; an axis can split one dim once")
        if self.flat is not None and self.flat in axes:
            raise SpecError(f"pattern partitions flat over axis {self.flat!r} that also shards a dim")

    @property
    def is_replicated(self) -> bool:
        return not self.shards and self.flat is None

    def validate(self, shape: tuple[int, ...], axes: tuple[str, ...], where: str = "") -> None:
        """Check the pattern against a tensor's global shape and the layout's axis names."""
        at = f" for {where}" if where else ""
        for s in self.shards:
            if s.axis not in axes:
                raise SpecError(f"pattern{at} shards over axis {s.axis!r}, which the layout {list(axes)} lacks")
            if not 0 <= s.dim < len(shape):
                raise SpecError(f"pattern{at} shards dim {s.dim}, outside a tensor of shape {list(shape)}")
        if self.flat is not None and self.flat not in axes:
            raise SpecError(f"pattern{at} partitions over axis {self.flat!r}, which the layout {list(axes)} lacks")
        if self.fused is not None:
            if not 0 <= self.fused.dim < len(shape):
                raise SpecError(f"fused dim {self.fused.dim}{at} is outside shape {list(shape)}")
            total = sum(n for _, n in self.fused.parts)
            dim_size = self.pad.keep if self.pad and self.pad.dim == self.fused.dim else shape[self.fused.dim]
            if total != dim_size:
                raise SpecError(f"fused sizes{at} sum to {total} but dim {self.fused.dim} has {dim_size}")
        if self.pad is not None:
            p = self.pad
            if not 0 <= p.dim < len(shape) or p.to != shape[p.dim] or not 0 < p.keep <= p.to:
                raise SpecError(f"padding{at} (dim={p.dim}, to={p.to}, keep={p.keep}) does not fit shape {list(shape)}")

    def to_dict(self) -> dict:
        d: dict = {}
        if self.shards:
            d["shards"] = [[s.axis, s.dim] for s in self.shards]
        if self.flat is not None:
            d["flat"] = self.flat
        if self.fused is not None:
            d["fused"] = {"dim": self.fused.dim, "parts": [[n, s] for n, s in self.fused.parts]}
        if self.pad is not None:
            d["pad"] = {"dim": self.pad.dim, "to": self.pad.to, "keep": self.pad.keep}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Pattern":
        if not isinstance(d, dict):
            raise SpecError(f"pattern must be an object, got {d!r}")
        unknown = set(d) - {"shards", "flat", "fused", "pad"}
        if unknown:
            raise SpecError(f"pattern has unknown field(s) {sorted(unknown)}")
        try:
            fused = d.get("fused")
            pad = d.get("pad")
            return cls(
                shards=tuple(Shard(str(a), int(dim)) for a, dim in d.get("shards", ())),
                flat=d.get("flat"),
                fused=Fused(int(fused["dim"]), tuple((str(n), int(s)) for n, s in fused["parts"])) if fused else None,
                pad=Pad(int(pad["dim"]), int(pad["to"]), int(pad["keep"])) if pad else None,
            )
        except (TypeError, ValueError, KeyError) as e:
            raise SpecError(f"malformed pattern {d!r}: {e}") from e

    def __str__(self) -> str:
        parts = [f"shard({s.axis}, dim={s.dim})" for s in self.shards]
        if self.flat:
            parts.append(f"flat({self.flat})")
        if self.fused:
            parts.append(f"fused(dim={self.fused.dim}, " + ", ".join(f"{n}={s}" for n, s in self.fused.parts) + ")")
        if self.pad:
            parts.append(f"pad(dim={self.pad.dim}, to={self.pad.to}, keep={self.pad.keep})")
        return " ".join(parts) or "replicate"


REPLICATED = Pattern()


def chunk_bounds(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[lo, hi)`` of chunk ``index`` when ``size`` elements are split into ``parts`` like ``torch.chunk``.

    Chunks hold ``ceil(size / parts)`` elements; trailing chunks may be short or empty.
    """
    if parts < 1 or not 0 <= index < parts:
        raise SpecError(f"chunk {index} of {parts} does not exist; parts must be >= 1 and 0 <= index < parts")
    step = -(-size // parts)
    lo = min(index * step, size)
    return lo, min(lo + step, size)


def local_box(pattern: Pattern, shape: tuple[int, ...], sizes: dict[str, int], coords: dict[str, int]) -> Box:
    """The box of a tensor of global ``shape`` held at ``coords`` of a mesh with axis ``sizes``.

    Flat partitioning is not applied here: the holder of a flat partition knows its range.
    """
    lo = [0] * len(shape)
    hi = list(shape)
    for s in pattern.shards:
        a, b = chunk_bounds(hi[s.dim] - lo[s.dim], sizes.get(s.axis, 1), coords.get(s.axis, 0))
        lo[s.dim], hi[s.dim] = lo[s.dim] + a, lo[s.dim] + b
    return Box(tuple(lo), tuple(h - l for l, h in zip(lo, hi)))
