"""CRC-32C checksums of byte buffers (hardware-accelerated through the ``crc32c`` package).

The ``crc32c`` package releases the GIL on buffers of 32 KiB or more, so checksums of different
fragments, or of different parts of one, run on several threads at once.

:func:`copy_block_crc32c` is the one pass of the memory tier's snapshots and restores: bytes copied
chunk by chunk and each chunk checksummed right after its copy, while it is still in cache, over
the threads the caller lends. The ``crc32c`` package sums one buffer per call, so a block checksum
is one native call (about 0.5 us of Python around some 4 us of summing a 64 KiB block in cache); a
fragment's whole checksum is combined from its blocks' (a few table lookups per block) rather than
summed again.
"""

from __future__ import annotations

from functools import lru_cache

import crc32c as _crc32c
import numpy as np

from ucp.codecs.turns import in_turns
from ucp.format.manifest import BLOCK_BYTES

#: bytes copied, then checksummed, at a time: still in the core's cache (L2) when summed
CHUNK_BYTES = 1 << 20
#: bytes one thread claims at a time from a :func:`copy_block_crc32c` job: claiming costs nothing
#: next to copying them, and the last claims still share the work out evenly
SPAN_BYTES = 8 << 20


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of ``data`` (any buffer: bytes, memoryview, numpy array), continuing from ``value``."""
    return _crc32c.crc32c(data, value)


def _expand(bit: list[int]) -> tuple[tuple[int, ...], ...]:
    """Tables (4 x 256 entries) of the GF(2)-linear map of 32-bit values whose values on the 32
    single bits are ``bit``."""
    values = np.asarray(bit, np.uint32).reshape(4, 8)
    bits = (np.arange(256)[:, None] >> np.arange(8)[None, :]) & 1  # byte value x bit -> set?
    tables = np.bitwise_xor.reduce(np.where(bits[None, :, :] == 1, values[:, None, :], 0).astype(np.uint32), axis=2)
    return tuple(tuple(int(v) for v in row) for row in tables)


@lru_cache(maxsize=8)
def _shift_tables(n: int) -> tuple[tuple[int, ...], ...]:
    """Tables of the map ``c -> crc32c(B, c) ^ crc32c(B, 0)`` for any ``B`` of ``n`` bytes: what a
    CRC ``c`` of some prefix contributes to the CRC of prefix + ``B``. The map is linear over GF(2),
    so it is tabulated per byte of ``c`` (4 x 256 entries) from its values on the 32 bits."""
    zeros = bytes(n)
    base = crc32c(zeros)
    return _expand([crc32c(zeros, 1 << i) ^ base for i in range(32)])


@lru_cache(maxsize=256)
def _power_tables(block: int, k: int) -> tuple[tuple[int, ...], ...]:
    """:func:`_shift_tables` of ``2**k`` blocks of ``block`` bytes, squared from those of ``2**(k-1)``
    (no bytes summed)."""
    if k == 0:
        return _shift_tables(block)
    half = _power_tables(block, k - 1)
    return _expand([crc32c_combine(crc32c_combine(1 << i, 0, half), 0, half) for i in range(32)])


def crc32c_combine(first: int, second: int, tables) -> int:
    """CRC-32C of A + B from ``first`` = crc(A), ``second`` = crc(B), and ``_shift_tables(len(B))``."""
    t0, t1, t2, t3 = tables
    return t0[first & 255] ^ t1[first >> 8 & 255] ^ t2[first >> 16 & 255] ^ t3[first >> 24] ^ second


def _shift(value: int, blocks: int, block: int) -> int:
    """What the CRC ``value`` of a prefix contributes to the CRC of that prefix followed by ``blocks``
    blocks of ``block`` bytes: one table map per bit set in ``blocks``."""
    k = 0
    while blocks:
        if blocks & 1:
            value = crc32c_combine(value, 0, _power_tables(block, k))
        blocks >>= 1
        k += 1
    return value


def fragment_checksums(view) -> tuple[int, tuple[int, ...]]:
    """A fragment's CRC-32C and its block checksums (format 1.1: one per ``BLOCK_BYTES``)."""
    return block_crc32c(view, BLOCK_BYTES)


