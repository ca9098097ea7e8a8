"""The manifest: the versioned description of a distributed checkpoint.

A manifest is two documents: a JSON header (step, layout, tensors with their global shape, dtype
and pattern, non-tensor state, the files and their sizes) and an Arrow/Parquet table with one row
per fragment. ``docs/format-checkpoint.md`` states the MUST rules; :meth:`Manifest.validate`
enforces them, one error per rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from ucp.errors import FormatError, SpecError
from ucp.format.box import Box
from ucp.format.dtypes import DTYPES
from ucp.format.fragment import Fragment, check_file_name, fragments_to_table
from ucp.format.jsonio import parse_json
from ucp.format.keys import parse_key
from ucp.format.layout import Layout
from ucp.format.pattern import Pattern

FORMAT = "ucp.checkpoint"
FORMAT_VERSION = "1.3"
PAGED_MINOR = 3  # from format 1.3 on, fragments and per-rank state are paged tables (rules 20-27)
BLOCK_BYTES = 64 << 10  # block checksums of fragments (format 1.1): one per 64 KiB
MAX_STEP = 1 << 63  # steps are int64 (the step directory's name, trainers' counters): a step is below this


def check_version(found, supported: str, what: str) -> None:
    """Reject a ``format_version`` whose major number this reader does not know."""
    if not isinstance(found, str) or not re.fullmatch(r"[0-9]+\.[0-9]+", found):
        raise FormatError(f"{what}: format_version {found!r} is not of the form 'MAJOR.MINOR'")
    if found.split(".")[0] != supported.split(".")[0]:
        raise FormatError(
            f"{what}: format_version {found} is not supported by this ucp (reads {supported.split('.')[0]}.x); "
            "upgrade ucp to read it"
        )


@dataclass(frozen=True)
class TensorMeta:
    """Global shape, dtype and pattern of one tensor key."""

    shape: tuple[int, ...]
    dtype: str
    pattern: Pattern = field(default_factory=Pattern)

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "pattern": self.pattern.to_dict()}

    @classmethod
    def from_dict(cls, d: dict, key: str = "") -> "TensorMeta":
        try:
            shape = tuple(int(s) for s in d["shape"])
            return cls(shape, str(d["dtype"]), Pattern.from_dict(d.get("pattern", {})))
        except (TypeError, ValueError, KeyError) as e:
            raise FormatError(f"tensor {key!r}: malformed entry {d!r} ({e})") from e


@dataclass(frozen=True)
class Manifest:
    """Everything needed to find and check every byte of a checkpoint.

    Args:
        step: training step the checkpoint was taken at.
        layout: the layout of the ranks that wrote it.
        tensors: tensor key -> :class:`TensorMeta`.
        fragments: where every piece of every tensor lives.
        state: non-tensor state, ``{"shared": {...}, "ranks": {"<rank>": {...}}}`` of typed JSON.
        files: data file name -> size in bytes.
        block_bytes: the block size of the fragments' block checksums (0: none, as in format 1.0).
        file_headers: data file name -> CRC-32C of its safetensors header (the 8-byte length and the
            JSON header; format 1.2, which records one for every file; empty before).
    """

    step: int
    layout: Layout
    tensors: dict
    fragments: tuple
    state: dict = field(default_factory=lambda: {"shared": {}, "ranks": {}})
    files: dict = field(default_factory=dict)
    format_version: str = FORMAT_VERSION
    created_by: str = ""
    block_bytes: int = 0
    file_headers: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Enforce the MUST rules of the checkpoint format; raise FormatError/SpecError on the first broken one."""
        self.validate_header()
        self.validate_fragments()

    def validate_header(self) -> None:
        """The rules on everything but the fragments (a save whose fragments were checked once per
        layout, in its plan, checks only this at each commit)."""
        check_version(self.format_version, FORMAT_VERSION, "checkpoint manifest")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or not 0 <= self.step < MAX_STEP:
            raise FormatError(f"manifest step {_short(self.step)} must be a non-negative integer below 2^63")
        for name, size in self.files.items():
            check_file_name(name)
            if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < MAX_STEP:
                raise FormatError(f"manifest file {name}: size {_short(size)} must be a non-negative integer below 2^63")
        if not isinstance(self.file_headers, dict):
            raise FormatError("manifest file_headers must be an object: file name -> CRC-32C of its header")
        for name, crc in self.file_headers.items():
            if name not in self.files:
                raise FormatError(f"manifest file_headers names {_short(name)}, which 'files' does not list")
            if isinstance(crc, bool) or not isinstance(crc, int) or not 0 <= crc < 1 << 32:
                raise FormatError(f"manifest file_headers: the checksum of {name} is {_short(crc)}, not a CRC-32C")
        for key, meta in self.tensors.items():
            parse_key(key)
            if meta.dtype not in DTYPES:
                raise FormatError(f"tensor {key}: unknown dtype {meta.dtype!r}")
            if any(s < 0 for s in meta.shape):
                raise FormatError(f"tensor {key}: negative size in shape {list(meta.shape)}")
            meta.pattern.validate(meta.shape, self.layout.names, key)
        if isinstance(self.block_bytes, bool) or not isinstance(self.block_bytes, int) or self.block_bytes < 0:
            raise FormatError(f"manifest block_bytes {self.block_bytes!r} must be a non-negative integer")
        if not isinstance(self.state, dict) or set(self.state) - {"shared", "ranks"}:
            raise FormatError("manifest state must be an object with 'shared' and 'ranks'")
        ranks = self.state.get("ranks", {})
        if not isinstance(self.state.get("shared", {}), dict) or not isinstance(ranks, dict) or any(
            not (isinstance(r, str) and r.isdigit() and int(r) < self.layout.world_size and isinstance(v, dict))
            for r, v in ranks.items()
        ):
            raise FormatError("manifest state: 'shared' must be an object and 'ranks' map rank numbers "
                              f"below {self.layout.world_size} to objects")

    def validate_fragments(self, cover: bool = True) -> None:
        """The rules on the fragments: each in its file and its tensor, and (``cover``) every tensor
        covered exactly once; a reader of part of a table checks its rows without ``cover`` (rule 27)."""
        by_key: dict[str, list[Fragment]] = {}
        for frag in self.fragments:
            meta = self.tensors.get(frag.key)
            if meta is None:
                raise FormatError(f"fragment in {frag.file} names tensor {frag.key!r}, which the manifest does not list")
            frag.validate()
            frag.check_blocks(self.block_bytes)
            if frag.file not in self.files:
                raise FormatError(f"fragment of {frag.key} names file {frag.file!r}, which the manifest does not list")
            if frag.offset + frag.length > self.files[frag.file]:
                raise FormatError(f"fragment of {frag.key} ends at byte {frag.offset + frag.length}, past the end of {frag.file}")
            if frag.dtype != meta.dtype:
                raise FormatError(f"fragment of {frag.key} in {frag.file} has dtype {frag.dtype}, tensor has {meta.dtype}")
            if not frag.box.fits(meta.shape):
                raise FormatError(f"fragment of {frag.key} in {frag.file}: box {frag.box} outside shape {list(meta.shape)}")
            if frag.rank >= self.layout.world_size:
                raise FormatError(f"fragment of {frag.key} written by rank {frag.rank}, layout has {self.layout.world_size} ranks")
            by_key.setdefault(frag.key, []).append(frag)
        if cover:
            for key, meta in self.tensors.items():
                _check_cover(key, meta, by_key.get(key, []))

    def check_cover(self, keys) -> None:
        """Rule 7 for the tensors ``keys`` alone: their fragments (all of them are here) hold every
        element exactly once (a reader that read every row of some keys, of a table it reads in part)."""
        for key in keys:
            _check_cover(key, self.tensors[key], self.fragments_of(key))

    @property
    def paged(self) -> bool:
        """Whether this version stores fragments and per-rank state as paged tables (1.3 on)."""
        return int(self.format_version.split(".")[1]) >= PAGED_MINOR

    def fragments_of(self, key: str) -> list[Fragment]:
        return [f for f in self.fragments if f.key == key]

    @property
    def nbytes(self) -> int:
        return sum(f.length for f in self.fragments)

    def header(self, fragment_table: dict, state_table: dict | None = None) -> dict:
        """The JSON header; ``fragment_table`` says where the stored table is (before 1.3:
        ``{"file", "crc32c", "rows"}``; from 1.3: a paged table, and ``state_table`` the ranks' state:
        ``{"file", "rows", "depth", "root"}``, :class:`ucp.storage.paged.PagedTable`)."""
        common = {
            "format": FORMAT,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "step": self.step,
            "layout": self.layout.to_dict(),
            "tensors": {k: m.to_dict() for k, m in self.tensors.items()},
            "fragment_table": dict(fragment_table),
        }
        if self.paged:  # files and their header checksums are columns of the fragment rows (rule 22)
            return common | {"state": {"shared": self.state.get("shared", {})}, "state_table": dict(state_table),
                             "block_bytes": self.block_bytes}
        return common | {
            "files": dict(self.files),
            "state": self.state,
        } | ({"block_bytes": self.block_bytes} if self.block_bytes else {}) \
          | ({"file_headers": dict(self.file_headers)} if self.file_headers else {})

    def document(self) -> dict:
        """Everything the manifest says as one JSON document (``ucp inspect --json``): the header's
        fields, every file, every rank's state and every fragment, whatever the stored form."""
        return {"format": FORMAT, "format_version": self.format_version, "created_by": self.created_by,
                "step": self.step, "layout": self.layout.to_dict(),
                "tensors": {k: m.to_dict() for k, m in self.tensors.items()}, "files": dict(self.files),
                "file_headers": dict(self.file_headers), "block_bytes": self.block_bytes, "state": self.state,
                "fragments": fragments_to_table(self.fragments).to_pylist()}

    @classmethod
    def from_header(cls, header: dict, fragments, files: dict | None = None, file_headers: dict | None = None,
                    ranks: dict | None = None, cover: bool = True) -> "Manifest":
        """Build and validate a manifest from its JSON header and fragment list; from format 1.3 on,
        ``files``, ``file_headers`` (from the fragment rows) and ``ranks`` (the per-rank state read)
        come from its tables. ``cover=False``: the fragments are the part of the table a reader
        needs, checked row by row (rule 27)."""
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise FormatError(f"not a ucp checkpoint manifest (format is {header.get('format') if isinstance(header, dict) else None!r})")
        check_version(header.get("format_version"), FORMAT_VERSION, "checkpoint manifest")
        try:
            m = cls(
                step=header["step"],
                layout=Layout.from_dict(header["layout"]),
                tensors={k: TensorMeta.from_dict(v, k) for k, v in header["tensors"].items()},
                fragments=tuple(fragments),
                state=header.get("state", {"shared": {}, "ranks": {}}) if ranks is None else
                {"shared": (header.get("state") or {}).get("shared", {}), "ranks": ranks},
                files=dict(header["files"] if files is None else files),
                format_version=header["format_version"],
                created_by=header.get("created_by", ""),
                block_bytes=header.get("block_bytes", 0),
                file_headers=header.get("file_headers", {}) if file_headers is None else file_headers,
            )
        except KeyError as e:
            raise FormatError(f"checkpoint manifest lacks field {e.args[0]!r}") from e
        except (SpecError, AttributeError, TypeError, ValueError) as e:
            raise FormatError(f"checkpoint manifest is malformed: {e}") from e
        m.validate_header()
        m.validate_fragments(cover)
        return m


