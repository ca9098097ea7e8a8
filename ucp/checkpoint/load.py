"""Loading a checkpoint into the live model, optimizer and state.

Phases: *find* (rank 0 picks the checkpoint, every rank uses that one), *manifest* (read and
validate), *targets* (build the destination pieces and resolve each to the checkpoint tensors that
fill it: everything refusable is refused here, before any read), *read* (the readers of
:mod:`ucp.checkpoint.readers` fill the pieces, every checksum verified), *restore* (optimizer, scheduler,
stateful objects, RNG). The source is a distributed checkpoint, a universal one (``ucp convert``)
or an in-memory snapshot, saved under any layout. Model tensors are filled in place; optimizer
state is filled into its existing tensors when they fit, else into new ones handed to
``optimizer.load_state_dict``.
"""

from __future__ import annotations

import operator
import re
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import torch

from ucp.checkpoint.readers import FragmentReader, UniversalReader, UniversalSource
from ucp.checkpoint.results import LoadResult
from ucp.errors import CheckpointDeletedError, CheckpointNotFoundError, LoadError, few
from ucp.format import values
from ucp.format.box import Box
from ucp.format.fragment import RegionQuery
from ucp.format.keys import EXTRA, MODEL, OPTIM, extra_key, optim_key, parse_key
from ucp.format.manifest import TensorMeta
from ucp.format.universal import universal_shape
from ucp.format.values import rank_state
from ucp.lang.apply import recorded_mapping
from ucp.plan.load_plan import FragmentIndex, ReadItem
from ucp.plan.reshard import check_target, load_regions
from ucp.plan.sources import Resolution, SourceIndex
from ucp.snapshot.index import SnapshotManifest
from ucp.snapshot.memory import cpu_threads
from ucp.state import pages
from ucp.state.capture import SPEC_STATE, Piece, model_pieces, normalize_fqn
from ucp.state.optimizer import merged_optimizer_state, optimizer_targets, restore_optimizer
from ucp.state.rng import restore_rng
from ucp.state.tensors import torch_dtype
from ucp.storage import directory as store
from ucp.storage.fragment_files import FragmentFiles
from ucp.storage.manifest_io import StoredManifest, manifest_bytes, open_manifest
from ucp.storage.object_reads import GETS
from ucp.storage.objstore import is_object
from ucp.storage.universal_io import is_universal, read_header


def _cast_target(p: Piece, res: Resolution, sources: SourceIndex, casts: list) -> tuple[Piece, Resolution]:
    """What to read instead when ``p``'s dtype differs from the checkpoint's: the parameter's fp32
    master if the checkpoint has one of the wanted dtype (exact), else a temporary of the stored
    dtype that is converted into ``p`` after the read (recorded in ``casts``)."""
    kind, fqn, _ = parse_key(p.key)
    if kind == MODEL:
        shape = universal_shape(p.meta.shape, p.meta.pattern)
        master = sources.resolve(optim_key(fqn, "master"), shape, p.meta.pattern, p.meta.dtype)
        if master is not None and master.dtype == p.meta.dtype and master.rule != "master" and \
                all(s.dim is not None or sources.shape(s.key) == shape for s in master.slices):
            return p, master
    temp = pages.empty(p.data.shape, torch_dtype(res.dtype), p.data.device)
    casts.append((temp, p.data))
    return replace(p, data=temp, meta=TensorMeta(p.meta.shape, res.dtype, p.meta.pattern)), res


def _renamed_params(plans) -> dict[str, tuple[str, ...]]:
    """fqn of each parameter loaded under other names -> the checkpoint's fqns it came from."""
    out = {}
    for p, res in plans:
        kind = parse_key(p.key)
        if kind.kind == MODEL and res.rule in ("part", "fused"):
            out[kind.name] = tuple(dict.fromkeys(parse_key(k).name for k in res.keys))
    return out


def _taken(res: Resolution) -> set:
    """What a resolution takes of the checkpoint: whole keys, or ``(key, dim, lo, n)`` slices."""
    return {s.key if s.dim is None else (s.key, s.dim, s.lo, s.n) for s in res.slices}


