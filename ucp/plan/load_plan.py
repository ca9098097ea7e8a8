"""The load plan: which fragments, and which regions of them, fill a destination box.

Pure box arithmetic. A destination equal to a stored fragment reads it whole (the common case of a
same-layout load); otherwise every overlapping dense fragment contributes its intersection. Flat
partitions are read only whole and where they match exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ucp.errors import LoadError
from ucp.spec.box import Box, FlatRange
from ucp.spec.fragment import Fragment


@dataclass(frozen=True)
class ReadItem:
    """Read ``fragment``; copy its ``src`` region into the destination's ``dst`` region.

    ``src``/``dst`` are None when the whole fragment fills the whole destination.
    """

    fragment: Fragment
    src: tuple[slice, ...] | None = None
    dst: tuple[slice, ...] | None = None


class FragmentIndex:
    """Fragments of a manifest, indexed by tensor key and by exact region."""

    def __init__(self, fragments):
        self.by_key: dict[str, list[Fragment]] = {}
        self.by_region: dict[tuple, Fragment] = {}
        for f in fragments:
            self.by_key.setdefault(f.key, []).append(f)
            self.by_region.setdefault(f.region, f)

    def plan(self, key: str, box: Box, flat: FlatRange | None = None, pattern=None) -> list[ReadItem]:
        """Read items that fill ``box`` (or its ``flat`` range) of tensor ``key`` exactly once.

        ``pattern`` is the stored tensor's: fused or padded tensors are stored in their layout's
        order (each rank's [q_r; k_r; v_r], padding rows), so only exact regions are read here.

        Raises:
            LoadError: the checkpoint lacks some of the elements, or would need a flat, fused or
                padded reshard.
        """
        region = (key, box.offsets, box.sizes, None if flat is None else (flat.start, flat.numel))
        exact = self.by_region.get(region)
        if exact is not None:
            return [ReadItem(exact)]
        if pattern is not None and (pattern.fused is not None or pattern.pad is not None):
            raise LoadError(
                f"{key}: stored as {pattern} under another layout; its elements are in that layout's order "
                f"(fused parts per rank, padding), so {box} cannot be cut from it here; that needs the resharding loader"
            )
        if flat is not None or any(f.flat is not None for f in self.by_key.get(key, ())):
            raise LoadError(
                f"{key}: the checkpoint holds flat partitions that do not match {box}"
                + (f" {flat}" if flat else "") + "; loading them onto another partitioning needs the resharding loader"
            )
        items, covered = [], 0
        for f in self.by_key.get(key, ()):
            ov = f.box.intersect(box)
            if ov is None or (ov.ndim and not ov.numel):
                continue
            items.append(ReadItem(f, ov.relative_to(f.box), ov.relative_to(box)))
            covered += ov.numel
        if covered != box.numel:
            raise LoadError(f"{key}: the checkpoint covers {covered} of the {box.numel} elements of {box}")
        return items
