"""The save plan: agree on tensor metadata, detect diverged replicas, pick one writer per region.

Pure functions over what the ranks reported. A durable save computes its plan once per layout, on
the committing rank (:func:`plan_save`), and reuses it while no rank's pieces change (their
:func:`structure_signature`); each rank keeps only its own :class:`RankPlan`, the committing rank
the :class:`CommitPlan`, and each save compares the replicas' checksums there
(:func:`compare_replicas`). :func:`assign_writers` is the same plan in one call, for callers that
have every rank's checksums at hand (the memory tier).
"""

from __future__ import annotations

import hashlib
import itertools
import pickle
from dataclasses import dataclass

import numpy as np

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


def structure_signature(infos: list[PieceInfo], metas: dict[str, TensorMeta], layout) -> bytes:
    """A digest of what a rank saves, without the data: its pieces' regions, dtypes and sizes, the
    tensors' metadata and the layout. A save plan holds while every rank's signature is unchanged."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(layout).encode())
    for i in infos:
        h.update(repr((i.region, i.dtype, i.nbytes)).encode())
    for key in sorted(metas):
        h.update(repr((key, metas[key])).encode())
    return h.digest()


def pack_share(infos: list[PieceInfo], metas: dict[str, TensorMeta]) -> tuple[tuple[bytes, ...], bytes]:
    """A rank's pieces and tensor metadata as it sends them to the committing rank for the plan:
    each run of consecutive pieces with (or without) a flat range pickled apart, and the metadata
    apart, so that what many ranks hold alike (parameters replicated over dp, a pipeline stage's
    metadata) arrives as equal bytes, unpickled once (:func:`unpack_shares`)."""
    runs = [list(run) for _, run in itertools.groupby(infos, key=lambda i: i.flat is None)]
    return tuple(pickle.dumps(run, protocol=pickle.HIGHEST_PROTOCOL) for run in runs), \
        pickle.dumps(metas, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_shares(packed: list[tuple[tuple[bytes, ...], bytes]]) -> tuple[list[list[PieceInfo]], list[dict]]:
    """Every rank's pieces and metadata from :func:`pack_share` (what the job's own ranks sent, as
    torch's object collectives trust them): equal bytes are unpickled once, into shared objects."""
    cache: dict[bytes, object] = {}

    def load(blob: bytes):
        value = cache.get(blob)
        if value is None:
            value = cache[blob] = pickle.loads(blob)
        return value

    pieces = [[info for blob in runs for info in load(blob)] for runs, _ in packed]
    return pieces, [load(metas) for _, metas in packed]


@dataclass(frozen=True)
class RankPlan:
    """One rank's share of a save plan.

    Args:
        plan_id: the plan this share belongs to (the committing rank's count of plans made).
        signature: the rank's :func:`structure_signature` the plan was made for.
        writes: indices of the rank's pieces it writes, in file order.
        replicated: indices of its pieces that other ranks hold too: checksummed at every save and
            compared on the committing rank.
    """

    plan_id: int
    signature: bytes
    writes: tuple[int, ...]
    replicated: tuple[int, ...]


@dataclass(frozen=True)
class CommitPlan:
    """What the committing rank keeps of a save plan: the job's tensor metadata, every rank's
    signature, each rank's written pieces in file order (the fragment table's fixed columns), and the
    replica groups.

    Args:
        plan_id: this plan's number (see :attr:`RankPlan.plan_id`).
        signatures: each rank's signature when the plan was made.
        metas: tensor key -> :class:`TensorMeta`, agreed by every rank.
        written: per rank, the :class:`PieceInfo` of each piece it writes, in file order.
        groups: for the replica comparison: each rank's replicated pieces (in :attr:`RankPlan.replicated`
            order), all ranks concatenated, are ``order``-permuted into groups that start at ``starts``;
            ``regions[g]`` names group ``g`` and ``holders[g]`` its ranks.
    """

    plan_id: int
    signatures: tuple[bytes, ...]
    metas: dict
    written: tuple[tuple[PieceInfo, ...], ...]
    order: np.ndarray
    starts: np.ndarray
    regions: tuple
    holders: tuple

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for ps in self.written for p in ps)


