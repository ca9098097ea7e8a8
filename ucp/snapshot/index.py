"""A snapshot's fragment index, spread over the ranks that load it (docs/agent.md section 4).

A job that resumes from memory in place reads its own header (``Snapshots._source_own``). One that
resumes on another world or layout, or after a parity rebuild, needs the fragments overlapping the
regions it loads, wherever the headers holding them are. No rank gathers every header:

1. each node's *speaker* (one rank per node) sends every fragment of the headers its agent holds to
   the fragment's *owner*, a rank chosen by a hash of the tensor key (:func:`key_owner`,
   :func:`index_messages`); each owner keeps what it gets as a :class:`KeyIndex`. In the same
   messages, saving rank ``q``'s non-tensor state goes to loading rank ``q`` (:func:`own_state`);
2. the speakers' tensors' metadata and the digests of their ranks' states are folded up a tree to
   rank 0 (:func:`state_offer`, :func:`fold_states`), which decides what every rank gets
   (:func:`decide_states`): the tensors' metadata, the state every rank saved alike and the
   optimizer's distinct per-rank states; a fold carries the model's metadata, not one copy per node;
3. once a rank knows the regions it loads, it asks the owners of their keys (:func:`query_messages`)
   and gets the fragments overlapping them (:meth:`KeyIndex.answer`), each region once, from a rank
   of its own node when one holds it: :meth:`SnapshotManifest.select`.

A rank's traffic is its own share: the fragments of its node's headers, of the keys it owns and of
the regions it loads, and its own state; rank 0's is the snapshot's metadata, not its fragments.
"""

from __future__ import annotations

from operator import itemgetter

import numpy as np

from ucp.codecs.checksum import crc32c
from ucp.errors import SpecError
from ucp.format.fragment import RegionQuery
from ucp.format.layout import Layout
from ucp.format.manifest import Manifest, TensorMeta
from ucp.format.values import value_digest
from ucp.snapshot.header import FragmentRecord, block_bytes_of, one_block_size

OPTIMIZER = "optimizer"  # the state every rank needs from every saving rank when the layout changes


def key_owner(key: str, world: int) -> int:
    """The rank (of ``world``) that holds the index entries of tensor ``key``."""
    return crc32c(key.encode()) % world


def index_messages(headers: list[dict], world: int) -> dict[int, tuple[list[tuple], dict]]:
    """A speaker's part of step 1: loading rank -> ``(entries, states)``: the index entries it owns
    ``(saving rank, host, file size, fragment dict)`` from ``headers``, and ``{saving rank: its state}``
    for the saving rank of its own number."""
    out: dict[int, tuple[list[tuple], dict]] = {}
    for h in headers:
        for f in h["fragments"]:
            out.setdefault(key_owner(f["key"], world), ([], {}))[0].append((h["rank"], h["host"], h["file_size"], f))
        if h["rank"] < world:
            out.setdefault(h["rank"], ([], {}))[1][h["rank"]] = h["state"]
    return out


def query_messages(regions: dict, world: int) -> dict[int, dict]:
    """A loading rank's part of step 3: owner rank -> ``{key: boxes or None}`` of ``regions``."""
    out: dict[int, dict] = {}
    for key, boxes in regions.items():
        out.setdefault(key_owner(key, world), {})[key] = boxes
    return out


_ASKED_MAX = 4096  # distinct queries whose regions a key remembers


