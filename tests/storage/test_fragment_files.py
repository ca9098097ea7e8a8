"""The one checked reader of fragment bytes (ucp.storage.fragment_files): short reads resumed, every
byte checksummed, a missing or truncated file and a corrupted fragment or block named."""

from __future__ import annotations

import os

import crc32c
import pytest

from ucp.errors import CorruptCheckpointError
from ucp.format.box import Box
from ucp.format.fragment import Fragment
from ucp.storage import fragment_files
from ucp.storage.fragment_files import FragmentFiles

BLOCK = 4096


def _fragment(data: bytes, offset: int = 10, file: str = "f", blocks: bool = True) -> Fragment:
    sums = tuple(crc32c.crc32c(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)) if blocks else ()
    return Fragment("model/w", Box((0,), (len(data),)), None, "uint8", 0, file, offset, len(data),
                    crc32c.crc32c(data), sums)


@pytest.fixture
def stored(tmp_path):
    data = os.urandom(3 * BLOCK + 123)
    (tmp_path / "f").write_bytes(b"x" * 10 + data)
    return tmp_path, data, _fragment(data)


def _short_reads(monkeypatch, most):
    real = os.preadv
    if most is not None:
        monkeypatch.setattr(fragment_files.os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:most]], off))


@pytest.mark.parametrize("most", [None, 1000, 4096, 77])
def test_block_checksums_survive_short_reads(stored, monkeypatch, most):
    directory, data, f = stored
    _short_reads(monkeypatch, most)
    with FragmentFiles(directory) as files:
        crc, n, blocks = files.checksums(f, bytearray(8192), block=BLOCK)
    assert n == len(data) and crc == crc32c.crc32c(data)
    assert blocks == [crc32c.crc32c(data[i:i + BLOCK]) for i in range(0, len(data), BLOCK)]


@pytest.mark.parametrize("most", [None, 1000, 77])
def test_read_scatters_in_order_and_checks_the_crc(stored, monkeypatch, most):
    directory, data, f = stored
    _short_reads(monkeypatch, most)
    views = [bytearray(100), memoryview(bytearray(len(data) - 150)), bytearray(50)]
    with FragmentFiles(directory) as files:
        assert files.read(f, views) == f.crc32c
        assert files.nbytes == len(data)
    assert b"".join(bytes(v) for v in views) == data


def test_a_corrupted_fragment_is_named(stored):
    directory, data, f = stored
    raw = bytearray((directory / "f").read_bytes())
    raw[10 + 5000] ^= 1
    (directory / "f").write_bytes(bytes(raw))
    with FragmentFiles(directory) as files, pytest.raises(CorruptCheckpointError) as e:
        files.read(f, [bytearray(len(data))])
    assert str(directory / "f") in str(e.value) and "model/w" in str(e.value) and "fails its checksum" in str(e.value)
    with FragmentFiles(directory) as files:  # without verification, the CRC of what is there
        assert files.read(f, [bytearray(len(data))], verify=False) != f.crc32c
        out = memoryview(bytearray(len(data)))
        files.read_blocks(f, [(0, 1)], out, BLOCK)  # block 0 is intact
        assert bytes(out[:BLOCK]) == data[:BLOCK]
        with pytest.raises(CorruptCheckpointError, match="block 1 at bytes"):
            files.read_blocks(f, [(1, 2)], out, BLOCK)


def test_missing_and_truncated_files_are_named(stored):
    directory, data, f = stored
    with pytest.raises(CorruptCheckpointError, match="data file is missing"):
        FragmentFiles(directory, names=["nope"])
    (directory / "f").write_bytes((directory / "f").read_bytes()[:-1])
    with FragmentFiles(directory) as files, pytest.raises(CorruptCheckpointError, match="truncated"):
        files.read(f, [bytearray(len(data))])


@pytest.mark.parametrize("lo,hi", [(0, 3 * BLOCK + 123), (100, 200), (BLOCK - 1, 2 * BLOCK + 1), (BLOCK, 2 * BLOCK),
                                   (3 * BLOCK, 3 * BLOCK + 123)])
