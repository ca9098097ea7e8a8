"""Redundancy groups and stripe placement (issue 7, stage b; docs/erasure.md section 5): pure functions.

Nodes are numbered ``0..n-1`` in the order of their lowest global rank (every rank computes the same
numbering). :func:`form_groups` cuts them into redundancy groups of consecutive nodes;
:func:`stripe_plan` lays one group's snapshot bytes out as stripe sets with rotating parity.

**Groups.** With group size ``g`` and ``m`` parity stripes per set, ``n`` nodes form
``max(1, n // g)`` groups whose sizes differ by at most one (earlier groups take the extra nodes), so
no group is smaller than ``g`` when ``n >= g``. Six nodes in groups of 3 lose two: the four left form
*one* group of 4 (3 data + 1 parity), not two groups of 2. It still survives any ``m`` failures, now
of 4 nodes instead of 3, at a memory overhead of 4/3 instead of 3/2. Fewer than ``m + 1`` nodes cannot
hold ``m`` parity stripes: :class:`RedundancyError`.

**Stripe sets.** In a group of ``s`` members (``k = s - m``), each member's buffer is cut into
chunks of ``stripe`` bytes (the last one zero-padded; a member whose buffer is shorter than the
longest has zero chunks past its end, which are never stored or sent). Stripe set ``j`` has its
``m`` parity stripes on members ``(j * m + t) % s``, ``t = 0..m-1`` (the parity rotates round-robin,
RAID-5 style, so members' parity loads differ by at most one stripe),
and takes one data chunk from each of the other ``k`` members: their next chunk, in order. There
are just enough sets that every member's chunks all find a place, so each member stores parity for
about ``m / k`` of its data: the group's memory is ``s / k`` of its data.
"""

from __future__ import annotations

from dataclasses import dataclass

from ucp.errors import RedundancyError


def form_groups(n_nodes: int, group: int, parity: int) -> list[list[int]]:
    """Nodes ``0..n_nodes-1`` in redundancy groups of consecutive nodes (policy: module docstring).

    Raises:
        RedundancyError: ``group < parity + 1`` or ``n_nodes < parity + 1``.
    """
    if parity < 1 or group < parity + 1:
        raise RedundancyError(f"groups of {group} nodes cannot hold {parity} parity stripe(s) and any data: "
                              f"use group >= parity + 1")
    if n_nodes < parity + 1:
        raise RedundancyError(f"{n_nodes} node(s) cannot hold {parity} parity stripe(s) besides the data: "
                              f"at least {parity + 1} are needed")
    count = max(1, n_nodes // group)
    base, extra = divmod(n_nodes, count)
    groups, start = [], 0
    for i in range(count):
        size = base + (1 if i < extra else 0)
        groups.append(list(range(start, start + size)))
        start += size
    return groups


@dataclass(frozen=True)
class StripeSet:
    """One stripe set of a group: ``data[i]`` is ``(member, chunk)`` (chunk ``c`` of that member's
    buffer, bytes ``[c * stripe, (c + 1) * stripe)``) for data stripe ``i``; ``parity[t]`` is the
    member holding parity stripe ``t``."""

    index: int
    data: tuple[tuple[int, int], ...]
    parity: tuple[int, ...]

    def members(self) -> tuple[int, ...]:
        """The member holding each stripe, in stripe order (data ``0..k-1``, parity ``k..k+m-1``)."""
        return tuple(member for member, _ in self.data) + self.parity


@dataclass(frozen=True)
class StripePlan:
    """One group's stripe sets. Members are numbered ``0..s-1`` within the group."""

    sizes: tuple[int, ...]  # each member's buffer, bytes
    m: int
    stripe: int
    sets: tuple[StripeSet, ...]

    @property
    def k(self) -> int:
        return len(self.sizes) - self.m

    def chunks(self, member: int) -> int:
        """How many chunks member ``member``'s buffer has (the last one may be short)."""
        return -(-self.sizes[member] // self.stripe)

    def chunk_span(self, member: int, chunk: int) -> tuple[int, int]:
        """Bytes ``[start, end)`` of ``member``'s buffer in ``chunk``; empty past its end (zeros)."""
        start = min(chunk * self.stripe, self.sizes[member])
        return start, min(start + self.stripe, self.sizes[member])

    def parity_slots(self, member: int) -> list[tuple[int, int]]:
        """``(set index, parity stripe t)`` of every parity stripe ``member`` stores, in order."""
        return [(s.index, t) for s in self.sets for t, holder in enumerate(s.parity) if holder == member]

    def parity_bytes(self, member: int) -> int:
        """The bytes of parity ``member`` stores."""
        return len(self.parity_slots(member)) * self.stripe

    def overhead(self) -> float:
        """The group's memory (data + parity) over its data."""
        data = sum(self.sizes)
        return (data + sum(self.parity_bytes(i) for i in range(len(self.sizes)))) / data if data else 1.0


def stripe_plan(sizes: list[int], parity: int, stripe: int) -> StripePlan:
    """The stripe sets of one group whose members' buffers have ``sizes`` bytes (module docstring).

    Raises:
        RedundancyError: fewer than ``parity + 1`` members, or a stripe size below 1.
    """
    s = len(sizes)
    if parity < 1 or s < parity + 1:
        raise RedundancyError(f"a group of {s} member(s) cannot hold {parity} parity stripe(s) besides the data")
    if stripe < 1 or any(n < 0 for n in sizes):
        raise RedundancyError(f"stripe {stripe} and sizes {sizes}: use a positive stripe and non-negative sizes")
    wanted = max(-(-n // stripe) for n in sizes)  # chunks of the longest buffer
    k = s - parity
    sets: list[StripeSet] = []
    taken = [0] * s  # chunks of each member placed so far
    j = 0
    while min(taken) < wanted:
        holders = tuple((j * parity + t) % s for t in range(parity))
        data = []
        for member in range(s):
            if member not in holders:
                data.append((member, taken[member]))
                taken[member] += 1
        assert len(data) == k
        sets.append(StripeSet(j, tuple(data), holders))
        j += 1
    return StripePlan(tuple(sizes), parity, stripe, tuple(sets))


def lane_groups(node_of_rank: list, group: int, parity: int) -> list[list[int]]:
    """Redundancy groups of ranks, from each rank's node (any hashable id, one per rank).

    Nodes are numbered in the order of their lowest rank and cut into groups by :func:`form_groups`.
    Within a group of nodes, the ``i``-th rank of every node (its *lane* ``i``) forms one group of
    ranks, in node order: each rank stripes its own snapshot with the ranks of its lane on the other
    nodes of its group, so a lost node costs each lane one member. Returns the groups of global ranks.

    Raises:
        RedundancyError: nodes with different numbers of ranks, or too few nodes (:func:`form_groups`).
    """
    ranks_of: dict = {}
    for rank, node in enumerate(node_of_rank):
        ranks_of.setdefault(node, []).append(rank)
    nodes = list(ranks_of.values())  # in the order of their lowest rank (dicts keep insertion order)
    per_node = {len(r) for r in nodes}
    if len(per_node) != 1:
        counts = sorted({len(r): None for r in nodes})
        raise RedundancyError(f"redundancy groups need the same number of ranks on every node; the nodes have "
                              f"{counts} ranks")
    lanes = per_node.pop()
    out = []
    for members in form_groups(len(nodes), group, parity):
        for lane in range(lanes):
            out.append([nodes[n][lane] for n in members])
    return out
