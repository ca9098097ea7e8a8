"""Reading ``torch.save`` files without torch and without an open unpickler (docs/foreign.md section 3).

A ``torch.save`` file is a zip archive of stored (uncompressed) records: ``<name>/data.pkl`` (the
object, pickled) and ``<name>/data/<key>``, the raw little-endian bytes of each storage. The pickle
names storages by key (``persistent_load``) and rebuilds tensors with
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` (within
``torch._tensor._rebuild_from_type_v2`` for a tensor of a named type: only plain tensors and
parameters are taken, their Python attributes dropped).

:func:`load` unpickles ``data.pkl`` with an unpickler that resolves exactly the globals of
:data:`ALLOWED` plus the stand-ins the caller names, and turns every tensor into a
:class:`StoredTensor`: where its elements lie in the file. Nothing is read beyond the pickle: a
converter reads a tensor's bytes in place (``pread`` at :meth:`StoredTensor.byte_range`), so memory
stays bounded by what it copies, and torch is never imported.
"""

from __future__ import annotations

import math
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError
from ucp.format.dtypes import itemsize

#: torch's storage classes -> the element type (ucp's dtype names) of the tensors they hold
STORAGES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
#: torch's dtypes as they may appear in pickled values (a config's ``params_dtype``): kept as names
DTYPE_NAMES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}
_NUMPY = {"bfloat16": np.uint16, "bool": np.bool_}  # (numpy has no bfloat16: its raw bits)
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")


def _extent(shape: tuple[int, ...], stride: tuple[int, ...]) -> int:
    """How many storage elements a tensor of ``shape`` and ``stride`` spans from its first one."""
    return 1 + sum((n - 1) * st for n, st in zip(shape, stride)) if math.prod(shape) else 0


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a ``torch.save`` file, described, not read: its element type and geometry, and the
    byte range of its storage in the file."""

    path: Path
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # the tensor's first element, in elements from the storage's start
    data: int  # the storage's first byte in the file
    nbytes: int  # the storage's length in bytes

    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def contiguous(self) -> bool:
        expect = 1
        for size, stride in zip(reversed(self.shape), reversed(self.stride)):
            if size != 1 and stride != expect:
                return False
            expect *= size
        return True

    def byte_range(self, start: int, n: int) -> tuple[int, int]:
        """``(file offset, length)`` of flat elements ``[start, start + n)`` of a contiguous tensor.

        Raises:
            CorruptCheckpointError: the range runs past the tensor or its storage.
        """
        item = itemsize(self.dtype)
        if start < 0 or start + n > self.numel() or (self.offset + start + n) * item > self.nbytes:
            raise CorruptCheckpointError(f"{self.path}: elements [{start}, {start + n}) run past a tensor of "
                                         f"{self.numel()} elements (its storage holds {self.nbytes // item})")
        return self.data + (self.offset + start) * item, n * item

    def array(self) -> np.ndarray:
        """The tensor's elements, as a read-only numpy view of the file (bfloat16 as its raw bits)."""
        item = itemsize(self.dtype)
        extent = _extent(self.shape, self.stride)
        if (self.offset + extent) * item > self.nbytes:
            raise CorruptCheckpointError(f"{self.path}: a tensor of shape {list(self.shape)} runs past its storage")
        dtype = np.dtype(_NUMPY.get(self.dtype, self.dtype))
        if not self.numel():
            return np.empty(self.shape, dtype)
        flat = np.memmap(self.path, dtype=dtype, mode="r", offset=self.data + self.offset * item, shape=(extent,))
        return np.lib.stride_tricks.as_strided(flat, self.shape, tuple(s * item for s in self.stride), writeable=False)


@dataclass(frozen=True)
class _Storage:
    dtype: str
    data: int
    nbytes: int


