"""Redundancy groups and rotating stripe placement (issue 7, stage b): every node in exactly one
group of at least ``parity + 1``; every chunk of every member in exactly one stripe set; parity
spread evenly; and, with the real codes, any ``m`` members of a group rebuilt bit-exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.codecs.erasure import erasure_code
from ucp.errors import RedundancyError
from ucp.plan.redundancy import form_groups, stripe_plan


@given(n=st.integers(1, 40), group=st.integers(2, 9), parity=st.integers(1, 4))
def test_groups_cover_every_node_once_with_at_least_group_nodes(n, group, parity):
    if group < parity + 1 or n < parity + 1:
        with pytest.raises(RedundancyError):
            form_groups(n, group, parity)
        return
    groups = form_groups(n, group, parity)
    assert [node for g in groups for node in g] == list(range(n))  # consecutive, each node once
    assert len(groups) == max(1, n // group)
    sizes = [len(g) for g in groups]
    assert max(sizes) - min(sizes) <= 1 and sorted(sizes, reverse=True) == sizes
    assert min(sizes) >= min(n, group)


def test_six_nodes_in_groups_of_three_minus_two_leave_one_group_of_four():
    assert form_groups(6, 3, 1) == [[0, 1, 2], [3, 4, 5]]
    assert form_groups(4, 3, 1) == [[0, 1, 2, 3]]
    assert form_groups(7, 3, 1) == [[0, 1, 2, 3], [4, 5, 6]]
    with pytest.raises(RedundancyError, match="1 node.* cannot hold 1 parity"):
        form_groups(1, 3, 1)
    with pytest.raises(RedundancyError, match="groups of 2 nodes cannot hold 2 parity"):
        form_groups(8, 2, 2)


@given(sizes=st.lists(st.integers(0, 5000), min_size=2, max_size=9), parity=st.integers(1, 4),
       stripe=st.sampled_from([64, 100, 1024]))
def test_every_chunk_is_in_one_set_and_parity_rotates(sizes, parity, stripe):
    if len(sizes) < parity + 1:
        with pytest.raises(RedundancyError):
            stripe_plan(sizes, parity, stripe)
        return
    plan = stripe_plan(sizes, parity, stripe)
    s, k = len(sizes), plan.k
    placed = {}
    for ss in plan.sets:
        members = ss.members()
        assert len(ss.data) == k and len(ss.parity) == parity and sorted(members) == list(range(s))
        for member, chunk in ss.data:
            assert (member, chunk) not in placed
            placed[member, chunk] = ss.index
    for member in range(s):
        for chunk in range(plan.chunks(member)):
            assert (member, chunk) in placed, (member, chunk)
        # chunks are taken in order, set after set
        own = [placed[member, c] for c in range(plan.chunks(member))]
        assert own == sorted(own)
    loads = [len(plan.parity_slots(i)) for i in range(s)]
    assert max(loads) - min(loads) <= 1  # rotation: no parity hot spot
    if plan.sets and min(sizes) == max(sizes) and sizes[0] % stripe == 0 and sizes[0]:
        # equal buffers: the group's memory is about s / k of its data (within one set of slack)
        assert plan.overhead() <= s / k + parity * stripe * s / sum(sizes) + 1e-9


@settings(max_examples=25, deadline=None)
@given(data=st.data(), s=st.integers(2, 6), parity=st.integers(1, 3))
def test_any_m_members_of_a_group_are_rebuilt_bit_exactly(data, s, parity):
    if s < parity + 1:
        return
    stripe = 64
    sizes = data.draw(st.lists(st.integers(0, 700), min_size=s, max_size=s))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    buffers = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    plan = stripe_plan(sizes, parity, stripe)
    code = erasure_code(plan.k, parity)

    def chunk(member, c):
        out = np.zeros(stripe, np.uint8)
        a, b = plan.chunk_span(member, c)
        out[:b - a] = buffers[member][a:b]
        return out

    stored = {}  # (set, t) -> parity stripe, held by its member
    for ss in plan.sets:
        for t, p in enumerate(code.encode([chunk(mb, c) for mb, c in ss.data])):
            stored[ss.index, t] = p.copy()
    for lost in itertools.combinations(range(s), parity):
        rebuilt = {mb: np.zeros(plan.chunks(mb) * stripe, np.uint8) for mb in lost}
        for ss in plan.sets:
            stripes = [None if mb in lost else chunk(mb, c) for mb, c in ss.data]
            stripes += [None if holder in lost else stored[ss.index, t] for t, holder in enumerate(ss.parity)]
            wanted = {i: np.empty(stripe, np.uint8) for i, (mb, _) in enumerate(ss.data) if mb in lost}
            if not wanted:
                continue
            for i, out in code.decode(stripes, wanted).items():
                mb, c = ss.data[i]
                if c < plan.chunks(mb):
                    rebuilt[mb][c * stripe:(c + 1) * stripe] = out
        for mb in lost:
            assert np.array_equal(rebuilt[mb][:sizes[mb]], buffers[mb]), (lost, mb)


def test_lane_groups_pair_the_same_local_rank_of_each_node_of_a_group():
    from ucp.plan.redundancy import lane_groups

    # 6 nodes of 2 ranks (ranks 2n, 2n+1 on node n), groups of 3 nodes
    nodes = [f"n{r // 2}" for r in range(12)]
    assert lane_groups(nodes, 3, 1) == [[0, 2, 4], [1, 3, 5], [6, 8, 10], [7, 9, 11]]
    # nodes are numbered by their lowest rank, wherever their ranks are
    assert lane_groups(["b", "a", "b", "a"], 2, 1) == [[0, 1], [2, 3]]
    # 4 nodes left of 6 in groups of 3: one group of 4
    assert lane_groups(["w", "x", "y", "z"], 3, 1) == [[0, 1, 2, 3]]


def test_lane_groups_refuse_uneven_nodes_and_too_few_nodes():
    from ucp.plan.redundancy import lane_groups

    with pytest.raises(RedundancyError, match="same number of ranks on every node"):
        lane_groups(["a", "a", "b"], 2, 1)
    with pytest.raises(RedundancyError, match="at least 2 are needed"):
        lane_groups(["a", "a"], 4, 1)


def test_redundancy_options_are_validated():
    from ucp.errors import OptionsError
    from ucp.options import RedundancyOptions

    assert RedundancyOptions(group=3, parity=1).stripe == 1 << 20
    assert RedundancyOptions().rate is None and RedundancyOptions(rate=200 << 20).rate == 200 << 20
    for bad, match in [(dict(group=2, parity=2), "group >= parity"), (dict(parity=0), "parity=0"),
                       (dict(group=True), "group=True"), (dict(stripe=100), "stripe=100"),
                       (dict(stripe=4096 + 32), "multiple of 64"), (dict(rate=1000), "rate=1000"),
                       (dict(rate=2.5e8), "bytes per second")]:
        with pytest.raises(OptionsError, match=match):
            RedundancyOptions(**bad)
