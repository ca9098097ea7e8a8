"""PyTorch ``torch.distributed.checkpoint`` (DCP) directories as a source of ``ucp convert --from dcp``
(docs/foreign.md section 2).

A DCP directory holds ``.metadata`` (a pickle of DCP's ``Metadata``: every tensor's global shape,
dtype and chunks, and where each chunk's bytes are) and ``__<rank>_<n>.distcp`` files, in which
each tensor chunk and each non-tensor value is a ``torch.save`` blob at a byte range.

Nothing here unpickles with an open unpickler:

* ``.metadata`` is read by :class:`MetadataUnpickler`, which resolves exactly DCP's metadata
  classes (and ``torch.Size``, torch dtypes, ``pathlib.PosixPath``) and refuses any other global,
  naming it;
* each blob is read with ``torch.load(weights_only=True)``.

The state dict's paths (DCP's ``planner_data``) map onto tensor keys: ``("model", fqn)`` to
``model/<fqn>``, ``("optim", "state", fqn, name)`` to ``optim/<fqn>/<name>``; a state dict saved
without a ``model``/``optim`` level is a model's. ``("optim", "param_groups", i, name)`` become the
optimizer's param groups, a top-level ``step`` the checkpoint's step, other values its extras.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

from ucp.convert.foreign.source import SourceRecord, refuse_step
from ucp.convert.foreign.torch_file import BoundedUnpickler, PickleStream
from ucp.errors import CaptureError, CheckpointNotFoundError, CorruptCheckpointError, FormatError
from ucp.format import values
from ucp.format.box import Box
from ucp.format.dtypes import DTYPES, dtype_name
from ucp.format.fragment import Fragment
from ucp.format.keys import model_key
from ucp.format.layout import Layout
from ucp.format.manifest import Manifest, TensorMeta
from ucp.format.pattern import Pattern
from ucp.storage.fragment_files import FragmentFiles

FORMAT = "torch.distributed.checkpoint"
METADATA = ".metadata"
_META = "torch.distributed.checkpoint.metadata"
#: the globals a DCP ``.metadata`` pickle may name (torch 2.4 - 2.13), besides torch dtypes
ALLOWED = {
    (_META, "Metadata"), (_META, "MetadataIndex"), (_META, "TensorStorageMetadata"),
    (_META, "BytesStorageMetadata"), (_META, "ChunkStorageMetadata"), (_META, "TensorProperties"),
    (_META, "StorageMeta"), (_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"), ("torch", "Size"), ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


def _build(self) -> None:
    """BUILD, restricted to setting the state of an instance of one of the allowed classes (never of a
    class or a function, which a pickle could otherwise rewrite for the whole process)."""
    inst = self.stack[-2] if len(self.stack) >= 2 else None
    if isinstance(inst, type) or type(inst) not in self.resolved:
        raise CorruptCheckpointError(f"{self.where}: the metadata pickle sets the state of a {type(inst).__name__}")
    pickle._Unpickler.load_build(self)


class MetadataUnpickler(BoundedUnpickler):
    """Unpickles a DCP ``.metadata``: only the globals in :data:`ALLOWED` and torch dtypes, every length
    the pickle declares checked against its size (``file`` is a seekable stream)."""

    dispatch = dict(BoundedUnpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _build

    def __init__(self, file, where: str):
        size = file.seek(0, io.SEEK_END) - file.seek(0)
        super().__init__(PickleStream(file, size, where))
        self.where = where
        self.resolved: set = set()

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            cls = super().find_class(module, name)
            if isinstance(cls, type):
                self.resolved.add(cls)
            return cls
        if module == "torch":
            import torch

            value = getattr(torch, name, None)
            if isinstance(value, torch.dtype):
                return value
        raise CorruptCheckpointError(f"{self.where}: the metadata pickle names {module}.{name}, which is not one of "
                                     "DCP's metadata classes; ucp does not unpickle it")


def read_metadata(directory: Path):
    """DCP's ``Metadata`` of the checkpoint in ``directory``, through :class:`MetadataUnpickler`."""
    path = Path(directory) / METADATA
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{directory}: no {METADATA} file: not a torch.distributed.checkpoint "
                                      "directory (or its save did not finish)") from None
    try:
        metadata = MetadataUnpickler(io.BytesIO(data), str(path)).load()
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever a malformed pickle makes the unpickler raise, in one line
        raise CorruptCheckpointError(f"{path}: not a DCP metadata pickle ({type(e).__name__}: "
                                     f"{' '.join(str(e).split())[:200]})") from None
    if type(metadata).__name__ != "Metadata" or not hasattr(metadata, "state_dict_metadata"):
        raise CorruptCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


