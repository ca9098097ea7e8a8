"""Capture: flatten a training state into tensor keys with global boxes.

A *piece* is what one rank holds of one tensor key: its local data, the tensor's global metadata
(shape, dtype, pattern) and the box (plus optional flat range) it covers. Geometry comes from DTensor
placements automatically (tensor parallel, FSDP2); plain tensors take it from a layout plus
per-parameter patterns, or are replicated. The same pieces serve as *targets* on load: their data
tensors are views of the live model, filled in place.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from ucp.errors import CaptureError
from ucp.format import values
from ucp.format.box import Box, FlatRange
from ucp.format.dtypes import dtype_name
from ucp.format.keys import extra_key, model_key, optim_key
from ucp.format.layout import Layout
from ucp.format.manifest import TensorMeta
from ucp.format.pattern import REPLICATED, Pattern, Shard, local_box
from ucp.lang.apply import LiveSpec
from ucp.state.rng import capture_rng


@dataclass(frozen=True)
class Piece:
    """One rank's part of one tensor key. ``data`` is the local tensor (a view of live state)."""

    key: str
    data: torch.Tensor
    meta: TensorMeta
    box: Box
    flat: FlatRange | None = None

    @property
    def numel(self) -> int:
        return self.flat.numel if self.flat is not None else self.box.numel


@dataclass(frozen=True)
class Geometry:
    """Where plain (non-DTensor) tensors live and what they are called: a layout, this rank's
    coordinates, and glob -> pattern or a UCL spec (``Checkpointer(spec=...)``), which also gives
    tensors held by a local index (``expert()``, ``stage()``) their global names."""

    layout: Layout
    coords: dict
    patterns: tuple[tuple[str, Pattern], ...] = ()
    spec: LiveSpec | None = None

    def pattern_for(self, fqn: str) -> Pattern:
        """The spec's first matching rule, else the first matching pattern; tensors no pattern
        matches are replicated."""
        if self.spec is not None:
            return self.spec.place(fqn)[1]
        for glob, pattern in self.patterns:
            if fnmatch.fnmatchcase(fqn, glob):
                return pattern
        return REPLICATED

    def name(self, fqn: str) -> str:
        """The checkpoint's (global) name of this rank's tensor ``fqn``."""
        return self.spec.place(fqn)[0] if self.spec is not None else fqn


def _dtensor_pattern(mesh, placements: tuple, coord, where: str) -> tuple[Pattern, dict, dict]:
    """The pattern of a DTensor placed by ``placements`` on ``mesh``, the mesh's axis sizes and this
    rank's coordinates (``coord``) on it."""
    names = mesh.mesh_dim_names or tuple(f"mesh{i}" for i in range(mesh.ndim))
    sizes = dict(zip(names, mesh.shape))
    plain, strided = [], []
    for name, p in zip(names, placements):
        if p.is_partial():
            raise CaptureError(f"{where}: DTensor has a Partial placement on mesh dim {name!r}; reduce it before saving")
        if isinstance(p, _StridedShard):
            strided.append((Shard(name, p.dim), p.split_factor))
        elif p.is_shard():
            plain.append(Shard(name, p.dim))
    # A strided shard (FSDP2 over TP) splits *after* the plain shards of its dim: right to left.
    for s, factor in strided:
        later = 1
        for q in plain:
            if q.dim == s.dim and names.index(q.axis) > names.index(s.axis):
                later *= sizes[q.axis]
        if factor != later:
            raise CaptureError(f"{where}: placements {placements} (strided split factor {factor}) are not supported yet")
    if coord is None:
        raise CaptureError(f"{where}: this rank is not part of the tensor's device mesh")
    return Pattern(tuple(plain) + tuple(s for s, _ in strided)), sizes, dict(zip(names, coord))


