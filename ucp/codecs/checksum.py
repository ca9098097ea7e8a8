"""CRC-32C checksums of byte buffers (hardware-accelerated through the ``crc32c`` package).

The ``crc32c`` package releases the GIL on large buffers, so checksums of different fragments can
run on several threads at once.
"""

from __future__ import annotations

import crc32c as _crc32c


def crc32c(data, value: int = 0) -> int:
    """CRC-32C of ``data`` (any buffer: bytes, memoryview, numpy array), continuing from ``value``."""
    return _crc32c.crc32c(data, value)