def _untaken(tensors: dict, taken: set, sources: SourceIndex) -> list[str]:
    """Checkpoint keys nothing takes whole: not taken as a key, nor covered by the slices taken of it
    (a fused tensor whose parts are all loaded is taken; one missing a part is not)."""
    spans: dict[str, list] = {}
    for t in taken:
        if isinstance(t, tuple):
            spans.setdefault(t[0], []).append(t[1:])
    out = []
    for key in tensors:
        if key in taken:
            continue
        pieces = sorted(set(spans.get(key, ())), key=lambda d: d[1])
        size = sources.shape(key)[pieces[0][0]] if pieces else None
        at = 0
        for _, lo, n in pieces:
            if lo <= at:
                at = max(at, lo + n)
        if size is None or at < size:
            out.append(key)
    return out


def _resolve_targets(pieces: list[Piece], sources: SourceIndex, layout, where: Path, cast: bool):
    """For each piece the checkpoint tensors that fill it (:mod:`ucp.plan.sources`), after checking
    that ``layout`` can hold it and the shape and dtype checks; returns ``(plans, missing keys, checkpoint keys taken, casts)``."""
    plans, missing, taken, casts = [], [], set(), []
    for p in pieces:
        check_target(p.key, p.meta.shape, p.meta.pattern, layout)
        shape = universal_shape(p.meta.shape, p.meta.pattern)
        res = sources.resolve(p.key, shape, p.meta.pattern, p.meta.dtype)
        if res is None:
            missing.append(p.key)
            continue
        # compared without padding: a layout may pad a dim (vocabulary) to a multiple of its tp
        if res.rule == "same" and sources.shape(p.key) != shape:
            raise LoadError(f"{where}: {p.key} has shape {list(sources.shape(p.key))} in the checkpoint, "
                            f"{list(shape)} here")
        taken.update(_taken(res))
        if res.dtype != p.meta.dtype:
            if not cast:
                raise LoadError(f"{where}: {p.key} is {res.dtype} in the checkpoint, {p.meta.dtype} here; "
                                "ucp does not cast silently: pass cast=True to convert")
            p, res = _cast_target(p, res, sources, casts)
        taken.update(_taken(res))
        plans.append((p, res))
    return plans, missing, taken, casts


def _regions(plans, manifest, layout) -> dict:
    """Checkpoint key -> the boxes of it (stored index space) the targets ``plans`` read."""
    out: dict = {}
    for p, res in plans:
        if p.numel:
            for key, boxes in load_regions(p.box, p.flat, p.meta.shape, p.meta.pattern, layout, res.slices,
                                           manifest.tensors, manifest.layout).items():
                out.setdefault(key, []).extend(boxes)
    return out


def _restore_extra_state(model, extra_state: dict) -> None:
    modules = {normalize_fqn(name): m for name, m in model.named_modules()}
    for key, value in extra_state.items():
        prefix = normalize_fqn(key.removesuffix("_extra_state").rstrip("."))
        if prefix not in modules:
            raise LoadError(f"the checkpoint holds extra state of module {prefix!r}, which this model lacks")
        modules[prefix].set_extra_state(value)


def _piece_bytes(piece: Piece) -> int:
    """The bytes a load writes into ``piece``."""
    return piece.numel * piece.data.element_size()


def _check_mapping(ckpt, manifest, path: Path) -> None:
    """The checkpoint's ``expert()`` / ``stage()`` rules (recorded by a live save with ``spec=``) must be
    this Checkpointer's: other rules would put tensors under other global indices, whatever ``strict``."""
    shared = manifest.shared_state() if hasattr(manifest, "shared_state") else manifest.state.get("shared", {})
    theirs = recorded_mapping(shared.get(SPEC_STATE))
    mine = ckpt.geometry.spec.mapping() if ckpt.geometry.spec is not None else ()
    if theirs and theirs != mine:
        def show(mapping):
            return "; ".join(f"{', '.join(g)}: {kind}({'experts' if kind == 'expert' else 'layers'}={n}"
                             f"{', placement=strided' if s else ''})" for g, kind, n, s in mapping) or "none"
        raise LoadError(f"{path}: the checkpoint names tensors by the expert()/stage() rules [{show(theirs)}], this "
                        f"Checkpointer by [{show(mine)}]: tensors would land under the wrong global indices (strict=False "
                        "does not change that); load it with a model of the same number of experts/layers and a spec= "
                        "with those rules (docs/ucl.md)")


