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
from pathlib import Path

from ucp.convert.foreign.source import SourceRecord, refuse_step
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError
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


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata``: only the globals in :data:`ALLOWED` and torch dtypes."""

    def __init__(self, file, where: str):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return super().find_class(module, name)
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
    except CorruptCheckpointError:
        raise
    except Exception as e:
        raise CorruptCheckpointError(f"{path}: not a DCP metadata pickle ({type(e).__name__}: {e})") from None
    if type(metadata).__name__ != "Metadata" or not hasattr(metadata, "state_dict_metadata"):
        raise CorruptCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP's Metadata")
    return metadata


def _dtype_name(dtype, where: str) -> str:
    name = dtype_name(dtype)
    if name not in DTYPES:
        raise CorruptCheckpointError(f"{where}: dtype {name} has no ucp equivalent")
    return name


def _path_of(fqn: str, planner_data) -> tuple:
    path = planner_data.get(fqn) if isinstance(planner_data, dict) else None
    return tuple(path) if path else tuple(fqn.split("."))


def _key(path: tuple, has_model: bool) -> str | None:
    """The tensor key of a state-dict path, or None for a path that is not model or optimizer state."""
    if len(path) >= 2 and path[0] == "model":
        return model_key(".".join(map(str, path[1:])))
    if len(path) == 4 and path[0] in ("optim", "optimizer") and path[1] == "state":
        return f"optim/{path[2]}/{path[3]}"
    if not has_model and path and path[0] not in ("optim", "optimizer"):
        return model_key(".".join(map(str, path)))  # a bare model state dict
    return None


class DcpBlobs:
    """Reads the ``torch.save`` blobs of a DCP directory (``decode``: a fragment's bytes)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.where: dict = {}  # fragment -> (file, offset, length)

    def load(self, file: str, offset: int, length: int, what: str):
        """The object of the blob at ``[offset, offset + length)`` of ``file`` (``weights_only``)."""
        import torch

        path = self.directory / file
        blob = bytearray(length)
        with FragmentFiles(self.directory) as files:
            files.pread(file, offset, [blob], f"{what} at bytes [{offset}, {offset + length})")
        try:
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
    planner_data = getattr(metadata, "planner_data", None) or {}
    storage = metadata.storage_data or {}
    by_fqn: dict[str, list] = {}
    for index, info in storage.items():
        if getattr(info, "transform_descriptors", None):
            raise CorruptCheckpointError(f"{where_md}: {index.fqn} is stored transformed "
                                         f"({list(info.transform_descriptors)}); ucp reads only plain torch.save items")
        by_fqn.setdefault(index.fqn, []).append((index, info))
    items = metadata.state_dict_metadata
    paths = {fqn: _path_of(fqn, planner_data) for fqn in items}
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
        if type(meta).__name__ == "TensorStorageMetadata":
            key = _key(path, has_model)
            if key is None:
                key = "extra/" + ".".join(map(str, path))
            dtype = _dtype_name(meta.properties.dtype, f"{where_md}: {fqn}")
            shape = tuple(int(s) for s in meta.size)
            tensors[key] = TensorMeta(shape, dtype, Pattern())
            infos = {tuple(int(o) for o in index.offset): info for index, info in stored}
            for chunk in meta.chunks:
                offsets = tuple(int(o) for o in chunk.offsets)
                info = infos.get(offsets)
                if info is None:
                    raise CorruptCheckpointError(f"{where_md}: the chunk of {fqn} at {list(offsets)} has no storage entry")
                box = Box(offsets, tuple(int(s) for s in chunk.sizes))
                frag = Fragment(key, box, None, dtype, 0, info.relative_path, int(info.offset),
                                box.numel * DTYPES[dtype][0], 0)
                blobs.where[frag] = (info.relative_path, int(info.offset), int(info.length))
                fragments.append(frag)
                sizes[info.relative_path] = 0
            continue
        if len(stored) != 1:
            raise CorruptCheckpointError(f"{where_md}: value {fqn} has {len(stored)} storage entries, not 1")
        (_, info), = stored
        value = blobs.load(info.relative_path, int(info.offset), int(info.length), f"value {fqn}")
        sizes[info.relative_path] = 0
        if len(path) == 4 and path[0] in ("optim", "optimizer") and path[1] == "param_groups":
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
    shared = {"extras": values.encode(extras, "extras")}
    if groups:
        param_groups = [groups[i] for i in sorted(groups)]
        shared["optimizer"] = values.encode({"scalars": scalars, "param_groups": param_groups}, "optimizer")
    manifest = Manifest(step, Layout.single(), tensors, tuple(fragments), {"shared": shared, "ranks": {}},
                        files=sizes, created_by=FORMAT)
    manifest.validate()
    writers = sorted({int(m.group(1)) for f in sizes if (m := re.match(r"__(\d+)_\d+\.distcp$", f))})
    facts = {"format": FORMAT, "path": str(directory.resolve()), "files": sorted(sizes), "writers": len(writers)}
    return SourceRecord(directory, manifest, facts, decode=blobs.decode)
