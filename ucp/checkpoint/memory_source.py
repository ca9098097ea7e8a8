"""How a load from memory chooses its snapshot: rank 0's decisions over what every node holds
(:meth:`ucp.checkpoint.memory.Snapshots.source`), and the folds that bring it to rank 0; pure functions
of the ranks' summaries.
"""

from __future__ import annotations

from dataclasses import replace

from ucp.snapshot.header import restorable
from ucp.snapshot.recovery import find_recoverable


def own_offer(rank: int, world_size: int, step: int | None, held: list, status: dict) -> dict:
    """What rank ``rank`` of a job of ``world_size`` ranks adds to the fold that decides whether the
    job resumes in place (:func:`fold_own`, :func:`decide_own`), from its node's header summaries
    ``held`` and agent ``status`` (only headers of ``step`` when given): the steps of which it holds
    its own header of this world on its node; the newest ``(step, world size)`` of a complete header
    there; whether its agent took over or discarded snapshots. A few numbers, whatever the world."""
    held = [h for h in held if step is None or h["step"] == step]
    return {"mine": frozenset(h["step"] for h in held if h["rank"] == rank and h["world_size"] == world_size),
            "complete": max(((h["step"], h["world_size"]) for h in held if h["complete"]), default=None),
            "taken_over": any(status.get(k) for k in ("adopted", "discarded"))}


def fold_own(a: dict, b: dict) -> dict:
    """Two offers (or folds of offers) as one: the steps both hold, the newer of each maximum."""
    def newer(x, y):
        return y if x is None else x if y is None else max(x, y)

    return {"mine": a["mine"] & b["mine"], "complete": newer(a["complete"], b["complete"]),
            "taken_over": a["taken_over"] or b["taken_over"]}


def decide_own(folded: dict, world_size: int) -> tuple[int, int] | None:
    """Rank 0's decision on the fold of every rank's :func:`own_offer`: ``(step, world size)`` of the
    snapshot a job resuming in place loads, each rank its own header on its own node, or None when
    the case is not that one (an agent took over or discarded snapshots; the newest complete snapshot
    is of another world, or some rank's header of it is not on its node), which the full path
    (:func:`choose_source`) then decides.

    The newest restorable snapshot has a complete header, so none is newer than the newest complete
    header; when every rank holds its own header of that one, it is restorable, hence the newest; a
    parity rebuild (:func:`~ucp.snapshot.recovery.find_recoverable`) completes only a snapshot with a
    complete header, so none newer either. This choice is :func:`choose_source`'s whenever it makes one."""
    newest = folded["complete"]
    if folded["taken_over"] or newest is None or newest[1] != world_size or newest[0] not in folded["mine"]:
        return None
    return newest


def node_offer(rank: int, node: str, held: list, records: list, status: dict) -> dict:
    """What rank ``rank`` adds to the fold of every node's holdings (:func:`fold_nodes`), when the
    job does not resume in place: its node's header and parity summaries and agent status, under the
    node's id (a node is an agent), with the rank as a candidate to speak for the node."""
    return {node: (rank, held, records, status)}


def fold_nodes(a: dict, b: dict) -> dict:
    """Two folds of :func:`node_offer` s as one: each node once, held by its lowest rank, the rank
    that speaks for it (reads its segments and headers). The ranks of a node hold the same summaries,
    so rank 0 receives each node's once, not once per rank."""
    out = dict(a)
    for node, offer in b.items():
        if node not in out or offer[0] < out[node][0]:
            out[node] = offer
    return out


def speaker_mask(nodes: dict) -> int:
    """The ranks that speak for their nodes (the fold's lowest rank of each), as bits of one integer:
    rank ``r`` speaks when bit ``r`` is set (one bit per rank in the broadcast decision)."""
    mask = 0
    for rank, *_ in nodes.values():
        mask |= 1 << rank
    return mask


def choose_source(nodes: dict, durable: int | None, step: int | None) -> dict:
    """Rank 0's choice of the snapshot to load from every node's holdings, ``{node: (speaker rank,
    header summaries, parity summaries, agent status)}`` (the fold of :func:`node_offer` s), and the
    step a durable load would resume (``durable``): ``{"step", "world", "rec", "speakers", "durable",
    "why"}`` (``step`` None: none to load from memory, ``why`` says why). ``rec`` is the
    :class:`~ucp.snapshot.recovery.Recoverable` to rebuild, trimmed to its damaged groups; ``speakers``
    maps the nodes holding them to the rank that reads their segments."""
    unique = [h for _, held, _, _ in nodes.values() for h in held if step is None or h["step"] == step]
    newest = restorable(unique)
    rec, why = find_recoverable([(n, held, records) for n, (_, held, records, _) in nodes.items()], step)
    if rec is not None and newest is not None and newest[0] >= rec.step:
        rec = None
    if newest is not None and rec is None and durable is not None and durable > newest[0] and \
            any(h.get("adopted") for h in unique if (h["step"], h["world_size"]) == newest):
        # taken over from a dead agent, while the job went on saving durably: not the newest state
        why = (f"the newest snapshot in memory (step {newest[0]}, taken over from a dead agent) is older than "
               f"durable step {durable}")
        newest = None
    out = {"step": None, "world": None, "rec": None, "speakers": {}, "durable": durable, "why": why}
    if newest is None and rec is None:
        return out
    if rec is not None:
        members = {r for g in rec.groups for r in g}
        holder = {r: n for r, n in rec.holder.items() if r in members}
        rec = replace(rec, holder=holder)
        out["speakers"] = {n: nodes[n][0] for n in set(holder.values())}
        out.update(step=rec.step, world=rec.world_size, rec=rec)
    else:
        out.update(step=newest[0], world=newest[1])
    return out


def records_of_rank(rec, speakers: dict, found: list[dict], rank: int) -> dict:
    """The parity records of ``rec``'s damaged groups (``found``: what the nodes' speakers found) that
    rank ``rank`` needs: ``{old rank: record}`` of every group whose rebuild it joins (it reads a
    surviving member's segments: it speaks for the node holding them); nothing for the others
    (``rebuild_lost`` skips a group it has no record of)."""
    full = {r["rank"]: r for r in found}
    out: dict = {}
    for members in rec.groups:
        if any(speakers[rec.holder[m]] == rank for m in members if m in full and m not in rec.lost):
            out.update({m: full[m] for m in members if m in full})
    return out
