"""Page-locked host buffers through which a load's bytes reach a GPU.

A load reads every fragment on the host (from a snapshot's mapping or from a file, each checksum
verified) before it is on the device. Read into pageable memory and then copied, the copy is
synchronous and the driver stages it once more through its own pinned buffer: a restore from memory
onto an H200 ran at 3.3 GB/s, against 55 GB/s for a copy from pinned memory (docs/agent.md).

:class:`DeviceStaging` holds a few page-locked buffers and a side stream of the device. Each chunk of
the load is read and verified into a free buffer, and its copy to the device queued on the stream;
the reading thread goes on to the next chunk while the copy runs, and a buffer is filled again only
once its last copy's event has passed. Several threads may stage at once (each holds one buffer at a
time), so the reads run in parallel and the copies behind them.

On the CPU (device ``cpu``) the buffers are ordinary memory and each copy is made at once: the same
path, which tests check without a GPU.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

import torch

#: bytes of each staging buffer: a chunk of a load read, verified and copied to the device at a time
STAGE_BYTES = 16 << 20


class DeviceStaging:
    """Staging buffers and a side stream for copies to ``device``.

    Args:
        device: the destination device (``cuda:N``; ``cpu`` for the same path without a GPU).
        buffers: buffers held: at least the threads that stage at once, plus one for a copy in flight.
        nbytes: bytes of each buffer, the largest chunk :meth:`put` takes.
    """

    def __init__(self, device, buffers: int = 3, nbytes: int = STAGE_BYTES):
        if buffers < 1 or nbytes < 1:
            raise ValueError(f"staging needs at least one buffer of at least one byte, not {buffers} of {nbytes}")
        device = torch.device(device)
        cuda = device.type == "cuda"
        if cuda and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device
        self.nbytes = nbytes
        self.staged = 0  # bytes copied to the device so far
        self._lock = threading.Lock()  # (copies queued, and their count and last event, one thread at a time)
        # (a stream of torch's pool, which other work may share: waits are for this staging's own events)
        self._stream = torch.cuda.Stream(device) if cuda else None
        self._last = None  # the event of the copy queued last
        self.follow()
        self._free: queue.SimpleQueue = queue.SimpleQueue()  # (buffer, event of its last copy or None)
        for _ in range(buffers):
            self._free.put((torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda), None))

    def follow(self) -> None:
        """Order the copies queued from now on after what the device's current stream (the calling
        thread's) has queued so far: the destinations may still be written there. Called when made,
        and by a reader each time it starts on destinations of this device."""
        if self._stream is not None:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))

    @property
    def pinned(self) -> bool:
        """Whether the buffers are page-locked (a CUDA device)."""
        return self._stream is not None

    def put(self, dest: torch.Tensor, fill: Callable[[memoryview], None]) -> None:
        """Have ``fill(view)`` write ``dest.numel()`` bytes into a free buffer, then queue their copy
        into ``dest`` (contiguous ``uint8`` bytes on the device, at most :attr:`nbytes`). Waits for a
        free buffer, and for that buffer's previous copy to land; safe to call from several threads.
        An exception of ``fill`` is raised with nothing copied."""
        n = dest.numel()
        if dest.device != self.device:  # (a copy to another GPU would run on that GPU's stream, not this one's)
            raise ValueError(f"a chunk for {dest.device} given to the staging buffers of {self.device}")
        if n > self.nbytes:
            raise ValueError(f"a chunk of {n} bytes does not fit a staging buffer of {self.nbytes}")
        buf, event = self._free.get()
        try:
            if event is not None:
                event.synchronize()
            host = buf[:n]
            fill(memoryview(host.numpy()))
            with self._lock:
                if self._stream is None:
                    dest.copy_(host)
                else:
                    with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                        dest.copy_(host, non_blocking=True)
                        event = self._last = torch.cuda.Event(blocking=True)  # (its waiters sleep, not spin)
                        event.record(self._stream)
                self.staged += n
        finally:
            self._free.put((buf, event))

    def wait(self) -> None:
        """Wait until every copy queued has landed: the destinations hold their bytes for any stream,
        and the buffers may be filled again or freed."""
        with self._lock:
            last = self._last
        if last is not None:  # (copies on one stream land in order: the last one's event covers them all)
            last.synchronize()

    def close(self) -> None:
        """:meth:`wait` (the buffers are freed with the object)."""
        self.wait()

    def __enter__(self) -> "DeviceStaging":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
