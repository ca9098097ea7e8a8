"""ctypes binding to the few ISA-L functions the erasure codes need.

Why ctypes and not pyeclib's Python API: ``ECDriver.encode`` allocates fresh fragments on every call,
and its speed then swings with glibc's allocator settings (0.5 vs 8.6 GB/s for the same RS(8+2)
call, depending on ``MALLOC_MMAP_THRESHOLD_``). ``ec_encode_data`` called on buffers the caller
owns and reuses has no such cliff. The library is the one the ``pyeclib`` wheel bundles
(``site-packages/pyeclib.libs/libisal-*.so*``), else a system ISA-L (``libisal.so.2``, which is
also what a source-built pyeclib loads). ``UCP_ISAL_LIBRARY`` names a file to use instead.

Every function here is a plain ctypes call (ctypes releases the GIL for its duration). Pointers are
passed as integers; the callers own the buffers and keep them alive across the call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import threading
from dataclasses import dataclass
from importlib.util import find_spec

import numpy as np

#: ``len`` arguments of ISA-L are C ints: callers split longer stripes into pieces of at most this.
MAX_CALL_BYTES = 1 << 30

_PTRS = ctypes.POINTER(ctypes.c_void_p)


@dataclass(frozen=True)
class Isal:
    """A loaded ISA-L library: its path, version, and typed entry points."""

    path: str
    version: str
    lib: ctypes.CDLL
    products: np.ndarray  # 256 x 256: the multiplication table of ISA-L's GF(2^8) (polynomial 0x11d)

    def cauchy_matrix(self, k: int, m: int) -> np.ndarray:
        """The ``(k + m) x k`` encode matrix of ``gf_gen_cauchy1_matrix``: identity over a Cauchy block."""
        a = np.zeros((k + m, k), np.uint8)
        self.lib.gf_gen_cauchy1_matrix(a.ctypes.data, k + m, k)
        return a

    def invert(self, matrix: np.ndarray) -> np.ndarray | None:
        """The inverse of a square GF(2^8) matrix, or None if it is singular (``gf_invert_matrix``)."""
        n = matrix.shape[0]
        work = np.ascontiguousarray(matrix, np.uint8).copy()  # gf_invert_matrix overwrites its input
        out = np.zeros((n, n), np.uint8)
        if self.lib.gf_invert_matrix(work.ctypes.data, out.ctypes.data, n) != 0:
            return None
        return out

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The GF(2^8) product of two small matrices (decode-table set-up, not a hot path)."""
        products = self.products[a[:, :, None], b[None, :, :]]  # rows x inner x cols
        return np.bitwise_xor.reduce(products, axis=1).astype(np.uint8)

    def tables(self, coefficients: np.ndarray) -> np.ndarray:
        """``ec_init_tables`` of a ``rows x k`` coefficient matrix: the expanded tables ec_encode_data takes."""
        rows, k = coefficients.shape
        coefficients = np.ascontiguousarray(coefficients, np.uint8)
        tables = np.zeros(32 * k * rows, np.uint8)
        self.lib.ec_init_tables(k, rows, coefficients.ctypes.data, tables.ctypes.data)
        return tables

    def encode(self, nbytes: int, tables: np.ndarray, sources: list[int], outputs: list[int]) -> None:
        """``ec_encode_data``: ``outputs[r] = sum_j c[r][j] * sources[j]`` over ``nbytes`` bytes each.

        ``sources`` and ``outputs`` are addresses of buffers of at least ``nbytes`` bytes; any
        alignment. ``nbytes`` above :data:`MAX_CALL_BYTES` is done in pieces.
        """
        k, rows = len(sources), len(outputs)
        for lo in range(0, nbytes, MAX_CALL_BYTES):
            n = min(MAX_CALL_BYTES, nbytes - lo)
            src = (ctypes.c_void_p * k)(*(a + lo for a in sources))
            dst = (ctypes.c_void_p * rows)(*(a + lo for a in outputs))
            self.lib.ec_encode_data(n, k, rows, tables.ctypes.data, src, dst)

    def xor(self, nbytes: int, sources: list[int], output: int) -> bool:
        """``xor_gen``: ``output = XOR of sources`` over ``nbytes`` bytes; False if ISA-L refused.

        ISA-L requires every address aligned to 32 bytes (checked here: False, nothing written,
        when one is not) and at least two sources.
        """
        addresses = [*sources, output]
        if len(sources) < 2 or any(a % 32 for a in addresses):
            return False
        for lo in range(0, nbytes, MAX_CALL_BYTES):
            n = min(MAX_CALL_BYTES, nbytes - lo)
            array = (ctypes.c_void_p * len(addresses))(*(a + lo for a in addresses))
            if self.lib.xor_gen(len(addresses), n, array) != 0:
                return False
        return True


