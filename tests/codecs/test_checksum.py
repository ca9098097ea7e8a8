"""CRC-32C of buffers and of their blocks."""

from __future__ import annotations

import crc32c as reference
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ucp.codecs.checksum import block_crc32c, crc32c


def test_crc32c_is_castagnoli_and_continues():
    assert crc32c(b"123456789") == 0xE3069283  # the standard check value of CRC-32C
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283


@given(data=st.binary(max_size=300), block=st.integers(1, 64))
def test_block_checksums_cover_the_data_in_blocks(data, block):
    whole, blocks = block_crc32c(np.frombuffer(data, np.uint8), block)
    assert whole == reference.crc32c(data)
    if len(data) <= block:
        assert blocks == ()
    else:
        assert blocks == tuple(reference.crc32c(data[i:i + block]) for i in range(0, len(data), block))


def _reference(data: bytes, block: int) -> tuple[int, list[int]]:
    return reference.crc32c(data), [reference.crc32c(data[i:i + block]) for i in range(0, len(data), block)]


@given(sizes=st.lists(st.integers(0, 700), max_size=6), block=st.integers(1, 48), helpers=st.integers(0, 3),
       chunk=st.integers(1, 4), span=st.integers(1, 6), summed_only=st.booleans())
def test_a_copy_is_checksummed_as_the_copied_bytes_however_it_is_split(sizes, block, helpers, chunk, span,
                                                                         summed_only):
    from concurrent.futures import ThreadPoolExecutor

    import pytest

    from ucp.codecs import checksum

    rng = np.random.default_rng(len(sizes) * 1000 + block)
    sources = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
    dests = [s.copy() if summed_only else np.zeros(len(s), np.uint8) for s in sources]
    called = []
    regions = [(d, None if summed_only else s, lambda i=i: called.append(i)) for i, (d, s) in enumerate(zip(dests, sources))]
    with pytest.MonkeyPatch.context() as mp, ThreadPoolExecutor(2) as pool:
        mp.setattr(checksum, "CHUNK_BYTES", chunk * block)  # many chunks and spans, a span over regions
        mp.setattr(checksum, "SPAN_BYTES", span * block)
        got = checksum.copy_block_crc32c(regions, block, pool, helpers)
    assert [tuple(a) for a in got] == [_reference(s.tobytes(), block) for s in sources]
    assert all(np.array_equal(d, s) for d, s in zip(dests, sources))
    assert set(called) == {i for i, n in enumerate(sizes) if n}  # each region made ready before it is touched


def test_a_copy_that_fails_stops_every_thread_and_raises():
    from concurrent.futures import ThreadPoolExecutor

    import pytest

    from ucp.codecs.checksum import copy_block_crc32c

    src = np.ones(64 << 20, np.uint8)

    def broken():
        raise OSError("device copy failed")

    regions = [(np.zeros(len(src), np.uint8), src, None), (np.zeros(10, np.uint8), src[:10], broken)]
    with ThreadPoolExecutor(2) as pool, pytest.raises(OSError, match="device copy failed"):
        copy_block_crc32c(regions, 1 << 16, pool, 2)


def test_whole_checksums_combine_across_many_spans():
    from ucp.codecs.checksum import SPAN_BYTES, copy_block_crc32c

    data = np.random.default_rng(1).integers(0, 256, 3 * SPAN_BYTES + 12345, dtype=np.uint8)
    out = np.empty_like(data)
    [(whole, blocks)] = copy_block_crc32c([(out, data, None)], 1 << 16)
    assert (whole, blocks) == _reference(data.tobytes(), 1 << 16) and np.array_equal(out, data)