_MAX = 1 << 63
_MISSING = object()


def _show(value) -> str:
    text = " ".join(repr(value).split())
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


class _Fields:
    """Typed access to the objects of a ``.metadata`` pickle: the unpickler lets only DCP's classes
    through, but their attributes are whatever the pickle set, so each is checked for its type before
    use, a wrong one refused in one line naming the file."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, what: str, value, want: str):
        raise FormatError(f"{self.where}: {what} is {_show(value)}, not {want}")

    def get(self, obj, name: str, what: str):
        value = getattr(obj, name, _MISSING) if not isinstance(obj, (type, dict, list, tuple, str)) else _MISSING
        if value is _MISSING:
            raise FormatError(f"{self.where}: {what} has no {name!r} ({_show(obj)})")
        return value

    def whole(self, value, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX:
            self.fail(what, value, "an integer >= 0")
        return value

    def wholes(self, value, what: str, rank: int | None = None) -> tuple[int, ...]:
        if not isinstance(value, (tuple, list)) or (rank is not None and len(value) != rank):
            self.fail(what, value, f"a list of {rank} integers" if rank is not None else "a list of integers")
        return tuple(self.whole(v, what) for v in value)

    def text(self, value, what: str) -> str:
        if not isinstance(value, str):
            self.fail(what, value, "a string")
        return value

    def mapping(self, value, what: str) -> dict:
        if not isinstance(value, dict):
            self.fail(what, value, "a dict")
        return value

    def file(self, value, what: str) -> str:
        name = self.text(value, what)
        if not name or Path(name).name != name or name in (".", ".."):
            raise FormatError(f"{self.where}: {what} {name!r} is not a file name in the checkpoint's directory")
        return name


def _dtype_name(dtype, where: str) -> str:
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise CorruptCheckpointError(f"{where}: dtype {name} has no ucp equivalent")
    return name


def _path_of(fqn: str, planner_data, fields: _Fields) -> tuple:
    path = planner_data.get(fqn)
    if not path:
        return tuple(fqn.split("."))
    if not isinstance(path, (tuple, list)) or not all(isinstance(p, (str, int)) and not isinstance(p, bool)
                                                       for p in path):
        fields.fail(f"the state-dict path of {fqn}", path, "a list of names and indices")
    return tuple(path)


def _key(path: tuple, has_model: bool) -> str | None:
    """The tensor key of a state-dict path, or None for a path that is not model or optimizer state."""
    if len(path) >= 2 and path[0] == "model":
        return model_key(".".join(map(str, path[1:])))
    if len(path) == 4 and path[0] in ("optim", "optimizer") and path[1] == "state":
        return f"optim/{path[2]}/{path[3]}"
    if not has_model and path and path[0] not in ("optim", "optimizer"):
        return model_key(".".join(map(str, path)))  # a bare model state dict
    return None


def _check_blob(blob: bytearray) -> None:
    """A blob must be a zip-format ``torch.save`` (as DCP writes them) whose records are stored raw: the
    legacy format and compressed records let a few bytes declare any size, which torch allocates."""
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                raise ValueError(f"record {info.filename} is compressed; torch.save stores them raw")


class DcpBlobs:
    """Reads the ``torch.save`` blobs of a DCP directory (``decode``: a fragment's bytes)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.where: dict = {}  # fragment -> (file, offset, length)

    def load(self, file: str, offset: int, length: int, what: str):
        """The object of the blob at ``[offset, offset + length)`` of ``file`` (``weights_only``)."""
        import torch

        path = self.directory / file
        with FragmentFiles(self.directory) as files:
            size = files.size(file)
            if offset + length > size:  # (checked before the blob's buffer is allocated)
                raise CorruptCheckpointError(f"{path}: {what} at bytes [{offset}, {offset + length}) lies past the "
                                             f"end of the file ({size} bytes; truncated?)")
            blob = bytearray(length)
            files.pread(file, offset, [blob], f"{what} at bytes [{offset}, {offset + length})")
        try:
            _check_blob(blob)
            return torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
        except Exception as e:
            line = " ".join(str(e).split())[:300]
            raise CorruptCheckpointError(f"{path}: {what} at bytes [{offset}, {offset + length}) cannot be read with "
                                         f"torch.load(weights_only=True): {line}") from None

    def decode(self, frag):
        """The bytes of fragment ``frag`` (its chunk, contiguous), as a uint8 numpy array."""
        import torch

        file, offset, length = self.where[frag]
        what = f"{frag.key} {frag.box}"
        t = self.load(file, offset, length, what)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != frag.box.sizes or dtype_name(t.dtype) != frag.dtype:
            got = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CorruptCheckpointError(f"{self.directory / file}: {what} holds {got}, the metadata says "
                                         f"{frag.dtype}{list(frag.box.sizes)}")
        return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _entries(metadata, fields: _Fields) -> tuple[dict, dict, dict]:
    """``(planner data, {fqn: [(chunk offsets or None, (file, offset, length))]}, {fqn: (dtype, size,
    [(offsets, sizes)]) for a tensor, None for a value})`` of DCP's ``Metadata``, every field checked
    for its type (one :class:`FormatError` line naming the file otherwise)."""
    planner_data = fields.mapping(getattr(metadata, "planner_data", None) or {}, "planner_data")
    storage = fields.mapping(getattr(metadata, "storage_data", None) or {}, "storage_data")
    by_fqn: dict[str, list] = {}
    for index, info in storage.items():
        fqn = fields.text(fields.get(index, "fqn", "a storage index"), "a storage index's fqn")
        offset = fields.get(index, "offset", f"the storage index of {fqn}")
        offsets = None if offset is None else fields.wholes(offset, f"the storage offset of {fqn}")
        where = (fields.file(fields.get(info, "relative_path", f"the storage of {fqn}"), f"the file of {fqn}"),
                 fields.whole(fields.get(info, "offset", f"the storage of {fqn}"), f"the byte offset of {fqn}"),
                 fields.whole(fields.get(info, "length", f"the storage of {fqn}"), f"the byte length of {fqn}"))
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpointError(f"{fields.where}: {fqn} is stored transformed "
                                         f"({_show(info.transform_descriptors)}); ucp reads only plain torch.save items")
        by_fqn.setdefault(fqn, []).append((offsets, where))
    items = {}
    for fqn, meta in fields.mapping(fields.get(metadata, "state_dict_metadata", "Metadata"), "state_dict_metadata").items():
        fields.text(fqn, "a state-dict key")
        kind = type(meta).__name__
        if kind == "BytesStorageMetadata":
            items[fqn] = None
            continue
        if kind != "TensorStorageMetadata":
            fields.fail(f"the metadata of {fqn}", meta, "DCP's TensorStorageMetadata or BytesStorageMetadata")
        dtype = _dtype_name(fields.get(fields.get(meta, "properties", fqn), "dtype", f"the properties of {fqn}"),
                            f"{fields.where}: {fqn}")
        size = fields.wholes(fields.get(meta, "size", fqn), f"the size of {fqn}")
        chunks = fields.get(meta, "chunks", fqn)
        if not isinstance(chunks, (list, tuple)):
            fields.fail(f"the chunks of {fqn}", chunks, "a list")
        items[fqn] = (dtype, size, [(fields.wholes(fields.get(c, "offsets", f"a chunk of {fqn}"),
                                                   f"a chunk's offsets of {fqn}", len(size)),
                                     fields.wholes(fields.get(c, "sizes", f"a chunk of {fqn}"),
                                                   f"a chunk's sizes of {fqn}", len(size))) for c in chunks])
    return planner_data, by_fqn, items


def dcp_source(src, step: int | None = None, spec=None, settings: dict | None = None) -> SourceRecord:
    """The DCP checkpoint ``src`` described for ``convert`` (its values decoded from their
    ``torch.save`` blobs; one checkpoint: no ``step``; a ``spec`` is applied by the converter).

    Raises:
        CheckpointNotFoundError: ``src`` is not a DCP directory.
        CorruptCheckpointError: the metadata names a class ucp does not unpickle, or is malformed;
            a value cannot be read with ``weights_only``; a chunk has no storage entry.
    """
    refuse_step(step, "a DCP directory holds one checkpoint; leave it out")
    directory = Path(src)
    if not directory.is_dir():
        raise CheckpointNotFoundError(f"{directory}: no such directory")
    metadata = read_metadata(directory)
    where_md = str(directory / METADATA)
    fields = _Fields(where_md)
    planner_data, by_fqn, items = _entries(metadata, fields)
    paths = {fqn: _path_of(fqn, planner_data, fields) for fqn in items}
    has_model = any(p and p[0] in ("model", "optim", "optimizer") for p in paths.values())
    blobs = DcpBlobs(directory)
    tensors, fragments, sizes = {}, [], {}
    groups: dict[int, dict] = {}
    scalars: dict[str, dict] = {}
    extras: dict = {}
    step = 0
    for fqn, meta in sorted(items.items()):
        path = paths[fqn]
        stored = by_fqn.get(fqn, [])
        if meta is not None:
            key = _key(path, has_model)
            if key is None:
                key = "extra/" + ".".join(map(str, path))
            dtype, shape, chunks = meta
            tensors[key] = TensorMeta(shape, dtype, Pattern())
            infos = {offsets: info for offsets, info in stored}
            for offsets, chunk_sizes in chunks:
                info = infos.get(offsets)
                if info is None:
                    raise CorruptCheckpointError(f"{where_md}: the chunk of {fqn} at {list(offsets)} has no storage entry")
                file, offset, length = info
                box = Box(offsets, chunk_sizes)
                nbytes = box.numel * DTYPES[dtype][0]
                if nbytes > length:  # (a blob holds its chunk's bytes and more: checked before any is allocated)
                    raise FormatError(f"{where_md}: the chunk of {fqn} at {list(offsets)} is {dtype}{list(chunk_sizes)} "
                                      f"({nbytes} bytes) but its blob in {file} has {length} bytes")
                frag = Fragment(key, box, None, dtype, 0, file, offset, nbytes, 0)
                blobs.where[frag] = info
                fragments.append(frag)
                sizes[file] = 0
            continue
        if len(stored) != 1:
            raise CorruptCheckpointError(f"{where_md}: value {fqn} has {len(stored)} storage entries, not 1")
        (_, (file, offset, length)), = stored
        value = blobs.load(file, offset, length, f"value {fqn}")
        sizes[file] = 0
        if len(path) == 4 and path[0] in ("optim", "optimizer") and path[1] == "param_groups":
            if not isinstance(path[2], int) and not (path[2].isascii() and path[2].isdigit()):
                fields.fail(f"the param group index of {fqn}", path[2], "an integer")
            groups.setdefault(int(path[2]), {})[str(path[3])] = value
        elif len(path) == 4 and path[0] in ("optim", "optimizer") and path[1] == "state":
            scalars.setdefault(str(path[2]), {})[str(path[3])] = value
        elif path == ("step",) and isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            step = value
        else:
            extras[".".join(map(str, path))] = value
    files = FragmentFiles(directory)
    for name in sizes:
        sizes[name] = files.size(name)
    if not tensors:
        raise CheckpointNotFoundError(f"{where_md}: the checkpoint holds no tensor")
    try:
        shared = {"extras": values.encode(extras, "extras")}
        if groups:
            param_groups = [groups[i] for i in sorted(groups)]
            shared["optimizer"] = values.encode({"scalars": scalars, "param_groups": param_groups}, "optimizer")
    except CaptureError as e:  # (a value of a blob that typed JSON cannot hold, or nested too deep)
        raise CorruptCheckpointError(f"{directory}: {e}") from None
    manifest = Manifest(step, Layout.single(), tensors, tuple(fragments), {"shared": shared, "ranks": {}},
                        files=sizes, created_by=FORMAT)
    try:
        manifest.validate()
    except FormatError as e:
        raise FormatError(f"{where_md}: {e}") from None
    writers = sorted({int(m.group(1)) for f in sizes if (m := re.fullmatch(r"__(\d+)_\d+\.distcp", f))})
    facts = {"format": FORMAT, "path": str(directory.resolve()), "files": sorted(sizes), "writers": len(writers)}
    return SourceRecord(directory, manifest, facts, decode=blobs.decode)