_INDEX = re.compile(r"(?<=[./])[0-9]+(?=\.)")


def _family(key: str) -> str:
    """``key`` with its numbered components (``experts.3.``, ``layers.12.``) as ``#``."""
    return _INDEX.sub("#", key)


def _check_local_indices(unexpected: list[str], taken: set, world_size: int, path: Path) -> None:
    """Refuse, whatever ``strict``, a job of several ranks that takes some numbered tensors of a family
    and leaves others (``experts.0-3`` taken, ``experts.4-7`` not): its ranks hold them by a local
    index, so loading what matches would give ranks the wrong experts or layers. (Called only for a
    layout with expert or pipeline parallelism, where ranks may hold tensors by a local index: a
    smaller model loaded with ``strict=False`` under data or tensor parallelism is not refused.)"""
    if world_size < 2 or not unexpected:
        return
    families = {_family(t if isinstance(t, str) else t[0]) for t in taken}
    left = [k for k in unexpected if parse_key(k).kind == MODEL and _INDEX.search(k)
            and _family(k) in families]
    if left:
        raise LoadError(f"{path}: this job's ranks take some numbered tensors and leave their siblings ({few(left)}): "
                        "ranks holding experts or layers by a local index would get the wrong ones, so this is refused "
                        "even with strict=False; give Checkpointer(spec=...) with expert()/stage() rules (docs/ucl.md) "
                        "so that each rank's tensors take their global names")


#: how many times a load of the newest checkpoint starts over when retention prunes the one it reads
RETRIES = 3
#: a read of fewer bytes than this runs on the loading thread: handing it to a helper thread costs
#: more than its copy (a resharded load from memory of a small model is hundreds of such reads)
INLINE_READ_BYTES = 1 << 20


def load_checkpoint(ckpt, step: int | None, strict: bool, cast: bool = False, memory=None, maps=None):
    """Implementation of :meth:`ucp.Checkpointer.load`; ``memory`` is ``(directory, manifest)`` of an
    in-memory snapshot (its fragments in the agent's segments) to load instead of searching storage,
    and ``maps(name)`` the mapping of such a segment to copy from (else the segments are read).

    A checkpoint deleted while being read (retention after another job's save: its manifest goes
    first, docs/format-checkpoint.md rules 3 and 16a) is not corruption: a load of the newest checkpoint
    finds the newest again and starts over (:data:`RETRIES` times at most); a load of ``step``
    raises :class:`~ucp.errors.CheckpointDeletedError` naming it. Every rank gets the same error
    from a phase, so all of them start over together.
    """
    t0 = time.perf_counter()
    coll = ckpt.coll
    if memory is not None:
        return _said(ckpt, _load(ckpt, coll, t0, Path(memory[0]), memory[1], False, strict, cast, "memory", maps))
    for attempt in range(RETRIES + 1):
        try:
            return _said(ckpt, _load_stored(ckpt, coll, t0, step, strict, cast))
        except CheckpointDeletedError as e:
            if step is not None:
                raise CheckpointDeletedError(f"{ckpt.root}: the checkpoint of step {step} was deleted (by retention?) "
                                             f"while being read; load another step ({e})") from e
            if attempt == RETRIES:
                raise


def _said(ckpt, result: LoadResult | None) -> LoadResult | None:
    """``result``, warning (at the caller of ``Checkpointer.load``) when it left an optimizer unrestored."""
    if result is not None and ckpt.optimizer is not None and not result.optimizer_restored:
        warnings.warn(f"ucp: {result.path} holds weights only (no optimizer state): the optimizer's state is not "
                      "restored (a new optimizer stays fresh)", RuntimeWarning, stacklevel=4)
    return result


