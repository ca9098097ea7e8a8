"""The save plan: agree on tensor metadata, detect diverged replicas, pick one writer per region.

Pure functions over what every rank reported; every rank computes the same plan from the same
all-gathered input, so no second round of communication is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ucp.errors import ReplicaDivergenceError, SpecError
from ucp.format.box import Box, FlatRange
from ucp.format.manifest import TensorMeta


@dataclass(frozen=True)
class PieceInfo:
    """What a rank holds of one tensor: its region, dtype, size and checksum (no data).

    ``crc32c`` is None until known: replicated regions are checksummed before the plan (to compare
    replicas), the others while they are written.
    """

    key: str
    box: Box
    flat: FlatRange | None
    dtype: str
    nbytes: int
    crc32c: int | None = None

    @property
    def region(self) -> tuple:
        return (self.key, self.box.offsets, self.box.sizes, None if self.flat is None else (self.flat.start, self.flat.numel))


def merge_metas(metas_by_rank: list[dict[str, TensorMeta]]) -> dict[str, TensorMeta]:
    """One metadata table for the job; ranks that disagree about a tensor are named."""
    merged: dict[str, TensorMeta] = {}
    seen_on: dict[str, int] = {}
    for rank, metas in enumerate(metas_by_rank):
        for key, meta in metas.items():
            if key not in merged:
                merged[key], seen_on[key] = meta, rank
            elif merged[key] != meta:
                a = merged[key]
                raise SpecError(
                    f"ranks {seen_on[key]} and {rank} disagree about tensor {key}: "
                    f"shape {list(a.shape)} {a.dtype} {a.pattern} vs shape {list(meta.shape)} {meta.dtype} {meta.pattern}"
                )
    return merged


def replicated_regions(pieces_by_rank: list[list[PieceInfo]]) -> set[tuple]:
    """Regions held by more than one rank: the ones whose copies must be compared."""
    seen: set[tuple] = set()
    shared: set[tuple] = set()
    for pieces in pieces_by_rank:
        for p in {p.region for p in pieces}:
            (shared if p in seen else seen).add(p)
    return shared


def assign_writers(pieces_by_rank: list[list[PieceInfo]]) -> list[list[int]]:
    """For each rank, the indices of its pieces that it writes: exactly one holder per region.

    Replicas are compared first: if the holders of one region report different checksums, the
    ranks are named grouped by checksum. Writers are chosen to balance bytes (largest regions first,
    each to the least-loaded holder, ties to the lowest rank).

    Raises:
        ReplicaDivergenceError: some replicated region differs between ranks.
    """
    holders: dict[tuple, list[tuple[int, int]]] = {}
    for rank, pieces in enumerate(pieces_by_rank):
        for i, p in enumerate(pieces):
            holders.setdefault(p.region, []).append((rank, i))

    problems = []
    for region, hs in holders.items():
        groups: dict[tuple, list[int]] = {}
        for rank, i in hs:
            p = pieces_by_rank[rank][i]
            groups.setdefault((p.crc32c, p.dtype, p.nbytes), []).append(rank)
        if len(hs) > 1 and any(pieces_by_rank[r][i].crc32c is None for r, i in hs):
            raise ValueError(f"replicated region {region[0]} reached the plan without checksums")
        if len(groups) > 1:
            key, offsets, sizes, flat = region
            box = Box(offsets, sizes)
            where = f"{key} {box}" + (f" {FlatRange(*flat)}" if flat else "")
            detail = "; ".join(f"ranks {ranks} have crc32c {c:08x}" for (c, _, _), ranks in groups.items())
            problems.append(f"{where}: {detail}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ReplicaDivergenceError(
            "replicated tensors differ between ranks, refusing to pick one: " + " | ".join(problems[:5]) + more
        )

    load = [0] * len(pieces_by_rank)
    out: list[list[int]] = [[] for _ in pieces_by_rank]
    order = sorted(holders.items(), key=lambda kv: -pieces_by_rank[kv[1][0][0]][kv[1][0][1]].nbytes)
    for _, hs in order:
        rank, i = min(hs, key=lambda h: (load[h[0]], h[0]))
        load[rank] += pieces_by_rank[rank][i].nbytes
        out[rank].append(i)
    for lst in out:
        lst.sort()
    return out