@lru_cache(maxsize=8192)
def _dtensor_geometry(shape: tuple, mesh, placements: tuple, coordinate: tuple) -> tuple[Pattern, Box, tuple, tuple]:
    """The pattern and box of a DTensor of global ``shape`` on ``mesh`` (where this rank sits at
    ``coordinate``) under ``placements``, and torch's own local shape and global offset of it (what
    :func:`dtensor_piece` checks the box against): computed once per kind of tensor (some 100 us)
    rather than at every capture and load. Placements ucp cannot express raise :class:`CaptureError`
    (never cached) with ``"<key>"`` for the caller to fill in."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    pattern, sizes, coords = _dtensor_pattern(mesh, placements, coordinate, "<key>")
    local, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    return pattern, local_box(pattern, shape, sizes, coords), tuple(local), tuple(offset)


def dtensor_piece(key: str, t: DTensor) -> Piece:
    """A piece from a DTensor's placements; its box is checked against torch's own computation."""
    shape = tuple(t.shape)
    mesh = t.device_mesh
    coordinate = mesh.get_coordinate()
    try:
        pattern, box, want_shape, want_offset = _dtensor_geometry(shape, mesh, tuple(t.placements),
                                                                  None if coordinate is None else tuple(coordinate))
    except CaptureError as e:
        raise CaptureError(str(e).replace("<key>", key, 1)) from None
    # (the local tensor itself, without to_local()'s autograd node: a piece is read or written in place)
    local = t._local_tensor if isinstance(getattr(t, "_local_tensor", None), torch.Tensor) else t.to_local()
    if local.requires_grad:
        local = local.detach()
    if tuple(local.shape) != box.sizes or want_shape != box.sizes or (box.numel and want_offset != box.offsets):
        raise CaptureError(
            f"{key}: placements {t.placements} give local shape {want_shape} at {want_offset}, "
            f"ucp computed {box}; this sharding is not supported yet"
        )
    return Piece(key, local, TensorMeta(shape, dtype_name(t.dtype), pattern), box)


def detached(t: torch.Tensor) -> torch.Tensor:
    """``t`` without autograd history, for a piece: a DTensor as it is (:func:`dtensor_piece` takes
    its local tensor, detached; detaching the DTensor itself costs a dispatch of some 50 us)."""
    return t if isinstance(t, DTensor) else t.detach()


def plain_piece(key: str, fqn: str, t: torch.Tensor, geometry: Geometry | None) -> Piece:
    """A piece for a plain tensor: replicated, or sharded by the pattern its fqn matches."""
    pattern = geometry.pattern_for(fqn) if geometry else REPLICATED
    if pattern.flat is not None:
        raise CaptureError(f"{key}: a flat partition needs its owner to report its range (see ucp_flat_state)")
    if pattern.is_replicated:
        return Piece(key, t, TensorMeta(tuple(t.shape), dtype_name(t.dtype), pattern), Box.full(t.shape))
    shape = list(t.shape)
    for s in pattern.shards:
        if s.dim >= len(shape):
            raise CaptureError(f"{key}: pattern {pattern} shards dim {s.dim} of a tensor of shape {list(t.shape)}")
        shape[s.dim] *= geometry.layout.size(s.axis)
    pattern.validate(tuple(shape), geometry.layout.names, key)
    box = local_box(pattern, tuple(shape), geometry.layout.sizes, geometry.coords)
    if box.sizes != tuple(t.shape):
        raise CaptureError(f"{key}: local shape {list(t.shape)} does not match {box} of the global shape {shape} under {pattern}")
    return Piece(key, t, TensorMeta(tuple(shape), dtype_name(t.dtype), pattern), box)


def tensor_piece(key: str, fqn: str, t: torch.Tensor, geometry: Geometry | None) -> Piece:
    if isinstance(t, DTensor):
        return dtensor_piece(key, t)
    return plain_piece(key, fqn, t, geometry)


#: the non-tensor state entry holding the UCL spec a live save named its tensors with
SPEC_STATE = "spec"

#: module names that wrappers insert into parameter names: torch.compile, activation checkpointing, FSDP1
WRAPPER_NAMES = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def normalize_fqn(fqn: str) -> str:
    """``fqn`` without the module names wrappers insert (``_orig_mod.`` of torch.compile,
    ``_checkpoint_wrapped_module.`` of activation checkpointing, ...), so a checkpoint of a wrapped
    model loads into an unwrapped one and back."""
    if not any(w in fqn for w in WRAPPER_NAMES):
        return fqn
    return ".".join(part for part in fqn.split(".") if part not in WRAPPER_NAMES)


def model_pieces(model: torch.nn.Module, geometry: Geometry | None) -> tuple[list[Piece], dict[str, str], dict]:
    """Pieces of every parameter and persistent buffer (keyed by their global names, see
    :meth:`Geometry.name`), the aliases of tied tensors, and extra state.

    Returns:
        (pieces, aliases ``{fqn: fqn_it_is_tied_to}``, ``{key: value}`` of modules' extra state).
    """
    pieces, aliases, extra = [], {}, {}
    first_name: dict[int, str] = {}
    for fqn, value in model.state_dict(keep_vars=True).items():
        fqn = normalize_fqn(fqn)
        if not isinstance(value, torch.Tensor) or fqn.endswith("_extra_state"):
            extra[fqn] = value  # get_extra_state() may return a tensor (FP8 scales): state, not a parameter
            continue
        name = geometry.name(fqn) if geometry is not None else fqn
        if id(value) in first_name:
            aliases[name] = first_name[id(value)]
            continue
        first_name[id(value)] = name
        piece = tensor_piece(model_key(name), fqn, detached(value), geometry)
        if isinstance(value, DTensor) and geometry is not None and geometry.spec is not None:
            _check_dtensor_rule(geometry.spec, fqn, piece)
        pieces.append(piece)
    return pieces, aliases, extra


def _check_dtensor_rule(spec: LiveSpec, fqn: str, piece: Piece) -> None:
    """A DTensor's placements give its shards; a spec rule that shards it must say the same."""
    rule_shards = spec.place(fqn)[1].shards
    if rule_shards and rule_shards != piece.meta.pattern.shards:
        raise CaptureError(f"{piece.key}: the spec shards it as {Pattern(rule_shards)}, its DTensor placements as "
                           f"{Pattern(piece.meta.pattern.shards)}; remove shard() from its rule (placements say it)")


def param_names(model: torch.nn.Module, geometry: Geometry | None = None) -> dict[int, str]:
    """id(parameter) -> its global fqn (:meth:`Geometry.name`), tied parameters under their first name."""
    if geometry is None:
        return {id(p): normalize_fqn(n) for n, p in model.named_parameters()}
    return {id(p): geometry.name(normalize_fqn(n)) for n, p in model.named_parameters()}


def optimizer_param_fqns(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    """The fqn of every parameter of ``optimizer``, in its state-dict index order."""
    out = []
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) not in names:
                raise CaptureError(f"optimizer param group {g} holds a parameter of shape {list(p.shape)} that the model does not own")
            out.append(names[id(p)])
    return out


def state_piece(fqn: str, state: str, value: torch.Tensor, param_piece: Piece | None, geometry: Geometry | None) -> Piece:
    """A piece of optimizer state: shaped like its parameter -> the parameter's geometry; else its own."""
    key = optim_key(fqn, state)
    if isinstance(value, DTensor):
        return dtensor_piece(key, value)
    value = detached(value)
    if param_piece is not None and tuple(value.shape) == tuple(param_piece.data.shape):
        meta = replace(param_piece.meta, dtype=dtype_name(value.dtype))
        return Piece(key, value, meta, param_piece.box, param_piece.flat)
    return plain_piece(key, fqn + "/" + state, value, None)


def flat_state_pieces(optimizer, by_fqn: dict[str, Piece], geometry: Geometry | None = None) -> list[Piece]:
    """Pieces of state an optimizer keeps as flat partitions of its parameters (ZeRO-1 style).

    An optimizer opts in by defining ``ucp_flat_state()`` returning ``{fqn: {state: (tensor, start)}}``:
    this rank holds elements ``[start, start + tensor.numel())`` of the parameter's local box,
    flattened row-major (the tensor may be a view into a flat buffer; loads fill it in place), and
    ``ucp_flat_axis`` (default ``"dp"``), the mesh axis the partitions are spread over. Such state is
    left out of the optimizer's ``state_dict()`` by the optimizer itself.
    """
    if not hasattr(optimizer, "ucp_flat_state"):
        return []
    axis = getattr(optimizer, "ucp_flat_axis", "dp")
    pieces = []
    for fqn, states in optimizer.ucp_flat_state().items():
        fqn = normalize_fqn(fqn)
        fqn = geometry.name(fqn) if geometry is not None else fqn
        param = by_fqn.get(model_key(fqn))
        if param is None:
            raise CaptureError(f"optimizer reports flat state for {fqn!r}, which the model does not have")
        for name, (t, start) in states.items():
            key = optim_key(fqn, name)
            flat = FlatRange(start, t.numel())
            if not flat.fits(param.box):
                raise CaptureError(f"{key}: flat range {flat} exceeds the parameter's box {param.box} ({param.box.numel} elements)")
            meta = TensorMeta(param.meta.shape, dtype_name(t.dtype), replace(param.meta.pattern, flat=axis))
            pieces.append(Piece(key, t.detach().view(-1), meta, param.box, flat))
    return pieces


def optimizer_pieces(optimizer, fqns: list[str], by_fqn: dict[str, Piece], geometry: Geometry | None):
    """Pieces of per-parameter optimizer state plus its non-tensor values and param groups.

    Returns:
        (pieces, ``{fqn: {state: value}}`` of non-tensor state, param groups with ``params`` as fqns).
    """
    sd = optimizer.state_dict()
    pieces, scalars = flat_state_pieces(optimizer, by_fqn, geometry), {}
    for idx, states in sd["state"].items():
        fqn = fqns[idx]
        for name, value in states.items():
            if isinstance(value, torch.Tensor):
                pieces.append(state_piece(fqn, name, value, by_fqn.get(model_key(fqn)), geometry))
            else:
                scalars.setdefault(fqn, {})[name] = value
    groups = []
    for group in sd["param_groups"]:
        g = {k: v for k, v in group.items() if k != "params"}
        g["params"] = [fqns[i] for i in group["params"]]
        groups.append(g)
    return pieces, scalars, groups


def capture_state(model, optimizer, scheduler, stateful: dict, extras: dict | None, geometry: Geometry,
                  rng: bool) -> tuple[list[Piece], dict]:
    """This rank's pieces and its non-tensor state (typed JSON, one entry per component): the
    model's parameters and buffers, the optimizer's state keyed by parameter fqn, the scheduler,
    other ``stateful`` objects, user ``extras`` (tensors become ``extra/<name>`` pieces) and,
    with ``rng``, the RNG states. What a durable save and a snapshot both take."""
    pieces: list[Piece] = []
    state: dict = {}
    if model is not None:
        mp, aliases, extra_state = model_pieces(model, geometry)
        pieces += mp
        state["model"] = values.encode({"aliases": aliases, "extra_state": extra_state}, "model")
        if optimizer is not None:
            fqns = optimizer_param_fqns(optimizer, param_names(model, geometry))
            op, scalars, groups = optimizer_pieces(optimizer, fqns, {p.key: p for p in mp}, geometry)
            pieces += op
            state["optimizer"] = values.encode({"scalars": scalars, "param_groups": groups}, "optimizer")
    if scheduler is not None:
        state["scheduler"] = values.encode(scheduler.state_dict(), "scheduler")
    for name, obj in stateful.items():
        state[f"state.{name}"] = values.encode(obj.state_dict(), f"state[{name!r}]")
    plain_extras = {}
    for name, value in (extras or {}).items():
        if isinstance(value, torch.Tensor):
            pieces.append(tensor_piece(extra_key(name), name, detached(value), None))
        else:
            plain_extras[name] = value
    state["extras"] = values.encode(plain_extras, "extras")
    if geometry is not None and geometry.spec is not None:
        state[SPEC_STATE] = geometry.spec.text  # (what a load checks its own expert()/stage() rules against)
    if rng:
        state["rng"] = values.encode(capture_rng(), "rng")
    return pieces, state


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
