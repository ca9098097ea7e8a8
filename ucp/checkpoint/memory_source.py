"""How a load from memory chooses its snapshot: rank 0's decisions over what every node holds
(:meth:`ucp.checkpoint.memory.Snapshots.source`), pure functions of the gathered summaries.
"""

from __future__ import annotations

from dataclasses import replace

from ucp.snapshot.header import restorable
from ucp.snapshot.recovery import find_recoverable


def choose_own(gathered: list, step: int | None, world_size: int) -> tuple[int, int] | None:
    """Rank 0's choice of the snapshot a job resuming in place loads, each rank its own header on its
    own node, from every node's ``(node, header summaries, parity summaries, agent status)``: the
    newest restorable ``(step, world size)`` (of ``step`` if given) saved by ``world_size`` ranks,
    when every rank's header of it is on the node that rank runs on; None when the case is not that
    one (an agent took over or discarded snapshots, parity would restore a newer one, another world)."""
    if any(g[3].get(k) for g in gathered for k in ("adopted", "discarded")):
        return None  # (an agent took over or discarded snapshots: the full path says what)
    unique = [h for g in gathered for h in g[1] if step is None or h["step"] == step]
    newest = restorable(unique)
    if newest is None or newest[1] != world_size:
        return None
    rec, _ = find_recoverable([(g[0], g[1], g[2]) for g in gathered], step)
    if rec is not None and rec.step > newest[0]:
        return None
    for rank, g in enumerate(gathered):  # every rank's own header on its own node
        if not any(h["rank"] == rank and (h["step"], h["world_size"]) == newest for h in g[1]):
            return None
    return newest


def choose_source(gathered: list, step: int | None) -> dict:
    """Rank 0's choice of the snapshot to load from every node's ``(node, header summaries, parity
    summaries, agent status, durable step)`` (the durable step on rank 0's entry): ``{"step",
    "world", "rec", "speakers", "durable", "why"}`` (``step`` None: none to load from memory, ``why``
    says why). ``rec`` is the :class:`~ucp.snapshot.recovery.Recoverable` to rebuild, trimmed to its
    damaged groups; ``speakers`` maps the nodes holding them to the rank that reads their segments."""
    durable = gathered[0][4]
    per_node = {n: (held, records) for n, held, records, _, _ in gathered}
    unique = [h for held, _ in per_node.values() for h in held if step is None or h["step"] == step]
    newest = restorable(unique)
    rec, why = find_recoverable([(n, held, records) for n, (held, records) in per_node.items()], step)
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
    speakers = _speakers(gathered)
    if rec is not None:
        members = {r for g in rec.groups for r in g}
        holder = {r: n for r, n in rec.holder.items() if r in members}
        rec = replace(rec, holder=holder)
        out["speakers"] = {n: speakers[n] for n in set(holder.values())}
        out.update(step=rec.step, world=rec.world_size, rec=rec)
    else:
        out.update(step=newest[0], world=newest[1])
    return out


def records_by_rank(rec, speakers: dict, got: list[list[dict]], world_size: int) -> list[dict]:
    """Rank 0's share-out of the parity records of ``rec``'s damaged groups (``got``: what each
    node's speaker found): each rank's ``{old rank: record}`` of the groups whose rebuild it joins
    (it reads a surviving member's segments: it speaks for the node holding them), every record of
    such a group; nothing for the others (``rebuild_lost`` skips a group it has no record of)."""
    full = {r["rank"]: r for held in got for r in held}
    out: list[dict] = [{} for _ in range(world_size)]
    for members in rec.groups:
        involved = {speakers[rec.holder[m]] for m in members if m in full and m not in rec.lost}
        for r in involved:
            out[r].update({m: full[m] for m in members if m in full})
    return out


def _speakers(gathered: list) -> dict:
    """node -> its lowest rank: the one that reads the node's segments and headers."""
    speakers: dict = {}
    for rank, g in enumerate(gathered):
        speakers.setdefault(g[0], rank)
    return speakers


def speaker_roles(gathered: list) -> list[bool]:
    """Whether each rank is its node's speaker."""
    speakers = set(_speakers(gathered).values())
    return [r in speakers for r in range(len(gathered))]