def _short(value) -> str:
    """``value`` for a one-line message: its repr, cut to 40 characters (a step of 4,000 digits)."""
    if isinstance(value, int) and value.bit_length() > 128:  # (repr refuses ints of over 4,300 digits)
        return f"of about {int(value.bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def header_to_json(header: dict) -> bytes:
    return json.dumps(header, indent=1, sort_keys=False, allow_nan=False).encode()


def canonical_json(header: dict) -> bytes:
    """The bytes a header's checksum is taken over: sorted keys, no whitespace."""
    return json.dumps(header, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def header_from_json(data: bytes, where: str) -> dict:
    header = parse_json(data, where)
    if not isinstance(header, dict):
        raise FormatError(f"{where} is not a JSON object")
    return header


def _check_cover(key: str, meta: TensorMeta, frags: list[Fragment]) -> None:
    """Fragments of a tensor must hold every element exactly once.

    Fragments are grouped by box: a box is held whole by one fragment, or by flat ranges that are
    disjoint and fill it. Distinct boxes must be disjoint (a sweep along the dim with the most
    distinct offsets). Disjoint boxes inside the shape hold at most its element count, so an equal
    count means every box is filled and the cover is exact.
    """
    numel = Box.full(meta.shape).numel
    held = sum(f.numel for f in frags)
    if held != numel:
        raise FormatError(f"tensor {key}: fragments hold {held} elements, the tensor has {numel}")
    by_box: dict[Box, list[Fragment]] = {}
    for f in frags:
        if f.numel:
            by_box.setdefault(f.box, []).append(f)
    for box, group in by_box.items():
        if len(group) == 1 and group[0].flat is None:
            continue
        if any(f.flat is None for f in group):
            raise FormatError(f"tensor {key}: fragments in {group[0].file} and {group[1].file} overlap at box {box}")
        group.sort(key=lambda f: f.flat.start)
        for a, b in zip(group, group[1:]):
            if b.flat.start < a.flat.end:
                raise FormatError(f"tensor {key}: flat ranges {a.flat} ({a.file}) and {b.flat} ({b.file}) of box {box} overlap")
    boxes = list(by_box)
    if len(boxes) < 2 or not meta.shape:
        return
    dim = max(range(len(meta.shape)), key=lambda d: len({b.offsets[d] for b in boxes}))
    active: list[Box] = []
    for box in sorted(boxes, key=lambda b: b.offsets[dim]):
        active = [a for a in active if a.ends[dim] > box.offsets[dim]]
        for a in active:
            ov = a.intersect(box)
            if ov is not None and ov.numel:
                raise FormatError(f"tensor {key}: fragments at {a} and {box} overlap at {ov}")
        active.append(box)
