"""object_reads.coalesced: which byte ranges of an object one ranged GET fetches together (fragments side by
side, or a little apart; never more than 1.1x the bytes asked for, or 64 KiB more)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ucp.storage.object_reads import COALESCE_GAP, COALESCE_SLACK, coalesced


def test_fragments_side_by_side_are_one_range_in_order_of_offset():
    assert coalesced([(300, 100), (0, 100), (100, 200)]) == [(0, 400, [1, 2, 0])]


def test_a_gap_over_the_limit_starts_a_new_range():
    big = 10 * COALESCE_GAP
    assert coalesced([(0, big), (big + COALESCE_GAP, 10)]) == [(0, big + COALESCE_GAP + 10, [0, 1])]
    assert coalesced([(0, big), (big + COALESCE_GAP + 1, 10)]) == [(0, big, [0]), (big + COALESCE_GAP + 1,
                                                                                   big + COALESCE_GAP + 11, [1])]


def test_fragments_far_apart_are_joined_within_a_tenth_more_bytes_or_64_kib():
    # tiny fragments (step counts) a few hundred bytes apart: one GET
    assert [r[2] for r in coalesced([(0, 4), (268, 4), (536, 4)])] == [[0, 1, 2]]
    # 1 KiB fragments: up to 64 KiB skipped in all, then a new range
    assert [r[2] for r in coalesced([(0, 1024), (1024 + COALESCE_SLACK, 1024)])] == [[0, 1]]
    assert [r[2] for r in coalesced([(0, 1024), (1025 + COALESCE_SLACK, 1024)])] == [[0], [1]]
    assert [r[2] for r in coalesced([(0, 1024), (2048, 1024), (3072 + COALESCE_SLACK, 1024)])] == [[0, 1], [2]]
    # large fragments: a tenth of the bytes held
    mib = 1 << 20
    assert [r[2] for r in coalesced([(0, 2 * mib), (2 * mib + 200_000, mib)])] == [[0, 1]]  # (<= 3 MiB / 10)
    assert [r[2] for r in coalesced([(0, mib), (mib + 120_000, mib // 8)])] == [[0], [1]]  # (> 1.125 MiB / 10)


def test_overlapping_ranges_are_fetched_apart():
    assert [r[2] for r in coalesced([(0, 100), (50, 100)])] == [[0], [1]]


@given(st.lists(st.tuples(st.integers(0, 1 << 22), st.integers(1, 1 << 16)), max_size=40))
def test_every_extent_is_held_once_and_at_most_a_tenth_or_64_kib_more_is_fetched(extents):
    ranges = coalesced(extents)
    assert sorted(i for _, _, held in ranges for i in held) == list(range(len(extents)))
    for start, end, held in ranges:
        assert start == extents[held[0]][0] and end == sum(extents[held[-1]])
        for a, b in zip(held, held[1:]):
            assert sum(extents[a]) <= extents[b][0]  # (in order, apart)
        asked = sum(extents[i][1] for i in held)
        assert end - start - asked <= max(asked // 10, COALESCE_SLACK)
