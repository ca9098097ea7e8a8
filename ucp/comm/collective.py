"""Named collective phases whose failures are the same on every rank.

Every step of a distributed save or load that can fail runs inside :meth:`Collective.phase`: each
rank runs its part, the outcomes are all-gathered, and if any rank failed, *every* rank raises the
same :class:`~ucp.errors.DistributedError` carrying ``{rank: message}``. A failure on one rank thus
never leaves the others waiting in the next collective, and every log names the culprit. Without an
initialized process group the same code runs as a world of one and re-raises the original error.
"""

from __future__ import annotations

import functools
import traceback
from contextlib import contextmanager
from typing import Any, Callable

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
            dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

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
        local_error: BaseException | None = None
        try:
            outcome = (True, fn(), None)
        except Exception as e:  # noqa: BLE001 - every failure must reach the other ranks
            local_error = e
            detail = str(e) if isinstance(e, UcpError) else "".join(traceback.format_exception_only(e)).strip()
            outcome = (False, detail, type(e) if isinstance(e, UcpError) else None)
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


@functools.lru_cache(maxsize=None)
def distributed_error_class(kind: type | None) -> type:
    """``DistributedError``, or when every failing rank raised the same ucp error class, a subclass of
    both: ``except CorruptCheckpointError`` then works the same in one process and under
    torch.distributed, and the CLI keeps that class's exit code."""
    if kind is None or not issubclass(kind, UcpError) or issubclass(kind, DistributedError):
        return DistributedError
    return type(f"Distributed{kind.__name__}", (DistributedError, kind), {"exit_code": kind.exit_code,
                                                                        "__module__": __name__})
