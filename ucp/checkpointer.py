"""The public hooks: :class:`Checkpointer` saves and loads a training state from a training loop.

A save runs in named phases (see :mod:`ucp.dist.collective`): *capture* (flatten the state, checksum
every local piece, all-gather what each rank holds), *prepare* (rank 0 clears a stale partial save),
*write* (each rank writes the pieces the save plan gives it, one safetensors file, fsynced) and
*commit* (rank 0 writes the fragment table and atomically commits the manifest, then prunes). A
failure anywhere raises the same error on every rank and leaves no manifest, so the previous
checkpoint stays the newest complete one.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from ucp import __version__
from ucp.codecs.checksum import block_crc32c
from ucp.dist.collective import Collective
from ucp.errors import OptionsError, UcpError, few
from ucp.options import CheckpointOptions, RedundancyOptions, SnapshotOptions, check_keep
from ucp.plan.save_plan import PieceInfo, assign_writers, merge_metas, replicated_regions
from ucp.snapshot import values
from ucp.snapshot.values import split_state
from ucp.snapshot.persist import PersistError
from ucp.snapshot.capture import Geometry, Piece, model_pieces, optimizer_param_fqns, optimizer_pieces, param_names, tensor_piece
from ucp.snapshot.rng import capture_rng
from ucp.spec.dtypes import DTYPES
from ucp.spec.fragment import Fragment
from ucp.spec.keys import extra_key
from ucp.spec.layout import Layout
from ucp.spec.manifest import BLOCK_BYTES, Manifest
from ucp.storage import directory as store
from ucp.storage.atomic import fsync_dir
from ucp.storage.manifest_io import commit_manifest
from ucp.storage.safetensors_file import Entry, write_file

__all__ = ["Checkpointer", "CheckpointOptions", "SaveResult", "LoadResult"]


def _checksums(view) -> tuple[int, tuple[int, ...]]:
    """A fragment's CRC-32C and its block checksums (format 1.1)."""
    return block_crc32c(view, BLOCK_BYTES)


@dataclass(frozen=True)
class SaveResult:
    """What a save produced: the step, its directory, bytes this job wrote, wall time, and the tier:
    ``"durable"`` (a checkpoint under ``root``; ``path`` is its directory) or ``"memory"`` (a
    snapshot held by the node's agent; ``path`` is the shared-memory directory)."""

    step: int
    path: Path
    nbytes: int
    seconds: float
    tier: str = "durable"


@dataclass(frozen=True)
class LoadResult:
    """What a load restored.

    Attributes:
        step: the checkpoint's step.
        source: which tier it came from (``"durable"``: a checkpoint on storage).
        path: the checkpoint directory.
        extras: the user extras saved with it.
        missing_keys: tensor keys the model/optimizer wanted but the checkpoint lacked (``strict=False``).
        unexpected_keys: tensor keys in the checkpoint that nothing here took (``strict=False``).
        nbytes: bytes this rank read.
        seconds: wall time of the load.
        rebuilt: ranks of the snapshot (``source == "memory"``) whose nodes were lost and whose
            shares were rebuilt from parity (docs/erasure.md section 8).
    """

    step: int
    source: str
    path: Path
    extras: dict = field(default_factory=dict)
    missing_keys: tuple = ()
    unexpected_keys: tuple = ()
    nbytes: int = 0
    seconds: float = 0.0
    rebuilt: tuple = ()


def bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _snapshot_source(t: torch.Tensor, changes: bool) -> torch.Tensor:
    """What a snapshot copies from: ``t`` contiguous; copied now when it ``changes`` before the
    optimizer's step (a module buffer); CUDA tensors stay on the device (copied on a side stream)."""
    t = t.contiguous() if t.is_cuda else staged(t)
    return t.clone() if changes else t


