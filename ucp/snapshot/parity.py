"""Parity of the memory tier's snapshots across nodes (docs/erasure.md section 7).

Each rank's snapshot slot is one member's buffer of its redundancy group
(:func:`ucp.plan.redundancy.lane_groups`): the ranks of one *lane* on the nodes of one group. After
every snapshot's cut, the members exchange their stripes point to point on a gloo group of their own,
from the snapshot's background thread (:class:`ParityEncoder`): for each stripe set
(:func:`ucp.plan.redundancy.stripe_plan`) each data member sends its chunk to the set's ``m`` parity
holders, and each holder computes its own parity stripe into a segment of its node's agent. Nothing
but the chunks themselves crosses the network; a zero chunk past the end of a short buffer is never
sent.

After nodes fail, :func:`rebuild` brings a lost member's buffer back on one survivor: the survivors
send it their stripes of every set that held the lost member's chunks, it checks each stripe's
CRC-32C (a stripe that fails is treated as lost, never decoded from) and decodes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ucp.codecs.checksum import crc32c
from ucp.codecs.erasure import erasure_code
from ucp.errors import ParityError, TooManyLostError
from ucp.plan.redundancy import StripePlan, stripe_plan

FORMAT = "ucp.parity"
FORMAT_VERSION = "1.0"
BATCH = 8  # stripe sets per step of the exchange's pipeline (receive buffers: two steps' held sets x k stripes)
_SET_BITS = 20  # a message's tag: (exchange sequence mod 1024) << 20 | stripe set (or OBJECTS)
OBJECTS = (1 << _SET_BITS) - 1
REBUILD = 1023  # the sequence of a rebuild's messages


def tag(sequence: int, index: int) -> int:
    """The tag of the messages of stripe set ``index`` (or :data:`OBJECTS`) in exchange ``sequence``:
    messages of an earlier exchange that timed out can never match a later one's."""
    if not 0 <= index <= OBJECTS:
        raise ParityError(f"stripe set {index}: a snapshot holds at most {OBJECTS} stripe sets per member group; "
                          "use a larger stripe")
    return (sequence % REBUILD) << _SET_BITS | index


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a)


def _wait(works) -> None:
    for w in works:
        w.wait()


def exchange_objects(group, members: Sequence[int], me: int, obj, message_tag: int = OBJECTS) -> dict[int, object]:
    """Every member's JSON-able ``obj`` (``{global rank: obj}``), sent point to point among
    ``members`` (global ranks, ``me`` one of them) on ``group`` with tag ``message_tag``."""
    import torch.distributed as dist

    others = [r for r in members if r != me]
    payload = np.frombuffer(bytearray(json.dumps(obj).encode()), np.uint8)
    size = torch.tensor([payload.size], dtype=torch.int64)
    sizes = {r: torch.zeros(1, dtype=torch.int64) for r in others}
    _wait([dist.isend(size, r, group=group, tag=message_tag) for r in others]
          + [dist.irecv(sizes[r], r, group=group, tag=message_tag) for r in others])
    bufs = {r: torch.empty(int(sizes[r].item()), dtype=torch.uint8) for r in others}
    _wait([dist.isend(_tensor(payload), r, group=group, tag=message_tag) for r in others]
          + [dist.irecv(bufs[r], r, group=group, tag=message_tag) for r in others])
    out = {r: json.loads(bufs[r].numpy().tobytes()) for r in others}
    out[me] = obj
    return out


@dataclass(frozen=True)
class _Step:
    """One step of a member's pipeline: ``sends`` ``(chunk, start, end, holders)`` of its own chunks;
    ``holds`` ``(set, t, position)`` of the parity stripes it computes (stripe ``t`` of ``set``, at
    ``position`` in its parity segment)."""

    sends: tuple
    holds: tuple


def _steps(plan: StripePlan, me: int) -> tuple[_Step, ...]:
    """Member ``me``'s part of each step of :data:`BATCH` stripe sets (computed once per plan)."""
    position = {key: i for i, key in enumerate(plan.parity_slots(me))}
    out = []
    for lo in range(0, len(plan.sets), BATCH):
        sends, holds = [], []
        for s in plan.sets[lo:lo + BATCH]:
            if me in s.parity:
                t = s.parity.index(me)
                holds.append((s, t, position[(s.index, t)]))
            else:
                chunk = next(c for member, c in s.data if member == me)
                a, z = plan.chunk_span(me, chunk)
                sends.append((s.index, chunk, a, z, s.parity))
        out.append(_Step(tuple(sends), tuple(holds)))
    return tuple(out)


