"""Checked reads of a checkpoint's fragments: the one place fragment bytes come off storage.

Loads (:mod:`ucp.checkpoint.readers`), conversion (:mod:`ucp.convert.universal`), ``ucp verify``
(:mod:`ucp.storage.verify`) and the DCP importer read a fragment's bytes here. Every read is
positional (threads share the open files), a short read is retried from where it stopped, a file
that ends early is named as truncated, and every byte read is checksummed: a fragment's CRC-32C
against the manifest's, or each 64 KiB block's (format 1.1) when only some blocks are read.

Files already in memory (the memory tier's segments) are read from their mappings instead: copied
straight into the destination and checksummed in the same pass, chunk by chunk while in cache
(:func:`ucp.codecs.checksum.copy_block_crc32c`), over the threads the caller lends.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ucp.codecs.checksum import copy_block_crc32c, crc32c
from ucp.errors import CorruptCheckpointError
from ucp.format.fragment import Fragment
from ucp.format.manifest import BLOCK_BYTES, Manifest
from ucp.storage.directory import MANIFEST
from ucp.storage.manifest_io import gone
from ucp.storage.object_reads import GETS, coalesced, read_objects
from ucp.storage.objstore import is_object
from ucp.storage.safetensors_file import header_bytes

IOV_MAX = 512  # buffers per preadv call (the kernel's UIO_MAXIOV is 1024)
#: an object's header is read in the GET of the first fragments wanted when they start within this
#: many bytes of the object's start (a rank's own file: right after the header); else its first
#: ``HEAD_GUESS`` bytes are fetched beside them, in the same round trip (a header longer than that
#: takes two GETs more)
HEAD_WITH_DATA = 256 << 10
HEAD_GUESS = 64 << 10


def _nbytes(v) -> int:
    return len(v) if isinstance(v, bytearray) else v.nbytes


def fragment_name(f: Fragment) -> str:
    """How a message names fragment ``f``: its tensor key, box and flat range."""
    return f"fragment of {f.key} {f.box}{f.flat or ''}"


def describe(path: Path, f: Fragment) -> str:
    """How an error names fragment ``f`` of file ``path``: file, fragment and byte range."""
    return f"{path}: {fragment_name(f)} at bytes [{f.offset}, {f.offset + f.length})"


class FragmentFiles:
    """The data files of one checkpoint directory, opened on first use and shared by threads.

    Args:
        directory: the checkpoint's directory (or ``/dev/shm`` for a snapshot in memory).
        names: files to open at once (a missing one fails here), else each on first use.
        manifest: the manifest of the committed checkpoint in ``directory``, if it is one. Each file
            it lists is then checked as it is opened, before a byte of it is read: its size against
            the manifest's (one fstat) and its safetensors header against the manifest's CRC-32C
            (format 1.2: one small pread); and a file found missing while ``manifest.json`` is gone
            too is a checkpoint deleted while being read (:class:`CheckpointDeletedError`), not
            corruption.
        maps: ``maps(name)`` -> the memory of data file ``name`` mapped by the caller (a buffer of
            the file's bytes, valid while this object is open), to read from instead of the file;
            None: read every file.
        pool: an executor whose threads help copy and checksum a read from a mapping (``helpers``
            tasks per read; it may be the executor the reads run on).
        helpers: see ``pool``.

    ``nbytes`` counts the bytes read. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, directory: Path, names=(), manifest: Manifest | None = None, maps=None, pool=None,
                 helpers: int = 0, sizes: dict[str, int] | None = None):
        self.directory = directory if is_object(directory) else Path(directory)
        self._object = is_object(directory)  # (then every read is a ranged GET of the bytes it needs)
        self.manifest = manifest
        self._sizes = dict(sizes or {})  # objects' sizes found already (check_sizes), not asked again
        self._unchecked: set[str] = set()  # objects whose header is checked at their first read
        self._claimed: set[str] = set()  # (of those, the ones a read is checking)
        self._files: dict[str, tuple[int, int]] = {}
        self._maps = maps
        self._mapped: dict[str, np.ndarray] = {}  # name -> its mapped bytes (files read from memory)
        self._pool, self._helpers = pool, helpers
        self._lock = threading.Lock()
        self.nbytes = 0
        try:
            for name in names:
                self.open(name)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "FragmentFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._files.values():
                if fd >= 0:
                    os.close(fd)
            self._files.clear()
            self._mapped.clear()  # (no view of a mapping outlives the reads)

    def open(self, name: str, what: str = "") -> tuple[int, int]:
        """``(fd, size)`` of data file ``name``; a missing file is corruption, named (with ``what`` it holds)."""
        with self._lock:
            if name not in self._files and self._object:
                size = self._sizes[name] if name in self._sizes else self.size(name, what)
                self._check_size(name, size)
                if self.manifest is not None and self.manifest.file_headers.get(name) is not None:
                    self._unchecked.add(name)  # (read with the first bytes wanted if it can: _read_head)
                self._files[name] = (-1, size)
            if name not in self._files:
                path = self.directory / name
                try:
                    fd = os.open(path, os.O_RDONLY)
                except FileNotFoundError:
                    raise self._missing(name, what) from None
                try:
                    size = os.fstat(fd).st_size
                    self._check(fd, name, size)
                    if self._maps is not None:
                        mapped = np.frombuffer(self._maps(name), np.uint8)
                        if len(mapped) == size:  # (else the file changed since it was mapped: read it)
                            self._mapped[name] = mapped
                except BaseException:
                    os.close(fd)
                    raise
                self._files[name] = (fd, size)
            return self._files[name]

    def _missing(self, name: str, what: str = "") -> Exception:
        if self.manifest is not None and not (self.directory / MANIFEST).exists():
            return gone(self.directory, name)  # retention deletes the manifest first (format rule 3)
        return CorruptCheckpointError(f"{self.directory / name}: data file is missing{f' (holds {what})' if what else ''}")

    def _check(self, fd: int, name: str, size: int) -> None:
        """What the manifest records of file ``name``, open as ``fd`` with ``size`` bytes: its size
        and its header's CRC-32C (checked before any allocation or read its contents would drive)."""
        self._check_size(name, size)
        recorded = None if self.manifest is None else self.manifest.file_headers.get(name)
        if recorded is not None:
            path = self.directory / name
            pread = os.pread if fd >= 0 else lambda _, n, offset: path.read_range(offset, offset + n)
            with self._reading(name):
                self._check_header(name, header_bytes(fd, size, path, pread))

    def _check_size(self, name: str, size: int) -> None:
        expected = None if self.manifest is None else self.manifest.files.get(name)
        if expected is not None and size != expected:
            raise self._size_error(name, size, expected)

    def _check_header(self, name: str, header: bytes) -> None:
        """File ``name``'s safetensors ``header`` as stored against the CRC-32C the manifest records."""
        got, recorded = crc32c(header), self.manifest.file_headers[name]
        if got != recorded:
            raise CorruptCheckpointError(f"{self.directory / name}: safetensors header fails its checksum (crc32c "
                                         f"{got:08x}, recorded {recorded:08x}); the file's header is corrupted")

    def _header_checked(self, name: str) -> None:
        """Check object ``name``'s header now if that is still to do (two small ranged GETs)."""
        if self._claim_header(name):
            self._check(-1, name, self._files[name][1])
            self._unchecked.discard(name)

    def _read_head(self, name: str, head) -> None:
        """Check object ``name``'s header from ``head``, its first bytes (read with its first fragments);
        if they do not hold it whole, from two ranged GETs of its own."""
        view = memoryview(head)
        n = int.from_bytes(view[:8], "little") if len(view) >= 8 else len(view)
        if 8 + n > len(view):
            self._check(-1, name, self._files[name][1])
        else:
            self._check_header(name, view[:8 + n])
        self._unchecked.discard(name)

    @contextmanager
    def _reading(self, name: str):
        """Data file ``name`` gone while being read (an object found missing at its read) is told as
        :meth:`_missing` tells it: deleted with its checkpoint, or corruption."""
        try:
            yield
        except FileNotFoundError:
            raise self._missing(name) from None

    def _size_error(self, name: str, size: int, expected: int) -> CorruptCheckpointError:
        """File ``name`` is ``size`` bytes, not the ``expected`` the manifest records: named with the
        first fragment it no longer holds whole, if any (format rule 16)."""
        cut = next((f for f in self.manifest.fragments if f.file == name and f.offset + f.length > size), None)
        held = f" ({describe(self.directory / name, cut).split(': ', 1)[1]} lies past its end)" if cut else ""
        return CorruptCheckpointError(f"{self.directory / name}: {size} bytes on storage, the manifest records "
                                      f"{expected}; the file is truncated{held} or overwritten")

    def size(self, name: str, what: str = "") -> int:
        """The size of data file ``name`` (not opened); a missing file is corruption, named."""
        try:
            return (self.directory / name).stat().st_size
        except FileNotFoundError:
            raise self._missing(name, what) from None

    def check_sizes(self) -> dict[str, int]:
        """Every file the manifest lists is there with the size it records (one stat each): what a
        tensor's declared size may drive (an allocation) is then backed by bytes that exist. The
        sizes, by name (a reader of objects given them asks no size again: ``sizes``)."""
        found = {}
        for name, expected in self.manifest.files.items() if self.manifest is not None else ():
            found[name] = self.size(name)
            if found[name] != expected:
                raise self._size_error(name, found[name], expected)
        return found

    def release(self, name: str) -> None:
        """Close data file ``name`` (reopened if read again): a reader going file by file holds one."""
        with self._lock:
            entry = self._files.pop(name, None)
            self._mapped.pop(name, None)
        if entry is not None and entry[0] >= 0:
            os.close(entry[0])

    def _count(self, n: int) -> None:
        with self._lock:
            self.nbytes += n

    def locate(self, f: Fragment) -> int:
        """The open file holding fragment ``f``; a file that ends before ``f`` does is corruption
        (truncated), named."""
        fd, size = self.open(f.file)
        if f.offset + f.length > size:
            raise CorruptCheckpointError(f"{describe(self.directory / f.file, f)} lies past the end of the file "
                                         f"({size} bytes); the file is truncated")
        return fd

    def pread(self, name: str, offset: int, views: list, what: str = "", crc: int | None = None) -> int | None:
        """Fill ``views`` in order with the bytes of file ``name`` from ``offset`` (``what`` they hold,
        for the message when the file ends early). With ``crc`` (a running CRC-32C to continue), the
        bytes are summed as they arrive, each batch while it is still in cache, and the CRC returned."""
        fd, _ = self.open(name, what)
        for i in range(0, len(views), IOV_MAX):
            batch = views[i:i + IOV_MAX]
            want = sum(_nbytes(v) for v in batch)
            got = 0
            while got < want:  # a short read: continue from where it stopped
                rest, skip = [], got
                for v in batch:
                    n = _nbytes(v)
                    if skip >= n:
                        skip -= n
                        continue
                    rest.append(memoryview(v)[skip:])
                    skip = 0
                if fd >= 0:
                    n = os.preadv(fd, rest, offset + got)
                else:  # (an object: ranged GETs)
                    self._header_checked(name)
                    with self._reading(name):
                        n = (self.directory / name).read_into(offset + got, rest)
                if n == 0:
                    raise CorruptCheckpointError(f"{self.directory / name}: {what + ': ' if what else ''}the file ends at "
                                                 f"byte {offset + got}, {want - got} bytes early (truncated?)")
                got += n
            if crc is not None:
                for v in batch:
                    crc = crc32c(v, crc)
            offset += want
            self._count(want)
        return crc

    def read(self, f: Fragment, views: list, verify: bool = True, block_bytes: int = 0) -> int:
        """Fragment ``f``'s bytes, in order, into ``views``; returns their CRC-32C, checked against
        the manifest's unless ``verify`` is off (sources that carry no checksums). From a mapping
        into one view, the block checksums (of ``block_bytes``, the manifest's; 0: none) are checked
        as well, and a failure names the first block that fails."""
        self.locate(f)
        blocks: list[int] = []
        if f.file in self._mapped and len(views) == 1:
            [(crc, blocks)] = self._copy(f.file, [(views[0], f.offset, f.offset + f.length)], block_bytes or BLOCK_BYTES)
        else:
            crc = self.pread(f.file, f.offset, views, fragment_name(f), crc=0)
        if verify:
            self._verify(f, crc, blocks, block_bytes)
        return crc

    def _verify(self, f: Fragment, crc: int, blocks: list[int], block_bytes: int) -> None:
        """Fragment ``f`` read with checksum ``crc`` and block checksums ``blocks`` (of ``block_bytes``;
        none when read from a file) against the manifest's: the first failing block is named."""
        if blocks and block_bytes and f.blocks:
            self._check_blocks(f, 0, blocks, block_bytes)
        if crc != f.crc32c:
            raise CorruptCheckpointError(f"{describe(self.directory / f.file, f)} fails its checksum (crc32c {crc:08x}, "
                                         f"expected {f.crc32c:08x}); the file is corrupted")

    @property
    def has_maps(self) -> bool:
        """Whether files may be read from the caller's mappings (a snapshot in memory)."""
        return self._maps is not None

    @property
    def remote(self) -> bool:
        """Whether the files are objects on an object store (each read a ranged GET)."""
        return self._object

    def read_spans(self, reads: list, gets: int = GETS) -> None:
        """Each ``(fragment, view)`` of ``reads`` (views of the fragments' lengths) from an object
        store, fetched together (:meth:`_fetch`); each fragment then checked against its CRC-32C. A
        rank's many small fragments cost a few round trips, not one each."""
        wanted: dict[str, list] = {}
        for f, view in reads:
            self.locate(f)
            wanted.setdefault(f.file, []).append((f.offset, view))
        self._fetch(wanted, gets)
        for f, view in reads:
            self._verify(f, crc32c(view), [], 0)

    def read_block_runs(self, runs: list, block_bytes: int, gets: int = GETS) -> None:
        """Each ``(fragment, first, view)`` of ``runs`` from an object store: the fragment's blocks (of
        ``block_bytes``) from block ``first`` on into ``view`` (as many as it holds), each block checked
        against its checksum (``first`` None: the whole fragment, checked against its CRC-32C), all
        fetched together (:meth:`_fetch`): a resharded piece's runs cost one round trip, not one each."""
        wanted: dict[str, list] = {}
        for f, first, view in runs:
            self.locate(f)
            wanted.setdefault(f.file, []).append((f.offset + (first or 0) * block_bytes, view))
        self._fetch(wanted, gets)
        for f, first, view in runs:
            if first is None:
                self._verify(f, crc32c(view), [], 0)
            else:
                data = memoryview(view)
                blocks = [crc32c(data[at:at + block_bytes]) for at in range(0, data.nbytes, block_bytes)]
                self._check_blocks(f, first, blocks, block_bytes)

    def _fetch(self, wanted: dict[str, list], gets: int) -> None:
        """Fill the views of ``wanted`` (file name -> ``(offset, view)`` extents in it) from the object
        store in one go: the extents of a file close together fetched by one ranged GET spanning them
        (:func:`~ucp.storage.object_reads.coalesced`: the bytes between, within a tenth more or 64 KiB, go
        to a scratch buffer), its header (if still to be checked) with them, every file's GETs ``gets``
        in flight at once (:func:`~ucp.storage.object_reads.read_objects`)."""
        requests, heads = [], []
        for name, extents in wanted.items():
            spans = []
            for start, end, indices in coalesced([(at, _nbytes(view)) for at, view in extents]):
                views, pos = [], start
                for i in indices:
                    at, view = extents[i]
                    if at > pos:
                        views.append(bytearray(at - pos))
                    views.append(view)
                    pos = at + _nbytes(view)
                spans.append((start, end, views))
            if self._claim_header(name):  # (the header comes in the same GETs: with the first span when that
                start, end, views = spans[0]  # starts near the object's start, else as a span of its own)
                if start <= HEAD_WITH_DATA:
                    heads.append((name, bytearray(start)))
                    spans[0] = (0, end, [heads[-1][1], *views])
                else:
                    heads.append((name, bytearray(min(HEAD_GUESS, self._files[name][1]))))
                    spans.insert(0, (0, len(heads[-1][1]), [heads[-1][1]]))
            requests.append((name, spans))
        try:
            got = read_objects([(self.directory / name, [(start, views) for start, _, views in spans])
                                for name, spans in requests], gets)
        except FileNotFoundError as e:
            raise self._missing(str(e.filename).rsplit("/", 1)[-1]) from None
        for (name, spans), counts in zip(requests, got):
            for (start, end, _), n in zip(spans, counts):
                if n < end - start:
                    raise CorruptCheckpointError(f"{self.directory / name}: the file ends at byte {start + n}, "
                                                 f"{end - start - n} bytes early (truncated?)")
            self._count(sum(end - start for start, end, _ in spans))
        for name, head in heads:
            self._read_head(name, head)

    def _claim_header(self, name: str) -> bool:
        """Whether this read checks object ``name``'s header (still to be checked, and no other
        thread's read has taken it on)."""
        with self._lock:
            if name not in self._unchecked or name in self._claimed:
                return False
            self._claimed.add(name)
            return True

    def mapped(self, f: Fragment) -> bool:
        """Whether fragment ``f`` is read from a mapping (its file located, so mapped if it can be)."""
        self.locate(f)
        return f.file in self._mapped

    def read_mapped(self, reads: list, block_bytes: int = 0) -> None:
        """Each ``(fragment, view)`` of ``reads`` (fragments :meth:`mapped`, views of their length)
        copied from its mapping into its view in one pass over all of them, split over the calling
        thread and the helpers, each checked against its CRC-32C and block checksums as :meth:`read`
        does: a whole restore from memory costs one call rather than one per fragment."""
        regions = []
        for f, view in reads:
            src = self._mapped[f.file]  # (located by mapped(): in its file's bounds)
            regions.append((np.frombuffer(view, np.uint8), src[f.offset:f.offset + f.length], None))
        sums = copy_block_crc32c(regions, block_bytes or BLOCK_BYTES, self._pool, self._helpers)
        del regions
        self._count(sum(f.length for f, _ in reads))
        for (f, _), (crc, blocks) in zip(reads, sums):
            self._verify(f, crc, blocks, block_bytes)

    def _copy(self, name: str, pieces: list, block_bytes: int) -> list[tuple[int, list[int]]]:
        """Copy bytes ``[lo, hi)`` of mapped file ``name`` into ``out`` for each ``(out, lo, hi)`` of
        ``pieces``, checksummed in the same pass: each piece's CRC-32C and ``block_bytes`` block
        checksums (from ``lo``)."""
        src = self._mapped[name]
        regions = [(np.frombuffer(out, np.uint8), src[lo:hi], None) for out, lo, hi in pieces]
        sums = copy_block_crc32c(regions, block_bytes, self._pool, self._helpers)
        self._count(sum(hi - lo for _, lo, hi in pieces))
        return sums

    def _check_blocks(self, f: Fragment, first: int, blocks: list[int], block_bytes: int) -> None:
        """Block checksums ``blocks`` of fragment ``f``, from block ``first`` on, against its own;
        the first that fails is named."""
        if len(f.blocks) < first + len(blocks):  # (a manifest validated has them all)
            raise CorruptCheckpointError(f"{describe(self.directory / f.file, f)} has {len(f.blocks)} block checksums, "
                                         f"its length needs {-(-f.length // block_bytes)}")
        if tuple(blocks) == tuple(f.blocks[first:first + len(blocks)]):
            return
        for i, (got, want) in enumerate(zip(blocks, f.blocks[first:])):
            if got != want:
                b, a = first + i, f.offset + (first + i) * block_bytes
                raise CorruptCheckpointError(
                    f"{self.directory / f.file}: {fragment_name(f)}, block {b} at bytes [{a}, "
                    f"{min(a + block_bytes, f.offset + f.length)}) fails its checksum (crc32c {got:08x}, expected "
                    f"{f.blocks[b]:08x}); the file is corrupted")

    def check_block(self, f: Fragment, b: int, data, block_bytes: int) -> None:
        """Verify block ``b`` of fragment ``f`` against its checksum; name file, key and block if it fails."""
        got = crc32c(data)
        if got != f.blocks[b]:
            a = f.offset + b * block_bytes
            raise CorruptCheckpointError(
                f"{self.directory / f.file}: {fragment_name(f)}, block {b} at bytes [{a}, {a + len(data)}) fails its "
                f"checksum (crc32c {got:08x}, expected {f.blocks[b]:08x}); the file is corrupted")

    def read_blocks(self, f: Fragment, runs, out: memoryview, block_bytes: int) -> None:
        """The block ``runs`` (``(first, last)`` pairs) of fragment ``f`` into ``out`` (the whole
        fragment's bytes; the rest is left unset), each block verified."""
        self.locate(f)
        if f.file in self._mapped:
            spans = [(first, first * block_bytes, min(last * block_bytes, f.length)) for first, last in runs]
            sums = self._copy(f.file, [(out[lo:hi], f.offset + lo, f.offset + hi) for _, lo, hi in spans], block_bytes)
            for (first, _, _), (_, blocks) in zip(spans, sums):
                self._check_blocks(f, first, blocks, block_bytes)
            return
        for first, last in runs:
            lo, hi = first * block_bytes, min(last * block_bytes, f.length)
            self.pread(f.file, f.offset + lo, [out[lo:hi]])
            for b in range(first, last):
                self.check_block(f, b, out[b * block_bytes:min((b + 1) * block_bytes, f.length)], block_bytes)

    def read_run(self, f: Fragment, lo: int, hi: int, out: memoryview, block_bytes: int) -> None:
        """Bytes ``[lo, hi)`` of fragment ``f``'s data (which has block checksums) into ``out``: the
        blocks inside the run straight into ``out``, the (at most two) blocks it cuts through a
        scratch buffer; every block read is verified."""
        self.locate(f)
        bb, scratch = block_bytes, None
        b, end = lo // bb, -(-hi // bb)
        while b < end:
            bl, bh = b * bb, min((b + 1) * bb, f.length)
            if lo <= bl and bh <= hi:  # a run of whole blocks: read in place
                e = b + 1
                while e < end and min((e + 1) * bb, f.length) <= hi:
                    e += 1
                rh = min(e * bb, f.length)
                if f.file in self._mapped:  # copied and checksummed in one pass
                    [(_, blocks)] = self._copy(f.file, [(out[bl - lo:rh - lo], f.offset + bl, f.offset + rh)], bb)
                    self._check_blocks(f, b, blocks, bb)
                else:
                    self.pread(f.file, f.offset + bl, [out[bl - lo:rh - lo]])
                    for k in range(b, e):
                        self.check_block(f, k, out[k * bb - lo:min((k + 1) * bb, f.length) - lo], bb)
                b = e
                continue
            scratch = scratch if scratch is not None else memoryview(bytearray(bb))
            block = scratch[:bh - bl]
            if f.file in self._mapped:
                block[:] = self._mapped[f.file][f.offset + bl:f.offset + bh]
                self._count(bh - bl)
            else:
                self.pread(f.file, f.offset + bl, [block])
            self.check_block(f, b, block, bb)
            a, z = max(lo, bl), min(hi, bh)
            out[a - lo:z - lo] = block[a - bl:z - bl]
            b += 1

    def checksums(self, f: Fragment, buf: bytearray, block: int = 0) -> tuple[int, int, list[int]]:
        """CRC-32C of fragment ``f``'s bytes as stored, streamed through ``buf``, and of each
        ``block``-byte block when ``block`` > 0; returns (crc, bytes there, block crcs): fewer bytes
        than ``f.length`` when its file ends early. Verification compares these with the manifest."""
        fd, _ = self.open(f.file)
        if fd < 0:
            self._header_checked(f.file)
        value, done, view, blocks = 0, 0, memoryview(buf), []
        read = os.preadv if fd >= 0 else lambda _, views, offset: (self.directory / f.file).read_into(offset, views)
        current, filled = 0, 0  # the block being summed and its bytes so far
        while done < f.length:
            n = read(fd, [view[: min(len(buf), f.length - done)]], f.offset + done)
            if n == 0:
                break
            value = crc32c(view[:n], value)
            at = 0
            while block and at < n:
                take = min(block - filled, n - at)
                current = crc32c(view[at:at + take], current)
                filled += take
                at += take
                if filled == block:
                    blocks.append(current)
                    current, filled = 0, 0
            done += n
        if block and filled:
            blocks.append(current)
        self._count(done)
        return value, done, blocks