def _load_stored(ckpt, coll, t0: float, step: int | None, strict: bool, cast: bool):
    """A load from storage: the phases *find* and *manifest*, then :func:`_load`. Rank 0 alone finds
    the checkpoint and reads what every rank needs alike (whether it is universal, the manifest's
    header), sent to all in the phase's answer: at 16,384 ranks, one request for a shared object,
    not one per rank (an object store throttles requests on one key)."""

    def find():
        if coll.rank != 0:
            return None
        if is_universal(ckpt.root):
            if step is not None and step != read_header(ckpt.root).step:
                raise CheckpointNotFoundError(f"{ckpt.root}: a universal checkpoint of step "
                                              f"{read_header(ckpt.root).step}, not {step}")
            return ckpt.root, True, None
        try:
            path = store.resolve(ckpt.root, step)
        except CheckpointNotFoundError:
            if step is None and not store.list_steps(ckpt.root):
                return None
            raise
        universal = is_universal(path)
        return path, universal, None if universal else manifest_bytes(path)

    _, found = coll.gather_phase("find", find, lambda found: found[0])
    if found is None:
        return None
    path, universal, header = found
    result: dict = {}

    def read_source():
        if universal:
            return UniversalSource(path, read_header(path))
        return open_manifest(path, header)  # (the header; each rank reads the rows it needs in phase "targets")

    coll.gather_phase("manifest", lambda: result.update(manifest=read_source()))
    return _load(ckpt, coll, t0, path, result["manifest"], universal, strict, cast,
                 "universal" if universal else "durable")


