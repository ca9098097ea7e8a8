"""Python's cyclic garbage collector paused over ucp's metadata-heavy calls: a load, a save.

A load or a save makes tens of thousands of small objects (boxes, keys, fragment records: a few per
tensor), and every 700 allocations past the last collection may run one; each tenth of those scans
the middle generation, each tenth of those the whole heap: the model's modules and parameters,
torch's objects, everything the training loop holds. On 2 ranks of 4,112 pieces each, a load from
memory spent half of its 1.0 CPU-second in those scans. What these calls make is freed by reference
counting when they return (it is not cyclic garbage), so pausing the collector for their length
loses nothing. The collector is restored as the outermost paused call found it, so a caller's own
``gc.disable()`` stands. A snapshot's background copy is not paused: a copy stuck on a broken process
group would keep the collector paused with it.
"""

from __future__ import annotations

import gc
import threading
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0  # paused calls in progress, in any thread
_was_enabled = False  # the collector's state when the outermost of them began


@contextmanager
def collector_paused():
    """Pause the cyclic garbage collector until the outermost paused call (in any thread) returns."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _was_enabled:
                gc.enable()
