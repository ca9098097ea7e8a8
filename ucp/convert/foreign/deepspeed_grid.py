"""The files of a DeepSpeed ZeRO-1/2 save on its tensor- and pipeline-parallel grid, and how each
parameter's pieces in them map onto its global tensor (docs/foreign.md section 4).

Without a pipeline, DeepSpeed writes one ``mp_rank_<t>_model_states.pt`` per tensor-parallel rank
``t`` (the module's weights: that rank's slice of each parameter) and one
``zero_pp_rank_<d>_mp_rank_<t>_optim_states.pt`` per data-parallel rank ``d`` (rank ``d``'s part of the
tp rank's flat fp32 groups). Under a pipeline, the model-parallel index is ``s * tp + t`` for stage
``s``, the model-states files hold only the parameters' shapes, and the weights are in
``layer_<i>-model_<t>-model_states.pt``, one per pipeline layer ``i``, keyed by the layer's own names
(a parameter's full name is ``<i>.<name>``, or ``tied_modules.<tie>.<name>`` for a tied layer).

How a tp rank's slice sits in the global tensor is not recorded: a UCL spec says it (``shard``,
``fused``, ``pad``, ``replicate``, ``average``). Parameters every tp rank holds whole are read from tp rank
0 (``replicate``) or averaged over the tp ranks as ``ds_to_universal`` does (``average``); a parameter a
later pipeline stage holds again (tied embeddings) is taken from the first stage that holds it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ucp.errors import CorruptCheckpointError, UclError
from ucp.format.pattern import REPLICATED, Pattern, local_box
from ucp.lang.validate import match_names

MODEL_FILE = "mp_rank_{mp:02d}_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
LAYER_FILE = re.compile(r"layer_(\d+)-model_(\d+)-model_states\.pt")


@dataclass(frozen=True)
class ParamGeometry:
    """One parameter's place on the grid: its global shape, how tp splits it, and which tp ranks' copies
    make the universal value of a parameter every tp rank holds whole (``(0,)``, or all when averaged)."""

    shape: tuple[int, ...]
    pattern: Pattern
    copies: tuple[int, ...] = (0,)

    def box(self, t: int, tp: int):
        """The part of the global tensor tp rank ``t`` holds."""
        return local_box(self.pattern, self.shape, {"tp": tp}, {"tp": t})

    def sources(self, t: int) -> tuple[int, ...]:
        """The tp ranks whose copies make tp rank ``t``'s fragment; empty: ``t`` adds none."""
        if self.pattern.shards:
            return (t,)
        return self.copies if t == 0 else ()


def grid_degrees(directory: Path, model0: dict) -> tuple[int, int]:
    """``(tp, pp)`` of the save: ``checkpoint_parallel_dimensions`` when DeepSpeed recorded them, else
    from the layer files and ``mp_world_size``; every model-states file must be there."""
    dims = model0.get("checkpoint_parallel_dimensions") or {}
    files = sorted(p.name for p in directory.glob("mp_rank_*_model_states.pt"))
    tp, pp = int(dims.get("tp_degree") or 0), int(dims.get("pp_degree") or 0)
    if not tp or not pp:
        layer_tps = {int(m.group(2)) for p in directory.iterdir() if (m := LAYER_FILE.fullmatch(p.name))}
        tp = len(layer_tps) or int(model0.get("mp_world_size") or len(files))
        pp = max(1, len(files) // tp)
    expected = [MODEL_FILE.format(mp=i) for i in range(tp * pp)]
    missing = sorted(set(expected) - set(files))
    if missing:
        raise CorruptCheckpointError(f"{directory}: a save of tp={tp} x pp={pp} misses {', '.join(missing)}")
    return tp, pp


def layer_weights(directory: Path, t: int, names: set[str], load) -> dict[str, tuple]:
    """``{full parameter name: (tensor, file name)}`` of tp rank ``t``'s pipeline layer files; ``names``
    are the parameters of that rank's stages (for a tied layer's keys). Buffers are left out."""
    out: dict[str, tuple] = {}
    tied = {}
    for n in names:
        if n.startswith("tied_modules."):
            tied.setdefault(n.split(".", 2)[2], []).append(n)
    files = sorted((int(m.group(1)), p.name) for p in directory.iterdir()
                   if (m := LAYER_FILE.fullmatch(p.name)) and int(m.group(2)) == t)
    for index, name in files:
        for key, tensor in load(directory / name).items():
            full = f"{index}.{key}"
            if full not in names:
                candidates = tied.get(key, [])
                if len(candidates) > 1:
                    raise CorruptCheckpointError(f"{directory / name}: {key!r} could be any of {', '.join(candidates)}")
                if not candidates:
                    continue  # a buffer: not a parameter of any stage
                full = candidates[0]
            out.setdefault(full, (tensor, name))
    return out


def geometries(checked, local_shapes: dict[str, list[tuple[int, ...]]], tp: int) -> dict[str, ParamGeometry]:
    """Each parameter's :class:`ParamGeometry` from the spec's rules and every tp rank's local shape.

    Args:
        checked: the spec, checked and bound to the save's layout (None: no tensor parallelism, every
            parameter whole on its one tp rank).
        local_shapes: ``{name: [shape on tp rank 0, shape on tp rank 1, ...]}``.
        tp: the tensor-parallel degree.

    Raises:
        UclError: a name no rule matches, an unused rule, a rule splitting over another axis than tp,
            local shapes that do not fit the rule, or fused parts or padding that do not fit.
    """
    if checked is None:
        return {n: ParamGeometry(tuple(s[0]), REPLICATED) for n, s in local_shapes.items()}

    out = {}
    for name, (rule, pattern) in match_names(checked, list(local_shapes)).items():
        where = (checked.file, rule.pos.line, rule.pos.column)
        shapes = local_shapes[name]
        if len(set(shapes)) != 1:
            raise UclError(f"{name}: the tp ranks hold slices of different shapes {[list(s) for s in shapes]}; "
                           "ucp reads even tensor-parallel splits only", *where)
        shape = list(shapes[0])
        for s in pattern.shards:
            if s.axis != "tp":
                raise UclError(f"{name}: shard({s.axis}, ...): DeepSpeed saves split parameters over tp only", *where)
            if s.dim >= len(shape):
                raise UclError(f"{name}: shard(tp, dim={s.dim}) on a tensor of {len(shape)} dim(s)", *where)
            shape[s.dim] *= tp
        averaged = any(t.name == "average" for t in rule.transforms)
        try:
            pattern.validate(tuple(shape), checked.layout.names, name)
        except Exception as e:  # noqa: BLE001 - the data model's SpecError, placed at the rule
            raise UclError(f"{e} (the rule matches {name!r}, {list(shapes[0])} on each tp rank)", *where) from None
        copies = tuple(range(tp)) if averaged and tp > 1 else (0,)
        out[name] = ParamGeometry(tuple(shape), pattern, copies)
    return out
