"""Fresh CPU tensors for a load to write into, on huge pages where the kernel offers them.

A load into a new process (a relaunch, an in-process recovery's new model) writes much of its
bytes into memory nobody has touched yet: the optimizer's moments, which the load creates. The first
touch of each 4 KiB page is a page fault, and on a virtual machine a fault costs more than the copy
into the page: copying 333 MB took 0.28 s into a fresh tensor and 0.04 s into one touched before
(one thread, this project's 2-core VM). Advised for transparent huge pages (``madvise(2)``
``MADV_HUGEPAGE``: one fault per 2 MiB), the same copy into a fresh tensor took 0.07 s.

:func:`empty` is ``torch.empty`` that so advises a CPU tensor of at least :data:`MIN_BYTES`. Only
the 2 MiB-aligned pages wholly inside the tensor's storage are advised. The advice outlives the
tensor: once it is freed, the allocator may hand those pages to other allocations, which then get
huge pages too (more memory touched at a fault, never other contents). Where the kernel has no
transparent huge pages (not Linux, or ``never`` in ``/sys/kernel/mm/transparent_hugepage/enabled``)
the advice does nothing and the tensor is an ordinary one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = 8 << 20  # below this a tensor spans too few huge pages to be worth a system call
MADV_HUGEPAGE = 14  # (Linux)

_madvise = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):
        _madvise = None


def empty(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype, device=device)``, advised for huge pages when it is a CPU
    tensor of at least :data:`MIN_BYTES` (see the module's doc)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if t.device.type == "cpu" and t.nbytes >= MIN_BYTES:
        advise_huge(t)
    return t


def advise_huge(t: torch.Tensor) -> int:
    """Advise the 2 MiB-aligned pages wholly inside CPU tensor ``t``'s storage for transparent huge
    pages; returns the bytes advised (0 where nothing was: too small, no ``madvise``, refused)."""
    if _madvise is None or t.device.type != "cpu":
        return 0
    storage = t.untyped_storage()
    start = storage.data_ptr()
    end = start + storage.nbytes()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return 0
    return last - first if _madvise(first, last - first, MADV_HUGEPAGE) == 0 else 0
