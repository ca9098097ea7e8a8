"""Configuration of the public hooks: frozen dataclasses validated at construction.

Each message says what is wrong and how to fix the value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ucp.errors import OptionsError
from ucp.format.layout import Layout
from ucp.format.pattern import Pattern

_JOB = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_job(job: str) -> str:
    """A job name: 1-64 letters, digits, ``_`` or ``-`` (it becomes part of file names)."""
    if not isinstance(job, str) or not _JOB.fullmatch(job):
        raise OptionsError(f"job name {job!r} must be 1-64 letters, digits, '_' or '-'")
    return job


@dataclass(frozen=True)
class CheckpointOptions:
    """How the durable tier saves and loads.

    Args:
        layout: the job's layout. Default: inferred from DTensor meshes, else ``dp=<world size>``.
        patterns: ``{glob: Pattern}`` (first match wins) giving plain (non-DTensor) tensors their
            geometry, e.g. Megatron-style tensor parallel shards; needs ``layout``.
        rng: save and restore each rank's RNG states (python, numpy, torch, CUDA).
        io_threads: threads used for checksums and reads on each rank, and for each snapshot's copy
            into memory (at most the CPUs the process may use).
        fsync: make data files durable before the manifest is committed (turn off only for tests).
    """

    layout: Layout | None = None
    patterns: tuple = ()
    rng: bool = True
    io_threads: int = 4
    fsync: bool = True

    def __post_init__(self):
        if self.layout is not None and not isinstance(self.layout, Layout):
            raise OptionsError(f"layout must be a ucp.Layout (e.g. Layout.from_sizes(dp=2, tp=2)), got {type(self.layout).__name__}")
        patterns = tuple(self.patterns.items()) if isinstance(self.patterns, dict) else tuple(self.patterns)
        for item in patterns:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Pattern)):
                raise OptionsError(f"patterns must map glob strings to ucp.Pattern, got {item!r}")
        if patterns and self.layout is None:
            raise OptionsError("patterns need a layout to shard over: pass layout=Layout.from_sizes(...) as well")
        if self.layout is not None:
            for glob, pattern in patterns:
                for s in pattern.shards:
                    if s.axis not in self.layout.names:
                        raise OptionsError(f"pattern {glob!r} shards over axis {s.axis!r}; the layout has {list(self.layout.names)}")
        object.__setattr__(self, "patterns", patterns)
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or not 1 <= self.io_threads <= 64:
            raise OptionsError(f"io_threads={self.io_threads!r}: use an integer from 1 to 64 (4 suits most disks)")
        for name in ("rng", "fsync"):
            if not isinstance(getattr(self, name), bool):
                raise OptionsError(f"{name}={getattr(self, name)!r}: use True or False")


@dataclass(frozen=True)
class SnapshotOptions:
    """The memory tier: snapshots held by the node's snapshot agent (docs/agent.md).

    Args:
        every: take a snapshot at every ``every``-th step passed to ``save`` (other steps: nothing).
        persist_every: every ``persist_every``-th snapshot (the steps that are multiples of
            ``every * persist_every``) is also written to the durable tier, by the agent in the
            background (None: only when the agent gets SIGTERM).
        job: the job's name on this node; default ``TORCHELASTIC_RUN_ID`` under torchrun, else one
            derived from the checkpoint root. Jobs with different names never share an agent.
        timeout: seconds to wait for the agent (start, requests).
        persist_timeout: seconds a durable write of a snapshot may take, and that rank 0's agent
            waits for every rank's file before it gives up on committing it.
    """

    every: int = 1
    persist_every: int | None = None
    job: str | None = None
    timeout: float = 30.0
    persist_timeout: float = 600.0

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise OptionsError(f"every={self.every!r}: use an integer >= 1 (1: a snapshot at every save)")
        p = self.persist_every
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise OptionsError(f"persist_every={p!r}: use None (memory only) or an integer >= 1")
        if self.job is not None:
            check_job(self.job)
        for name in ("timeout", "persist_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise OptionsError(f"{name}={value!r}: use a positive number of seconds")

    def persists(self, step: int) -> bool:
        """Whether the snapshot of ``step`` (a multiple of ``every``) is also written durably."""
        return self.persist_every is not None and (step // self.every) % self.persist_every == 0

    def job_name(self, root) -> str:
        """This job's name: ``job``, else torchrun's run id, else one derived from ``root``."""
        import hashlib
        import os

        if self.job is not None:
            return self.job
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if run_id and run_id != "none":
            safe = "".join(c if c.isalnum() or c in "_-" else "-" for c in run_id)[:64]
            if safe:
                return safe
        # (a local root by its real path; one on an object store, which is no path, by its URL)
        where = os.path.realpath(root) if isinstance(root, (str, os.PathLike)) else str(root)
        return "ckpt-" + hashlib.sha1(where.encode()).hexdigest()[:16]


def check_keep(keep) -> int | None:
    """``keep`` is None (keep all) or a count >= 1 of complete checkpoints to retain."""
    if keep is None:
        return None
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise OptionsError(f"keep={keep!r}: use None to keep every checkpoint, or an integer >= 1")
    return keep


@dataclass(frozen=True)
class RedundancyOptions:
    """Erasure-coded redundancy of the memory tier's snapshots across nodes (docs/erasure.md).

    Nodes form redundancy groups of ``group`` nodes (``group - parity`` data + ``parity`` parity
    stripes per stripe set, the parity rotating over the group's nodes): a snapshot survives the loss
    of any ``parity`` nodes of each group, their memory included. ``parity`` 1 is XOR; 2 or more is
    Reed-Solomon (ISA-L, Cauchy). Memory: ``group / (group - parity)`` of the snapshot's data.

    Args:
        group: nodes per redundancy group (at least ``parity + 1``).
        parity: parity stripes per stripe set: the node failures each group survives.
        stripe: bytes per stripe (default 1 MiB).
        rate: the most bytes per second each rank sends in the parity exchange, on average (None:
            as fast as it goes). The exchange runs in the snapshot's background thread, overlapping
            training; a rate spreads its traffic and CPU over more of the following steps, for a
            network that training needs too (docs/erasure.md section 7).
    """

    group: int = 4
    parity: int = 1
    stripe: int = 1 << 20
    rate: int | None = None

    def __post_init__(self):
        for name, low in (("parity", 1), ("group", 2), ("stripe", 4096)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise OptionsError(f"{name}={value!r}: use an integer >= {low}")
        if self.group < self.parity + 1:
            raise OptionsError(f"group={self.group} cannot hold parity={self.parity} stripe(s) and any data: "
                               f"use group >= parity + 1")
        if self.stripe % 64:
            raise OptionsError(f"stripe={self.stripe}: use a multiple of 64 bytes")
        if self.rate is not None and (isinstance(self.rate, bool) or not isinstance(self.rate, int)
                                      or self.rate < 1 << 20):
            raise OptionsError(f"rate={self.rate!r}: use None (unbounded) or bytes per second, an integer >= "
                               f"{1 << 20} (1 MiB/s)")