def _whole(value, what: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CorruptCheckpointError(f"{path}: a tensor's {what} is {type(value).__name__} {str(value)[:40]}, not an "
                                     "integer >= 0")
    return value


def _rebuild_tensor(path: Path):
    def rebuild(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        if not isinstance(storage, _Storage):
            raise CorruptCheckpointError(f"{path}: a tensor rebuilt from a {type(storage).__name__}, not a storage")
        if not isinstance(size, tuple) or not isinstance(stride, tuple) or len(size) != len(stride):
            raise CorruptCheckpointError(f"{path}: a tensor's size and stride are not tuples of one length")
        shape = tuple(_whole(n, "size", path) for n in size)
        strides = tuple(_whole(n, "stride", path) for n in stride)
        offset = _whole(storage_offset, "storage offset", path)
        extent = _extent(shape, strides)
        if (offset + extent) * itemsize(storage.dtype) > storage.nbytes:
            raise CorruptCheckpointError(f"{path}: a tensor of shape {list(shape)} at element {offset} runs past its "
                                         f"storage of {storage.nbytes} bytes")
        return StoredTensor(path, storage.dtype, shape, strides, offset, storage.data, storage.nbytes)
    return rebuild


def _parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


class _TensorType:
    """``torch.Tensor`` / ``torch.nn.Parameter`` as a pickle names them (the type a tensor is rebuilt as)."""


def _rebuild_from_type(func, new_type, args, state=None):
    """``torch._tensor._rebuild_from_type_v2``: a tensor rebuilt by ``func``, then cast to a plain tensor
    type (its Python attributes, ``state``, are not kept)."""
    if not isinstance(new_type, _TensorType) or not isinstance(args, tuple):
        raise CorruptCheckpointError(f"a tensor rebuilt as a {type(new_type).__name__}, not as a plain tensor")
    return func(*args)


class _StorageType:
    """What a storage class unpickles as: the element type of the storage that names it."""

    def __init__(self, dtype: str):
        self.dtype = dtype


def _build(self) -> None:
    """BUILD, restricted: a plain attribute dict, set only on an instance of a stand-in class (never on a
    class, a function or ucp's own descriptors, which a pickle could otherwise rewrite)."""
    state = self.stack.pop()
    inst = self.stack[-1]
    if type(inst) not in self.buildable:
        raise CorruptCheckpointError(f"{self.path}: the pickle sets the state of a {type(inst).__name__}")
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
        raise CorruptCheckpointError(f"{self.path}: the pickle sets a {type(inst).__name__}'s state from a "
                                     f"{type(state).__name__}, not an attribute dict")
    inst.__dict__.update(state)


class PickleStream:
    """A pickle read through a count of the bytes it has left, so that a length the pickle declares
    (``BINBYTES8``, ``BINUNICODE8``, ``LONG4``, ``FRAME``, ...) is checked against what the file holds
    before anything of that size is read or allocated: a few bytes of pickle cannot ask for gigabytes.

    Args:
        raw: the pickle's stream (``read(n)``, ``readline(limit)``).
        size: how many bytes it holds.
        path: what the errors name.
    """

    def __init__(self, raw, size: int, path: Path | str):
        self.raw, self.left, self.path = raw, size, path

    def claim(self, n: int, what: str) -> None:
        if n > self.left:
            raise CorruptCheckpointError(f"{self.path}: its pickle declares {what} of {n} bytes where {self.left} "
                                         "bytes of it are left; the file is malformed")

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else n
        self.claim(n, "a value")
        data = self.raw.read(n)
        self.left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self.raw.readline(self.left)
        self.left -= len(line)
        return line


def _bytearray8(self) -> None:
    """BYTEARRAY8, its length checked before the array is allocated (the stock one allocates first)."""
    (n,) = struct.unpack("<Q", self.read(8))
    frame = self._unframer.current_frame
    in_frame = len(frame.getvalue()) - frame.tell() if frame else 0
    self.stream.claim(n - in_frame, "a bytearray")
    b = bytearray(n)
    self.readinto(b)
    self.append(b)


class BoundedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be restricted) reading a :class:`PickleStream`: no
    length the pickle declares is believed beyond the bytes it has left. The pickles read with it hold
    metadata only; subclasses say which globals they resolve (``find_class``)."""

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BYTEARRAY8[0]] = _bytearray8

    def __init__(self, stream: PickleStream):
        super().__init__(stream)
        self.stream = stream


class _Unpickler(BoundedUnpickler):
    """``data.pkl``'s unpickler: torch's tensor globals, the caller's stand-ins, and a restricted BUILD."""

    dispatch = dict(BoundedUnpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _build

    def __init__(self, stream: PickleStream, path: Path, records: dict, stand_ins: dict):
        super().__init__(stream)
        self.path, self.records, self.stand_ins = path, records, stand_ins
        # (a module's state dict is an OrderedDict with a _metadata attribute)
        self.buildable = {OrderedDict} | {cls for cls in stand_ins.values()
                                          if isinstance(cls, type) and not issubclass(cls, Enum)}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in self.stand_ins:
            return self.stand_ins[full]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor(self.path)
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return _rebuild_from_type
        if (module, name) in (("torch", "Tensor"), ("torch.nn.parameter", "Parameter")):
            return _TensorType()
        if module == "torch" and name in STORAGES:
            return _StorageType(STORAGES[name])
        if module == "torch" and name == "Size":
            return tuple
        if module == "torch" and name in DTYPE_NAMES:
            return name
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise _Refused(full)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str)):
            raise CorruptCheckpointError(f"{self.path}: an unexpected persistent id (a {type(pid).__name__})")
        key = pid[2]
        if key not in self.records:
            raise CorruptCheckpointError(f"{self.path}: storage {key!r} has no record in the archive")
        data, nbytes = self.records[key]
        return _Storage(pid[1].dtype, data, nbytes)