def _candidates() -> list[str]:
    """Library files to try, best first: ``UCP_ISAL_LIBRARY``, pyeclib's bundled copy, the system's."""
    explicit = os.environ.get("UCP_ISAL_LIBRARY")
    if explicit:
        return [explicit]
    out = []
    spec = find_spec("pyeclib")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            out += sorted(glob.glob(os.path.join(os.path.dirname(location), "pyeclib.libs", "libisal*.so*")))
    out.append("libisal.so.2")
    found = ctypes.util.find_library("isal")
    if found:
        out.append(found)
    return out


def _load(path: str) -> Isal:
    lib = ctypes.CDLL(path)
    u8p = ctypes.c_void_p
    lib.gf_gen_cauchy1_matrix.argtypes = [u8p, ctypes.c_int, ctypes.c_int]
    lib.gf_gen_cauchy1_matrix.restype = None
    lib.gf_invert_matrix.argtypes = [u8p, u8p, ctypes.c_int]
    lib.gf_invert_matrix.restype = ctypes.c_int
    lib.gf_mul.argtypes = [ctypes.c_ubyte, ctypes.c_ubyte]
    lib.gf_mul.restype = ctypes.c_ubyte
    lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, u8p, u8p]
    lib.ec_init_tables.restype = None
    lib.ec_encode_data.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, u8p, _PTRS, _PTRS]
    lib.ec_encode_data.restype = None
    lib.xor_gen.argtypes = [ctypes.c_int, ctypes.c_int, _PTRS]
    lib.xor_gen.restype = ctypes.c_int
    version = "unknown"
    if hasattr(lib, "isal_get_version_str"):
        lib.isal_get_version_str.restype = ctypes.c_char_p
        lib.isal_get_version_str.argtypes = []
        version = lib.isal_get_version_str().decode()
    return Isal(path=os.path.realpath(path) if os.path.exists(path) else path, version=version, lib=lib,
                products=_products(lib))


def _products(lib) -> np.ndarray:
    """The multiplication table of the library's field, from powers of its generator 2 (255 calls)."""
    exp = np.zeros(255, np.int64)
    exp[0] = 1
    for i in range(1, 255):
        exp[i] = lib.gf_mul(int(exp[i - 1]), 2)
    log = np.zeros(256, np.int64)
    log[exp] = np.arange(255)
    table = exp[(log[:, None] + log[None, :]) % 255].astype(np.uint8)
    table[0, :] = table[:, 0] = 0
    return table


_lock = threading.Lock()
_loaded: list = []  # [Isal | None] once tried
_errors: list[str] = []


def isal() -> Isal | None:
    """The ISA-L library, loaded on first use; None when none is found (:func:`why_missing` says why)."""
    with _lock:
        if not _loaded:
            found = None
            for path in _candidates():
                try:
                    found = _load(path)
                    break
                except (OSError, AttributeError) as e:  # not there, or an ISA-L without the raid/ec symbols
                    _errors.append(f"{path}: {e}")
            _loaded.append(found)
        return _loaded[0]


def why_missing() -> str:
    """What was tried when :func:`isal` found no library, and how to get one."""
    isal()
    tried = "; ".join(_errors) or "nothing"
    return (f"ISA-L not found (tried {tried}); install the pyeclib wheel (`pip install pyeclib`, it bundles "
            f"ISA-L), a system libisal2, or set UCP_ISAL_LIBRARY to the library file")
