"""objstore.coalesced: which byte ranges of an object one ranged GET fetches together (fragments side by
side, or a little apart; never more than 1.1x the bytes asked for)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ucp.storage.objstore import COALESCE_GAP, coalesced


def test_fragments_side_by_side_are_one_range_in_order_of_offset():
    assert coalesced([(300, 100), (0, 100), (100, 200)]) == [(0, 400, [1, 2, 0])]


def test_a_gap_over_the_limit_starts_a_new_range():
    big = 10 * COALESCE_GAP
    assert coalesced([(0, big), (big + COALESCE_GAP, 10)]) == [(0, big + COALESCE_GAP + 10, [0, 1])]
    assert coalesced([(0, big), (big + COALESCE_GAP + 1, 10)]) == [(0, big, [0]), (big + COALESCE_GAP + 1,
                                                                                   big + COALESCE_GAP + 11, [1])]


def test_small_fragments_far_apart_are_not_joined_past_a_tenth_more_bytes():
    # 1 KiB fragments 64 KiB apart: joining them would fetch 65x the bytes asked for
    assert [r[2] for r in coalesced([(0, 1024), (65 * 1024, 1024)])] == [[0], [1]]
    assert [r[2] for r in coalesced([(0, 1024), (1024 + 204, 1024)])] == [[0, 1]]  # (204 bytes <= 2048 / 10)
    assert [r[2] for r in coalesced([(0, 1024), (1024 + 205, 1024)])] == [[0], [1]]


def test_overlapping_ranges_are_fetched_apart():
    assert [r[2] for r in coalesced([(0, 100), (50, 100)])] == [[0], [1]]


@given(st.lists(st.tuples(st.integers(0, 1 << 22), st.integers(1, 1 << 16)), max_size=40))
def test_every_extent_is_held_once_and_at_most_a_tenth_more_is_fetched(extents):
    ranges = coalesced(extents)
    assert sorted(i for _, _, held in ranges for i in held) == list(range(len(extents)))
    for start, end, held in ranges:
        assert start == extents[held[0]][0] and end == sum(extents[held[-1]])
        for a, b in zip(held, held[1:]):
            assert sum(extents[a]) <= extents[b][0]  # (in order, apart)
        asked = sum(extents[i][1] for i in held)
        assert (end - start) * 10 <= asked * 11
