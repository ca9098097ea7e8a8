"""Verification of a stored checkpoint: completeness, file sizes, every data file's header (format
1.2) and every fragment's checksum."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ucp.codecs.checksum import crc32c
from ucp.errors import CorruptCheckpointError
from ucp.format.manifest import Manifest
from ucp.storage.directory import MANIFEST
from ucp.storage.fragment_files import FragmentFiles, describe
from ucp.storage.manifest_io import gone
from ucp.storage.objstore import is_object
from ucp.storage.safetensors_file import header_bytes

_CHUNK = 8 << 20


@dataclass
class Report:
    """Problems found in a checkpoint (one line each, naming file and tensor key) and the bytes
    checked; ``notes``: what could not be checked (one line each), which is not a problem."""

    path: Path
    problems: list[str] = field(default_factory=list)
    nbytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport(Report):
    """A distributed checkpoint's :class:`Report`, with the fragments checked."""

    fragments: int = 0


def verify_checkpoint(directory: Path, manifest: Manifest, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every data file and fragment the manifest lists; ``progress(nbytes)`` after each fragment."""
    report = VerifyReport(directory if is_object(directory) else Path(directory))
    if manifest.files and not manifest.file_headers:
        report.notes.append(f"the data files' safetensors headers are unchecked: a format {manifest.format_version} "
                            "manifest records no checksums of them (1.2 does)")
    buf = bytearray(_CHUNK)
    by_file: dict[str, list] = {}
    for f in manifest.fragments:
        by_file.setdefault(f.file, []).append(f)
    with FragmentFiles(report.path) as files:
        for name, expected in sorted(manifest.files.items()):
            path = report.path / name
            frags = sorted(by_file.get(name, []), key=lambda f: f.offset)
            try:
                _, size = files.open(name)
            except CorruptCheckpointError:
                if not (report.path / MANIFEST).exists():  # deleted (by retention) while verified, manifest first
                    raise gone(report.path, name) from None
                keys = ", ".join(sorted({f.key for f in frags})[:3])
                report.problems.append(f"{path}: missing (holds {len(frags)} fragment(s): {keys}...)")
                continue
            if size != expected:
                report.problems.append(f"{path}: {size} bytes, the manifest records {expected} (truncated or overwritten)")
            if name in manifest.file_headers:
                _check_header(files.open(name)[0], size, path, manifest.file_headers[name], report)
            for f in frags:
                where = describe(path, f)
                crc, got, blocks = files.checksums(f, buf, manifest.block_bytes if f.blocks else 0)
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
            files.release(name)  # one data file open at a time, however many ranks wrote
    return report


def _check_header(fd: int, size: int, path: Path, recorded: int, report: VerifyReport) -> None:
    """The CRC-32C of file ``path``'s safetensors header against the manifest's ``recorded`` one."""
    try:
        pread = os.pread if fd >= 0 else lambda _, n, offset: path.read_range(offset, offset + n)  # (an object)
        got = crc32c(header_bytes(fd, size, path, pread))
    except CorruptCheckpointError as e:
        report.problems.append(str(e))
        return
    if got != recorded:
        report.problems.append(f"{path}: safetensors header fails its checksum (crc32c {got:08x}, recorded "
                               f"{recorded:08x}); the file's header is corrupted")