def block_crc32c(data, block: int) -> tuple[int, tuple[int, ...]]:
    """CRC-32C of ``data`` and of each of its ``block``-byte blocks (the last may be shorter).

    Data of one block or less gets no block checksums (``()``): its whole checksum covers it. Each
    byte is summed once: the whole checksum is combined from the blocks' (a few table lookups per
    block), except the last short block, which is summed again into the whole.
    """
    view = np.frombuffer(data, np.uint8)
    [(whole, blocks)] = copy_block_crc32c([(view, None, None)], block)
    return whole, tuple(blocks) if len(view) > block else ()


def copy_block_crc32c(regions, block: int = BLOCK_BYTES, pool=None, helpers: int = 0) -> list[tuple[int, list[int]]]:
    """Copy each region's ``src`` into its ``dst`` (when ``src`` is not None) and return each region's
    CRC-32C and its ``block``-byte block checksums (the last block may be shorter; a region of one
    block or less has one): one pass over the bytes, each chunk of :data:`CHUNK_BYTES` summed from
    ``dst`` right after its copy.

    Args:
        regions: ``(dst, src, ready)`` triples: ``dst`` a flat uint8 numpy array, ``src`` one of the
            same length or None (``dst`` is only summed), ``ready`` None or a callable that returns
            once ``dst`` (when ``src`` is None) or ``src`` may be read (e.g. a device copy into it
            is done); it is called before the region's first byte is touched, maybe from several
            threads.
        block: the bytes of a block.
        pool: an executor lending threads, or None.
        helpers: how many tasks to submit to ``pool``. The calling thread works too, claiming spans
            of :data:`SPAN_BYTES` like the helpers; helpers not yet started when the work is done are
            cancelled, so ``pool`` may be the executor the caller itself runs on.

    Raises:
        whatever a copy, a checksum or ``ready`` raised (once every helper has stopped).
    """
    chunk = max(1, CHUNK_BYTES // block) * block
    span = max(1, SPAN_BYTES // block) * block
    tasks, current, filled = [], [], 0  # tasks: lists of (region, lo, hi), block-aligned, about a span each
    for r, (dst, _, _) in enumerate(regions):
        for lo in range(0, len(dst), span):
            hi = min(len(dst), lo + span)
            current.append((r, lo, hi))
            filled += hi - lo
            if filled >= span:
                tasks.append(current)
                current, filled = [], 0
    if current:
        tasks.append(current)
    results: list = [None] * len(tasks)

    def run(r: int, lo: int, hi: int) -> tuple[list[int], int, int]:
        dst, src, ready = regions[r]
        if ready is not None:
            ready()
        blocks: list[int] = []
        for a in range(lo, hi, chunk):
            b = min(hi, a + chunk)
            if src is not None:
                np.copyto(dst[a:b], src[a:b])
            blocks += [_crc32c.crc32c(dst[x:min(x + block, b)]) for x in range(a, b, block)]
        full = len(blocks) if (hi - lo) % block == 0 else len(blocks) - 1
        t0, t1, t2, t3 = _power_tables(block, 0)
        fold = 0
        for c in blocks[:full]:  # (crc32c_combine inlined: this runs once per block)
            fold = t0[fold & 255] ^ t1[fold >> 8 & 255] ^ t2[fold >> 16 & 255] ^ t3[fold >> 24] ^ c
        return blocks, fold, full

    def one(i: int) -> None:
        results[i] = [run(*t) for t in tasks[i]]

    in_turns(one, len(tasks), pool, helpers)
    out: list = [[0, []] for _ in regions]
    for task, parts in zip(tasks, results):
        for (r, _, _), (blocks, fold, full) in zip(task, parts):
            out[r][0] = _shift(out[r][0], full, block) ^ fold
            out[r][1] += blocks
    for (dst, _, _), o in zip(regions, out):
        tail = len(dst) % block
        if tail:  # the last block is short: summed again into the whole (its bytes are in cache)
            o[0] = crc32c(dst[len(dst) - tail:], o[0])
    return [(crc, blocks) for crc, blocks in out]
