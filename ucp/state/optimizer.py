"""Loading optimizer state: which tensors a rank's optimizer receives, and how the rest of its state
(step counts, param groups) is restored, also across optimizer classes.

Optimizers keep Adam's step count in one of two places: per parameter (``torch.optim.AdamW``:
``state[p]["step"]``, a 0-d tensor, saved as the tensor key ``optim/<fqn>/step``) or per param group
(an optimizer whose groups carry a ``"step"`` entry, like the flat ZeRO-1 optimizer of
:mod:`ucp.trainer.zero1`). Loading translates between the two: a per-group step becomes every
parameter's step, and per-parameter steps become their group's step when the group's parameters
agree (they differ only if parameters joined training at different times; that is refused).

Optimizer state is filled into the optimizer's existing tensors when they fit, else into new
tensors sharded like their parameter, handed to ``optimizer.load_state_dict``. fp32 master weights
(``master``) are given only to parameters stored in another dtype: an fp32 parameter is its own master.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ucp.errors import LoadError, few
from ucp.format import values
from ucp.format.box import Box
from ucp.format.dtypes import dtype_name
from ucp.format.keys import MODEL, optim_key, parse_key
from ucp.format.manifest import TensorMeta
from ucp.format.pattern import Pattern
from ucp.format.universal import universal_shape
from ucp.lang.names import part_name
from ucp.plan.sources import SourceIndex
from ucp.state.capture import Piece, detached, flat_state_pieces, optimizer_param_fqns, param_names, tensor_piece
from ucp.state import pages
from ucp.state.tensors import torch_dtype

STEP = "step"


def _new_like(key: str, meta: TensorMeta, param_piece: Piece | None, param) -> tuple[object, Piece]:
    """A fresh destination for optimizer state ``key``: sharded like its parameter when shaped like it."""
    dtype = torch_dtype(meta.dtype)
    if param_piece is not None and tuple(meta.shape) == tuple(param_piece.meta.shape):
        if isinstance(param, DTensor):
            local = pages.empty(param.to_local().shape, dtype, param.device)
            value = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                       shape=param.shape, stride=param.stride())
            return value, tensor_piece(key, "", value, None)
        local = pages.empty(param_piece.data.shape, dtype, param_piece.data.device)
        return local, Piece(key, local, TensorMeta(meta.shape, meta.dtype, param_piece.meta.pattern),
                            param_piece.box, param_piece.flat)
    value = pages.empty(meta.shape, dtype)
    return value, Piece(key, value, meta, Box.full(meta.shape))


def optimizer_targets(optimizer, model, sources: SourceIndex, model_by_key: dict[str, Piece], geometry=None):
    """Destination pieces for the optimizer's state, and the index-keyed state they will form; ``geometry``
    (a :class:`~ucp.state.capture.Geometry`) names parameters as the checkpoint does.

    Returns:
        ``(fqns, pieces, state)``: the fqn of every optimizer parameter in index order, the pieces
        to read, and ``{index: {state: tensor}}`` for ``optimizer.load_state_dict``.
    """
    fqns = optimizer_param_fqns(optimizer, param_names(model, geometry))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    pieces = flat_state_pieces(optimizer, model_by_key, geometry)  # filled in place, outside state_dict()
    # States a flat-partitioned optimizer keeps in its flat buffers, for its parameters here and
    # (partitions of other ranks) elsewhere: never per-parameter state.
    flat_states = {parse_key(p.key).state for p in pieces}
    flat_owner = hasattr(optimizer, "ucp_flat_state")
    state = {}
    for idx, (fqn, param) in enumerate(zip(fqns, params)):
        existing = optimizer.state.get(param, {})
        param_piece = model_by_key.get(f"{MODEL}/{fqn}")
        names = sources.states(fqn, param_piece.meta.pattern if param_piece is not None else None)
        names += [n for n, v in existing.items() if isinstance(v, torch.Tensor) and n not in names]
        for name in names:
            key = optim_key(fqn, name)
            if flat_owner and (name in flat_states or (key in sources.tensors and sources.tensors[key].pattern.flat)):
                continue  # this rank's partitions are among the flat pieces; the others are other ranks'
            cur = existing.get(name)
            # a master is fp32 (or the dtype of the one the optimizer holds): a model tensor of
            # another dtype is no master (rule 4 of ucp.plan.sources)
            want = (dtype_name(cur.dtype) if isinstance(cur, torch.Tensor) else "float32") \
                if name == "master" else None
            meta = _target_meta(sources, key, param_piece, want)
            if name == "master" and cur is None and param_piece is not None and meta is not None \
                    and param_piece.meta.dtype == meta.dtype:
                continue  # the parameter has the master's dtype: it is its own master
            if meta is None:
                if isinstance(cur, torch.Tensor):  # the optimizer has it, the checkpoint does not: missing
                    pieces.append(_existing_piece(key, fqn, cur, param_piece))
                    state.setdefault(idx, {})[name] = cur
                    continue
                scalars = _part_scalars(sources, fqn, name, param_piece)
                if scalars is not None:  # e.g. the parts' step counts of a fused parameter
                    pieces += scalars.pieces
                    state.setdefault(idx, {})[name] = scalars
                continue
            if isinstance(cur, torch.Tensor) and tuple(cur.shape) == tuple(meta.shape) and cur.dtype == torch_dtype(meta.dtype):
                value = cur
                if isinstance(cur, DTensor):
                    piece = tensor_piece(key, fqn, detached(cur), None)
                elif param_piece is not None and tuple(meta.shape) == tuple(param_piece.meta.shape):
                    piece = Piece(key, cur.detach(), meta, param_piece.box, param_piece.flat)
                else:
                    piece = Piece(key, cur.detach(), meta, Box.full(meta.shape))
            else:
                value, piece = _new_like(key, meta, param_piece, param)
            pieces.append(piece)
            state.setdefault(idx, {})[name] = value
    return fqns, pieces, state


class PartScalars:
    """0-d state a fused parameter takes from its parts (their step counts): one value when they agree."""

    def __init__(self, pieces: list[Piece]):
        self.pieces = pieces

    def value(self, where: str) -> torch.Tensor:
        first = self.pieces[0].data
        if any(not torch.equal(p.data, first) for p in self.pieces[1:]):
            raise LoadError(f"{where}: the parts {', '.join(p.key for p in self.pieces)} hold different values "
                            f"({', '.join(str(p.data.item()) for p in self.pieces)}); a fused parameter needs one")
        return first


def _part_scalars(sources: SourceIndex, fqn: str, name: str, param_piece: Piece | None) -> PartScalars | None:
    """Destinations for the 0-d state ``name`` of each part of fused parameter ``fqn``, if every part has it."""
    fused = param_piece.meta.pattern.fused if param_piece is not None else None
    if fused is None:
        return None
    pieces = []
    for part, _ in fused.parts:
        key = optim_key(part_name(fqn, part), name)
        meta = sources.tensors.get(key)
        if meta is None or tuple(meta.shape) != ():
            return None
        value = torch.empty((), dtype=torch_dtype(meta.dtype))
        pieces.append(Piece(key, value, TensorMeta((), meta.dtype, Pattern()), Box.full(())))
    return PartScalars(pieces)


def _existing_piece(key: str, fqn: str, cur: torch.Tensor, param_piece: Piece | None) -> Piece:
    """A piece for state the optimizer holds and the checkpoint lacks (reported missing; with
    ``strict=False`` it keeps its value)."""
    if isinstance(cur, DTensor):
        return tensor_piece(key, fqn, detached(cur), None)
    dtype = dtype_name(cur.dtype)
    if param_piece is not None and tuple(cur.shape) == tuple(param_piece.data.shape):
        pm = param_piece.meta
        return Piece(key, cur.detach(), TensorMeta(pm.shape, dtype, pm.pattern), param_piece.box, param_piece.flat)
    return Piece(key, cur.detach(), TensorMeta(tuple(cur.shape), dtype, Pattern()), Box.full(tuple(cur.shape)))


def _target_meta(sources: SourceIndex, key: str, param_piece: Piece | None, dtype: str | None = None) -> TensorMeta | None:
    """The shape and dtype state ``key`` has here: its parameter's (stored) shape when the checkpoint's
    state is shaped like the parameter, else the checkpoint's own; None when nothing fills it.
    ``dtype`` is the state's own dtype when it must be that one (a master)."""
    if param_piece is not None:
        pm = param_piece.meta
        shape = universal_shape(pm.shape, pm.pattern)
        res = sources.resolve(key, shape, pm.pattern, dtype)
        if res is not None and (res.rule != "same" or sources.shape(key) == shape):
            return TensorMeta(pm.shape, res.dtype, pm.pattern)
        scalar = sources.resolve(key, (), None, dtype)  # 0-d state, e.g. a fused parameter's step for a part
        if scalar is not None and scalar.rule == "part":
            return TensorMeta((), scalar.dtype, Pattern())
    if key in sources.tensors:
        m = sources.tensors[key]
        return TensorMeta(universal_shape(m.shape, m.pattern), m.dtype, type(m.pattern)())
    return None


