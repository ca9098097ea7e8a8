"""Named collective phases whose failures are the same on every rank.

Every step of a distributed save or load that can fail runs inside :meth:`Collective.phase`: each
rank runs its part, the outcomes are all-gathered, and if any rank failed, *every* rank raises the
same :class:`~ucp.errors.DistributedError` carrying ``{rank: message}``. A failure on one rank thus
never leaves the others waiting in the next collective, and every log names the culprit. Without an
initialized process group the same code runs as a world of one and re-raises the original error.
"""

from __future__ import annotations

import functools
import pickle
import traceback
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.distributed as dist

from ucp.errors import DistributedError, PeerLostError, UcpError


@contextmanager
def transport(what: str, rank: int):
    """Raise a transport failure of the collective ``what`` (gloo's "Connection reset by peer", a
    NCCL error: a ``RuntimeError`` from torch.distributed) as one :class:`PeerLostError` line."""
    try:
        yield
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise PeerLostError(f"rank {rank}: the {what} failed: another rank of the job died or "
                            f"became unreachable ({first[:300]}); this process group cannot be used any more: "
                            "restart the job, which resumes from the newest complete checkpoint") from None


class Collective:
    """A process group (or a world of one) with object collectives and named phases."""

    def __init__(self, group=None):
        self.active = dist.is_available() and dist.is_initialized()
        self.group = group
        self.rank = dist.get_rank(group) if self.active else 0
        self.world_size = dist.get_world_size(group) if self.active else 1
        self._what = "collective exchange"  # what is running (a phase's name), named in a transport failure

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (pickled among this job's ranks by torch.distributed)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        with transport(self._what, self.rank):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        with transport(self._what, self.rank):
            dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def gather(self, obj: Any, dst: int = 0) -> list | None:
        """Every rank's ``obj`` in rank order on rank ``dst``; None on the others.

        Objects are pickled (among this job's ranks, as torch.distributed's object collectives do);
        their sizes are gathered to ``dst``, then each rank sends ``dst`` its bytes alone (point to
        point, ``dst``'s receives posted together): unlike ``torch.distributed.gather_object``, which
        all-gathers every rank's size first, a rank other than ``dst`` receives nothing that grows
        with the world, and ``dst`` receives what the ranks sent, not every buffer padded to the
        largest (at 16,384 ranks the save's write reports: 72 MB, not 337)."""
        if self.world_size == 1:
            return [obj]
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        device = self._device()
        with transport(self._what, self.rank):
            size = torch.tensor([len(blob)], dtype=torch.int64, device=device)
            sizes = [torch.empty_like(size) for _ in range(self.world_size)] if self.rank == dst else None
            dist.gather(size, sizes, dst=self._global(dst), group=self.group)
            data = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
            if sizes is None:
                dist.send(data, self._global(dst), group=self.group)
                return None
            slots = [data if r == dst else torch.empty(int(n.item()), dtype=torch.uint8, device=device)
                     for r, n in enumerate(sizes)]
            ops = [dist.P2POp(dist.irecv, slot, self._global(r), self.group) for r, slot in enumerate(slots)
                   if r != dst]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return [obj if r == dst else pickle.loads(slot.cpu().numpy().tobytes()) for r, slot in enumerate(slots)]

    def exchange(self, outgoing: dict[int, Any]) -> dict[int, Any]:
        """Send ``outgoing[r]`` to each rank ``r`` named; return ``{r: what r sent this rank}``
        (ranks that sent nothing are absent). A sparse all-to-all: one all-to-all of the byte counts,
        one of the pickled bytes; a rank's traffic is what it sends and receives, plus one count per
        rank."""
        if self.world_size == 1:
            return {0: outgoing[0]} if 0 in outgoing else {}
        blobs = {r: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) for r, obj in sorted(outgoing.items())}
        if any(not 0 <= r < self.world_size for r in blobs):
            raise ValueError(f"exchange to ranks {sorted(blobs)} of a world of {self.world_size}")
        device = self._device()
        send_sizes = [0] * self.world_size
        for r, blob in blobs.items():
            send_sizes[r] = len(blob)
        with transport(self._what, self.rank):
            counts = torch.tensor(send_sizes, dtype=torch.int64, device=device)
            got = torch.empty_like(counts)
            dist.all_to_all_single(got, counts, group=self.group)
            recv_sizes = got.cpu().tolist()
            sendbuf = torch.frombuffer(bytearray(b"".join(blobs.values())) or bytearray(1), dtype=torch.uint8)
            sendbuf = sendbuf[:sum(send_sizes)].to(device)
            recvbuf = torch.empty(sum(recv_sizes), dtype=torch.uint8, device=device)
            dist.all_to_all_single(recvbuf, sendbuf, recv_sizes, send_sizes, group=self.group)
        data = recvbuf.cpu().numpy().tobytes()
        out, at = {}, 0
        for r, n in enumerate(recv_sizes):
            if n:
                out[r] = pickle.loads(data[at:at + n])
            at += n
        return out

    def exchange_phase(self, name: str, fn: Callable[[], dict[int, Any]]) -> dict[int, Any]:
        """Run ``fn`` (-> ``{rank: object}``) on every rank and :meth:`exchange` the objects; a failure
        on any rank is raised on every rank as in :meth:`phase` (the ranks agree on it with one
        all-reduce; only then are the failures gathered)."""
        if self.world_size == 1:
            return self.exchange(fn())
        outcome, local_error = _run(fn)
        self._what = f"collective of phase '{name}'"
        try:
            with transport(self._what, self.rank):
                flag = torch.tensor([0 if outcome[0] else 1], dtype=torch.int64, device=self._device())
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if not int(flag.item()):
                return self.exchange(outcome[1])
            gathered = self.gather(outcome)
            verdict = None if gathered is None else {r: (msg, kind) for r, (ok, msg, kind) in enumerate(gathered)
                                                     if not ok}
            failures = self.broadcast(verdict)
        finally:
            self._what = "collective exchange"
        raise _shared_error(name, failures) from local_error

    def _device(self) -> torch.device:
        """Where this group's tensors must be: the current GPU under NCCL, else the CPU."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def scatter(self, objs: list | None, src: int = 0) -> Any:
        """Rank ``src``'s ``objs[r]`` on each rank ``r`` (``objs`` is read on ``src`` only).

        Two collectives (``torch.distributed.scatter_object_list`` takes three): a broadcast of the
        largest pickled size, then one scatter of buffers of that size, each holding its length and
        its bytes."""
        if self.world_size == 1:
            return objs[0]
        device = self._device()
        with transport(self._what, self.rank):
            blobs = [pickle.dumps(o, protocol=pickle.HIGHEST_PROTOCOL) for o in objs] if self.rank == src else None
            size = torch.tensor([max(map(len, blobs)) if blobs else 0], dtype=torch.int64, device=device)
            dist.broadcast(size, src=self._global(src), group=self.group)
            n = int(size.item()) + 8
            chunks = None if blobs is None else [_framed(blob, n).to(device) for blob in blobs]
            out = torch.empty(n, dtype=torch.uint8, device=device)
            dist.scatter(out, chunks, src=self._global(src), group=self.group)
        return _unframed(out)

    def _global(self, rank: int) -> int:
        """The global rank of this group's ``rank`` (torch's object collectives take global ranks)."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def barrier(self) -> None:
        if self.world_size > 1:
            with transport(self._what, self.rank):
                dist.barrier(group=self.group)

    def phase(self, name: str, fn: Callable[[], Any]) -> list:
        """Run ``fn`` on every rank; return every rank's result, or raise one error on all ranks.

        Raises:
            DistributedError: some rank raised; carries ``{rank: message}`` (world > 1).
            Exception: in a world of one, whatever ``fn`` raised.
        """
        if self.world_size == 1:
            return [fn()]
        outcome, local_error = _run(fn)
        self._what = f"collective of phase '{name}'"
        try:
            gathered = self.all_gather(outcome)
        finally:
            self._what = "collective exchange"
        failures = {r: msg for r, (ok, msg, _) in enumerate(gathered) if not ok}
        if failures:
            kinds = {kind for ok, _, kind in gathered if not ok}
            raise distributed_error_class(kinds.pop() if len(kinds) == 1 else None)(name, failures) from local_error
        return [value for _, value, _ in gathered]

    def gather_phase(self, name: str, fn: Callable[[], Any], decide: Callable[[list], Any] | None = None,
                     root: int = 0) -> tuple[list | None, Any]:
        """Run ``fn`` on every rank and gather the results to ``root`` alone, which runs
        ``decide(results)`` when every rank succeeded; its value (small: it goes to every rank) is
        returned on every rank as ``(results on root else None, decision)``. A failure of ``fn`` on
        any rank, or of ``decide`` (charged to ``root``), is raised on every rank as in :meth:`phase`.
        """
        if self.world_size == 1:
            results = [fn()]
            return results, decide(results) if decide is not None else None
        outcome, local_error = _run(fn)
        self._what = f"collective of phase '{name}'"
        try:
            gathered = self.gather(outcome, root)
            verdict = None
            if gathered is not None:
                failures = {r: (msg, kind) for r, (ok, msg, kind) in enumerate(gathered) if not ok}
                decision = None
                if not failures:
                    try:
                        decision = decide([value for _, value, _ in gathered]) if decide is not None else None
                    except Exception as e:  # noqa: BLE001 - the same error on every rank
                        local_error = e
                        failures = {root: _failed(e)[1:]}
                verdict = (failures, None if failures else decision)
            failures, decision = self.broadcast(verdict, root)
        finally:
            self._what = "collective exchange"
        if failures:
            raise _shared_error(name, failures) from local_error
        return (None if gathered is None else [value for _, value, _ in gathered]), decision

    def reduce_phase(self, name: str, fn: Callable[[], Any], combine: Callable[[Any, Any], Any],
                     decide: Callable[[Any], Any] | None = None) -> tuple[Any, Any]:
        """Run ``fn`` on every rank and fold the results into one on rank 0 with ``combine(a, b)``
        (associative, and its value about the size of either: a union of sets, a sum), pairwise up a
        binomial tree; rank 0 runs ``decide(combined)`` and every rank gets its value. A rank
        receives at most ``ceil(log2(world))`` folded values and sends one, so no rank, rank 0
        included, receives anything that grows with the world (a :meth:`gather_phase` brings every
        rank's value to the root). Returns ``(combined on rank 0 else None, decision)``; failures are
        raised on every rank as in :meth:`phase` (every failing rank named)."""
        if self.world_size == 1:
            value = fn()
            return value, decide(value) if decide is not None else None
        (ok, value, kind), local_error = _run(fn)
        failures = {} if ok else {self.rank: (value, kind)}
        self._what = f"collective of phase '{name}'"
        try:
            with transport(self._what, self.rank):
                step = 1
                while step < self.world_size:
                    if self.rank & step:  # (this rank's subtree is folded: up to its parent, and done)
                        self._send_object((failures, None if failures else value), self.rank - step)
                        break
                    if self.rank + step < self.world_size:
                        got_failures, got = self._recv_object(self.rank + step)
                        failures.update(got_failures)
                        if not failures:
                            try:
                                value = combine(value, got)
                            except Exception as e:  # noqa: BLE001 - sent up the tree, raised on every rank
                                local_error, value = e, None
                                failures = {self.rank: _failed(e)[1:]}
                    step *= 2
            verdict = None
            if self.rank == 0:
                decision = None
                if not failures:
                    try:
                        decision = decide(value) if decide is not None else None
                    except Exception as e:  # noqa: BLE001 - the same error on every rank
                        local_error = e
                        failures = {0: _failed(e)[1:]}
                verdict = (failures, decision)
            failures, decision = self.broadcast(verdict)
        finally:
            self._what = "collective exchange"
        if failures:
            raise _shared_error(name, failures) from local_error
        return (value if self.rank == 0 else None), decision

    def _send_object(self, obj: Any, dst: int) -> None:
        """``obj`` to group rank ``dst`` (which calls :meth:`_recv_object`): its pickled size, then its bytes."""
        device = self._device()
        blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        dist.send(torch.tensor([len(blob)], dtype=torch.int64, device=device), self._global(dst), group=self.group)
        dist.send(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device), self._global(dst), group=self.group)

    def _recv_object(self, src: int) -> Any:
        """The object group rank ``src`` sends with :meth:`_send_object`."""
        device = self._device()
        size = torch.empty(1, dtype=torch.int64, device=device)
        dist.recv(size, self._global(src), group=self.group)
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        dist.recv(buf, self._global(src), group=self.group)
        return pickle.loads(buf.cpu().numpy().tobytes())