class _KeyEntries:
    """The entries of one tensor key by region (equal boxes and flat ranges hold the same elements):
    each region's box (``lo``, ``hi``) and flat range (``start``, ``end``; -1 for none), and which
    entry serves it to a rank on a given host (the lowest rank there, else the lowest rank). A query
    costs the key's regions, not its entries: a tensor replicated over every data-parallel rank is
    one region however many ranks hold it."""

    def __init__(self, entries: list[tuple]):
        self.entries = entries
        frags = [e[3] for e in entries]
        dims = {len(f["offsets"]) for f in frags}
        self.ragged = len(dims) != 1  # (a malformed row: every query keeps it, so that validation names it)
        if self.ragged:
            return
        n = dims.pop()
        lo = np.array([f["offsets"] for f in frags], dtype=np.int64).reshape(len(frags), n)
        sizes = np.array([f["sizes"] for f in frags], dtype=np.int64).reshape(len(frags), n)
        flat = np.array([f["flat"] if f["flat"] is not None else (-1, 0) for f in frags], dtype=np.int64)
        _, first, region = np.unique(np.concatenate([lo, sizes, flat], axis=1), axis=0, return_index=True,
                                     return_inverse=True)
        region = region.reshape(-1)
        self.lo, self.sizes = lo[first], sizes[first]
        self.hi = self.lo + self.sizes
        self.start, self.end = flat[first, 0], flat[first, 0] + flat[first, 1]
        # row-major strides of each box (for flat ranges): suffix products of its sizes
        self.strides = np.ones_like(self.sizes)
        for d in range(n - 2, -1, -1):
            self.strides[:, d] = self.strides[:, d + 1] * self.sizes[:, d + 1]
        self._asked: dict = {}  # the regions each query met (boxes -> region ids)
        self.lowest: list[int] = [-1] * len(first)  # region -> the entry of its lowest rank
        self.on_host: dict[tuple[int, str], int] = {}  # (region, host) -> the entry of its lowest rank there
        for i in np.lexsort((np.array([e[0] for e in entries], dtype=np.int64), region)).tolist():  # by rank
            r = int(region[i])
            self.on_host.setdefault((r, entries[i][1]), i)
            if self.lowest[r] < 0:
                self.lowest[r] = i

    def answer(self, boxes, host: str) -> list[tuple]:
        """The entries meeting any of ``boxes`` (None: all), as
        :meth:`~ucp.format.fragment.RegionQuery.wants` decides: each region once, from a rank on
        ``host`` when one holds it, else the lowest rank (a ragged key: every entry)."""
        if self.ragged:
            return list(self.entries)
        query = None if boxes is None else tuple(boxes)
        regions = self._asked.get(query)
        if regions is None:  # (the ranks of one coordinate in every data-parallel replica ask alike)
            regions = self._regions(boxes).tolist()
            if len(self._asked) < _ASKED_MAX:
                self._asked[query] = regions
        return [self.entries[self.on_host.get((r, host), self.lowest[r])] for r in regions]

    def _regions(self, boxes) -> np.ndarray:
        """The regions (ascending) that may meet any of ``boxes`` (None: all)."""
        every = np.arange(len(self.lowest))
        if boxes is None:
            return every
        keep = np.zeros(len(self.lowest), dtype=bool)
        n = self.lo.shape[1]
        for q in boxes:
            if len(q.offsets) != n or n == 0:
                return every
            qlo = np.array(q.offsets, dtype=np.int64)
            qhi = qlo + np.array(q.sizes, dtype=np.int64)
            olo, ohi = np.maximum(self.lo, qlo), np.minimum(self.hi, qhi)
            meets = (ohi > olo).all(axis=1)
            flat = self.start >= 0
            if flat.any():  # the flat indices the overlap spans in the box, against the flat range
                first = ((olo - self.lo) * self.strides).sum(axis=1)
                last = ((ohi - 1 - self.lo) * self.strides).sum(axis=1)
                meets &= ~flat | ((self.start <= last) & (self.end > first))
            keep |= meets
        return np.nonzero(keep)[0]


class KeyIndex:
    """What one owner holds of a snapshot's index: every fragment of the keys it owns (``received``:
    source rank -> ``(entries, states)`` of :func:`index_messages`)."""

    def __init__(self, received: dict[int, tuple[list[tuple], dict]]):
        by_key: dict[str, list[tuple]] = {}
        for entries, _ in received.values():
            for e in entries:
                by_key.setdefault(e[3]["key"], []).append(e)
        self._keys = {k: _KeyEntries(v) for k, v in by_key.items()}

    def answer(self, regions: dict, host: str) -> list[tuple]:
        """The entries of the keys ``regions`` names (``{key: boxes or None}``) that overlap their
        boxes: each region once, from a rank on ``host`` when one holds it, else the lowest rank."""
        out: list[tuple] = []
        for key, boxes in regions.items():
            held = self._keys.get(key)
            if held is not None:
                out += held.answer(boxes, host)
        return out