def plan_save(pieces_by_rank: list[list[PieceInfo]], metas_by_rank: list[dict[str, TensorMeta]],
              signatures: list[bytes], plan_id: int) -> tuple[CommitPlan, list[RankPlan]]:
    """The save plan for the job (on the committing rank): one writer per region, balanced by bytes;
    checksums are compared later, at each save (:func:`compare_replicas`).

    Raises:
        SpecError: ranks disagree about a tensor's metadata.
        ReplicaDivergenceError: the holders of one region disagree about its dtype or size.
    """
    metas = merge_metas(metas_by_rank)
    holders = _holders(pieces_by_rank)
    problems = []
    for region, hs in holders.items():
        kinds: dict[tuple, list[int]] = {}
        for rank, i in hs:
            p = pieces_by_rank[rank][i]
            kinds.setdefault((p.dtype, p.nbytes), []).append(rank)
        if len(kinds) > 1:
            detail = "; ".join(f"ranks {ranks} hold {n} bytes of {d}" for (d, n), ranks in kinds.items())
            problems.append(f"{_where(region)}: {detail}")
    _refuse(problems)
    writes = _balance(holders, pieces_by_rank)
    replicated: list[list[int]] = [[] for _ in pieces_by_rank]
    groups = [hs for hs in holders.values() if len(hs) > 1]
    for hs in groups:
        for rank, i in hs:
            replicated[rank].append(i)
    for lst in replicated:
        lst.sort()
    position = {}  # (rank, piece) -> its place among all ranks' replicated pieces, concatenated
    for rank, idxs in enumerate(replicated):
        for i in idxs:
            position[(rank, i)] = len(position)
    order = np.fromiter((position[h] for hs in groups for h in hs), dtype=np.int64, count=len(position))
    starts = np.fromiter(itertools.accumulate((len(hs) for hs in groups[:-1]), initial=0), dtype=np.int64,
                         count=len(groups))
    regions = tuple(pieces_by_rank[hs[0][0]][hs[0][1]].region for hs in groups)
    commit = CommitPlan(plan_id, tuple(signatures), metas,
                        tuple(tuple(pieces_by_rank[r][i] for i in idxs) for r, idxs in enumerate(writes)),
                        order, starts, regions, tuple(tuple(r for r, _ in hs) for hs in groups))
    ranks = [RankPlan(plan_id, sig, tuple(w), tuple(rp)) for sig, w, rp in zip(signatures, writes, replicated)]
    return commit, ranks


def compare_replicas(plan: CommitPlan, crcs_by_rank: list[np.ndarray]) -> None:
    """Compare the checksums of every replicated region's copies (``crcs_by_rank[r]``: rank ``r``'s
    replicated pieces' CRC-32C, in :attr:`RankPlan.replicated` order).

    Raises:
        ReplicaDivergenceError: some region's copies differ; the ranks are named grouped by checksum.
    """
    if not len(plan.order):
        return
    crcs = np.concatenate([np.asarray(c, dtype=np.uint32) for c in crcs_by_rank])[plan.order]
    diverged = np.flatnonzero(np.minimum.reduceat(crcs, plan.starts) != np.maximum.reduceat(crcs, plan.starts))
    problems = []
    for g in diverged[:6]:
        lo = plan.starts[g]
        seen: dict[int, list[int]] = {}
        for rank, crc in zip(plan.holders[g], crcs[lo:lo + len(plan.holders[g])]):
            seen.setdefault(int(crc), []).append(rank)
        problems.append(f"{_where(plan.regions[g])}: " + "; ".join(f"ranks {rs} have crc32c {c:08x}"
                                                                     for c, rs in seen.items()))
    _refuse(problems, len(diverged))


def merge_metas(metas_by_rank: list[dict[str, TensorMeta]]) -> dict[str, TensorMeta]:
    """One metadata table for the job; ranks that disagree about a tensor are named."""
    merged: dict[str, TensorMeta] = {}
    seen_on: dict[str, int] = {}
    merged_tables: set[int] = set()  # (ranks may share one table object: unpack_shares)
    for rank, metas in enumerate(metas_by_rank):
        if id(metas) in merged_tables:
            continue
        merged_tables.add(id(metas))
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
    holders = _holders(pieces_by_rank)
    problems = []
    for region, hs in holders.items():
        groups: dict[tuple, list[int]] = {}
        for rank, i in hs:
            p = pieces_by_rank[rank][i]
            groups.setdefault((p.crc32c, p.dtype, p.nbytes), []).append(rank)
        if len(hs) > 1 and any(pieces_by_rank[r][i].crc32c is None for r, i in hs):
            raise ValueError(f"replicated region {region[0]} reached the plan without checksums")
        if len(groups) > 1:
            detail = "; ".join(f"ranks {ranks} have crc32c {c:08x}" for (c, _, _), ranks in groups.items())
            problems.append(f"{_where(region)}: {detail}")
    _refuse(problems)
    return _balance(holders, pieces_by_rank)


def _holders(pieces_by_rank: list[list[PieceInfo]]) -> dict[tuple, list[tuple[int, int]]]:
    """region -> ``(rank, piece index)`` of every copy, in rank order."""
    holders: dict[tuple, list[tuple[int, int]]] = {}
    for rank, pieces in enumerate(pieces_by_rank):
        for i, p in enumerate(pieces):
            holders.setdefault(p.region, []).append((rank, i))
    return holders


def _where(region: tuple) -> str:
    key, offsets, sizes, flat = region
    return f"{key} {Box(offsets, sizes)}" + (f" {FlatRange(*flat)}" if flat else "")


def _refuse(problems: list[str], count: int | None = None) -> None:
    if problems:
        count = len(problems) if count is None else count
        more = f" (and {count - 5} more)" if count > 5 else ""
        raise ReplicaDivergenceError(
            "replicated tensors differ between ranks, refusing to pick one: " + " | ".join(problems[:5]) + more
        )


def _balance(holders: dict, pieces_by_rank: list[list[PieceInfo]]) -> list[list[int]]:
    """One writer per region: largest regions first, each to its least-loaded holder (ties: lowest rank)."""
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