def _load(ckpt, coll, t0: float, path: Path, manifest, universal: bool, strict: bool, cast: bool, source: str,
          maps=None):
    """The phases after the manifest: targets, read, restore. ``manifest`` is a
    :class:`~ucp.storage.manifest_io.StoredManifest` (a checkpoint on storage: each rank reads the
    rows it needs), a :class:`~ucp.format.manifest.Manifest` (a snapshot in memory, its segments
    mapped by ``maps``) or a universal checkpoint's :class:`~ucp.checkpoint.readers.UniversalSource`."""
    result: dict = {}
    stored = manifest

    def targets():
        pieces: list[Piece] = []
        model_by_key: dict[str, Piece] = {}
        sources = SourceIndex(manifest.tensors)
        _check_mapping(ckpt, manifest, path)
        if ckpt.model is not None:
            mp, _, _ = model_pieces(ckpt.model, ckpt.geometry)
            model_by_key = {p.key: p for p in mp}
            pieces += mp
        fqns, opt_state = [], {}
        if ckpt.optimizer is not None:
            fqns, op, opt_state = optimizer_targets(ckpt.optimizer, ckpt.model, sources, model_by_key, ckpt.geometry)
            pieces += op
        extras = {}
        extra_keys = {key: None for key in manifest.tensors if parse_key(key).kind == EXTRA}
        if extra_keys and isinstance(manifest, StoredManifest):  # their files' sizes back their shapes
            FragmentFiles(path, manifest=manifest.select(RegionQuery(extra_keys))).check_sizes()
        for key, meta in manifest.tensors.items():
            if parse_key(key).kind == EXTRA:
                extras[parse_key(key).name] = t = pages.empty(meta.shape, torch_dtype(meta.dtype))
                pieces.append(Piece(extra_key(parse_key(key).name), t, meta, Box.full(meta.shape)))
        plans, missing, taken, casts = _resolve_targets(pieces, sources, ckpt.geometry.layout, path, cast)
        result.update(plans=plans, missing=missing, casts=casts, fqns=fqns, opt_state=opt_state, extras=extras,
                      optimizer_restored=ckpt.optimizer is not None and _holds_optimizer(manifest))
        if isinstance(manifest, StoredManifest):  # the fragments this rank reads, and only those
            query = RegionQuery(_regions(plans, manifest, ckpt.geometry.layout))
            result["manifest"] = manifest.select(query)
            # every file this rank reads there with its recorded size, before a declared shape drives an allocation
            result["sizes"] = FragmentFiles(path, manifest=result["manifest"]).check_sizes()
        elif isinstance(manifest, SnapshotManifest):  # asked of the index's owners next, on every rank together
            result["query"] = RegionQuery(_regions(plans, manifest, ckpt.geometry.layout))
        # a flat-partitioned optimizer vouches for all of its partitions
        flat_owner = ckpt.optimizer is not None and hasattr(ckpt.optimizer, "ucp_flat_state")
        return taken | {k for k, m in manifest.tensors.items() if flat_owner and m.pattern.flat}

    def untaken(taken):  # rank 0: checkpoint tensors no rank takes (``taken``: what every rank takes, folded)
        out = sorted(k for k in _untaken(manifest.tensors, taken, SourceIndex(manifest.tensors))
                     if parse_key(k).kind == MODEL or (parse_key(k).kind == OPTIM and ckpt.optimizer is not None))
        layout = ckpt.geometry.layout
        if (ckpt.geometry.spec is None or not ckpt.geometry.spec.mapping()) and layout is not None \
                and any(layout.size(axis) > 1 for axis in ("ep", "pp")):
            _check_local_indices(out, taken, coll.world_size, path)
        return out

    # Strictness is judged for the job: a key is unexpected only if no rank takes it (pipeline stages
    # and flat partitions spread the keys over ranks; what they take is folded up a tree to rank 0), missing
    # if this rank wants it.
    _, unexpected = coll.reduce_phase("targets", targets, operator.or_, untaken)
    if isinstance(manifest, SnapshotManifest):
        result["manifest"] = manifest.select(coll, result["query"])

    def read():
        missing = sorted(result["missing"])
        manifest = result.get("manifest", stored)
        if strict and (missing or unexpected):
            raise LoadError(
                f"{path}: checkpoint and model do not match: missing {few(missing)}, unexpected {few(unexpected)}; "
                "if the names differ only by a rank's local index (experts, pipeline layers), give Checkpointer(spec=...) "
                "with expert()/stage() rules (docs/ucl.md); if the model really lacks or adds these tensors, "
                "strict=False loads the ones both have"
            )
        target_layout = ckpt.geometry.layout
        plans = [(p, res) for p, res in result["plans"] if p.numel]
        threads = ckpt.options.io_threads
        together = []  # exact reads from memory (one pass over them all, on this thread and helpers) or from an
        # object store (ranged GETs each fetching many): read_all
        remote = is_object(path)  # (a read there waits on round trips, not on the CPU: threads * GETS at once,
        # none inline on this thread)
        with ThreadPoolExecutor(threads * GETS if remote else threads) as pool:
            if universal:
                reader = UniversalReader(manifest)
                jobs = [(reader.read, (p, res, target_layout), _piece_bytes(p)) for p, res in plans]
            else:  # (a read from memory splits its copy over the pool's threads too)
                index = FragmentIndex(manifest.fragments)
                reader = FragmentReader(path, manifest if source == "durable" else None, maps=maps, pool=pool,
                                        helpers=cpu_threads(threads) - 1, block_bytes=manifest.block_bytes,
                                        gets=threads * GETS, sizes=result.get("sizes"))
                if not remote:  # (GPUs' staging buffers, made on this thread: after what its streams queued)
                    try:
                        reader.stage_to(p.data.device for p, _ in plans)
                    except BaseException:
                        reader.close()
                        raise
                jobs, resharded = [], []
                for p, res in plans:
                    only = res.slices[0]
                    exact = index.exact(only.key, p.box, p.flat) if len(res.slices) == 1 and only.dim is None else None
                    if exact is not None and reader.batches(ReadItem(exact), p.data):
                        together.append((ReadItem(exact), p.data))
                    elif exact is not None:  # the same layout: straight into the destination
                        jobs.append((reader.read, (ReadItem(exact), p.data), _piece_bytes(p)))
                    elif remote:  # (fetched together, below)
                        resharded.append((p, res.slices))
                    else:
                        jobs.append((reader.read_resharded, (p, res.slices, index, manifest, target_layout),
                                     _piece_bytes(p)))
                if resharded:
                    jobs.append((reader.read_resharded_all, (resharded, index, manifest, target_layout),
                                 sum(_piece_bytes(p) for p, _ in resharded)))
            inline = 0 if remote else INLINE_READ_BYTES
            small = [(fn, a) for fn, a, n in jobs if n < inline]
            futures = [pool.submit(fn, *a) for fn, a, n in jobs if n >= inline]
            try:
                if together:
                    reader.read_all(together)
                for fn, a in small:
                    fn(*a)
                for f in futures:
                    f.result()
            finally:
                wait(futures)  # (every read has stopped before the files close)
                reader.close()
        with torch.no_grad():
            for temp, dest in result["casts"]:
                dest.copy_(temp)
        result.update(missing=missing, unexpected=unexpected, nbytes=reader.nbytes)

    coll.gather_phase("read", read)

    def restore():
        spread = isinstance(manifest, (StoredManifest, SnapshotManifest))  # (its rank states read on demand)
        own = manifest.rank_state(coll.rank) if spread else rank_state(manifest.state, coll.rank)
        state = {k: values.decode(v, k) for k, v in own.items()}
        if universal and manifest.layout.world_size != coll.world_size:
            # Per-rank RNG streams belong to the ranks that saved them: with another number of ranks
            # there is no rank to give them to, so each rank keeps its own (docs/format-universal.md).
            state.pop("rng", None)
        if ckpt.model is not None and "model" in state:
            _restore_extra_state(ckpt.model, state["model"].get("extra_state", {}))
        if result["optimizer_restored"]:
            saved = state.get("optimizer", {})
            if manifest.layout != ckpt.geometry.layout:  # parameters moved between ranks: every rank's groups
                saved = merged_optimizer_state(manifest.states_of("optimizer") if spread else manifest.state, path)
            restore_optimizer(ckpt.optimizer, result["fqns"], result["opt_state"], saved, path, strict,
                              _renamed_params(result["plans"]))
        if ckpt.scheduler is not None:
            if "scheduler" not in state:
                raise LoadError(f"{path}: the checkpoint holds no scheduler state")
            ckpt.scheduler.load_state_dict(state["scheduler"])
        for name, obj in ckpt.state.items():
            if f"state.{name}" not in state:
                raise LoadError(f"{path}: the checkpoint holds no state named {name!r}")
            obj.load_state_dict(state[f"state.{name}"])
        if ckpt.options.rng and "rng" in state:
            restore_rng(state["rng"])
        return state.get("extras", {})

    coll.gather_phase("restore", lambda: result.update(restored=restore()))
    extras = {**result["restored"], **result["extras"]}
    return LoadResult(manifest.step, source, path, extras, tuple(result["missing"]),
                      tuple(result["unexpected"]), result["nbytes"], time.perf_counter() - t0,
                      optimizer_restored=result["optimizer_restored"])


def _holds_optimizer(manifest) -> bool:
    """Whether a checkpoint holds optimizer state: optimizer tensors, or the optimizer's param groups
    saved by some rank. One without either (Hugging Face weights, a save of the model alone) is
    *weights only*: a load does not match the optimizer's param groups and state against nothing,
    but leaves them as they are (state the checkpoint's weights fill, fp32 masters of parameters
    held in another dtype, is filled all the same)."""
    if any(parse_key(key).kind == OPTIM for key in manifest.tensors):
        return True
    spread = isinstance(manifest, (StoredManifest, SnapshotManifest))  # (its rank states read on demand)
    state = manifest.states_of("optimizer") if spread else manifest.state
    return "optimizer" in state.get("shared", {}) or any("optimizer" in r for r in state.get("ranks", {}).values())

