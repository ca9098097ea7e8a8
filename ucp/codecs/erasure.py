"""Erasure codes over stripes of bytes: XOR parity (m = 1) and Reed-Solomon (m >= 2).

A *stripe set* is ``k`` data stripes and ``m`` parity stripes of one length; any ``k`` of the
``k + m`` rebuild the others. The snapshot layer keeps one stripe set per redundancy group, one
stripe per node, so the memory of any ``m`` nodes of a group can be lost. This module only sees
bytes: which node holds which stripe, and the CRC-32C that tells a good stripe from a corrupted one,
are the callers' (``docs/erasure.md``). A stripe whose checksum fails MUST be passed to
:meth:`ErasureCode.decode` as lost (None): a code rebuilds what is missing, it cannot tell good
bytes from bad ones.

Reed-Solomon is ISA-L's, over GF(2^8) with the Cauchy generator matrix of ``gf_gen_cauchy1_matrix``
(every k x k submatrix of it is invertible, so every loss pattern of up to ``m`` stripes decodes;
ISA-L's Vandermonde matrix is not MDS for m >= 5). It is called through ctypes on buffers the
caller owns (:mod:`ucp.codecs.isal`): in the steady state an encode or decode allocates no stripe
memory, which is what keeps its speed independent of the allocator. The parity is byte for byte
what pyeclib's ``isa_l_rs_cauchy`` backend writes into its fragments. XOR parity needs only numpy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import numpy as np

from ucp.codecs.checksum import crc32c
from ucp.codecs.isal import isal, why_missing
from ucp.errors import ErasureError, FormatError, OptionsError, TooManyLostError, few

#: The stripe length the system encodes, sends and checksums in: 1 MiB of one node's buffer.
STRIPE_BYTES = 1 << 20
#: Stripe lengths made by :func:`stripe_bytes` are multiples of this (a cache line, ISA-L's vector).
STRIPE_ALIGN = 64
#: The most stripes (k + m) one code may have: the Cauchy matrix needs k + m distinct elements of
#: GF(2^8); ISA-L tests up to 255.
MAX_STRIPES = 255

# Encode and decode walk long stripes in pieces of this many bytes, so that XOR's running parity
# stays in cache; Reed-Solomon streams all stripes at once and is indifferent to it.
_PIECE = 1 << 20


@dataclass(frozen=True)
class ErasureCode(ABC):
    """``k`` data stripes and ``m`` parity stripes, any ``k`` of which rebuild the others.

    Stripes are numbered data ``0..k-1``, then parity ``k..k+m-1``. Buffers are anything with the
    buffer protocol (numpy arrays, bytearray, memoryview, mmap), C-contiguous; they are read and
    written as bytes. Outputs must not overlap inputs. Construct with :func:`erasure_code`.

    Raises (construction):
        OptionsError: ``k < 1``, ``m < 1``, or ``k + m > MAX_STRIPES``.
    """

    k: int
    m: int
    name: ClassVar[str]

    def __post_init__(self):
        for field in ("k", "m"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionsError(f"erasure code {field}={v!r}: must be an integer >= 1")
        if self.k + self.m > MAX_STRIPES:
            raise OptionsError(f"erasure code k + m = {self.k} + {self.m} = {self.k + self.m}: must be at most "
                               f"{MAX_STRIPES} (stripes of a GF(2^8) code); use smaller groups")

    def __str__(self) -> str:
        return f"{self.name}({self.k}+{self.m})"

    @property
    def n(self) -> int:
        """Stripes in a stripe set: ``k + m``."""
        return self.k + self.m

    def encode(self, data: Sequence, parity: Sequence | None = None) -> list[np.ndarray]:
        """Compute the ``m`` parity stripes of ``k`` data stripes.

        Args:
            data: ``k`` buffers of one length.
            parity: ``m`` writable buffers of that length, overwritten; None: allocate them.

        Returns:
            The parity stripes, as uint8 arrays over ``parity``'s buffers (or the new ones).

        Raises:
            ValueError: a count or a length is wrong, or a parity buffer is read-only.
        """
        if len(data) != self.k:
            raise ValueError(f"{self} encodes {self.k} data stripes, got {len(data)}")
        src = [_bytes(b, f"data stripe {i}") for i, b in enumerate(data)]
        nbytes = _common_length(src, "data stripe")
        if parity is None:
            dst = [empty_aligned(nbytes) for _ in range(self.m)]
        else:
            if len(parity) != self.m:
                raise ValueError(f"{self} writes {self.m} parity stripes, got {len(parity)} buffers")
            dst = [_bytes(b, f"parity stripe {self.k + j}", writable=True) for j, b in enumerate(parity)]
            _same_length(dst, nbytes, "parity stripe", range(self.k, self.n))
        for lo in range(0, nbytes, _PIECE):
            hi = min(nbytes, lo + _PIECE)
            self._encode([s[lo:hi] for s in src], [d[lo:hi] for d in dst])
        return dst

    def decode(self, stripes: Sequence, out: Mapping[int, object] | None = None) -> dict[int, np.ndarray]:
        """Rebuild lost stripes of a stripe set from the ``k`` or more that are present.

        Callers MUST verify each stripe's CRC-32C first and pass a stripe that fails it as lost:
        decoding from a corrupted stripe yields wrong bytes, silently.

        Args:
            stripes: ``k + m`` entries, data then parity: a buffer for each present stripe, None
                for each lost one. At most ``m`` may be None.
            out: ``{index: writable buffer}`` for the lost stripes to rebuild (data or parity, any
                subset of the lost ones), overwritten; None: new buffers for every lost data stripe.

        Returns:
            ``{index: uint8 array}`` of the rebuilt stripes (views of ``out``'s buffers).

        Raises:
            TooManyLostError: more than ``m`` stripes are lost.
            ValueError: a count or a length is wrong, ``out`` names a present stripe, an out buffer
                is read-only, or no stripe is present to tell the length.
        """
        if len(stripes) != self.n:
            raise ValueError(f"{self} decodes from {self.n} stripes (None for a lost one), got {len(stripes)}")
        lost = [i for i, s in enumerate(stripes) if s is None]
        if len(lost) > self.m:
            raise TooManyLostError(self, lost)
        present = {i: _bytes(s, f"stripe {i}") for i, s in enumerate(stripes) if s is not None}
        nbytes = _common_length(list(present.values()), "stripe", list(present))
        if out is None:
            out = {i: empty_aligned(nbytes) for i in lost if i < self.k}
        wanted = sorted(out)
        if not set(wanted) <= set(lost):
            raise ValueError(f"out names stripes {few(sorted(set(wanted) - set(lost)))}, which are present; "
                             f"it may only name lost ones ({few(lost)})")
        dst = {i: _bytes(out[i], f"out stripe {i}", writable=True) for i in wanted}
        _same_length(list(dst.values()), nbytes, "out stripe", wanted)
        if wanted:
            for lo in range(0, nbytes, _PIECE):
                hi = min(nbytes, lo + _PIECE)
                self._rebuild({i: s[lo:hi] for i, s in present.items()}, {i: d[lo:hi] for i, d in dst.items()})
        return dst

    def to_dict(self) -> dict:
        """``{"name", "k", "m"}``: what a manifest records of the code (JSON)."""
        return {"name": self.name, "k": self.k, "m": self.m}

    @staticmethod
    def from_dict(d: Mapping) -> ErasureCode:
        """The code :meth:`to_dict` described.

        Raises:
            FormatError: an unknown name or a missing field.
            OptionsError: invalid ``k`` or ``m``.
        """
        codes = {c.name: c for c in (XorCode, ReedSolomonCode)}
        if not isinstance(d, Mapping) or d.get("name") not in codes or "k" not in d or "m" not in d:
            raise FormatError(f"erasure code {d!r}: expected {{'name': one of {sorted(codes)}, 'k': int, 'm': int}}")
        return codes[d["name"]](k=d["k"], m=d["m"])

    @abstractmethod
    def _encode(self, data: list[np.ndarray], parity: list[np.ndarray]) -> None:
        """Parity of one piece: arguments validated, equal non-zero lengths."""

    @abstractmethod
    def _rebuild(self, present: dict[int, np.ndarray], out: dict[int, np.ndarray]) -> None:
        """Lost stripes ``out`` (non-empty) of one piece from ``present`` (at least k): validated."""


@dataclass(frozen=True)
class XorCode(ErasureCode):
    """Parity = XOR of the ``k`` data stripes (RAID-5): ``m`` is 1, any one lost stripe is rebuilt.

    numpy only; runs at memory speed (its running parity stays in cache: one read of each stripe).
    """

    m: int = 1
    name: ClassVar[str] = "xor"

    def __post_init__(self):
        super().__post_init__()
        if self.m != 1:
            raise OptionsError(f"XOR parity has m = 1 parity stripe, not {self.m}: use erasure_code(k, m), "
                               f"which picks Reed-Solomon for m >= 2")

    def _encode(self, data, parity):
        _xor(data, parity[0])

    def _rebuild(self, present, out):
        (index,) = out  # one lost stripe: the XOR of all k others
        _xor(list(present.values()), out[index])


@dataclass(frozen=True)
class ReedSolomonCode(ErasureCode):
    """Reed-Solomon over GF(2^8), ISA-L's Cauchy matrix: any ``m`` lost stripes are rebuilt.

    Encode and decode are ISA-L's ``ec_encode_data`` on the caller's buffers. Its expanded tables are
    computed once per (k, m) for encoding and once per loss pattern for decoding (cached).

    Raises (construction):
        ErasureError: no ISA-L library is found (it comes with ``pip install pyeclib``).
    """

    name: ClassVar[str] = "rs_cauchy"

    def __post_init__(self):
        super().__post_init__()
        if isal() is None:
            raise ErasureError(f"{self} needs ISA-L: {why_missing()}")

    def _encode(self, data, parity):
        isal().encode(len(data[0]), _encode_tables(self.k, self.m), [_addr(s) for s in data],
                      [_addr(p) for p in parity])

    def _rebuild(self, present, out):
        sources, tables = _decode_plan(self.k, self.m, tuple(sorted(present)), tuple(sorted(out)))
        isal().encode(len(present[sources[0]]), tables, [_addr(present[i]) for i in sources],
                      [_addr(out[i]) for i in sorted(out)])


def erasure_code(k: int, m: int) -> ErasureCode:
    """The code for ``k`` data + ``m`` parity stripes: XOR parity for ``m == 1``, else Reed-Solomon.

    Raises:
        OptionsError: ``k < 1``, ``m < 1`` or ``k + m > MAX_STRIPES``.
        ErasureError: ``m >= 2`` and no ISA-L library is found.
    """
    return XorCode(k) if m == 1 else ReedSolomonCode(k, m)


def drop_corrupt(stripes: Sequence, crcs: Sequence[int | None]) -> tuple[list, list[int]]:
    """The stripes with each one whose CRC-32C is not its recorded one replaced by None (lost).

    What to pass to :meth:`ErasureCode.decode`, so that a corrupted data or parity stripe is rebuilt
    or reported, never decoded from.

    Args:
        stripes: the stripe set, data then parity; None for a stripe already lost.
        crcs: the CRC-32C recorded for each stripe when it was written (None: unknown, so lost).

    Returns:
        The stripes to decode from, and the indices of those dropped as corrupt (or of unknown CRC).
    """
    if len(crcs) != len(stripes):
        raise ValueError(f"{len(stripes)} stripes but {len(crcs)} checksums")
    kept, corrupt = [], []
    for i, (s, c) in enumerate(zip(stripes, crcs)):
        if s is not None and (c is None or crc32c(_bytes(s, f"stripe {i}")) != c):
            corrupt.append(i)
            s = None
        kept.append(s)
    return kept, corrupt


# -- stripe layout ---------------------------------------------------------------------------------


def stripe_bytes(nbytes: int, k: int, align: int = STRIPE_ALIGN) -> int:
    """The stripe length that splits ``nbytes`` into ``k`` stripes: ``ceil(nbytes / k)`` rounded up
    to a multiple of ``align`` (0 for no bytes)."""
    if k < 1 or align < 1 or nbytes < 0:
        raise ValueError(f"stripe_bytes(nbytes={nbytes}, k={k}, align={align}): need nbytes >= 0, k >= 1, align >= 1")
    per = -(-nbytes // k)
    return -(-per // align) * align


def empty_aligned(nbytes: int, align: int = STRIPE_ALIGN) -> np.ndarray:
    """A new uint8 array of ``nbytes`` whose first byte is ``align``-byte aligned (contents undefined)."""
    raw = np.empty(nbytes + align, np.uint8)
    lo = -raw.ctypes.data % align
    return raw[lo:lo + nbytes]


def split(data, k: int, align: int = STRIPE_ALIGN) -> list[np.ndarray]:
    """``data`` as ``k`` data stripes of :func:`stripe_bytes` each, the last zero-padded.

    Stripe ``i`` holds bytes ``[i * s, (i + 1) * s)`` of ``data``. When ``len(data)`` is already
    ``k * s`` the stripes are views of ``data`` (no copy); otherwise they are views of a new,
    ``align``-aligned, zero-padded copy. :func:`join` undoes it.
    """
    src = _bytes(data, "data")
    s = stripe_bytes(len(src), k, align)
    if len(src) != k * s:
        padded = empty_aligned(k * s, align)
        padded[:len(src)] = src
        padded[len(src):] = 0
        src = padded
    return [src[i * s:(i + 1) * s] for i in range(k)]


def join(stripes: Sequence, nbytes: int, out=None) -> np.ndarray:
    """The first ``nbytes`` of the data stripes laid end to end: what :func:`split` was given.

    Args:
        stripes: the ``k`` data stripes, in order.
        nbytes: the length of the original data (the padding is dropped).
        out: a writable buffer of ``nbytes``, overwritten; None: a new array.

    Raises:
        ValueError: the stripes hold fewer than ``nbytes`` bytes, or ``out`` has another length.
    """
    views = [_bytes(s, f"data stripe {i}") for i, s in enumerate(stripes)]
    if sum(len(v) for v in views) < nbytes:
        raise ValueError(f"{len(views)} stripes hold {sum(len(v) for v in views)} bytes, fewer than nbytes={nbytes}")
    dst = np.empty(nbytes, np.uint8) if out is None else _bytes(out, "out", writable=True)
    if len(dst) != nbytes:
        raise ValueError(f"out has {len(dst)} bytes, nbytes is {nbytes}")
    pos = 0
    for v in views:
        n = min(len(v), nbytes - pos)
        dst[pos:pos + n] = v[:n]
        pos += n
    return dst


# -- internals -------------------------------------------------------------------------------------


def _bytes(buf, what: str, writable: bool = False) -> np.ndarray:
    """A buffer as a flat uint8 array over the same memory."""
    try:
        view = memoryview(buf)
    except TypeError:
        raise ValueError(f"{what} is a {type(buf).__name__}, not a buffer (bytes, bytearray, numpy array, ...)") from None
    if not view.c_contiguous:
        raise ValueError(f"{what} is not C-contiguous")
    if writable and view.readonly:
        raise ValueError(f"{what} is read-only; an output must be writable")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return np.frombuffer(view, np.uint8)


def _common_length(views: list[np.ndarray], what: str, indices: Sequence[int] | None = None) -> int:
    if not views:
        raise ValueError(f"no {what} is present: the length of the stripes is unknown")
    _same_length(views, len(views[0]), what, range(len(views)) if indices is None else indices)
    return len(views[0])


def _same_length(views: list[np.ndarray], nbytes: int, what: str, indices: Sequence[int]) -> None:
    bad = [f"{i}: {len(v)}" for i, v in zip(indices, views) if len(v) != nbytes]
    if bad:
        raise ValueError(f"stripes of a stripe set must have one length ({nbytes} bytes); {what}s of other "
                         f"lengths: {few(bad)}")


def _addr(a: np.ndarray) -> int:
    return a.ctypes.data


def _words(a: np.ndarray) -> np.ndarray:
    """8-byte words over ``a`` when its length allows (numpy XORs those ~8x faster than bytes)."""
    return a.view(np.uint64) if len(a) % 8 == 0 else a


def _xor(sources: list[np.ndarray], out: np.ndarray) -> None:
    words = [_words(s) for s in sources]
    acc = _words(out)
    if len(words) == 1:
        np.copyto(acc, words[0])
        return
    np.bitwise_xor(words[0], words[1], out=acc)
    for w in words[2:]:
        np.bitwise_xor(acc, w, out=acc)


@lru_cache(maxsize=64)
def _encode_tables(k: int, m: int) -> np.ndarray:
    lib = isal()
    return lib.tables(lib.cauchy_matrix(k, m)[k:])


@lru_cache(maxsize=4096)
def _decode_plan(k: int, m: int, present: tuple[int, ...], wanted: tuple[int, ...]) -> tuple[tuple[int, ...], np.ndarray]:
    """The ``k`` stripes to read and the tables that turn them into the ``wanted`` ones.

    With ``A`` the encode matrix and ``S`` its rows of the chosen survivors (data first), stripe
    ``i`` is ``A[i] @ inverse(S) @ survivors``; for a lost data stripe ``A[i] @ inverse(S)`` is just
    row ``i`` of the inverse.
    """
    lib = isal()
    matrix = lib.cauchy_matrix(k, m)
    sources = present[:k]
    inverse = lib.invert(matrix[list(sources)])
    if inverse is None:  # impossible for a Cauchy matrix: every k x k submatrix is invertible
        raise ErasureError(f"ISA-L found the decode matrix of rs_cauchy({k}+{m}) from stripes {sources} singular")
    rows = lib.matmul(matrix[list(wanted)], inverse)
    return sources, lib.tables(rows)
