"""Side groups: gloo process groups of their own that the memory tier's background threads use (the
snapshots' cut, the parity exchange), so they never share a communicator with the training loop;
and the small all-reduces they run.

A group is created on first use, by every rank of the job together (``new_group`` is collective),
and only torch.distributed holds it: held here too, it would outlive ``destroy_process_group()`` and
be torn down at interpreter exit, where gloo may abort the process.
"""

from __future__ import annotations

import datetime
import weakref

import torch
import torch.distributed as dist

from ucp.comm.collective import Collective, transport


class SideGroups:
    """Named gloo groups over the ranks of ``coll`` (None in a job of one rank), with ``timeout``
    seconds for their collectives."""

    def __init__(self, coll: Collective, timeout: float):
        self.coll = coll
        self.timeout = timeout
        self._refs: dict[str, weakref.ref] = {}

    def get(self, name: str):
        """The group ``name`` (created on first use: every rank must ask together), or None in a
        job of one rank."""
        if self.coll.world_size == 1:
            return None
        ref = self._refs.get(name)
        group = ref() if ref is not None else None
        if group is None:
            ranks = dist.get_process_group_ranks(self.coll.group) if self.coll.group is not None else None
            group = dist.new_group(ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
            self._refs[name] = weakref.ref(group)
        return group

    def forget(self) -> None:
        """Drop the groups without destroying them (their job's process group broke: every group
        is destroyed together by ``destroy_process_group()``)."""
        self._refs.clear()

    def destroy(self) -> None:
        """Destroy every group still alive."""
        for ref in self._refs.values():
            group = ref()
            if group is not None:
                dist.destroy_process_group(group)
        self._refs.clear()


def all_reduce_ints(values: list[int], op: str, group) -> list[int]:
    """``values`` reduced element-wise over ``group`` (``op`` "min" or "max"); as they are when
    ``group`` is None (a job of one rank)."""
    t = torch.tensor(values, dtype=torch.int64)
    if group is not None:
        with transport("collective all_reduce", dist.get_rank()):
            dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX, group=group)
    return t.tolist()


def all_true(ok: bool, group) -> bool:
    """Whether ``ok`` holds on every rank of ``group``."""
    return bool(all_reduce_ints([int(ok)], "min", group)[0])


def all_gather_objects(obj, group, world_size: int) -> list:
    """Every rank's ``obj`` over ``group``, in rank order (``[obj]`` when ``group`` is None)."""
    if group is None:
        return [obj]
    out = [None] * world_size
    with transport("collective all_gather", dist.get_rank()):
        dist.all_gather_object(out, obj, group=group)
    return out