def restore_optimizer(optimizer, fqns: list[str], tensor_state: dict, saved: dict, where: Path, strict: bool,
                      names: dict[str, tuple[str, ...]] | None = None) -> None:
    """Load state keyed by the *current* parameter indices, so group order and membership map by fqn.

    ``names`` maps a parameter's fqn to the checkpoint's fqns it was loaded from, where they differ
    (a split ``q`` from a fused ``qkv``, a fused ``qkv`` from its parts).

    Hyperparameters come from the checkpoint's groups over the optimizer's own (keys only the
    optimizer has keep its values); the step count is translated between per-parameter and
    per-group forms (module docstring). With ``strict=False`` parameters the checkpoint lacks
    start fresh, and param groups that cannot be matched keep their current hyperparameters.
    """
    scalars = saved.get("scalars", {})
    index = {fqn: i for i, fqn in enumerate(fqns)}
    state = {i: {n: (v.value(f"{where}: {n} of {fqns[i]}") if isinstance(v, PartScalars) else v) for n, v in named.items()}
             for i, named in tensor_state.items()}
    for fqn, i in index.items():
        # a parameter loaded under other names takes their non-tensor state (the first that has some)
        named = scalars.get(fqn) or next((scalars[n] for n in (names or {}).get(fqn, ()) if n in scalars), None)
        if named:
            state.setdefault(i, {}).update(named)
    current = optimizer.state_dict()["param_groups"]
    groups = saved.get("param_groups", [])
    if len(groups) != len(current):
        if strict:
            raise LoadError(f"{where}: the checkpoint's optimizer has {len(groups)} param group(s), this one has {len(current)}")
        groups = [None] * len(current)
    new_groups = []
    for g, (old, cur) in enumerate(zip(groups, current)):
        members = list(cur["params"])
        if old is None:
            new = dict(cur)
        else:
            mine = {n for i in members for n in (names or {}).get(fqns[i], (fqns[i],))}
            if strict and mine - set(old["params"]):
                raise LoadError(f"{where}: optimizer param group {g} holds parameters the checkpoint's group {g} does "
                                f"not ({few(sorted(mine - set(old['params'])))}); pass strict=False to load the state "
                                "of the parameters both have")
            new = {**cur, **{k: v for k, v in old.items() if k != "params"}, "params": members}
        if STEP in cur:  # a per-group step: from the saved group's, else from its parameters' steps
            steps = {_number(state[i].pop(STEP)) for i in members if STEP in state.get(i, {})}
            if old is None or STEP not in old:
                if len(steps) > 1:
                    raise LoadError(f"{where}: the parameters of optimizer param group {g} have different step "
                                    f"counts {sorted(steps)} in the checkpoint; this optimizer keeps one per group")
                if steps:
                    new[STEP] = steps.pop()
        elif old is not None and STEP in old:  # a per-group step saved, per-parameter steps wanted
            step = new.pop(STEP)
            for i in members:
                if i in state and STEP not in state[i]:
                    state[i][STEP] = torch.tensor(float(step), dtype=_scalar_dtype())
        new_groups.append(new)
    optimizer.load_state_dict({"state": state, "param_groups": new_groups})


