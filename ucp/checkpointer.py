"""The public hooks: :class:`Checkpointer` saves and loads a training state from a training loop.

A save runs in named phases (see :mod:`ucp.dist.collective`): *capture* (flatten the state, checksum
every local piece, all-gather what each rank holds), *prepare* (rank 0 clears a stale partial save),
*write* (each rank writes the pieces the save plan gives it, one safetensors file, fsynced) and
*commit* (rank 0 writes the fragment table and atomically commits the manifest, then prunes). A
failure anywhere raises the same error on every rank and leaves no manifest, so the previous
checkpoint stays the newest complete one.
"""

from __future__ import annotations

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
from ucp.memory_hooks import MemoryTierHooks
from ucp.errors import OptionsError, UcpError
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


class Checkpointer(MemoryTierHooks):
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


