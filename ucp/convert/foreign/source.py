"""The one record every source of ``ucp convert`` is described by, whatever system wrote it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ucp.errors import OptionsError
from ucp.format.manifest import Manifest


@dataclass(frozen=True)
class SourceRecord:
    """A checkpoint described as a ucp manifest for the converter.

    Attributes:
        path: the directory its fragments' files are in.
        manifest: its tensors, their fragments (byte ranges of those files) and non-tensor state.
        facts: what the universal checkpoint records of its source (format, path, ...).
        verify: whether its fragments carry checksums to verify (ucp's own); foreign ones are summed as read.
        decode: fragment -> its bytes, for files whose bytes are not raw (None: every fragment lies raw).
        spec_applied: the importer applied the spec itself (its patterns are in the manifest);
            ``spec_text`` is then the spec as applied (None without a spec).
    """

    path: Path
    manifest: Manifest
    facts: dict = field(default_factory=dict)
    verify: bool = False
    decode: Callable | None = None
    spec_applied: bool = False
    spec_text: str | None = None


def refuse_step(step: int | None, why: str) -> None:
    """A source that holds one checkpoint takes no ``step``; ``why`` says what to pass instead."""
    if step is not None:
        raise OptionsError(f"step: {why}")
