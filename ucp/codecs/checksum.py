"""CRC-32C checksums of byte buffers (hardware-accelerated through the ``crc32c`` package).

The ``crc32c`` package releases the GIL on large buffers, so checksums of different fragments can
run on several threads at once.
"""

from __future__ import annotations

from functools import lru_cache

import crc32c as _crc32c

from ucp.format.manifest import BLOCK_BYTES


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of ``data`` (any buffer: bytes, memoryview, numpy array), continuing from ``value``."""
    return _crc32c.crc32c(data, value)


@lru_cache(maxsize=8)
def _shift_tables(n: int) -> tuple[tuple[int, ...], ...]:
    """Tables of the map ``c -> crc32c(B, c) ^ crc32c(B, 0)`` for any ``B`` of ``n`` bytes: what a
    CRC ``c`` of some prefix contributes to the CRC of prefix + ``B``. The map is linear over GF(2),
    so it is tabulated per byte of ``c`` (4 x 256 entries) from its values on the 32 bits."""
    zeros = bytes(n)
    base = crc32c(zeros)
    bit = [crc32c(zeros, 1 << i) ^ base for i in range(32)]
    tables = []
    for k in range(4):
        table = []
        for b in range(256):
            v = 0
            for i in range(8):
                if b >> i & 1:
                    v ^= bit[8 * k + i]
            table.append(v)
        tables.append(tuple(table))
    return tuple(tables)


def crc32c_combine(first: int, second: int, tables) -> int:
    """CRC-32C of A + B from ``first`` = crc(A), ``second`` = crc(B), and ``_shift_tables(len(B))``."""
    t0, t1, t2, t3 = tables
    return t0[first & 255] ^ t1[first >> 8 & 255] ^ t2[first >> 16 & 255] ^ t3[first >> 24] ^ second


def fragment_checksums(view) -> tuple[int, tuple[int, ...]]:
    """A fragment's CRC-32C and its block checksums (format 1.1: one per ``BLOCK_BYTES``)."""
    return block_crc32c(view, BLOCK_BYTES)


def block_crc32c(data, block: int) -> tuple[int, tuple[int, ...]]:
    """CRC-32C of ``data`` and of each of its ``block``-byte blocks (the last may be shorter).

    Data of one block or less gets no block checksums (``()``): its whole checksum covers it. Each
    byte is summed once: the whole checksum is combined from the blocks' (a few table lookups per
    block), except the last short block, which is summed again into the whole.
    """
    view = memoryview(data).cast("B")
    if len(view) <= block:
        return crc32c(view), ()
    tables = _shift_tables(block)
    whole, blocks = 0, []
    for lo in range(0, len(view), block):
        piece = view[lo:lo + block]
        c = crc32c(piece)
        blocks.append(c)
        whole = crc32c_combine(whole, c, tables) if len(piece) == block else crc32c(piece, whole)
    return whole, tuple(blocks)