class _Refused(Exception):
    """A global outside the allowed set (its dotted name)."""


#: the globals every ``torch.save`` file may name (beyond the caller's stand-ins)
ALLOWED = ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter", "torch._tensor._rebuild_from_type_v2",
           "torch.Tensor", "torch.nn.parameter.Parameter", "torch.Size",
           "collections.OrderedDict", *(f"torch.{n}" for n in STORAGES), *(f"torch.{n}" for n in DTYPE_NAMES))


def _stored(path: Path, f, info: zipfile.ZipInfo, size: int) -> int:
    """The first byte of record ``info``'s data in the file (``size`` bytes long), once it is known to
    be stored raw (as torch.save stores every record) and to lie within the file: a declared size is
    never trusted further than the file's bytes go."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CorruptCheckpointError(f"{path}: record {info.filename} is compressed; torch.save stores them raw")
    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise CorruptCheckpointError(f"{path}: record {info.filename} has no local header (truncated?)")
    fields = _LOCAL_HEADER.unpack(header)
    data = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
    if data + info.file_size > size:
        raise CorruptCheckpointError(f"{path}: record {info.filename} declares {info.file_size} bytes at byte {data}, "
                                     f"past the end of the file ({size} bytes; truncated?)")
    return data


def _records(path: Path, archive: zipfile.ZipFile) -> tuple[zipfile.ZipInfo, dict]:
    """``(data.pkl's record, {storage key: (first byte in the file, length)})``, every record the
    reader uses checked to be stored raw within the file."""
    pkl = [i for i in archive.infolist() if i.filename.endswith("/data.pkl") or i.filename == "data.pkl"]
    if len(pkl) != 1:
        raise CorruptCheckpointError(f"{path}: not a torch.save file (no single data.pkl record)")
    prefix = pkl[0].filename[:-len("data.pkl")]
    size = path.stat().st_size
    records = {}
    with path.open("rb") as f:
        _stored(path, f, pkl[0], size)
        for info in archive.infolist():
            if info.filename == prefix + "byteorder":
                at = _stored(path, f, info, size)
                f.seek(at)
                if f.read(min(info.file_size, 16)).strip() not in (b"little", b""):
                    raise CorruptCheckpointError(f"{path}: a big-endian torch.save file; ucp reads little-endian ones")
            if info.filename.startswith(prefix + "data/"):
                records[info.filename[len(prefix) + 5:]] = (_stored(path, f, info, size), info.file_size)
    return pkl[0], records


def load(path: Path, stand_ins: dict | None = None):
    """The object ``torch.save`` wrote to ``path``, its tensors as :class:`StoredTensor` s.

    Args:
        path: the file.
        stand_ins: ``{dotted global name: class}`` allowed besides :data:`ALLOWED`.

    Raises:
        CheckpointNotFoundError: no such file.
        CorruptCheckpointError: not a zip-format ``torch.save`` file, a truncated one, or one whose pickle
            needs a global outside the allowed set (named).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: no such file")
    stand_ins = dict(stand_ins or {})
    try:
        with zipfile.ZipFile(path) as archive:
            pkl, records = _records(path, archive)
            with archive.open(pkl) as raw:
                return _Unpickler(PickleStream(raw, pkl.file_size, path), path, records, stand_ins).load()
    except _Refused as e:
        allowed = ", ".join(sorted(stand_ins)) or "none"
        raise CorruptCheckpointError(f"{path}: it pickles {e}, which ucp does not load (besides torch's tensors it "
                                     f"reads only {allowed}, as inert stand-ins)") from None
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(str(e) if str(e).startswith(str(path)) else f"{path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever a malformed file makes the unpickler raise, said in one line
        raise CorruptCheckpointError(f"{path}: not a readable torch.save file ({type(e).__name__}: "
                                     f"{' '.join(str(e).split())[:200]})") from None
