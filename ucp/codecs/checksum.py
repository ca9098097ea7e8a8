"""CRC-32C checksums of byte buffers (hardware-accelerated through the ``crc32c`` package).

The ``crc32c`` package releases the GIL on large buffers, so checksums of different fragments can
run on several threads at once.
"""

from __future__ import annotations

import crc32c as _crc32c


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of ``data`` (any buffer: bytes, memoryview, numpy array), continuing from ``value``."""
    return _crc32c.crc32c(data, value)


def block_crc32c(data, block: int) -> tuple[int, tuple[int, ...]]:
    """CRC-32C of ``data`` and of each of its ``block``-byte blocks (the last may be shorter).

    Data of one block or less gets no block checksums (``()``): its whole checksum covers it. Each
    block is summed twice (alone, and into the whole) while it is still in the cache.
    """
    view = memoryview(data).cast("B")
    if len(view) <= block:
        return crc32c(view), ()
    whole, blocks = 0, []
    for lo in range(0, len(view), block):
        piece = view[lo:lo + block]
        blocks.append(crc32c(piece))
        whole = crc32c(piece, whole)
    return whole, tuple(blocks)
