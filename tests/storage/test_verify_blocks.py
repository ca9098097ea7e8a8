"""Block checksums as verify computes them: the same blocks whatever sizes the reads come back in."""

from __future__ import annotations

import os

import crc32c
import pytest

from ucp.storage import verify


@pytest.mark.parametrize("most", [None, 1000, 4096, 77])
def test_block_checksums_survive_short_reads(tmp_path, monkeypatch, most):
    data = os.urandom(3 * 4096 + 123)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 10 + data)
    real = os.preadv
    if most is not None:
        monkeypatch.setattr(verify.os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:most]], off))
    fd = os.open(path, os.O_RDONLY)
    try:
        crc, n, blocks = verify._crc_of_range(fd, 10, len(data), bytearray(8192), block=4096)
    finally:
        os.close(fd)
    assert n == len(data) and crc == crc32c.crc32c(data)
    assert blocks == [crc32c.crc32c(data[i:i + 4096]) for i in range(0, len(data), 4096)]
