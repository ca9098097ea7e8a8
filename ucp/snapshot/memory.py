"""The memory tier on the trainer's side: a rank's snapshot in its node agent's shared memory.

Each rank owns two *slots*: a data segment ``r<rank>.s<slot>`` created by the agent and mapped here
once (reused while the state's size stays the same), and a header the agent publishes
(``r<rank>.s<slot>.json``, docs/agent.md section 4). A snapshot of ``step`` is written into the
slot that does not hold the rank's newest complete snapshot:

1. ``begin``: the agent drops the slot's header, so a half-written slot is never taken for a snapshot;
2. the pieces are copied into the segment, coalesced per dtype (64-byte aligned), and checksummed
   in the same pass (:func:`ucp.codecs.checksum.copy_block_crc32c`, over the tier's threads);
3. ``commit``: the agent publishes the header (fragments with their offsets, the rank's non-tensor
   state), marked incomplete;
4. ``complete``: after every rank of the job has committed (the caller's collective), the header
   is marked complete. A step is *restorable* when every rank holds it committed and at least one
   holds it complete (complete is sent only once all have committed).

The header's fragments name the data segment as their file, so the whole snapshot of the node is
an ordinary distributed checkpoint whose directory is ``/dev/shm``: the durable loader (resharding
included) reads it, from the mappings of :meth:`MemoryTier.mapping` (a restore copies straight from
the segment into the destination, checksummed in the same pass).
"""

from __future__ import annotations

import os
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ucp.codecs.checksum import copy_block_crc32c
from ucp.errors import UcpError
from ucp.snapshot import shm
from ucp.snapshot.client import AgentClient, ensure_agent
from ucp.snapshot.header import SNAPSHOT_BLOCK_BYTES, SNAPSHOT_FORMAT_VERSION

ALIGN = 64
FORMAT = "ucp.snapshot"
FORMAT_VERSION = SNAPSHOT_FORMAT_VERSION
#: bytes of device-to-host copies queued between two CUDA events: checksums of the first pieces
#: start while the later ones are still being copied
EVENT_BYTES = 64 << 20
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: the slot counts as pinned for every device's copies


def cuda_device(tensors) -> torch.device | None:
    """The one CUDA device of ``tensors`` (None when none is on a GPU); UcpError when they are on
    several: a rank snapshots the tensors of one GPU."""
    devices = sorted({str(t.device) for t in tensors if t.is_cuda})
    if len(devices) > 1:
        raise UcpError(f"a rank's snapshot holds tensors of several GPUs ({', '.join(devices)}); "
                       "ucp snapshots one GPU's tensors per rank")
    return torch.device(devices[0]) if devices else None


