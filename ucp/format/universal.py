"""The universal checkpoint: one consolidated array per tensor key, independent of any layout.

Stored as a zarr v3 group (``docs/format-universal.md`` states the MUST rules). This module is the
pure part: which array path a tensor key gets, which data type stands in for dtypes zarr lacks
(bfloat16, float8), the inner chunk shape, and the header kept in the root group's attributes,
with :meth:`UniversalHeader.validate` enforcing the rules one error each.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ucp.errors import FormatError, SpecError
from ucp.format.dtypes import DTYPES, itemsize
from ucp.format.fragment import check_file_name
from ucp.format.keys import OPTIM, parse_key
from ucp.format.layout import Layout
from ucp.format.manifest import check_version
from ucp.format.pattern import Pattern

FORMAT = "ucp.universal"
FORMAT_VERSION = "1.1"
"""1.1: each array's ``zarr.json`` records its chunks' CRC-32C (``attributes.ucp.chunk_crc32c``),
binding every chunk to its array and position; 1.0 files lack it and are read without that check."""

#: inner chunks hold about this many bytes unless a writer is told otherwise
DEFAULT_CHUNK_BYTES = 1 << 20

#: dtypes zarr v3 has no data type for: stored as their raw bit patterns in an unsigned integer type
RAW_BITS = {"bfloat16": "uint16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}

#: compressors a writer may apply to each chunk (numcodecs through zarr's codec names)
COMPRESSORS = ("none", "zstd")

_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


#: the model config files a universal checkpoint may keep (``source.config_files``) for ``export``
CONFIG_FILES = ("config.json", "generation_config.json")


def stored_dtype(dtype: str) -> str:
    """The zarr data type of a tensor of ``dtype``: itself, or the unsigned type of its raw bits."""
    itemsize(dtype)
    return RAW_BITS.get(dtype, dtype)


#: names a node cannot take: its parent group's metadata file (any case: case-insensitive file systems)
_RESERVED = {"zarr.json"}


def _segment(name: str) -> str:
    """A zarr node name for ``name``: itself if plain, else every other byte written as ``%XX``."""
    reserved = name.lower() in _RESERVED
    if _SAFE_SEGMENT.fullmatch(name) and not name.startswith("__") and set(name) != {"."} and not reserved:
        return name
    out = []
    for i, ch in enumerate(name):
        plain = ch.isascii() and (ch.isalnum() or ch in "-_" or (ch == "." and i > 0)) and not (i == 0 and (ch == "_" or reserved))
        out.append(ch if plain else "".join(f"%{b:02X}" for b in ch.encode()))
    return "".join(out)


def array_path(key: str) -> str:
    """The path of a tensor key's array inside the group.

    ``model/<fqn>`` -> ``model/<fqn>``; ``optim/<fqn>/<state>`` -> ``optim/<state>/<fqn>`` (one
    group per optimizer state, keyed like the model); ``extra/<name>`` -> ``extra/<name>``. Names
    outside ``[A-Za-z0-9._-]`` are escaped as ``%XX``.
    """
    kind, name, state = parse_key(key)
    if kind == OPTIM:
        return f"{OPTIM}/{_segment(state)}/{_segment(name)}"
    return f"{kind}/{_segment(name)}"


def chunk_shape(shape: tuple[int, ...], item: int, target: int = DEFAULT_CHUNK_BYTES) -> tuple[int, ...]:
    """Inner chunk shape: halve the largest dim (rounding up) until a chunk holds <= ``target`` bytes.

    Every dim of a large tensor ends up split, so a slice along any dim reads little beyond itself.
    """
    if target < 1:
        raise SpecError(f"chunk target {target} bytes must be positive")
    chunk = [max(1, s) for s in shape]
    while chunk and math.prod(chunk) * item > target and max(chunk) > 1:
        d = max(range(len(chunk)), key=lambda i: chunk[i])
        chunk[d] = -(-chunk[d] // 2)
    return tuple(chunk)


def shard_shape(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    """The single shard of an array: ``shape`` rounded up to whole chunks (at least one per dim)."""
    return tuple(max(1, -(-s // c)) * c for s, c in zip(shape, chunks))


@dataclass(frozen=True)
class ArrayMeta:
    """One tensor key's array.

    Args:
        path: the array's path inside the group (see :func:`array_path`).
        shape: the universal (consolidated, unpadded) shape.
        dtype: the tensor's true dtype (``bfloat16`` even though zarr stores ``uint16``).
        chunks: inner chunk shape.
        pattern: how the source layout spread the tensor (fused parts, padding, shards).
        compressor: ``none`` or ``zstd``.
        metadata_crc32c: CRC-32C of the array's ``zarr.json``.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    chunks: tuple[int, ...]
    pattern: Pattern = field(default_factory=Pattern)
    compressor: str = "none"
    metadata_crc32c: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def stored_dtype(self) -> str:
        return stored_dtype(self.dtype)

    def to_dict(self) -> dict:
        return {"path": self.path, "shape": list(self.shape), "dtype": self.dtype, "data_type": self.stored_dtype,
                "chunks": list(self.chunks), "pattern": self.pattern.to_dict(), "compressor": self.compressor,
                "metadata_crc32c": self.metadata_crc32c}

    @classmethod
    def from_dict(cls, d: dict, key: str) -> "ArrayMeta":
        """An entry of the header's ``tensors``; its ``data_type`` must be the one ``dtype`` is stored as."""
        try:
            a = cls(str(d["path"]), tuple(_ints(d["shape"])), str(d["dtype"]), tuple(_ints(d["chunks"])),
                    Pattern.from_dict(d.get("pattern", {})), str(d.get("compressor", "none")),
                    _int(d["metadata_crc32c"]))
            data_type = d["data_type"]
        except (KeyError, TypeError, ValueError, SpecError) as e:
            raise FormatError(f"universal tensor {key!r}: malformed entry ({e})") from e
        if a.dtype not in DTYPES:
            raise FormatError(f"universal tensor {key}: unknown dtype {a.dtype!r}")
        if data_type != a.stored_dtype:
            raise FormatError(f"universal tensor {key}: data_type {data_type!r}, but dtype {a.dtype} is stored as "
                              f"{a.stored_dtype!r}")
        return a


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{v!r} is not an integer")
    return v