def staged(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor (a copy only when it is not one already)."""
    if t.device.type != "cpu":
        t = t.cpu()
    return t if t.is_contiguous() else t.contiguous()


def infer_layout(model, world_size: int) -> Layout:
    """The layout of a job from its parameters' richest DTensor mesh, or plain data parallelism."""
    dtensors = [p for p in (model.parameters() if model is not None else ()) if isinstance(p, DTensor)]
    if not dtensors:
        return Layout((("dp", world_size),))
    mesh = max((p.device_mesh for p in dtensors), key=lambda m: (m.ndim, m.size()))
    names = mesh.mesh_dim_names or tuple(f"mesh{i}" for i in range(mesh.ndim))
    axes = list(zip(names, mesh.shape))
    if mesh.size() < world_size:
        axes.insert(0, ("dp" if "dp" not in names else "replica", world_size // mesh.size()))
    sharded_dp = any(
        (pl.is_shard() or isinstance(pl, _StridedShard)) and n in ("dp", "dp_shard", "fsdp")
        for p in dtensors
        for n, pl in zip(p.device_mesh.mesh_dim_names or (), p.placements)
    )
    return Layout(tuple(axes), zero=3 if sharded_dp else 0)


class Checkpointer:
    """Save and load the training state of every rank of a job.

    Every rank constructs one with the same arguments and calls :meth:`save` and :meth:`load`
    together. Works in one process and under ``torch.distributed`` (DTensor tensor parallel, FSDP2).

    Args:
        root: directory holding one ``step_<N>/`` directory per checkpoint.
        model: the module whose parameters and persistent buffers are saved.
        optimizer: its optimizer; state is keyed by parameter name, not index.
        scheduler: an LR scheduler (anything with ``state_dict``/``load_state_dict``).
        state: ``{name: obj}`` of other stateful objects (a resumable data loader, say); saved per rank.
        keep: retain the newest ``keep`` complete checkpoints (None: keep all).
        options: :class:`CheckpointOptions`.
        process_group: the group of ranks saving together (default: the whole world).
        snapshot: :class:`~ucp.options.SnapshotOptions` to keep snapshots in the memory of the node's
            snapshot agent (docs/agent.md): ``save`` then takes a snapshot every ``every`` steps and
            writes every ``persist_every``-th one durably too; ``load`` prefers the newest complete
            snapshot in memory, then the newest durable checkpoint.
        redundancy: :class:`~ucp.options.RedundancyOptions` to erasure-code the snapshots across
            nodes (needs ``snapshot``): a snapshot is complete only once its parity is, and ``load``
            after nodes failed rebuilds their share from parity (docs/erasure.md).

    Raises:
        OptionsError: an argument is invalid; the message says how to fix it.
    """

    def __init__(self, root, model=None, optimizer=None, scheduler=None, state=None, keep=None,
                 options: CheckpointOptions | None = None, process_group=None, snapshot=None,
                 redundancy=None):
        self.root = Path(root)
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.state = dict(state or {})
        self.keep = check_keep(keep)
        self.options = options if options is not None else CheckpointOptions()
        if not isinstance(self.options, CheckpointOptions):
            raise OptionsError("options must be a ucp.CheckpointOptions")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise OptionsError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and model is None:
            raise OptionsError("an optimizer needs its model: pass model=... so its state can be keyed by parameter name")
        for name, obj in [("scheduler", scheduler), *((f"state[{k!r}]", v) for k, v in self.state.items())]:
            if obj is not None and not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise OptionsError(f"{name} must have state_dict() and load_state_dict()")
        self.coll = Collective(process_group)
        self.layout = self.options.layout or infer_layout(model, self.coll.world_size)
        if self.layout.world_size != self.coll.world_size:
            raise OptionsError(
                f"layout {self.layout} has {self.layout.world_size} ranks but the job has {self.coll.world_size}; "
                "give a layout whose axis sizes multiply to the world size"
            )
        self.geometry = Geometry(self.layout, self.layout.coords(self.coll.rank), self.options.patterns)
        if snapshot is not None and not isinstance(snapshot, SnapshotOptions):
            raise OptionsError("snapshot must be a ucp.SnapshotOptions")
        self.snapshot = snapshot
        if redundancy is not None and not isinstance(redundancy, RedundancyOptions):
            raise OptionsError("redundancy must be a ucp.RedundancyOptions")
        if redundancy is not None and snapshot is None:
            raise OptionsError("redundancy protects the memory tier's snapshots: pass snapshot=ucp.SnapshotOptions(...) too")
        self.redundancy = redundancy
        self._memory_tier = None
        self._memory_lost: str | None = None  # why the memory tier stopped, once it has
        self._pending: dict | None = None  # the snapshot whose copy or cut is in flight
        self._groups: dict = {}  # name -> weak reference to a process group of the snapshots ("cut", "parity")
        self._parity = None  # the snapshots' parity (ucp.recovery.SnapshotParity), with redundancy
        self._rebuilt: list[str] = []
        self._rebuilt_ranks: tuple = ()  # segments a load rebuilt from parity, freed once it has read them
        self._hook = None
        self._persist_regions = None  # the pieces the agent was configured with (durable writes)
        self._closed = False

    # -- capture -----------------------------------------------------------------------------

    def capture(self, extras: dict | None = None) -> tuple[list[Piece], dict]:
        """This rank's pieces and its non-tensor state (typed JSON, one entry per component)."""
        pieces: list[Piece] = []
        state: dict = {}
        if self.model is not None:
            mp, aliases, extra_state = model_pieces(self.model, self.geometry)
            pieces += mp
            state["model"] = values.encode({"aliases": aliases, "extra_state": extra_state}, "model")
            if self.optimizer is not None:
                fqns = optimizer_param_fqns(self.optimizer, param_names(self.model))
                by_key = {p.key: p for p in mp}
                op, scalars, groups = optimizer_pieces(self.optimizer, fqns, by_key, self.geometry)
                pieces += op
                state["optimizer"] = values.encode({"scalars": scalars, "param_groups": groups}, "optimizer")
        if self.scheduler is not None:
            state["scheduler"] = values.encode(self.scheduler.state_dict(), "scheduler")
        for name, obj in self.state.items():
            state[f"state.{name}"] = values.encode(obj.state_dict(), f"state[{name!r}]")
        plain_extras = {}
        for name, value in (extras or {}).items():
            if isinstance(value, torch.Tensor):
                pieces.append(tensor_piece(extra_key(name), name, value.detach(), None))
            else:
                plain_extras[name] = value
        state["extras"] = values.encode(plain_extras, "extras")
        if self.options.rng:
            state["rng"] = values.encode(capture_rng(), "rng")
        return pieces, state

    # -- save --------------------------------------------------------------------------------

    def save(self, step: int, extras: dict | None = None) -> SaveResult:
        """Write a complete checkpoint of ``step``; visible only once every rank's data is durable.

        Args:
            step: training step (a non-negative integer); one checkpoint per step.
            extras: user values saved with it: JSON-able values, or tensors (same on every rank).

        Returns:
            :class:`SaveResult`.

        Raises:
            ReplicaDivergenceError: (wrapped in DistributedError under torch.distributed) replicated
                tensors differ between ranks.
            UcpError: the checkpoint already exists, or a rank failed; nothing becomes visible.
        """
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise OptionsError(f"step={step!r}: use a non-negative integer")
        if self.snapshot is None:
            return self._save_durable(step, extras)
        if step % self.snapshot.every:
            return None
        persist = self.snapshot.persists(step)
        if self._memory_lost is None:
            try:
                return self._save_memory(step, extras, persist)
            except PersistError:
                raise  # the snapshots go on; the durable tier failed
            except UcpError as e:
                self._lose_memory(e)
        if self.snapshot.persist_every is None or persist:
            return self._save_durable(step, extras)
        return None

    def _lose_memory(self, error: Exception) -> None:
        """The memory tier failed (its agent killed, say): say so once; the durable tier carries on."""
        self._pending = None
        self._memory_lost = str(error)
        warnings.warn(f"ucp: the memory tier failed ({error}); snapshots stop, saves and loads use the "
                      f"durable tier only", RuntimeWarning, stacklevel=3)

    def _memory(self):
        if self._memory_tier is None:
            from ucp.snapshot.memory import MemoryTier

            # every rank of a node asks; the first starts the node's agent, the others find it
            self._memory_tier = MemoryTier(self.snapshot.job_name(self.root), self.coll.rank, self.snapshot.timeout,
                                           self.snapshot.persist_timeout)
        return self._memory_tier

    def _save_memory(self, step: int, extras: dict | None, persist: bool) -> SaveResult:
        """A snapshot of ``step`` into the memory of this node's agent (and, with ``persist``, by the
        agent to the durable tier, in the background).

        The state is captured now (non-tensor state encoded, module buffers copied, since a forward
        pass may change them); parameters and optimizer state are copied into the slot by a
        background thread, overlapping the next forward/backward: the optimizer's pre-step hook
        waits for that copy before the step mutates them. The snapshot becomes complete (the
        consistent cut: an all-reduce of every rank's "committed" on a gloo group of its own, in the
        same background thread) as soon as every rank has copied it.
        """
        from ucp.snapshot.shm import SHM_DIR

        t0 = time.perf_counter()
        self._finish_snapshot()
        tier = self._memory()
        pieces, state = self.capture(extras)
        metas = {p.key: p.meta.to_dict() for p in pieces}
        pieces = [p for p in pieces if p.numel]
        buffers = self._buffer_keys()
        items = [(p.meta.dtype, _snapshot_source(p.data, p.key in buffers)) for p in pieces]
        ready = None
        if any(t.is_cuda for _, t in items):  # the side stream's copies start after what is queued now
            ready = torch.cuda.Event()
            ready.record()
        fragments = [{"key": p.key, "offsets": list(p.box.offsets), "sizes": list(p.box.sizes),
                      "flat": None if p.flat is None else [p.flat.start, p.flat.numel],
                      "dtype": p.meta.dtype, "length": t.numel() * t.element_size()}
                     for p, (_, t) in zip(pieces, items)]
        header = {"layout": self.layout.to_dict(), "world_size": self.coll.world_size, "tensors": metas,
                  "state": state, "fragments": fragments, "created_by": f"ucp {__version__}"}
        pending = {"step": step, "copied": threading.Event(), "device_copied": None}
        cut = self._cut_group()
        if self.redundancy is not None:
            self._own_group("parity")  # (created here, in the training thread, by every rank together)
        if self.redundancy is not None and self._parity is None:
            from ucp.recovery import SnapshotParity

            self._parity = SnapshotParity(self.redundancy, self.coll)

        def copied(event) -> None:  # the sources may change now (after ``event``, on a GPU)
            pending["device_copied"] = event
            pending["copied"].set()

        regions = [(f["key"], f["offsets"], f["sizes"], f["flat"], f["dtype"], f["length"]) for f in fragments]

        def copy():
            errors = []
            try:
                committed, errors = tier.write(step, items, header, lambda views: [_checksums(v) for v in views],
                                               ready=ready, on_copied=copied)
                pending["slot"] = committed["slot"]
            except BaseException as e:  # surfaced by the next ucp call, never lost
                pending["error"] = e
            finally:
                pending["copied"].set()  # the state may change now; the cut waits for the other ranks
            try:
                ok, token, failed, changed = self._cut_flags(cut, "error" not in pending, bool(errors),
                                                             regions != self._persist_regions)
                if not ok and "error" not in pending:
                    pending["error"] = UcpError(f"another rank failed its snapshot of step {step}; "
                                               "that snapshot is not complete")
                if failed:
                    pending["persist_error"] = PersistError("; ".join(errors) or "the agent of another rank failed "
                                                            "to write a snapshot to the durable tier (see its error)")
                if ok:
                    local = None
                    if changed:  # where this rank's snapshots go durably, and its share of the save plan
                        try:
                            self._configure_persist(tier, cut, committed)
                            self._persist_regions = regions
                        except BaseException as e:  # (with parity, every rank still joins its collectives)
                            if self._parity is None:
                                raise
                            local = e
                    if self._parity is not None and not self._encode_parity(tier, cut, committed, step, token, local):
                        pending.setdefault("error", UcpError(f"the parity of the snapshot of step {step} failed on "
                                                             "another rank; that snapshot is not complete"))
                        return
                    tier.complete(pending["slot"], step, token)
                    if persist:
                        tier.persist(pending["slot"], step)
            except BaseException as e:
                pending.setdefault("error", e)

        thread = threading.Thread(target=copy, name=f"ucp-snapshot-{step}", daemon=True)
        pending["thread"] = thread
        self._pending = pending
        self._hook_optimizer()
        thread.start()
        nbytes = sum(f["length"] for f in fragments)
        return SaveResult(step, SHM_DIR, nbytes, time.perf_counter() - t0, "memory")

    def _cut_flags(self, cut, committed: bool, failed: bool, changed: bool) -> tuple[bool, int, bool, bool]:
        """The cut, in one all-reduce on the group ``cut``: whether every rank committed, the cut's
        token (rank 0's random id), whether any rank's agent failed a durable write, whether any
        rank's pieces changed since the agents were configured."""
        import random

        token = random.getrandbits(62) + 1 if self.coll.rank == 0 else 0
        flags = torch.tensor([int(committed), -token, -int(failed), -int(changed)], dtype=torch.int64)
        if cut is not None:
            import torch.distributed as dist

            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=cut)
        ok, token, failed, changed = flags.tolist()
        return ok == 1, -token, failed < 0, changed < 0

    def _encode_parity(self, tier, cut, committed: dict, step: int, token: int, error=None) -> bool:
        """Encode this rank's share of the snapshot's parity (docs/erasure.md section 7); whether every
        rank's succeeded. Every rank joins the same collectives whatever fails where: the groups'
        forming (once), then an all-reduce on ``cut`` of "ready" after the steps that may fail on one
        rank alone (``error``: one that already did), then the stripes' exchange, then an all-reduce
        of "done" (complete is sent only once all parity is). Raises this rank's own failure."""
        parity = self._parity
        sequence = parity.sequence
        parity.sequence += 1
        prepared = None
        try:
            parity.setup(tier, self._own_group("parity"))
            if error is None:
                prepared = parity.prepare(tier, committed, step, sequence)
        except BaseException as e:
            error = error or e
        if self._all_ok(cut, error is None):
            try:
                parity.exchange(tier, prepared, token)
            except BaseException as e:
                error = e
            done = self._all_ok(cut, error is None)
        else:
            done = False
        if error is not None:
            import traceback

            traceback.clear_frames(error.__traceback__)  # its frames held views of the shared memory
            raise error if isinstance(error, UcpError) else UcpError(f"the parity of step {step} failed: {error!r}")
        return done

    def _all_ok(self, cut, ok: bool) -> bool:
        """Whether ``ok`` on every rank (an all-reduce on ``cut``)."""
        flag = torch.tensor([int(ok)], dtype=torch.int64)
        if cut is not None:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=cut)
        return bool(flag.item())

    def _configure_persist(self, tier, cut, committed: dict) -> None:
        """Tell the agent the checkpoint root and the fragments this rank writes there: the durable
        save plan (each replicated region written by one holder) over every rank's pieces."""
        from ucp.spec.box import Box, FlatRange

        infos = [PieceInfo(f["key"], Box(tuple(f["offsets"]), tuple(f["sizes"])),
                           None if f["flat"] is None else FlatRange(*f["flat"]), f["dtype"], f["length"], f["crc32c"])
                 for f in committed["fragments"]]
        gathered = [infos]
        if cut is not None:
            import torch.distributed as dist

            gathered = [None] * self.coll.world_size
            dist.all_gather_object(gathered, infos, group=cut)
        write = assign_writers(gathered)[self.coll.rank]
        tier.configure(str(self.root.resolve()), write, self.coll.world_size, self.keep, self.options.fsync)

    def _buffer_keys(self) -> set[str]:
        """Keys of module buffers (not parameters): state a forward pass may change."""
        if self.model is None:
            return set()
        from ucp.snapshot.capture import normalize_fqn
        from ucp.spec.keys import model_key

        params = {id(p) for p in self.model.parameters()}
        return {model_key(normalize_fqn(n)) for n, b in self.model.named_buffers() if id(b) not in params}

    def _hook_optimizer(self) -> None:
        if self.optimizer is not None and getattr(self, "_hook", None) is None:
            self._hook = self.optimizer.register_step_pre_hook(lambda *a, **k: self._wait_copy())

    def _wait_copy(self) -> None:
        """Block until this rank's snapshot copy in flight is done, so the state may change (the
        optimizer's pre-step hook; the cut may still wait for other ranks). A failed copy is reported
        by the next ``save``/``wait``/``load``, not here."""
        pending = self._pending
        if pending is not None:
            pending["copied"].wait()
            if pending["device_copied"] is not None:  # copies from the GPU: its next kernels wait, not the host
                torch.cuda.current_stream().wait_event(pending["device_copied"])

    def _finish_snapshot(self) -> None:
        """Wait for the snapshot in flight (copy and cut) and raise its error, if any, then a
        failure of the agents to write an earlier snapshot durably (:class:`PersistError`). Either is
        raised on every rank together: the cut tells every rank of both."""
        pending = self._pending
        if pending is None:
            return
        pending["thread"].join()
        self._pending = None
        error = pending.get("error")
        if error is not None:
            raise error if isinstance(error, UcpError) else UcpError(f"snapshot of step {pending['step']} failed: {error!r}")
        if "persist_error" in pending:
            raise pending["persist_error"]

    def _cut_group(self):
        """The process group of the snapshots' cut (created on first use, by every rank's first
        snapshot); None for a job of one rank, whose cut is its own commit."""
        return self._own_group("cut")

    def _own_group(self, name: str):
        """A gloo group of the snapshots (``"cut"``, ``"parity"``; created on first use by every rank
        together), None in a job of one rank. Only torch.distributed holds it: held here too, it
        would outlive ``destroy_process_group()`` and be torn down at interpreter exit, where gloo
        may abort the process."""
        if self.coll.world_size == 1:
            return None
        ref = self._groups.get(name)
        group = ref() if ref is not None else None
        if group is None:
            import datetime
            import weakref

            import torch.distributed as dist

            ranks = dist.get_process_group_ranks(self.coll.group) if self.coll.group is not None else None
            group = dist.new_group(ranks=ranks, backend="gloo", timeout=datetime.timedelta(seconds=self.snapshot.timeout))
            self._groups[name] = weakref.ref(group)
        return group

    def _save_durable(self, step: int, extras: dict | None) -> SaveResult:
        t0 = time.perf_counter()
        coll, rank = self.coll, self.coll.rank
        directory = store.step_dir(self.root, step)
        local: dict = {}

        def capture():
            pieces, state = self.capture(extras)
            metas = {p.key: p.meta for p in pieces}
            pieces = [p for p in pieces if p.numel]  # empty shards (uneven splits) hold nothing
            buffers = [staged(p.data) for p in pieces]
            local.update(pieces=pieces, buffers=buffers, views=[bytes_view(b) for b in buffers])
            infos = [PieceInfo(p.key, p.box, p.flat, p.meta.dtype, v.nbytes) for p, v in zip(pieces, local["views"])]
            return infos, metas, state, self.layout, (step, str(self.root.resolve()))

        gathered = coll.phase("capture", capture)
        infos_by_rank = [g[0] for g in gathered]
        layouts = {g[3] for g in gathered}
        targets = {g[4] for g in gathered}
        shared = replicated_regions(infos_by_rank)

        def compare():
            # Only copies held by several ranks need checksums now; the rest are summed while written.
            todo = [i for i, info in enumerate(infos_by_rank[rank]) if info.region in shared]
            with ThreadPoolExecutor(self.options.io_threads) as pool:
                return dict(zip(todo, pool.map(_checksums, [local["views"][i] for i in todo])))

        early = coll.phase("compare", compare)  # per rank {piece: (crc, block crcs)}
        infos_by_rank = [[replace(info, crc32c=early[r][i][0] if i in early[r] else None) for i, info in enumerate(infos)]
                         for r, infos in enumerate(infos_by_rank)]

        def plan():
            if len(targets) > 1:
                seen = {r: g[4] for r, g in enumerate(gathered)}
                raise UcpError(f"ranks disagree about what to save (step, root): {seen}; every rank must call "
                               "save() with the same step on the same checkpoint root")
            if len(layouts) > 1:
                raise UcpError(f"ranks disagree about the layout: {sorted(map(str, layouts))}")
            local["plan"] = merge_metas([g[1] for g in gathered]), assign_writers(infos_by_rank)

        coll.phase("plan", plan)  # every rank computes the same plan from the same input
        metas, assignments = local.pop("plan")
        coll.phase("prepare", lambda: self._prepare(directory) if rank == 0 else None)

        def write():
            mine = assignments[rank]
            if not mine:
                return None
            name = store.rank_file(rank)
            entries = []
            for i in mine:
                p = local["pieces"][i]
                shape = (p.flat.numel,) if p.flat is not None else p.box.sizes
                entries.append(Entry(f"{p.key}{p.box}{p.flat or ''}", DTYPES[p.meta.dtype][1], shape, local["views"][i]))
            late = [i for i in mine if infos_by_rank[rank][i].crc32c is None]
            with ThreadPoolExecutor(1) as pool:  # checksums on a second core while the file streams out
                sums = pool.map(_checksums, [local["views"][i] for i in late])
                size, offsets = write_file(directory / name, entries, {"format": "ucp.checkpoint", "rank": str(rank)},
                                           self.options.fsync)
                return name, size, offsets, dict(zip(late, sums))

        written = coll.phase("write", write)
        local.clear()

        def commit():
            if rank != 0:
                return None
            fragments, files = [], {}
            for r, w in enumerate(written):
                if w is None:
                    continue
                name, size, offsets, late = w
                files[name] = size
                for i, off in zip(assignments[r], offsets):
                    info = infos_by_rank[r][i]
                    crc, blocks = early[r][i] if i in early[r] else late[i]
                    fragments.append(Fragment(info.key, info.box, info.flat, info.dtype, r, name, off, info.nbytes,
                                              crc, blocks))
            manifest = Manifest(step, self.layout, metas, tuple(fragments), split_state([g[2] for g in gathered]),
                                files, created_by=f"ucp {__version__}", block_bytes=BLOCK_BYTES)
            manifest.validate()
            for name, size in files.items():  # what each rank wrote is here, whole, before it is published
                found = (directory / name).stat().st_size if (directory / name).exists() else None
                if found != size:
                    raise UcpError(f"{directory / name}: {found} bytes on storage, the writing rank reported {size}; "
                                   "is the checkpoint root the same storage on every rank?")
            commit_manifest(directory, manifest)
            return manifest.nbytes

        nbytes = coll.phase("commit", commit)[0]
        if rank == 0:
            # Retention runs after the commit and never fails a save that is already visible.
            try:
                store.prune(self.root, self.keep, current=step)
            except OSError as e:
                warnings.warn(f"ucp: checkpoint {directory} is saved, but pruning old ones failed: {e}", stacklevel=2)
        return SaveResult(step, directory, nbytes, time.perf_counter() - t0)

    def _prepare(self, directory: Path) -> None:
        if store.is_complete(directory):
            raise UcpError(f"{directory}: a complete checkpoint for this step exists already; save under a new step")
        if directory.exists():
            store.remove_checkpoint(directory)  # a stale partial save of the same step
        directory.mkdir(parents=True)
        fsync_dir(directory.parent)  # the new directory's entry is durable before its manifest is

    # -- load --------------------------------------------------------------------------------

    def load(self, step: int | None = None, strict: bool = True, cast: bool = False) -> LoadResult | None:
        """Restore the newest complete checkpoint (or ``step``) into the model, optimizer and state.

        The checkpoint may come from any layout and number of ranks, or be a universal one; each
        rank reads only what its tensors need. Tensors the model names differently are found by the
        rules of :mod:`ucp.plan.sources` (a fused ``qkv`` and its ``q``/``k``/``v`` parts, an fp32
        master and an fp32 parameter), and Adam's step count moves between per-parameter and
        per-group optimizers (:mod:`ucp.optimizer_load`). A target layout that cannot hold a tensor is
        refused before any read.

        Args:
            step: the step to load; None for the newest complete checkpoint.
            strict: fail if some tensor of the model/optimizer has no source in the checkpoint, or
                some tensor of the checkpoint goes nowhere; with False, load what matches and report
                the rest in the result.
            cast: allow dtypes to differ: a parameter whose checkpoint also holds an fp32 master
                (``optim/<fqn>/master``) of the wanted dtype is loaded from the master, exactly;
                anything else is converted as ``Tensor.to`` converts (bf16 from fp32 rounds).

        Returns:
            :class:`LoadResult`, or None when ``root`` holds no complete checkpoint and ``step`` is None.

        Raises:
            CheckpointNotFoundError: ``step`` was given and no complete checkpoint has it.
            CorruptCheckpointError: a fragment fails its checksum or is truncated (names file and key).
            LoadError: the checkpoint does not fit the model or optimizer.
        """
        self._check_open()
        from ucp.loader import load_checkpoint

        if self.snapshot is not None and self._memory_lost is None:
            try:
                self._finish_snapshot()
                memory = self._memory_source(step)
            except PersistError:
                raise
            except UcpError as e:
                self._lose_memory(e)
                memory = None
            if memory is not None:
                try:
                    result = load_checkpoint(self, step, strict, cast, memory=memory)
                finally:
                    self._free_rebuilt()
                return replace(result, rebuilt=self._rebuilt_ranks) if self._rebuilt_ranks else result
        return load_checkpoint(self, step, strict, cast)

    def _memory_source(self, step: int | None):
        """``(directory, manifest)`` of the newest snapshot the agents of this job's nodes hold whole
        or can complete from parity (of ``step`` if given; saved by any number of ranks), or None;
        it is marked complete. Ranks rebuilt from parity are listed in ``self._rebuilt_ranks`` and
        their segments in ``self._rebuilt`` (freed after the load)."""
        from ucp.recovery import find_recoverable, rebuild_lost
        from ucp.snapshot.memory import manifest_from_headers, restorable
        from ucp.snapshot.shm import SHM_DIR

        coll = self.coll
        tier = self._memory()
        host = os.uname().nodename
        node = f"{host}:{tier.client.info.pid}"  # a node is an agent
        # which snapshots each node holds (summaries), then the chosen one's headers, once per node
        nodes = coll.phase("memory", lambda: (node, [dict(h, host=h.get("host") or host)
                                                     for h in tier.node_headers(summary=True)],
                                              tier.node_parity(summary=True)))
        per_node = {n: (held, records) for n, held, records in nodes}
        unique = [h for held, _ in per_node.values() for h in held if step is None or h["step"] == step]
        newest = restorable(unique)
        rec, why = find_recoverable([(n, held, records) for n, (held, records) in per_node.items()], step)
        if rec is not None and newest is not None and newest[0] >= rec.step:
            rec = None
        if newest is None and rec is None:
            if why and coll.rank == 0:
                warnings.warn(f"ucp: {why}; loading the newest durable checkpoint instead", RuntimeWarning, stacklevel=3)
            return None
        chosen_step, world = (rec.step, rec.world_size) if rec is not None else newest
        speaker = min(r for r, (n, _, _) in enumerate(nodes) if n == node)  # this node's lowest rank

        def headers():
            if coll.rank != speaker:
                return []
            for h in nodes[coll.rank][1]:  # the cut finished (some rank marked it): mark it here too
                if h["step"] == chosen_step and h["world_size"] == world and not h["complete"]:
                    tier.complete_rank(h["rank"], h["slot"], chosen_step)
            return [dict(h, host=h.get("host") or host) for h in tier.node_headers(step=chosen_step)
                    if h["world_size"] == world]

        got = coll.phase("memory-headers", headers)
        chosen = list({h["rank"]: h for held in got for h in held}.values())
        self._rebuilt_ranks = ()
        if rec is not None:
            damaged = {r for g in rec.groups for r in g}

            def records():
                if coll.rank != speaker:
                    return []
                return [r for r in tier.node_parity(step=rec.step) if r["token"] == rec.token and r["rank"] in damaged]

            full = {r["rank"]: r for held in coll.phase("memory-parity", records) for r in held}
            group = self._own_group("parity")
            node_of_rank = [n for n, _, _ in nodes]
            made: list = []

            self._rebuilt = made  # freed after the load, or if anything below fails
            try:
                rebuilt = coll.phase("memory-rebuild", lambda: rebuild_lost(coll, tier, group, rec, node_of_rank,
                                                                             full, made))
            except UcpError as e:  # a stripe failed its checksum, say: never loaded from
                self._free_rebuilt()
                if coll.rank == 0:
                    why = " ".join(str(e).split())
                    warnings.warn(f"ucp: the snapshot of step {rec.step} cannot be rebuilt from parity ({why}); "
                                  "loading the newest durable checkpoint instead", RuntimeWarning, stacklevel=3)
                return None
            chosen += [h for held in rebuilt for h in held]
            self._rebuilt_ranks = tuple(rec.lost)
            if coll.rank == 0:
                warnings.warn(f"ucp: ranks {few(rec.lost)} of the snapshot of step {rec.step} were lost with their "
                              f"nodes and are rebuilt from parity", RuntimeWarning, stacklevel=3)
        built: dict = {}

        def build():
            built["manifest"] = manifest_from_headers(chosen, host)

        try:
            coll.phase("memory-manifest", build)
        except BaseException:
            self._free_rebuilt()
            raise
        return SHM_DIR, built["manifest"]

    def _free_rebuilt(self) -> None:
        """Free the segments a load rebuilt from parity (every rank has read them: the load's last
        phase is collective)."""
        names, self._rebuilt = self._rebuilt, []
        for name in names:
            try:
                self._memory_tier.client.free(name)
            except UcpError:
                pass

    # -- lifecycle ---------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until every save in flight is done (a collective: every rank calls it): durable
        saves complete inside ``save``; a snapshot's copy and cut complete here, and so do the
        agents' durable writes of snapshots (``persist_every``).

        Raises:
            PersistError: an agent failed to write a snapshot durably (on every rank).
        """
        self._check_open()
        if self.snapshot is not None and self._memory_lost is None and self._memory_tier is not None:
            try:
                self._finish_snapshot()
                errors = self._memory_tier.drain()
            except PersistError:
                raise
            except UcpError as e:
                self._lose_memory(e)
                return
            cut = self._cut_group()
            if cut is not None:
                import torch.distributed as dist

                failed = torch.tensor([int(bool(errors))])
                dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=cut)
                if failed.item() and not errors:
                    errors = ["the agent of another rank failed to write a snapshot to the durable tier (see its error)"]
            if errors:
                raise PersistError("; ".join(errors))

    def close(self) -> None:
        """Finish pending work (a collective with snapshots: every rank calls it), release the
        snapshots' process group and this rank's mappings of the agent's memory (the snapshots stay
        with the agent); later calls raise."""
        if not self._closed:
            try:
                self.wait()
            finally:
                if self._hook is not None:
                    self._hook.remove()
                    self._hook = None
                self._closed = True
                for ref in self._groups.values():
                    group = ref()
                    if group is not None:
                        import torch.distributed as dist

                        dist.destroy_process_group(group)
                self._groups.clear()
                if self._memory_tier is not None:
                    self._memory_tier.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UcpError("this Checkpointer is closed")

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