def merged_optimizer_state(state: dict, where: Path) -> dict:
    """The optimizer's non-tensor state of every saving rank together, for a job whose ranks hold
    other parameters than the saving ranks did (another layout, pipeline stages re-assigned).

    Param group ``g`` holds the parameters of every rank's group ``g``, with the hyperparameters
    they agree on; a hyperparameter the ranks disagree about is an error (it cannot be given to
    one parameter without guessing). Per-parameter values are merged by fqn.
    """
    per_rank = [state.get("shared", {}).get("optimizer")]
    per_rank += [r.get("optimizer") for _, r in sorted(state.get("ranks", {}).items(), key=lambda kv: int(kv[0]))]
    per_rank = [values.decode(o, "optimizer") for o in per_rank if o is not None]
    scalars: dict = {}
    groups: list[dict] = []
    for opt in per_rank:
        for fqn, named in opt.get("scalars", {}).items():
            scalars.setdefault(fqn, {}).update(named)
        for g, group in enumerate(opt.get("param_groups", [])):
            if g == len(groups):
                groups.append({**group, "params": list(group["params"])})
                continue
            merged = groups[g]
            for k, v in group.items():
                if k == "params":
                    merged["params"] += [p for p in v if p not in merged["params"]]
                elif k in merged and not _equal(merged[k], v):
                    raise LoadError(f"{where}: the saving ranks disagree about {k!r} of optimizer param group {g} "
                                    f"({merged[k]!r} vs {v!r}); load on the layout that saved it")
                else:
                    merged[k] = v
    return {"scalars": scalars, "param_groups": groups}


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def _number(value):
    """A step count as a plain number (0-d tensors included), integral when it is."""
    v = value.item() if isinstance(value, torch.Tensor) else value
    return int(v) if float(v).is_integer() else v


def _scalar_dtype() -> torch.dtype:
    """The dtype torch's optimizers give their step tensors."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
