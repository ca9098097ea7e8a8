"""Verification of a stored checkpoint: completeness, file sizes and every fragment's checksum."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ucp.codecs.checksum import crc32c
from ucp.format.manifest import Manifest

_CHUNK = 8 << 20


@dataclass
class VerifyReport:
    """Problems found (one line each, naming file and tensor key) and what was checked."""

    path: Path
    problems: list[str] = field(default_factory=list)
    fragments: int = 0
    nbytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _crc_of_range(fd: int, offset: int, length: int, buf: bytearray, block: int = 0) -> tuple[int, int, list[int]]:
    """CRC-32C of ``length`` bytes at ``offset``, streamed in chunks, and of each ``block``-byte block
    when ``block`` > 0 (short reads allowed); returns (crc, bytes read, block crcs)."""
    value, done, view, blocks = 0, 0, memoryview(buf), []
    current, filled = 0, 0  # the block being summed and its bytes so far
    while done < length:
        n = os.preadv(fd, [view[: min(len(buf), length - done)]], offset + done)
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
    return value, done, blocks


def verify_checkpoint(directory: Path, manifest: Manifest, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every data file and fragment the manifest lists; ``progress(nbytes)`` after each fragment."""
    report = VerifyReport(Path(directory))
    buf = bytearray(_CHUNK)
    by_file: dict[str, list] = {}
    for f in manifest.fragments:
        by_file.setdefault(f.file, []).append(f)
    for name, expected in sorted(manifest.files.items()):
        path = report.path / name
        frags = sorted(by_file.get(name, []), key=lambda f: f.offset)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            keys = ", ".join(sorted({f.key for f in frags})[:3])
            report.problems.append(f"{path}: missing (holds {len(frags)} fragment(s): {keys}...)")
            continue
        try:
            size = os.fstat(fd).st_size
            if size != expected:
                report.problems.append(f"{path}: {size} bytes, the manifest records {expected} (truncated or overwritten)")
            for f in frags:
                where = f"{path}: fragment of {f.key} {f.box}{f.flat or ''} at bytes [{f.offset}, {f.offset + f.length})"
                crc, got, blocks = _crc_of_range(fd, f.offset, f.length, buf, manifest.block_bytes if f.blocks else 0)
                report.fragments += 1
                report.nbytes += got
                if got < f.length:
                    report.problems.append(f"{where}: only {got} bytes present (truncated)")
                elif crc != f.crc32c:
                    report.problems.append(f"{where}: checksum mismatch (crc32c {crc:08x}, expected {f.crc32c:08x})")
                elif f.blocks and tuple(blocks) != f.blocks:
                    bad = next((i for i, (a, b) in enumerate(zip(blocks, f.blocks)) if a != b), min(len(blocks), len(f.blocks)) - 1)
                    report.problems.append(f"{where}: block {bad} checksum mismatch (crc32c {blocks[bad]:08x}, "
                                           f"expected {f.blocks[bad]:08x}) although the whole fragment's matches")
                if progress:
                    progress(f.length)
        finally:
            os.close(fd)
    return report
