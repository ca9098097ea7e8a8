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