def _framed(blob: bytes, n: int) -> torch.Tensor:
    """``blob`` in a zeroed CPU buffer of ``n`` bytes (at least ``len(blob) + 8``): its length as an
    int64, then its bytes (the buffers of :meth:`Collective.scatter`)."""
    buf = torch.zeros(n, dtype=torch.uint8)
    buf[:8] = torch.tensor([len(blob)], dtype=torch.int64).view(torch.uint8)
    buf[8:8 + len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    return buf


def _unframed(buf: torch.Tensor) -> Any:
    """The object a :func:`_framed` buffer holds (pickled among this job's ranks, as
    torch.distributed's object collectives do)."""
    buf = buf.cpu()
    n = int(buf[:8].view(torch.int64).item())
    return pickle.loads(buf[8:8 + n].numpy().tobytes())


def _run(fn: Callable[[], Any]) -> tuple[tuple, BaseException | None]:
    """``fn``'s outcome as it travels, ``(True, result, None)`` or :func:`_failed`, and its error."""
    try:
        return (True, fn(), None), None
    except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
        return _failed(e), e


def _failed(e: BaseException) -> tuple:
    """A failed outcome as it travels: ``(False, one-line message, ucp error class or None)``."""
    detail = str(e) if isinstance(e, UcpError) else "".join(traceback.format_exception_only(e)).strip()
    return False, detail, type(e) if isinstance(e, UcpError) else None


def _shared_error(name: str, failures: dict) -> DistributedError:
    """The error every rank raises for phase ``name``'s ``failures`` ({rank: (message, ucp class or None)})."""
    kinds = {kind for _, kind in failures.values()}
    return distributed_error_class(kinds.pop() if len(kinds) == 1 else None)(
        name, {r: msg for r, (msg, _) in failures.items()})


@functools.lru_cache(maxsize=None)
def distributed_error_class(kind: type | None) -> type:
    """``DistributedError``, or when every failing rank raised the same ucp error class, a subclass of
    both: ``except CorruptCheckpointError`` then works the same in one process and under
    torch.distributed, and the CLI keeps that class's exit code."""
    if kind is None or not issubclass(kind, UcpError) or issubclass(kind, DistributedError):
        return DistributedError
    return type(f"Distributed{kind.__name__}", (DistributedError, kind), {"exit_code": kind.exit_code,
                                                                        "__module__": __name__})
