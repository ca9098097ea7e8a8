"""An arena: one block of memory, allocated and touched once, handed out in ranges and reused.

Fresh memory costs a page fault per 4 KiB on first touch (0.4-4 GB/s measured on this machine's
VMs, slower than the disk); buffers carved from an arena that stays resident pay it once. The arena
also bounds memory: a request waits until a large enough range is free.
"""

from __future__ import annotations

import threading

import numpy as np

from ucp.errors import OptionsError

_ALIGN = 64


class Arena:
    """``size`` bytes handed out first-fit by :meth:`take`, returned by :meth:`give_back`.

    Thread-safe; :meth:`take` blocks until a range of the requested size is free.
    """

    def __init__(self, size: int):
        if size < 0:
            raise OptionsError(f"arena size {size} must be >= 0")
        self.size = -(-size // _ALIGN) * _ALIGN
        self.memory = np.empty(self.size, dtype=np.uint8)
        self.memory[::4096] = 0  # resident from now on
        self._free = [(0, self.size)]  # sorted, coalesced (start, length) ranges
        self._cond = threading.Condition()

    def take(self, nbytes: int) -> tuple[int, memoryview]:
        """A range of ``nbytes`` (offset, view), waiting for one to be free.

        Raises:
            OptionsError: ``nbytes`` exceeds the arena; it would never fit.
        """
        need = -(-nbytes // _ALIGN) * _ALIGN
        if need == 0:  # an empty tensor's buffer: nothing to hand out, nothing to wait for
            return 0, memoryview(self.memory[:0])
        if need > self.size:
            raise OptionsError(f"a buffer of {nbytes} bytes does not fit the {self.size}-byte arena; raise the memory limit")
        with self._cond:
            while True:
                for i, (start, length) in enumerate(self._free):
                    if length >= need:
                        if length == need:
                            del self._free[i]
                        else:
                            self._free[i] = (start + need, length - need)
                        return start, memoryview(self.memory[start:start + nbytes])
                self._cond.wait()

    def give_back(self, offset: int, nbytes: int) -> None:
        """Return the range :meth:`take` gave at ``offset`` for ``nbytes``."""
        need = -(-nbytes // _ALIGN) * _ALIGN
        if need == 0:
            return
        with self._cond:
            free = sorted(self._free + [(offset, need)])
            merged: list[tuple[int, int]] = []
            for start, length in free:
                if merged and merged[-1][0] + merged[-1][1] == start:
                    merged[-1] = (merged[-1][0], merged[-1][1] + length)
                else:
                    merged.append((start, length))
            self._free = merged
            self._cond.notify_all()
