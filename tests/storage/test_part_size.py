"""The part size of a multipart upload (ucp.storage.multipart.part_size): 8 MiB up to 78 GiB, then
enough for S3's 10,000 parts, within its 5 GiB part limit; and the parts in flight it allows within the
writer's memory cap (uploads). The uploads themselves: test_multipart.py, against a real S3 server."""

from __future__ import annotations

import pytest

from ucp.storage.multipart import MAX_PART_BYTES, MEMORY_BYTES, PART_BYTES, UPLOADS, part_size, uploads

MIB, GIB, TIB = 1 << 20, 1 << 30, 1 << 40


def test_the_part_size_is_8_mib_until_10000_parts_do_not_hold_the_object():
    assert part_size(None) == part_size(0) == part_size(1) == PART_BYTES == 8 * MIB
    assert part_size(10_000 * 8 * MIB) == 8 * MIB  # (78.1 GiB: the most 8 MiB parts hold)
    assert part_size(10_000 * 8 * MIB + 1) == 9 * MIB


@pytest.mark.parametrize("size", [200 * GIB, TIB, 10 * TIB + 12345, 10_000 * MAX_PART_BYTES])
def test_a_large_object_fits_in_10000_parts_of_whole_mib_within_5_gib(size):
    part = part_size(size)
    assert part % MIB == 0 and PART_BYTES <= part <= MAX_PART_BYTES
    assert -(-size // part) <= 10_000  # (it fits)
    assert -(-size // (part - MIB)) > 10_000  # (and a MiB less would not: the least that fits)


def test_an_object_over_10000_parts_of_5_gib_is_refused_in_one_line():
    with pytest.raises(ValueError, match="over 10000 parts of 5368709120 bytes"):
        part_size(10_000 * MAX_PART_BYTES + 1)


def test_larger_parts_are_uploaded_fewer_at_once_within_the_memory_cap():
    assert uploads(PART_BYTES) == UPLOADS  # (8 MiB parts: 4 in flight, 40 MiB)
    for size in (200 * GIB, TIB, 2 * TIB, 5 * TIB, 40 * TIB):
        part = part_size(size)
        n = uploads(part)
        assert 1 <= n <= UPLOADS
        assert (n + 1) * part <= max(MEMORY_BYTES, 2 * part)  # (at least one part in flight, one filling)
    assert uploads(part_size(TIB)) == UPLOADS - 1  # (105 MiB parts: 3 in flight, 420 MiB)
    assert uploads(MAX_PART_BYTES) == 1