def test_read_run_gives_exactly_the_bytes_asked(stored, lo, hi):
    directory, data, f = stored
    out = memoryview(bytearray(hi - lo))
    with FragmentFiles(directory) as files:
        files.read_run(f, lo, hi, out, BLOCK)
        assert files.nbytes >= hi - lo
    assert bytes(out) == data[lo:hi]


class _Maps:
    """Maps data files read-only, as the memory tier maps its segments for a load."""

    def __init__(self, directory):
        self.directory, self.maps = directory, {}

    def __call__(self, name):
        import mmap

        with open(self.directory / name, "rb") as fh:
            self.maps[name] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self.maps[name]


def _no_preadv(monkeypatch):
    def refused(*a):
        raise AssertionError("a mapped file was read with preadv")

    monkeypatch.setattr(fragment_files.os, "preadv", refused)


@pytest.mark.parametrize("helpers", [0, 3])
def test_a_mapped_file_is_copied_from_its_mapping_and_checked(stored, monkeypatch, helpers):
    from concurrent.futures import ThreadPoolExecutor

    from ucp.codecs import checksum

    directory, data, f = stored
    monkeypatch.setattr(checksum, "CHUNK_BYTES", BLOCK)  # a chunk per block, a span per two
    monkeypatch.setattr(checksum, "SPAN_BYTES", 2 * BLOCK)
    _no_preadv(monkeypatch)
    with ThreadPoolExecutor(3) as pool, FragmentFiles(directory, maps=_Maps(directory), pool=pool,
                                                      helpers=helpers) as files:
        out = bytearray(len(data))
        assert files.read(f, [out], block_bytes=BLOCK) == f.crc32c and bytes(out) == data
        for lo, hi in [(0, len(data)), (100, 200), (BLOCK - 1, 2 * BLOCK + 1), (BLOCK, 3 * BLOCK + 123)]:
            run = memoryview(bytearray(hi - lo))
            files.read_run(f, lo, hi, run, BLOCK)
            assert bytes(run) == data[lo:hi]
        whole = memoryview(bytearray(len(data)))
        files.read_blocks(f, [(0, 1), (2, 4)], whole, BLOCK)
        assert bytes(whole[:BLOCK]) == data[:BLOCK] and bytes(whole[2 * BLOCK:]) == data[2 * BLOCK:]
        assert files.nbytes >= 2 * len(data)


def test_a_corrupted_block_of_a_mapped_file_is_named(stored, monkeypatch):
    directory, data, f = stored
    raw = bytearray((directory / "f").read_bytes())
    raw[10 + 2 * BLOCK + 7] ^= 1
    (directory / "f").write_bytes(bytes(raw))
    _no_preadv(monkeypatch)
    with FragmentFiles(directory, maps=_Maps(directory)) as files:
        with pytest.raises(CorruptCheckpointError) as e:
            files.read(f, [bytearray(len(data))], block_bytes=BLOCK)
        said = str(e.value)
        assert str(directory / "f") in said and "model/w" in said and "block 2 at bytes" in said, said
        assert "fails its checksum" in said
        out = memoryview(bytearray(BLOCK))
        files.read_run(f, BLOCK, 2 * BLOCK, out, BLOCK)  # block 1 is intact
        assert bytes(out) == data[BLOCK:2 * BLOCK]
        with pytest.raises(CorruptCheckpointError, match="block 2 at bytes"):
            files.read_run(f, BLOCK, 3 * BLOCK, memoryview(bytearray(2 * BLOCK)), BLOCK)
        with pytest.raises(CorruptCheckpointError, match="block 2 at bytes"):
            files.read_blocks(f, [(1, 3)], memoryview(bytearray(len(data))), BLOCK)
    unblocked = _fragment(data, blocks=False)  # (format 1.0: the whole checksum alone)
    with FragmentFiles(directory, maps=_Maps(directory)) as files, \
            pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        files.read(unblocked, [bytearray(len(data))], block_bytes=BLOCK)
