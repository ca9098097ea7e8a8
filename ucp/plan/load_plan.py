"""The same-layout load plan: the fragment that holds exactly a destination's region.

A destination equal to a stored fragment reads it whole, straight into the destination (the common
case of a same-layout load). Any other destination goes through the reshard planner
(:mod:`ucp.plan.reshard`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ucp.format.box import Box, FlatRange
from ucp.format.fragment import Fragment


@dataclass(frozen=True)
class ReadItem:
    """Read ``fragment`` whole into a destination holding exactly its region."""

    fragment: Fragment


class FragmentIndex:
    """Fragments of a manifest, indexed by tensor key and by exact region."""

    def __init__(self, fragments):
        self.by_key: dict[str, list[Fragment]] = {}
        self.by_region: dict[tuple, Fragment] = {}
        for f in fragments:
            self.by_key.setdefault(f.key, []).append(f)
            self.by_region.setdefault(f.region, f)

    def exact(self, key: str, box: Box, flat: FlatRange | None = None) -> Fragment | None:
        """The fragment holding exactly this region, if one does (a same-layout load)."""
        return self.by_region.get((key, box.offsets, box.sizes, None if flat is None else (flat.start, flat.numel)))