def cpu_threads(wanted: int) -> int:
    """How many of ``wanted`` threads a copy and checksum of memory (CPU-bound, unlike disk reads)
    should use on this rank: at most its share of the CPUs it may run on, shared with the other local
    ranks of its node (``LOCAL_WORLD_SIZE``, set by torchrun; 1 if unset). More threads than cores
    only take turns on them (on 2 CPUs, 2 ranks of 2 threads each were 5-10% slower than of 1)."""
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(wanted, len(os.sched_getaffinity(0)) // local))


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Placement:
    """Where piece ``index`` lives in the slot: ``offset`` and ``nbytes``."""

    index: int
    offset: int
    nbytes: int


def place(sizes: list[tuple[str, int]]) -> tuple[list[Placement], int]:
    """Offsets of pieces ``(dtype, nbytes)`` in one buffer: grouped by dtype (one coalesced run per
    dtype, in first-seen order), each piece 64-byte aligned; returns the placements (in the pieces'
    order) and the buffer size."""
    order: dict[str, list[int]] = {}
    for i, (dtype, _) in enumerate(sizes):
        order.setdefault(dtype, []).append(i)
    out: list[Placement | None] = [None] * len(sizes)
    at = 0
    for indices in order.values():
        for i in indices:
            out[i] = Placement(i, at, sizes[i][1])
            at = _aligned(at + sizes[i][1])
    return out, max(at, ALIGN)


class MemoryTier:
    """One rank's two slots in its node's agent.

    Args:
        job: the job's name on this node.
        rank: this rank.
        timeout: seconds to wait for the agent.
        persist_timeout: seconds a durable write of a snapshot may take.
        threads: the threads a snapshot's copy and checksums run on (the writing thread and
            ``threads - 1`` of the tier's pool), at most this rank's share of the CPUs (:func:`cpu_threads`).
    """

    def __init__(self, job: str, rank: int, timeout: float = 30.0, persist_timeout: float = 600.0, threads: int = 1):
        self.job = shm.check_job(job)
        self.rank = rank
        self.persist_timeout = persist_timeout
        self.threads = cpu_threads(threads)
        self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="ucp-snapshot") if self.threads > 1 else None
        self._maps: dict[str, shm.Segment] = {}  # segments of other ranks mapped for a load (see mapping)
        self.client: AgentClient = ensure_agent(job, timeout)
        self.client.hello(rank)
        self._segments: dict[int, shm.Segment] = {}
        self._parity: dict[int, shm.Segment] = {}  # slot -> the segment of that snapshot's parity stripes
        self._newest: int | None = None  # the slot of this rank's newest complete snapshot, if known
        self._streams: dict = {}  # device -> the CUDA side stream of snapshots of that device's tensors
        self._pinned: dict[int, int | None] = {}  # slot -> address page-locked for CUDA copies

    def headers(self, step: int | None = None, summary: bool = False) -> dict[int, dict]:
        """This rank's committed slots (of ``step``, or all): slot -> header (with ``summary``, its
        fields of :meth:`node_headers`' summaries)."""
        slots = self.client.request("slots", rank=self.rank, step=step, summary=summary)["slots"]
        return {int(k.split(".")[1]): h for k, h in slots.items()}

    def node_headers(self, step: int | None = None, summary: bool = False) -> list[dict]:
        """The committed headers (of ``step``, or all; with ``summary``, only ``rank``, ``slot``,
        ``step``, ``world_size``, ``complete``, ``host``) of every rank this node's agent holds."""
        return list(self.client.request("slots", step=step, summary=summary)["slots"].values())

    def complete_rank(self, rank: int, slot: int, step: int, token: int | None = None) -> None:
        self.client.request("complete", rank=rank, slot=slot, step=step, token=token)
        if rank == self.rank:
            self._newest = None  # (a load marked one of ours complete: ask the agent again)

    def free_slot(self) -> int:
        """The slot to write next: not the one holding this rank's newest complete snapshot (known
        from this rank's own ``complete``, else asked of the agent)."""
        if self._newest is None:
            complete = {s: h["step"] for s, h in self.headers(summary=True).items() if h["complete"]}
            self._newest = max(complete, key=complete.get) if complete else 1
        return 1 - self._newest

    def _segment(self, slot: int, nbytes: int, kind: str = "s") -> shm.Segment:
        """The mapped segment of ``slot``'s snapshot data (``kind`` "s") or parity ("p") of ``nbytes``."""
        mapped = self._segments if kind == "s" else self._parity
        seg = mapped.get(slot)
        if seg is not None and seg.nbytes == nbytes:
            return seg
        what = f"r{self.rank}.{kind}{slot}"
        if seg is not None:  # the state changed size: a new segment
            if kind == "s":
                self._unpin(slot)
            seg.close()
            del mapped[slot]
            self.client.free(what)
        else:
            held = self.client.status()["segments"].get(shm.segment_name(self.job, what))
            if held is not None and held != nbytes:
                self.client.free(what)
        name = self.client.alloc(what, nbytes)
        seg = mapped[slot] = shm.attach(name)
        return seg

    def data_segment(self, slot: int) -> shm.Segment:
        """The mapped data segment of ``slot`` (written by :meth:`write`)."""
        return self._segments[slot]

    def mapping(self, name: str):
        """The memory of segment ``name`` (its full name, as a snapshot header's fragments give it)
        mapped into this process, for a load to copy from. This rank's own slots stay mapped (the
        next snapshot into the slot reuses the mapping and its page tables); other segments stay
        mapped until :meth:`unmap`."""
        own = {shm.segment_name(self.job, f"r{self.rank}.s{slot}"): slot for slot in (0, 1)}
        slot = own.get(name)
        seg = self._segments.get(slot) if slot is not None else self._maps.get(name)
        if seg is None or not seg.current():  # (not mapped yet, or the name now names another file)
            if seg is not None:
                self._forget(slot, name)
            seg = shm.attach(name)
            if slot is not None:
                self._segments[slot] = seg
            else:
                self._maps[name] = seg
        return seg.buf

    def unmap(self) -> None:
        """Drop the mappings of other ranks' segments that :meth:`mapping` made (each unmapped once
        no view of it is left)."""
        self._maps.clear()

    def _forget(self, slot: int | None, name: str) -> None:
        """Drop a stale mapping of segment ``name`` (this rank's ``slot``, or another's)."""
        if slot is None:
            del self._maps[name]
            return
        self._unpin(slot)
        del self._segments[slot]

    def parity_segment(self, slot: int, nbytes: int) -> shm.Segment:
        """The segment (``nbytes``, reused while the size stays) of the parity of ``slot``'s snapshot."""
        return self._segment(slot, max(nbytes, ALIGN), "p")

    def commit_parity(self, slot: int, step: int, record: dict) -> None:
        """Have the agent keep the parity record of the snapshot of ``step`` in ``slot``."""
        self.client.request("parity_commit", rank=self.rank, slot=slot, step=step, record=record)

    def node_parity(self, step: int | None = None, summary: bool = False) -> list[dict]:
        """The parity records (of ``step``, or all) of every rank this node's agent holds."""
        return list(self.client.request("parity", step=step, summary=summary)["parity"].values())

    def write(self, step: int, items: list[tuple[str, torch.Tensor]], header: dict, ready=None,
              on_copied=None) -> tuple[dict, list[str]]:
        """Copy ``items`` ``(dtype name, contiguous tensor)`` into a free slot as ``step`` and
        commit it with ``header``, to whose fragments their file, offsets and checksums (CRC-32C and
        block checksums of :data:`~ucp.snapshot.header.SNAPSHOT_BLOCK_BYTES` blocks) are added;
        returns the committed header and the agent's failures to write earlier snapshots durably,
        not reported before. Waits while the agent writes the slot to the durable tier.

        CPU tensors are copied and checksummed in one pass, chunk by chunk over the tier's threads
        (each chunk summed right after its copy, while in cache). CUDA tensors are copied on a side
        stream of this tier, after the CUDA event ``ready`` (recorded by the caller on its stream),
        into the slot page-locked once (``cudaHostRegister``); they are checksummed from the slot
        as their copies land (an event every :data:`EVENT_BYTES`), by the same threads.
        ``on_copied(event)`` is called as soon as the sources may change: once the CPU tensors are
        copied and the CUDA tensors' copies queued, before those are summed (``event``, None without
        CUDA tensors, marks the copies' end on the side stream: make the stream that changes the
        sources wait for it; the host never waits for the GPU there)."""
        slot = self.free_slot()
        views = [t.detach().reshape(-1).view(torch.uint8) for _, t in items]
        placements, nbytes = place([(d, v.numel()) for (d, _), v in zip(items, views)])
        seg = self._segment(slot, nbytes)
        errors = self.client.request("begin", wait=self.persist_timeout, rank=self.rank, slot=slot, step=step,
                                     session=self.client.id)["errors"]
        data = np.frombuffer(seg.buf, np.uint8)
        regions = [(data[p.offset:p.offset + p.nbytes], None if v.is_cuda else v.numpy(), None)
                   for p, v in zip(placements, views)]
        try:
            on_device = [v.is_cuda for v in views]
            done = None
            if any(on_device):
                regions, done = self._copy_from_device(slot, seg, placements, views, regions, ready)
            # the host's tensors first (a GPU's optimizer keeps its step counts there), then the sources
            # may change (the training stream waits for ``done``: its next kernels queue behind the
            # copies), then the device copies are summed as they land
            host = [r for r, d in zip(regions, on_device) if not d]
            sums = iter(copy_block_crc32c(host, SNAPSHOT_BLOCK_BYTES, self._pool, self.threads - 1))
            if on_copied is not None:
                on_copied(done)
            device = iter(copy_block_crc32c([r for r, d in zip(regions, on_device) if d], SNAPSHOT_BLOCK_BYTES,
                                            self._pool, self.threads - 1))
            sums = [next(device) if d else next(sums) for d in on_device]
        except BaseException as e:
            traceback.clear_frames(e.__traceback__)  # its frames held views of the slot (it stays closable)
            for side in self._streams.values():  # no copy queued before the failure still reads the sources or
                side.synchronize()               # writes the slot once the caller lets the sources change
            raise
        finally:
            del data, regions
        fragments = [dict(f, file=seg.name, offset=p.offset, crc32c=crc,
                          blocks=blocks if p.nbytes > SNAPSHOT_BLOCK_BYTES else [])
                     for f, p, (crc, blocks) in zip(header["fragments"], placements, sums)]
        full = {**header, "format": FORMAT, "format_version": FORMAT_VERSION, "rank": self.rank,
                "block_bytes": SNAPSHOT_BLOCK_BYTES,
                "slot": slot, "host": os.uname().nodename, "file_size": seg.nbytes, "fragments": fragments}
        self.client.request("commit", rank=self.rank, slot=slot, step=step, header=full)
        return full, errors

    def _copy_from_device(self, slot: int, seg: shm.Segment, placements, views, regions, ready):
        """Queue the copies of the CUDA ``views`` into ``slot`` on the side stream (after ``ready``,
        else after what the current stream has queued), an event each :data:`EVENT_BYTES`; returns
        ``regions`` with those pieces to be summed once their event has passed, and the last event."""
        whole = torch.frombuffer(seg.buf, dtype=torch.uint8)
        try:
            device = cuda_device(views)
            side = self._side_stream(device, slot, whole)
            side.wait_event(ready) if ready is not None else side.wait_stream(torch.cuda.current_stream(device))
            out, waiting, queued, event = list(regions), [], 0, None
            last = max(i for i, v in enumerate(views) if v.is_cuda)
            with torch.cuda.device(device), torch.cuda.stream(side):
                for i, (p, v) in enumerate(zip(placements, views)):
                    if not v.is_cuda:
                        continue
                    whole[p.offset:p.offset + p.nbytes].copy_(v, non_blocking=True)
                    waiting.append(i)
                    queued += p.nbytes
                    if queued >= EVENT_BYTES or i == last:
                        event = torch.cuda.Event(blocking=True)  # (its waiters sleep rather than spin)
                        event.record(side)
                        for j in waiting:
                            out[j] = (regions[j][0], None, event.synchronize)
                        waiting, queued = [], 0
            return out, event
        finally:
            del whole

    def complete(self, slot: int, step: int, token: int | None = None) -> None:
        self.complete_rank(self.rank, slot, step, token)
        self._newest = slot

    # -- the durable tier, written by the agent (docs/agent.md section 5) -----------------------
    def configure(self, root: str, write: list[int], world_size: int, keep: int | None, fsync: bool) -> None:
        """Tell the agent where this rank's snapshots go durably and which fragments it writes."""
        self.client.request("configure", rank=self.rank, root=root, write=write, world_size=world_size, keep=keep,
                            fsync=fsync, timeout=self.persist_timeout, session=self.client.id)

    def persist(self, slot: int, step: int) -> None:
        """Have the agent write the complete snapshot of ``step`` in ``slot`` durably (background)."""
        self.client.request("persist", rank=self.rank, slot=slot, step=step)

    def drain(self) -> list[str]:
        """Wait until the agent's durable writes for this rank are done; the failures of those this
        tier asked for (a failure of an earlier job's is never this job's)."""
        return self.client.request("drain", wait=self.persist_timeout, rank=self.rank, session=self.client.id)["errors"]

    def _side_stream(self, device: torch.device, slot: int, whole: torch.Tensor):
        """This tier's CUDA side stream on ``device`` (the copying thread's own current device may be
        another), with slot ``slot`` (``whole``) page-locked for every device (``cudaHostRegisterPortable``)."""
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        if slot not in self._pinned:
            cudart = torch.cuda.cudart()
            ptr = whole.data_ptr()
            with torch.cuda.device(device):
                registered = int(cudart.cudaHostRegister(ptr, whole.numel(), HOST_REGISTER_PORTABLE)) == 0
            if registered:
                self._pinned[slot] = ptr
            else:  # copies still work, synchronously staged by the driver
                warnings.warn(f"ucp: could not page-lock snapshot slot {slot} ({whole.numel()} bytes); "
                              "device-to-host copies of snapshots will not overlap", RuntimeWarning, stacklevel=2)
                self._pinned[slot] = None
        return self._streams[device]

    def _unpin(self, slot: int) -> None:
        ptr = self._pinned.pop(slot, None)
        if ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(ptr)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        for slot in list(self._pinned):
            self._unpin(slot)
        for seg in [*self._segments.values(), *self._parity.values()]:
            seg.close()
        self._segments.clear()
        self._parity.clear()
        self._maps.clear()
