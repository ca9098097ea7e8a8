"""The public hooks: :class:`Checkpointer` saves and loads the training state of every rank of a job.

It holds its tiers as parts: the durable tier (:mod:`ucp.checkpoint.save`, :mod:`ucp.checkpoint.load`)
always, the memory tier (:class:`ucp.checkpoint.memory.Snapshots`) when given ``snapshot=``.
Orchestration only: the math is the planner's, the bytes the storage layer's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ucp.checkpoint.collector import collector_paused
from ucp.checkpoint.load import load_checkpoint
from ucp.checkpoint.memory import Snapshots
from ucp.checkpoint.results import LoadResult, SaveResult
from ucp.checkpoint.save import SavePlans, on_storage, save_durable
from ucp.comm.collective import Collective
from ucp.errors import NotInMemoryError, OptionsError, PersistError, UcpError
from ucp.lang.apply import LiveSpec
from ucp.lang.specs import read_spec
from ucp.options import CheckpointOptions, RedundancyOptions, SnapshotOptions, check_keep
from ucp.state.capture import Geometry, Piece, capture_state, infer_layout
from ucp.storage import lease as leases
from ucp.storage.objstore import as_location, is_object

__all__ = ["Checkpointer", "CheckpointOptions", "SaveResult", "LoadResult"]


def _live_spec(spec, options: CheckpointOptions, layout, coords) -> LiveSpec | None:
    """The ``spec=`` of a Checkpointer, read and checked against its layout (None without one)."""
    if spec is None:
        return None
    if options.patterns:
        raise OptionsError("spec= and options.patterns both say how tensors are laid out: give one (a spec rule "
                           '"glob" : shard(axis, dim=D) is what a Pattern says)')
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".ucl")):
        text, file = read_spec(spec, packaged=False)
    elif isinstance(spec, str):
        text, file = spec, "<spec>"
    else:
        raise OptionsError(f"spec must be UCL text or the path of a .ucl file, got {type(spec).__name__}")
    return LiveSpec(text, file, layout, coords)


class Checkpointer:
    """Save and load the training state of every rank of a job.

    Every rank constructs one with the same arguments and calls :meth:`save` and :meth:`load`
    together. Works in one process and under ``torch.distributed`` (DTensor tensor parallel, FSDP2).

    Args:
        root: directory holding one ``step_<N>/`` directory per checkpoint, or a URL (``s3://bucket/run``,
            any fsspec URL) holding them as objects (docs/format-checkpoint.md, section 7; with
            ``snapshot``, the agents write the persisted snapshots there, with the credentials and
            endpoint of the environment they were started in: docs/agent.md, section 5). A ``Path``
            made of a URL (``s3:/bucket/run``) is refused, never written to.
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
        spec: a UCL program (docs/ucl.md), the path of a ``.ucl`` file (a ``Path`` or a string ending
            in ``.ucl``) or its text: the same language as ``ucp convert --spec``. Its first matching
            rule gives each plain tensor its pattern (``shard``, ``fused``, ``pad``), and ``expert()`` /
            ``stage()`` rules give tensors held by a local index their global names, at save and at
            load (a checkpoint saved at ``ep=2`` loads at ``ep=4`` or ``ep=1``). Its axes are the
            layout's (``options.layout``); not together with ``options.patterns``.

    Raises:
        OptionsError: an argument is invalid; the message says how to fix it (:class:`LocationError`:
            a root ucp cannot serve, or s3fs missing for an ``s3://`` one).
        UclError: the spec is malformed or does not fit the layout (names file, line and column).
    """

    def __init__(self, root, model=None, optimizer=None, scheduler=None, state=None, keep=None,
                 options: CheckpointOptions | None = None, process_group=None, snapshot=None,
                 redundancy=None, spec=None):
        self.root = as_location(root)  # (a local path, or an ObjectPath for a URL: s3://bucket/run)
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
        coords = self.layout.coords(self.coll.rank)
        self.geometry = Geometry(self.layout, coords, self.options.patterns, _live_spec(spec, self.options, self.layout, coords))
        if snapshot is not None and not isinstance(snapshot, SnapshotOptions):
            raise OptionsError("snapshot must be a ucp.SnapshotOptions")
        self.snapshot = snapshot
        if redundancy is not None and not isinstance(redundancy, RedundancyOptions):
            raise OptionsError("redundancy must be a ucp.RedundancyOptions")
        if redundancy is not None and snapshot is None:
            raise OptionsError("redundancy protects the memory tier's snapshots: pass snapshot=ucp.SnapshotOptions(...) too")
        self.redundancy = redundancy
        # the memory tier, a part of its own; None without snapshots
        self._snapshots = Snapshots(self, snapshot, redundancy) if snapshot is not None else None
        self._lease: leases.Lease | None = None  # rank 0's lease on root, taken at its first durable save
        self._closed = False
        self._save_plans = SavePlans()  # the durable save plan, made once per layout (ucp.checkpoint.save)

    def capture(self, extras: dict | None = None) -> tuple[list[Piece], dict]:
        """This rank's pieces and its non-tensor state (typed JSON, one entry per component)."""
        return capture_state(self.model, self.optimizer, self.scheduler, self.state, extras, self.geometry,
                             self.options.rng)

    def save(self, step: int, extras: dict | None = None) -> SaveResult:
        """Write a complete checkpoint of ``step``; visible only once every rank's data is durable.

        With ``snapshot=``, a snapshot every ``every`` steps into the memory of the node's agent
        instead (returned at once; the copy finishes in the background), written durably every
        ``persist_every``-th one; if the memory tier fails, saves go on in the durable tier.

        Args:
            step: training step (a non-negative integer); one checkpoint per step.
            extras: user values saved with it: JSON-able values, or tensors (same on every rank).

        Returns:
            :class:`SaveResult`, or None for a step the snapshots skip.

        Raises:
            ReplicaDivergenceError: (wrapped in DistributedError under torch.distributed) replicated
                tensors differ between ranks.
            LeaseError: (wrapped likewise) another job saves into ``root`` (docs/format-checkpoint.md,
                rule 4c); the message names it.
            StorageError: (wrapped likewise) the storage refused a write (a full disk); names the file.
                The failed save's partial directory is cleared, and never blocks a later save.
            UcpError: this job saved ``step`` already, or a rank failed; nothing becomes visible.

        A complete checkpoint of ``step`` saved by an earlier run, and after the commit those of
        later steps, belong to an abandoned run: they are retired (moved to ``root/.abandoned/``, or
        deleted when ``keep`` is set) with a warning, so the checkpoint just saved is the newest.
        """
        with collector_paused():  # (in the body: a wrapper's frame would shift the warnings' stacklevel)
            self._check_open()
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise OptionsError(f"step={step!r}: use a non-negative integer")
            snaps = self._snapshots
            if snaps is None:
                return save_durable(self, step, extras)
            if step % self.snapshot.every:
                return None
            persist = self.snapshot.persists(step)
            if snaps.lost is None:
                try:
                    return snaps.save(step, extras, persist)
                except PersistError:
                    raise  # the snapshots go on; the durable tier failed
                except UcpError as e:
                    snaps.lose(e)
            if self.snapshot.persist_every is None or persist:
                return save_durable(self, step, extras)
            return None

    # -- load --------------------------------------------------------------------------------

    def load(self, step: int | None = None, strict: bool = True, cast: bool = False,
             memory_only: bool = False) -> LoadResult | None:
        """Restore the newest complete checkpoint (or ``step``) into the model, optimizer and state.

        The checkpoint may come from any layout and number of ranks, or be a universal one; each
        rank reads only what its tensors need. Tensors the model names differently are found by the
        rules of :mod:`ucp.plan.sources` (a fused ``qkv`` and its ``q``/``k``/``v`` parts, an fp32
        master and an fp32 parameter), and Adam's step count moves between per-parameter and
        per-group optimizers (:mod:`ucp.state.optimizer`). A target layout that cannot hold a tensor is
        refused before any read. A checkpoint of weights only (no optimizer tensors and no saved
        param groups: Hugging Face weights, a save without an optimizer) leaves a new optimizer
        fresh, with a warning and ``optimizer_restored=False`` in the result.

        Args:
            step: the step to load; None for the newest complete checkpoint.
            strict: fail if some tensor of the model/optimizer has no source in the checkpoint, or
                some tensor of the checkpoint goes nowhere; with False, load what matches and report
                the rest in the result.
            cast: allow dtypes to differ: a parameter whose checkpoint also holds an fp32 master
                (``optim/<fqn>/master``) of the wanted dtype is loaded from the master, exactly;
                anything else is converted as ``Tensor.to`` converts (bf16 from fp32 rounds).
            memory_only: restore from the snapshot agents' memory only (in-process recovery): when
                memory cannot restore the job, raise :class:`NotInMemoryError` instead of reading
                the durable tier. Needs ``snapshot=``.

        Returns:
            :class:`LoadResult`, or None when ``root`` holds no complete checkpoint and ``step`` is None.

        Raises:
            CheckpointNotFoundError: ``step`` was given and no complete checkpoint has it.
            CorruptCheckpointError: a fragment fails its checksum or is truncated (names file and key).
            LoadError: the checkpoint does not fit the model or optimizer.
            NotInMemoryError: ``memory_only`` and no snapshot in memory restores the job.
            StorageError: an object store failed a read (unreachable after the retries); names the
                object. (A local disk's errors are raised as they are.)
        """
        with collector_paused():  # (in the body: a wrapper's frame would shift the warnings' stacklevel)
            self._check_open()
            snaps = self._snapshots
            if memory_only and snaps is None:
                raise OptionsError("load(memory_only=True) restores from the memory tier: pass "
                                   "snapshot=ucp.SnapshotOptions(...)")
            if snaps is not None and snaps.lost is None:
                try:
                    snaps.finish()
                    memory = snaps.source(step, memory_only)
                except PersistError:
                    raise
                except UcpError as e:
                    snaps.lose(e)
                    memory = None
                if memory is not None:
                    try:
                        result = load_checkpoint(self, step, strict, cast, memory=memory, maps=snaps.mapping)
                    finally:
                        snaps.free_rebuilt()
                    return replace(result, rebuilt=snaps.rebuilt_ranks) if snaps.rebuilt_ranks else result
            if memory_only:
                why = snaps.lost or snaps.why_not or "none is held"
                raise NotInMemoryError(f"no snapshot in the agents' memory restores this job ({why}); the durable tier "
                                       "was not read")
            if is_object(self.root):
                return on_storage(load_checkpoint, self.root)(self, step, strict, cast)
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
        if self._snapshots is not None:
            self._snapshots.wait()

    def abandon(self) -> None:
        """Drop this Checkpointer after its job's process group broke (in-process recovery): no
        collective, no waiting for peers. The snapshot in flight is left to fail on its own (its
        thread is a daemon); its mappings of the agent's memory are released once it has. The
        snapshots already complete stay with the agent; later calls raise."""
        if not self._closed:
            self._release(abandon=True)

    def close(self) -> None:
        """Finish pending work (a collective with snapshots: every rank calls it), release the
        snapshots' process group and this rank's mappings of the agent's memory (the snapshots stay
        with the agent) and the writer lease on ``root``; later calls raise."""
        if not self._closed:
            try:
                self.wait()
            finally:
                self._release(abandon=False)

    def _release(self, abandon: bool) -> None:
        """Mark closed; leave the writer lease; close (or, after a broken process group, abandon)
        the memory tier's part."""
        self._closed = True
        if self._lease is not None:
            leases.leave(self._lease)
            self._lease = None
        if self._snapshots is not None:
            (self._snapshots.abandon if abandon else self._snapshots.close)()

    def _writer_lease(self) -> leases.Lease:
        """Rank 0's lease on ``root`` (shared by the Checkpointers of this process writing there),
        taken by the durable save (:func:`ucp.checkpoint.save.save_durable`)."""
        if self._lease is None:
            self._lease = leases.for_process(self.root)
        return self._lease

    def _check_open(self) -> None:
        if self._closed:
            raise UcpError("this Checkpointer is closed")

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