class ParityEncoder:
    """One rank's side of the parity exchange of its redundancy group; reuses its buffers.

    The exchange is a pipeline of steps of :data:`BATCH` stripe sets: the messages of step ``i + 1``
    are posted before the parity of step ``i`` is computed, so the network carries one step while the
    CPU encodes the other (two steps of receive buffers, reused). A member checksums each chunk it
    sends just after posting it, while the bytes are in cache and the message in flight. With a
    ``rate``, a member sends at most that many bytes per second on average: it sleeps between steps
    when ahead, which leaves the CPU and the network to training.

    Args:
        group: the gloo process group of the exchange (every member in it).
        members: the group's members' global ranks, in member order.
        me: this rank's global rank.
        parity: ``m``, parity stripes per set.
        stripe: bytes per stripe.
        rate: the most bytes per second this member sends, on average (None: unbounded).
    """

    def __init__(self, group, members: Sequence[int], me: int, parity: int, stripe: int,
                 rate: float | None = None):
        self.group = group
        self.members = tuple(members)
        self.index = self.members.index(me)
        self.m = parity
        self.stripe = stripe
        self.rate = rate
        self._plan: StripePlan | None = None
        self._steps: tuple[_Step, ...] = ()
        self._recv = np.empty((0,), np.uint8)

    def plan(self, sizes: Sequence[int]) -> StripePlan:
        """The stripe plan of buffers of ``sizes`` (kept while the sizes stay the same). Its stripe
        is the configured one, or less for small buffers: a ``k``-th of the longest buffer (64-byte
        aligned), so that each member has about ``k`` chunks and the parity stays about ``m / k`` of
        the data, not a whole stripe per set."""
        if self._plan is None or self._plan.sizes != tuple(sizes):
            k = len(sizes) - self.m
            stripe = min(self.stripe, max(64, -(-max(sizes) // max(k, 1) // 64) * 64 if sizes else 64))
            self._plan = stripe_plan(list(sizes), self.m, stripe)
            self._steps = _steps(self._plan, self.index)
            held = max((len(step.holds) for step in self._steps), default=0)
            shape = (2, held, self._plan.k, stripe) if held else (0,)
            if self._recv.shape != shape:
                self._recv = np.empty(shape, np.uint8)
        return self._plan

    def encode(self, sizes: Sequence[int], data: np.ndarray, parity: np.ndarray,
               sequence: int = 0) -> tuple[list[int], list[int]]:
        """Send this member's chunks to their sets' parity holders and compute the parity stripes it
        holds into ``parity`` (``plan(sizes).parity_bytes(index)`` bytes, in the order of
        ``parity_slots``). ``data`` is this member's buffer. Every member of the group calls it with
        the same ``sizes`` and ``sequence`` (the exchange's number, in the messages' tags).

        Returns:
            The CRC-32C of each parity stripe computed, and of each chunk of ``data`` (its own
            bytes, without the zero padding).
        """
        plan = self.plan(sizes)
        me = self.index
        if data.size != plan.sizes[me] or parity.size != plan.parity_bytes(me):
            raise ParityError(f"member {me}: buffers of {data.size} and {parity.size} bytes, the plan wants "
                              f"{plan.sizes[me]} and {plan.parity_bytes(me)}")
        parity_sums = [0] * (parity.size // plan.stripe)
        chunk_sums = [0] * plan.chunks(me)
        code = erasure_code(plan.k, plan.m)
        steps = self._steps
        t0, sent = time.perf_counter(), 0
        inflight = self._post(steps[0], self._recv[0] if self._recv.size else None, data, sequence, chunk_sums) \
            if steps else []
        for i, step in enumerate(steps):
            following = []
            if i + 1 < len(steps):
                following = self._post(steps[i + 1], self._recv[(i + 1) % 2] if self._recv.size else None, data,
                                       sequence, chunk_sums)
            _wait(inflight)
            for b, (_, t, pos) in enumerate(step.holds):
                out = parity[pos * plan.stripe:(pos + 1) * plan.stripe]
                code.decode(list(self._recv[i % 2, b]) + [None] * plan.m, out={plan.k + t: out})
                parity_sums[pos] = crc32c(out)
            inflight = following
            if self.rate:
                sent += sum((z - a) * len(holders) for _, _, a, z, holders in step.sends)
                ahead = sent / self.rate - (time.perf_counter() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        return parity_sums, chunk_sums

    def _post(self, step: _Step, recv: np.ndarray | None, data: np.ndarray, sequence: int,
              chunk_sums: list[int]) -> list:
        """Post the messages of ``step`` (its receives into ``recv``), then checksum the chunks it
        sends while they travel; the works to wait for."""
        import torch.distributed as dist

        plan, works = self._plan, []
        for b, (s, _, _) in enumerate(step.holds):
            for i, (member, chunk) in enumerate(s.data):
                a, z = plan.chunk_span(member, chunk)
                buf = recv[b, i]
                buf[z - a:] = 0
                if z > a:
                    works.append(dist.irecv(_tensor(buf[:z - a]), self.members[member], group=self.group,
                                            tag=tag(sequence, s.index)))
        for index, _, a, z, holders in step.sends:
            if z > a:
                for holder in holders:
                    works.append(dist.isend(_tensor(data[a:z]), self.members[holder], group=self.group,
                                            tag=tag(sequence, index)))
        for _, chunk, a, z, _ in step.sends:
            if z > a:
                chunk_sums[chunk] = crc32c(data[a:z])
        return works


def rebuild(group, plan: StripePlan, members: Sequence[int], lost: Sequence[int], servers: Mapping[int, int],
            rebuilder: int, me: int, held: Mapping[int, tuple], crcs: Mapping[int, tuple[list, list]],
            out: Mapping[int, np.ndarray] | None, what: str) -> None:
    """Rebuild the buffers of the ``lost`` members (indices) of one group on ``rebuilder``.

    Every rank involved calls it: the rebuilder and each ``servers[member]`` (the global rank that
    reads a surviving member's buffers from its node). ``held[member]`` is ``(data, parity)`` of each
    surviving member this rank serves (numpy views of the agent's segments); ``crcs[member]`` is the
    surviving member's recorded ``(chunk CRCs, parity CRCs)`` (needed on the rebuilder); ``out`` maps
    each lost member to the buffer to fill (``plan.sizes[member]`` bytes; on the rebuilder only).
    ``what`` names the group in errors.

    Raises:
        ParityError: a set has more than ``m`` stripes lost or failing their checksums (named).
    """
    import torch.distributed as dist

    lost = sorted(lost)
    if any(servers.get(i) is None for i in range(len(members)) if i not in lost):
        raise ParityError(f"{what}: a surviving member has no server")
    k, m, stripe = plan.k, plan.m, plan.stripe
    sets = [s for s in plan.sets if any(member in lost for member, _ in s.data)]
    slots = {i: {key: n for n, key in enumerate(plan.parity_slots(i))} for i in range(len(members))}
    recv = np.zeros((min(BATCH, len(sets)) or 1, k + m, stripe), np.uint8) if me == rebuilder else None

    def stripe_of(member: int, s, position: int) -> tuple[np.ndarray, int]:
        """The bytes this rank holds of ``member``'s stripe ``position`` of set ``s`` (exact span)."""
        data, parity = held[member]
        if position < k:
            a, z = plan.chunk_span(member, s.data[position][1])
            return data[a:z], z - a
        n = slots[member][(s.index, position - k)]
        return parity[n * stripe:(n + 1) * stripe], stripe

    failure = None  # the first set that cannot be rebuilt: raised after every batch is exchanged
    for lo in range(0, len(sets), BATCH):
        batch = sets[lo:lo + BATCH]
        works = []
        for b, s in enumerate(batch):
            holders = s.members()
            for position, member in enumerate(holders):
                if member in lost:
                    continue
                server = servers[member]
                if server == me and rebuilder == me:
                    view, n = stripe_of(member, s, position)
                    recv[b, position, :n] = view
                    recv[b, position, n:] = 0
                elif server == me:
                    view, n = stripe_of(member, s, position)
                    if n:
                        works.append(dist.isend(_tensor(view), rebuilder, group=group, tag=tag(REBUILD, s.index)))
                elif rebuilder == me:
                    n = _span(plan, s, position)
                    recv[b, position, n:] = 0
                    if n:
                        works.append(dist.irecv(_tensor(recv[b, position, :n]), server, group=group,
                                                tag=tag(REBUILD, s.index)))
        _wait(works)
        if me != rebuilder or failure is not None:
            continue
        for b, s in enumerate(batch):
            failure = _decode_set(plan, s, recv[b], lost, slots, crcs, out, members, what)
            if failure is not None:
                break
    if failure is not None:
        raise ParityError(failure)


def _decode_set(plan: StripePlan, s, got: np.ndarray, lost, slots, crcs, out, members, what: str) -> str | None:
    """Check the received stripes of set ``s`` (``got[position]``) and decode its lost data chunks
    into ``out``; the error message when too many are lost or corrupt."""
    k, m = plan.k, plan.m
    holders = s.members()
    stripes, bad = [], []
    for position, member in enumerate(holders):
        if member in lost:
            stripes.append(None)
            continue
        n = _span(plan, s, position)
        chunk_sums, parity_sums = crcs[member]
        if position < k:
            expected = chunk_sums[s.data[position][1]] if n else None
        else:
            expected = parity_sums[slots[member][(s.index, position - k)]]
        if expected is not None and crc32c(got[position, :n]) != expected:
            bad.append(f"{'data chunk' if position < k else 'parity stripe'} of member {member} "
                       f"(rank {members[member]})")
            stripes.append(None)
        else:
            stripes.append(got[position])
    wanted = [p for p in range(k) if holders[p] in lost]
    try:
        rebuilt = erasure_code(k, m).decode(stripes, out={p: np.empty(plan.stripe, np.uint8) for p in wanted})
    except TooManyLostError:
        return (f"{what}: stripe set {s.index} cannot be rebuilt: {len(lost)} member(s) lost and "
                f"{'; '.join(bad) or 'no stripe'} failing its checksum, more than the {m} parity stripe(s) can rebuild")
    for p in wanted:
        member, chunk = s.data[p]
        a, z = plan.chunk_span(member, chunk)
        out[member][a:z] = rebuilt[p][:z - a]
    return None


def _span(plan: StripePlan, s, position: int) -> int:
    """The bytes sent of stripe ``position`` of set ``s``: a data chunk's own bytes, or a whole parity stripe."""
    if position < plan.k:
        member, chunk = s.data[position]
        a, z = plan.chunk_span(member, chunk)
        return z - a
    return plan.stripe