def _merge_meta(into: dict, key: str, meta: dict, rank: int) -> None:
    """Tensor ``key``'s ``meta`` from saving rank ``rank`` into a fold's ``metas`` (the first
    disagreement is kept in its ``conflict``; each key keeps the lowest rank's)."""
    held = into["metas"].get(key)
    if held is None or (rank < held[1] and held[0] == meta):
        into["metas"][key] = (meta, rank)
    elif held[0] != meta:
        a, b = TensorMeta.from_dict(held[0], key), TensorMeta.from_dict(meta, key)
        if a != b and into["conflict"] is None:
            (r1, m1), (r2, m2) = sorted([(held[1], a), (rank, b)], key=itemgetter(0))
            into["conflict"] = (f"ranks {r1} and {r2} disagree about tensor {key}: shape {list(m1.shape)} {m1.dtype} "
                                f"{m1.pattern} vs shape {list(m2.shape)} {m2.dtype} {m2.pattern}")


def state_offer(headers: list[dict]) -> dict | None:
    """A speaker's part of step 2, folded up a tree to rank 0 (:func:`fold_states`): its node's
    headers' tensors' metadata, which saving ranks they are, each state name's digest while every rank
    seen so far holds it alike (None once they differ), the values of those digests, and the distinct
    values of the optimizer's state; None for a rank that speaks for no header."""
    out = None
    for h in sorted(headers, key=lambda h: h["rank"]):
        rank, state = h["rank"], h["state"]
        digests = {name: value_digest(value) for name, value in state.items()}
        one = {"ranks": 1 << rank, "metas": {key: (meta, rank) for key, meta in h["tensors"].items()},
               "names": digests, "values": {d: state[name] for name, d in digests.items()},
               "optimizer": {digests[OPTIMIZER]: (rank, state[OPTIMIZER])} if OPTIMIZER in state else {},
               "head": (rank, {k: h.get(k) for k in ("step", "layout", "created_by")}), "conflict": None,
               "block_bytes": (block_bytes_of(h),)}
        out = fold_states(out, one)
    return out


def fold_states(a: dict | None, b: dict | None) -> dict | None:
    """Two :func:`state_offer` s (or folds of them) as one, never raising (a disagreement about a
    tensor is kept in ``conflict``, for :func:`decide_states` to name): metadata once per key, a
    name's digest kept while both sides hold it alike, the optimizer's distinct values with the
    lowest rank holding each. Its size is the model's metadata and the state's distinct values, and
    one bit per saving rank."""
    if a is None or b is None:
        return a if b is None else b
    out = {"ranks": a["ranks"] | b["ranks"], "metas": dict(a["metas"]), "conflict": a["conflict"] or b["conflict"],
           "head": min(a["head"], b["head"], key=lambda h: h[0]), "optimizer": dict(a["optimizer"]),
           "block_bytes": tuple(sorted({*a["block_bytes"], *b["block_bytes"]}))}
    for key, (meta, rank) in b["metas"].items():
        _merge_meta(out, key, meta, rank)
    for d, (rank, value) in b["optimizer"].items():
        if d not in out["optimizer"] or rank < out["optimizer"][d][0]:
            out["optimizer"][d] = (rank, value)
    names = {name: d if b["names"].get(name, None) == d else None for name, d in a["names"].items()}
    names.update({name: None for name in b["names"] if name not in names})
    out["names"] = names
    out["values"] = {d: a["values"].get(d, b["values"].get(d)) for d in names.values() if d is not None}
    return out


def decide_states(folded: dict | None, world_size: int) -> dict:
    """Rank 0's part of step 2, from the fold of every speaker's :func:`state_offer`: what every rank
    gets (the step, layout, tensors' metadata, the state every saving rank holds alike, and the
    distinct values of the optimizer's state where they differ). A rank's own state comes to it with
    the index (:func:`index_messages`, :func:`own_state`)."""
    held = 0 if folded is None else folded["ranks"]
    missing = [r for r in range(world_size) if not held >> r & 1]
    if missing or folded is None:
        raise SpecError(f"the snapshot's headers of saving ranks {missing[:8]} reached no rank")
    if folded["conflict"] is not None:
        raise SpecError(folded["conflict"])
    head = folded["head"][1]
    shared = {name: folded["values"][d] for name, d in sorted(folded["names"].items()) if d is not None}
    optimizer = [] if OPTIMIZER in shared else [v for _, v in sorted(folded["optimizer"].values(), key=itemgetter(0))]
    return {"step": head["step"], "layout": head["layout"], "created_by": head.get("created_by") or "",
            "block_bytes": one_block_size(folded["block_bytes"]),
            "tensors": {k: m for k, (m, _) in sorted(folded["metas"].items())}, "shared": shared,
            "optimizer": optimizer}


