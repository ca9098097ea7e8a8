"""Erasure-coded snapshots across nodes, and recovery from them on fewer nodes (docs/erasure.md
sections 7-8; issue 7).

**Saving.** With ``Checkpointer(..., redundancy=RedundancyOptions(group=g, parity=m))``, after each
snapshot's cut the ranks encode its parity (:class:`SnapshotParity`): on its first snapshot a job
learns which ranks share a node (a node is an agent), forms its redundancy groups
(:func:`ucp.plan.redundancy.lane_groups`), and then, per snapshot, the members of each group swap
their committed headers (each keeps every member's, so a lost rank's header survives it) and
exchange stripes (:class:`ucp.snapshot.parity.ParityEncoder`); each rank's agent keeps its parity
stripes and a *parity record*. The snapshot is marked complete only after every rank's parity is.

**Recovering.** A load that finds no snapshot held whole by the live agents looks for the newest
one that parity can complete (:func:`find_recoverable`): every rank of the snapshot either held by a
live agent, or lost with at most ``m`` others of its group whose survivors all hold their parity.
Each damaged group is rebuilt on one survivor (:func:`rebuild_lost`), into a segment of its agent;
the rebuilt ranks' fragments then read like any other, resharded onto the new layout by the same
planner, and every read is checked against its fragments' CRC-32C. More than ``m`` lost in a group:
the load says so in one line and falls back to the newest durable checkpoint.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from ucp.codecs.erasure import erasure_code
from ucp.comm.side_groups import all_gather_objects
from ucp.errors import RedundancyError, few
from ucp.plan.redundancy import lane_groups, stripe_plan
from ucp.snapshot import parity as parity_mod
from ucp.snapshot import shm
from ucp.snapshot.parity import FORMAT, FORMAT_VERSION, ParityEncoder, exchange_objects


def _global_ranks(coll) -> list[int]:
    """The global rank of each rank of the job (``coll``'s group)."""
    import torch.distributed as dist

    if coll.world_size == 1:
        return [0]
    return list(dist.get_process_group_ranks(coll.group)) if coll.group is not None else list(range(coll.world_size))


class SnapshotParity:
    """The parity side of one rank's snapshots (run from the snapshot's background thread)."""

    def __init__(self, options, coll):
        self.options = options
        self.coll = coll
        self.encoder: ParityEncoder | None = None
        self.members: list[int] = []  # this rank's group, job ranks
        self.disabled: str | None = None  # why this job's snapshots carry no parity
        self.sequence = 0  # snapshots whose parity was attempted (the same on every rank): message tags

    def setup(self, tier, group) -> None:
        """Form the redundancy groups, once per job (a collective of every rank on ``group``): every
        rank's node (its agent), gathered."""
        if self.encoder is not None or self.disabled is not None:
            return
        node = f"{os.uname().nodename}:{tier.client.info.pid}"
        nodes = all_gather_objects(node, group if self.coll.world_size > 1 else None, self.coll.world_size)
        try:
            groups = lane_groups(nodes, self.options.group, self.options.parity)
        except RedundancyError as e:
            self.disabled = str(e)
            if self.coll.rank == 0:
                warnings.warn(f"ucp: snapshots are kept without parity: {e}", RuntimeWarning, stacklevel=2)
            return
        self.members = next(g for g in groups if self.coll.rank in g)
        to_global = _global_ranks(self.coll)
        self.encoder = ParityEncoder(group, [to_global[r] for r in self.members], to_global[self.coll.rank],
                                     self.options.parity, self.options.stripe, self.options.rate)

    def prepare(self, tier, committed: dict, step: int, sequence: int) -> dict | None:
        """The first half of a snapshot's parity: swap headers with the group (point to point) and
        take the parity segment. What may fail on this rank alone happens here, before any stripe is
        exchanged (the caller then agrees with every rank whether to go on). None without parity."""
        if self.encoder is None:
            return None
        enc = self.encoder
        to_job = dict(zip(enc.members, self.members))
        got = exchange_objects(enc.group, enc.members, enc.members[enc.index], dict(committed, step=step),
                               message_tag=parity_mod.tag(sequence, parity_mod.OBJECTS))
        headers = {to_job[g]: h for g, h in got.items()}
        sizes = [headers[r]["file_size"] for r in self.members]
        plan = enc.plan(sizes)
        pseg = tier.parity_segment(committed["slot"], plan.parity_bytes(enc.index))
        return {"headers": headers, "sizes": sizes, "plan": plan, "segment": pseg, "committed": committed,
                "step": step, "sequence": sequence}

    def exchange(self, tier, prepared: dict | None, token: int) -> None:
        """The second half: exchange the stripes, compute this rank's parity, have the agent keep
        the record."""
        if prepared is None:
            return
        enc, me = self.encoder, self.coll.rank
        plan, slot, pseg = prepared["plan"], prepared["committed"]["slot"], prepared["segment"]
        nbytes = plan.parity_bytes(enc.index)
        data = np.frombuffer(tier.data_segment(slot).buf, np.uint8)
        parity = np.frombuffer(pseg.buf, np.uint8)
        try:
            crcs, chunks = enc.encode(prepared["sizes"], data, parity[:nbytes], prepared["sequence"])
        finally:
            del data, parity
        record = {"format": FORMAT, "format_version": FORMAT_VERSION, "token": token,
                  "world_size": self.coll.world_size, "members": self.members, "index": enc.index,
                  "m": plan.m, "stripe": plan.stripe, "sizes": prepared["sizes"],
                  "code": erasure_code(plan.k, plan.m).to_dict(), "file": pseg.name, "parity_crc32c": crcs,
                  "chunk_crc32c": chunks, "headers": {str(r): h for r, h in prepared["headers"].items() if r != me}}
        tier.commit_parity(slot, prepared["step"], record)


@dataclass
class Recoverable:
    """A snapshot that parity can complete: ``lost`` ranks rebuilt from their ``groups``."""

    step: int
    token: int
    world_size: int
    holder: dict  # rank -> node id of the live agent holding its data (and parity)
    lost: list[int]
    groups: list[list[int]] = field(default_factory=list)  # the damaged groups (job ranks of that snapshot)
    m: int = 1


def find_recoverable(nodes: list[tuple[str, list[dict], list[dict]]], step: int | None) -> tuple[Recoverable | None, str]:
    """The newest snapshot (of ``step`` if given) the live agents can complete from parity.

    Args:
        nodes: per live node, ``(node id, its data header summaries, its parity record summaries)``.

    Returns:
        ``(recoverable, "")``, or ``(None, why)`` — ``why`` is empty when no snapshot carried parity.
    """
    data: dict[tuple[int, int], dict] = {}  # (step, world) -> rank -> node
    complete: dict[tuple[int, int], int] = {}  # (step, world) -> token of a complete header
    parity: dict[tuple[int, int], dict] = {}  # (step, token) -> rank -> (node, record)
    for node, headers, records in nodes:
        for h in headers:
            key = (h["step"], h["world_size"])
            data.setdefault(key, {})[h["rank"]] = node
            if h["complete"] and h.get("token") is not None:
                complete[key] = h["token"]
        for r in records:
            parity.setdefault((r["step"], r["token"]), {})[r["rank"]] = (node, r)
    why = ""
    for (s, world), token in sorted(complete.items(), reverse=True):
        if step is not None and s != step:
            continue
        held = data[(s, world)]
        records = parity.get((s, token), {})
        lost = sorted(set(range(world)) - set(held))
        if not records:
            why = why or f"the snapshot of step {s} lost ranks {few(lost)} and carries no parity"
            continue
        groups = {tuple(r["members"]) for _, r in records.values()}
        m = next(iter(records.values()))[1]["m"]
        damaged, problem = [], ""
        for rank in lost:
            group = next((g for g in groups if rank in g), None)
            if group is None:
                problem = f"rank {rank} and every rank of its redundancy group are lost"
                break
            gone = [r for r in group if r not in held or r not in records]
            if len(gone) > m:
                problem = (f"ranks {few(gone)} of one redundancy group (ranks {few(list(group))}) are lost, more than "
                           f"its {m} parity stripe(s) can rebuild")
                break
            if list(group) not in damaged:
                damaged.append(list(group))
        if problem:
            why = why or f"the snapshot of step {s} cannot be rebuilt: {problem}"
            continue
        return Recoverable(s, token, world, dict(held), lost, damaged, m), ""
    return None, why


def rebuild_lost(coll, tier, group, rec: Recoverable, speaker: dict[str, int], records: dict[int, dict],
                 made: list[str]) -> list[dict]:
    """Rebuild the lost ranks of ``rec`` (a collective of the new job on ``group``).

    Args:
        speaker: node id -> the rank of the new job that reads that node's segments (its lowest), for
            every node holding a member of a damaged group.
        records: the full parity record of every surviving member of the damaged groups whose
            rebuild this rank joins (old rank -> record); a group none of whose records are here is
            rebuilt without this rank.
        made: the segments this rank creates for rebuilt ranks are appended as they are made (to
            free once the load has read them, or on failure).

    Returns:
        The rebuilt ranks' headers (their fragments in the new segments) this rank made.
    """
    me = coll.rank
    to_global = _global_ranks(coll)
    headers: list[dict] = []
    opened = []
    try:
        for gi, members in enumerate(rec.groups):
            if not any(r in records for r in members):
                continue  # (its rebuild is other ranks')
            lost = [i for i, r in enumerate(members) if r in rec.lost or r not in records]
            alive = [i for i in range(len(members)) if i not in lost]
            servers = {i: speaker[rec.holder[members[i]]] for i in alive}
            candidates = sorted(set(servers.values()))
            rebuilder = candidates[gi % len(candidates)]
            first = records[members[alive[0]]]
            plan = stripe_plan(first["sizes"], first["m"], first["stripe"])
            held, crcs = {}, {}
            for i in alive:
                record = records[members[i]]
                crcs[i] = (record["chunk_crc32c"], record["parity_crc32c"])
                if servers[i] == me:
                    data = shm.attach(shm.segment_name(tier.job, f"r{members[i]}.s{record['slot']}"))
                    par = shm.attach(record["file"])
                    opened += [data, par]
                    held[i] = (np.frombuffer(data.buf, np.uint8)[:plan.sizes[i]],
                               np.frombuffer(par.buf, np.uint8)[:plan.parity_bytes(i)])
            out = None
            if me == rebuilder:
                out = {}
                for i in lost:  # (a member held without its parity record is decoded, not reported)
                    name = tier.client.alloc(f"rebuilt.s{rec.step}.r{members[i]}", plan.sizes[i])
                    made.append(name.removeprefix(shm.prefix(tier.job)))
                    seg = shm.attach(name)
                    opened.append(seg)
                    out[i] = np.frombuffer(seg.buf, np.uint8)[:plan.sizes[i]]
                    if members[i] not in rec.lost:
                        continue
                    header = first["headers"][str(members[i])]
                    header = dict(header, host=os.uname().nodename, complete=True, token=rec.token,
                                  fragments=[dict(f, file=name) for f in header["fragments"]])
                    headers.append(header)
            if me == rebuilder or me in servers.values():
                parity_mod.rebuild(group, plan, members, lost, {i: to_global[s] for i, s in servers.items()}, to_global[rebuilder],
                                   to_global[me], held, crcs, out,
                                   f"redundancy group of ranks {few(members)} (step {rec.step})")
            held.clear()
            out = None
    except BaseException as e:
        import traceback

        traceback.clear_frames(e.__traceback__)  # its frames held views of the segments
        raise
    finally:
        held = out = None  # noqa: F841 - release the views before unmapping
        for seg in opened:
            try:
                seg.close()
            except BufferError:
                pass
    return headers
