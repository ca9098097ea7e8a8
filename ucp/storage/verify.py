"""Verification of a stored checkpoint: completeness, file sizes and every fragment's checksum."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ucp.errors import CorruptCheckpointError
from ucp.format.manifest import Manifest
from ucp.storage.fragment_files import FragmentFiles, describe

_CHUNK = 8 << 20


@dataclass
class Report:
    """Problems found in a checkpoint (one line each, naming file and tensor key) and the bytes checked."""

    path: Path
    problems: list[str] = field(default_factory=list)
    nbytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport(Report):
    """A distributed checkpoint's :class:`Report`, with the fragments checked."""

    fragments: int = 0


def verify_checkpoint(directory: Path, manifest: Manifest, progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every data file and fragment the manifest lists; ``progress(nbytes)`` after each fragment."""
    report = VerifyReport(Path(directory))
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
                keys = ", ".join(sorted({f.key for f in frags})[:3])
                report.problems.append(f"{path}: missing (holds {len(frags)} fragment(s): {keys}...)")
                continue
            if size != expected:
                report.problems.append(f"{path}: {size} bytes, the manifest records {expected} (truncated or overwritten)")
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