def own_state(received: dict, rank: int, common: dict) -> dict:
    """This loading rank's own state from what the index exchange brought it (:func:`index_messages`):
    saving rank ``rank``'s state less what :func:`decide_states` found shared (nothing when no saving
    rank of that number exists)."""
    for _, states in received.values():
        if rank in states:
            return {name: v for name, v in states[rank].items() if name not in common["shared"]}
    return {}


class SnapshotManifest:
    """A snapshot in memory as a loader reads it when its headers are spread over the nodes: the
    header now (:attr:`tensors`, :attr:`layout`), this rank's share of the fragment index, and the
    fragments a rank loads when it asks (:meth:`select`, a collective).

    Args:
        common: what :func:`decide_states` gives every rank.
        rank, own: this rank and its own state (:func:`own_state`).
        index: this rank's share of the index.
        host: this rank's node (fragments held there are preferred).
    """

    def __init__(self, common: dict, rank: int, own: dict, index: KeyIndex, host: str):
        self.step = common["step"]
        self.layout = Layout.from_dict(common["layout"])
        self.tensors = {k: TensorMeta.from_dict(m, k) for k, m in common["tensors"].items()}
        self.block_bytes = common["block_bytes"]
        self.created_by = common["created_by"]
        self._shared, self._own, self._optimizer = common["shared"], own, common["optimizer"]
        self._rank, self._index, self._host = rank, index, host
        Manifest(self.step, self.layout, self.tensors, (), {"shared": self._shared, "ranks": {}},
                 block_bytes=self.block_bytes).validate_header()

    def select(self, coll, query: RegionQuery) -> Manifest:
        """The manifest of the fragments ``query`` wants, from their keys' owners (two exchanges of
        ``coll``, on every rank together), checked row by row and, for keys asked whole, for cover."""
        asked = coll.exchange_phase("memory-query",
                                    lambda: {r: (q, self._host) for r, q in query_messages(query.regions,
                                                                                           coll.world_size).items()})
        got = coll.exchange_phase("memory-answer", lambda: {r: self._index.answer(q, host) for r, (q, host)
                                                            in asked.items()})
        fragments, files = [], {}
        for entries in got.values():
            for rank, _, file_size, f in entries:
                fragments.append(FragmentRecord.from_dict(f).fragment(rank))
                files[f["file"]] = file_size
        manifest = Manifest(self.step, self.layout, self.tensors, tuple(fragments),
                            {"shared": self._shared, "ranks": {}}, files, created_by=self.created_by,
                            block_bytes=self.block_bytes)
        manifest.validate_header()
        manifest.validate_fragments(cover=False)
        manifest.check_cover([k for k, boxes in query.regions.items() if boxes is None and k in self.tensors])
        return manifest

    def shared_state(self) -> dict:
        """The non-tensor state every rank saved alike."""
        return self._shared

    def rank_state(self, rank: int) -> dict:
        """This rank's view of the non-tensor state: the shared entries overlaid with its own."""
        if rank != self._rank:
            raise ValueError(f"rank {self._rank} holds its own state, not rank {rank}'s")
        return {**self._shared, **self._own}

    def states_of(self, name: str) -> dict:
        """The optimizer's state as :func:`ucp.state.optimizer.merged_optimizer_state` reads it."""
        if name != OPTIMIZER:
            raise ValueError(f"a snapshot spread over nodes keeps only the {OPTIMIZER!r} state of every rank")
        shared = {k: v for k, v in self._shared.items() if k == name}
        return {"shared": shared, "ranks": {str(i): {name: v} for i, v in enumerate(self._optimizer)}}