def _ints(values) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{values!r} is not a list of integers")
        out.append(v)
    return out


@dataclass(frozen=True)
class UniversalHeader:
    """The root group's ``ucp`` attributes: everything about the checkpoint except the array bytes.

    Args:
        step: the training step of the source checkpoint.
        source_layout: the layout the source was saved under.
        tensors: tensor key -> :class:`ArrayMeta`.
        state: non-tensor state as in the source manifest (``{"shared": ..., "ranks": ...}``).
        source: facts about the source checkpoint (format, version, path, its header checksum).
        fragment_table: ``{"file", "crc32c", "rows"}`` of the Parquet table of source fragments.
        spec: the UCL program the conversion used, or None.
    """

    step: int
    source_layout: Layout
    tensors: dict
    state: dict = field(default_factory=lambda: {"shared": {}, "ranks": {}})
    source: dict = field(default_factory=dict)
    fragment_table: dict = field(default_factory=dict)
    spec: str | None = None
    format_version: str = FORMAT_VERSION
    created_by: str = ""

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors.values())

    def validate(self) -> None:
        """Enforce the MUST rules of ``docs/format-universal.md`` on the header alone."""
        check_version(self.format_version, FORMAT_VERSION, "universal checkpoint")
        if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0:
            raise FormatError(f"universal checkpoint: step {self.step!r} must be a non-negative integer")
        paths: dict[str, str] = {}
        for key, a in self.tensors.items():
            try:
                parse_key(key)
            except SpecError as e:
                raise FormatError(f"universal checkpoint: {e}") from e
            if a.path != array_path(key):
                raise FormatError(f"universal tensor {key}: path {a.path!r}, expected {array_path(key)!r}")
            if a.path in paths:
                raise FormatError(f"universal tensors {paths[a.path]} and {key} share the array {a.path}")
            paths[a.path] = key
            if a.dtype not in DTYPES:
                raise FormatError(f"universal tensor {key}: unknown dtype {a.dtype!r}")
            if (len(a.chunks) != len(a.shape) or any(s < 0 for s in a.shape)
                    or any(not 1 <= c <= max(1, s) for c, s in zip(a.chunks, a.shape))):
                raise FormatError(f"universal tensor {key}: chunks {list(a.chunks)} do not fit shape {list(a.shape)} "
                                  "(each chunk dim from 1 to the array's)")
            if a.compressor not in COMPRESSORS:
                raise FormatError(f"universal tensor {key}: unknown compressor {a.compressor!r}")
            if not 0 <= a.metadata_crc32c < 2**32:
                raise FormatError(f"universal tensor {key}: metadata_crc32c out of range")
            try:
                a.pattern.validate(padded_shape(a.shape, a.pattern), self.source_layout.names, key)
            except SpecError as e:
                raise FormatError(f"universal tensor {key}: {e}") from e
            pad = a.pattern.pad
            if pad is not None and a.shape[pad.dim] != pad.keep:
                raise FormatError(f"universal tensor {key}: padding keeps keep={pad.keep} of dim {pad.dim}, but the "
                                  f"array's dim {pad.dim} has {a.shape[pad.dim]}; the array holds exactly the kept part")
        table = self.fragment_table
        def count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if not (isinstance(table, dict) and isinstance(table.get("file"), str)
                and count(table.get("rows")) and count(table.get("crc32c"))):
            raise FormatError("universal checkpoint: 'fragment_table' must give file, rows and crc32c")
        check_file_name(table["file"])
        ranks = self.state.get("ranks", {}) if isinstance(self.state, dict) else None
        if (not isinstance(self.state, dict) or set(self.state) - {"shared", "ranks"}
                or not isinstance(self.state.get("shared", {}), dict) or not isinstance(ranks, dict)
                or any(not (isinstance(r, str) and r.isdigit() and isinstance(v, dict)) for r, v in ranks.items())):
            raise FormatError("universal checkpoint: state must be an object with 'shared' (an object) and 'ranks' "
                              "(rank number -> object)")
        if self.spec is not None and not isinstance(self.spec, str):
            raise FormatError("universal checkpoint: spec must be the UCL text or null")
        configs = self.source.get("config_files", {}) if isinstance(self.source, dict) else None
        if (not isinstance(configs, dict) or set(configs) - set(CONFIG_FILES)
                or not all(isinstance(v, str) for v in configs.values())):
            raise FormatError(f"universal checkpoint: source.config_files must map {' and/or '.join(CONFIG_FILES)} "
                              "to their text")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "created_by": self.created_by,
            "step": self.step,
            "source_layout": self.source_layout.to_dict(),
            "source": dict(self.source),
            "tensors": {k: a.to_dict() for k, a in self.tensors.items()},
            "fragment_table": dict(self.fragment_table),
            "state": self.state,
            "spec": self.spec,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "UniversalHeader":
        """Build and validate a header from the root group's ``ucp`` attributes."""
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            found = d.get("format") if isinstance(d, dict) else None
            raise FormatError(f"not a ucp universal checkpoint (format is {found!r})")
        check_version(d.get("format_version"), FORMAT_VERSION, "universal checkpoint")
        try:
            tensors = d["tensors"]
            if not isinstance(tensors, dict):
                raise TypeError("'tensors' must be an object")
            h = cls(
                step=d["step"],
                source_layout=Layout.from_dict(d["source_layout"]),
                tensors={k: ArrayMeta.from_dict(v, k) for k, v in tensors.items()},
                state=d.get("state", {"shared": {}, "ranks": {}}),
                source=dict(d.get("source", {})),
                fragment_table=d["fragment_table"],
                spec=d.get("spec"),
                format_version=d["format_version"],
                created_by=str(d.get("created_by", "")),
            )
        except KeyError as e:
            raise FormatError(f"universal checkpoint lacks field {e.args[0]!r}") from e
        except (SpecError, AttributeError, TypeError, ValueError) as e:
            raise FormatError(f"universal checkpoint header is malformed: {e}") from e
        h.validate()
        return h


def universal_shape(shape: tuple[int, ...], pattern: Pattern) -> tuple[int, ...]:
    """The consolidated shape of a stored tensor: padding stripped."""
    if pattern.pad is None:
        return tuple(shape)
    out = list(shape)
    out[pattern.pad.dim] = pattern.pad.keep
    return tuple(out)


def padded_shape(shape: tuple[int, ...], pattern: Pattern) -> tuple[int, ...]:
    """Inverse of :func:`universal_shape`: the shape the source layout stored."""
    if pattern.pad is None or pattern.pad.dim >= len(shape):
        return tuple(shape)
    out = list(shape)
    out[pattern.pad.dim] = pattern.pad.to
    return tuple(out)


__all__ = ["FORMAT", "FORMAT_VERSION", "ArrayMeta", "UniversalHeader", "array_path", "chunk_shape", "shard_shape",
           "stored_dtype", "universal_shape", "padded_shape", "RAW_BITS", "COMPRESSORS", "DEFAULT_CHUNK_BYTES"]
