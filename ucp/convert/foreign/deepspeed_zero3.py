"""DeepSpeed ZeRO-3 saves, with or without Megatron-style tensor parallelism, as a source of ``ucp convert
--from deepspeed`` (docs/foreign.md sections 3 and 4): per (dp rank ``d``, tp rank ``t``)
``zero_pp_rank_<d>_mp_rank_<t>_model_states.pt`` (tp rank ``t``'s local shapes, frozen parameters' parts)
and the optimizer file with ``fp32_flat_groups``, each parameter split over ``dp`` on its own."""

from __future__ import annotations

import math
from pathlib import Path

from ucp.convert.foreign.deepspeed_files import (
    FORMAT,
    STATES,
    ManifestParts,
    checked_spec,
    finish,
    flat_sources,
    group_step,
    merge_group,
    model_file,
    optim_entry,
    place,
    tensor_dtype,
)
from ucp.convert.foreign.deepspeed_grid import geometries
from ucp.errors import CorruptCheckpointError, OptionsError
from ucp.format.box import Box, FlatRange
from ucp.format.keys import model_key
from ucp.format.layout import Layout
from ucp.format.manifest import TensorMeta
from ucp.format.pattern import Pattern

ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_{mp:02d}_model_states.pt"
ZERO3_OPTIM_FILE = "zero_pp_rank_{rank}_mp_rank_{mp:02d}_optim_states.pt"


def _zero3_slices(shapes: dict, dp: int, size: int, where: str) -> list[list[tuple[str, int, int, int]]]:
    """The same for ZeRO-3, where each parameter is split on its own: ``ceil(numel / dp)`` elements
    per rank (the last rank's part padded), the parts concatenated in ``param_shapes`` order."""
    out: list[list] = [[] for _ in range(dp)]
    at = 0
    for fqn, shape in shapes.items():
        numel = 1
        for d in shape:
            numel *= int(d)
        part = -(-numel // dp)
        for rank in range(dp):
            real = max(0, min(part, numel - rank * part))
            if real:
                out[rank].append((fqn, at, rank * part, real))
        at += part
    if at > size:
        raise CorruptCheckpointError(f"{where}: the parameters' ZeRO-3 parts need {at} elements per rank, the flat "
                                     f"groups hold {size}")
    return out


def zero3_manifest(directory: Path, spec, settings, prefix: str):
    """A ZeRO-3 save: per (dp rank d, tp rank t) ``zero_pp_rank_<d>_mp_rank_<t>_model_states.pt`` (each tp rank's
    local shapes; its module holds empty placeholders) and the optimizer file with ``fp32_flat_groups``."""
    model0 = model_file(directory, ZERO3_MODEL_FILE.format(rank=0, mp=0))
    dims = model0.get("checkpoint_parallel_dimensions") or {}
    tp = int(dims.get("tp_degree") or model0.get("mp_world_size") or 1)
    dp = int(model0.get("dp_world_size") or 1)
    if tp > 1 and spec is None:
        raise OptionsError(f"{directory}: a tensor-parallel DeepSpeed save (tp={tp}); pass a UCL spec saying how each "
                           "parameter is split (--spec megatron-gpt, --spec megatron-llama or a file; docs/foreign.md)")
    models = [model0] + [model_file(directory, ZERO3_MODEL_FILE.format(rank=0, mp=t)) for t in range(1, tp)]
    # frozen parameters (no optimizer state): each dp rank's part is in its own model file
    frozen = [{n: tuple(int(d) for d in shape) for n, shape in (m.get("frozen_param_shapes") or {}).items()}
              for m in models]
    holders = {(d, t): models[t] if d == 0 else model_file(directory, ZERO3_MODEL_FILE.format(rank=d, mp=t))
               for d in range(dp) for t in range(tp)} if frozen[0] else {}
    optim = [[optim_entry(directory, prefix + ZERO3_OPTIM_FILE.format(rank=d, mp=t), True) for d in range(dp)]
             for t in range(tp)]
    layout = Layout.from_sizes(zero=3, dp=dp, **({"tp": tp} if tp > 1 or spec is not None else {}))
    out = ManifestParts(directory, layout)
    shapes_of = [[{fqn: tuple(int(d) for d in shape) for fqn, shape in group.items()} for group in m["param_shapes"]]
                 for m in models]
    partitioned = {fqn for group in shapes_of[0] for fqn in group} | set(frozen[0])
    local = {fqn: [shapes_of[t][g][fqn] for t in range(tp)] for g, group in enumerate(shapes_of[0]) for fqn in group}
    for name in frozen[0]:
        if any(name not in f for f in frozen):
            raise CorruptCheckpointError(f"{directory}: frozen parameter {name!r} is missing from a tp rank's model file")
        local[name] = [f[name] for f in frozen]
    for name, w in models[0]["module"].items():
        if name not in partitioned:  # (a buffer: whole in each tp rank's module)
            local[name] = [tuple(m["module"][name].shape) if name in m["module"] else None for m in models]
            if None in local[name]:
                raise CorruptCheckpointError(f"{directory}: {name!r} is missing from a tp rank's model file")
    checked, spec_text = checked_spec(spec, settings, layout, model0)
    geo = geometries(checked, local, tp)
    for name in local:
        if name in partitioned:
            continue
        key = model_key(name)
        dtype = tensor_dtype(models[0]["module"][name], f"{directory / ZERO3_MODEL_FILE.format(rank=0, mp=0)}: {name}")
        out.tensors[key] = TensorMeta(geo[name].shape, dtype, geo[name].pattern)
        for t in range(tp):
            if geo[name].sources(t):
                out.add(key, geo[name].box(t, tp), None, dtype, out.rank(tp=t), ZERO3_MODEL_FILE.format(rank=0, mp=t),
                        [(models[c]["module"][name], 0) for c in geo[name].sources(t)])
    for name in frozen[0]:
        _zero3_frozen(out, directory, name, geo[name], holders, math.prod(frozen[0][name]), tp, dp)
    groups_state = []
    for g, shapes in enumerate(shapes_of[0]):
        sizes = [int(optim[t][0][2][g].numel()) for t in range(tp)]  # (each rank's partition of group g)
        slices = [_zero3_slices(shapes_of[t][g], dp, sizes[t], str(directory)) for t in range(tp)]
        flat = [[flat_sources(e, g, sizes[t], directory) for e in optim[t]] for t in range(tp)]
        for fqn in shapes:
            pattern = Pattern(geo[fqn].pattern.shards, "dp", geo[fqn].pattern.fused, geo[fqn].pattern.pad)
            for suffix in ("master", *STATES):
                out.tensors[f"optim/{fqn}/{suffix}"] = TensorMeta(geo[fqn].shape, "float32", pattern)
            out.tensors[model_key(fqn)] = TensorMeta(geo[fqn].shape, "float32", pattern)
        for t in range(tp):
            for d, mine in enumerate(slices[t]):
                for fqn, at, begin, numel in mine:
                    if not geo[fqn].sources(t):
                        continue
                    places = [(c, place(slices[c][d], fqn, begin, numel, directory, c)) for c in geo[fqn].sources(t)]
                    for state in ("master", *STATES, "model"):
                        # (the weight is its fp32 master: ZeRO-3 keeps no other copy)
                        key = model_key(fqn) if state == "model" else f"optim/{fqn}/{state}"
                        source = "master" if state == "model" else state
                        out.add(key, geo[fqn].box(t, tp), FlatRange(begin, numel), "float32", out.rank(dp=d, tp=t),
                                optim[t][d][0], [(flat[c][d][source], where) for c, where in places])
        step = group_step(optim[0][0], g, directory)
        for fqn in shapes:
            key = f"optim/{fqn}/step"
            out.tensors[key] = TensorMeta((), tensor_dtype(step, f"{directory / optim[0][0][0]}: group {g}'s step"), Pattern())
            out.add(key, Box.full(()), None, out.tensors[key].dtype, 0, optim[0][0][0], [(step, 0)])
        merge_group(groups_state, g, optim[0][0][3]["param_groups"][g], list(shapes))
    facts = {"format": FORMAT, "path": str(directory.resolve()), "dp": dp, "tp": tp, "pp": 1,
             "ds_version": model0.get("ds_version"), "zero_stage": 3}
    return directory, finish(out, model0, groups_state), facts, out.files, spec_text


def _zero3_frozen(out: ManifestParts, directory: Path, name: str, geo, holders: dict, numel: int, tp: int, dp: int) -> None:
    """A frozen ZeRO-3 parameter: dp rank ``d`` holds elements ``[d * ceil(numel / dp), ...)`` of each tp rank's
    slice, in its model file's ``frozen_param_fragments`` (the last part padded)."""
    def part(d: int, t: int):
        where = directory / ZERO3_MODEL_FILE.format(rank=d, mp=t)
        try:
            return holders[(d, t)]["frozen_param_fragments"][name]
        except (KeyError, TypeError):
            raise CorruptCheckpointError(f"{where}: no frozen_param_fragments entry for {name!r}") from None

    first = part(0, 0)
    dtype = tensor_dtype(first, f"{directory / ZERO3_MODEL_FILE.format(rank=0, mp=0)}: {name}")
    key = model_key(name)
    out.tensors[key] = TensorMeta(geo.shape, dtype, Pattern(geo.pattern.shards, "dp", geo.pattern.fused, geo.pattern.pad))
    size = -(-numel // dp)
    for t in range(tp):
        if not geo.sources(t):
            continue
        for d in range(dp):
            real = max(0, min(size, numel - d * size))
            if real:
                out.add(key, geo.box(t, tp), FlatRange(d * size, real), dtype, out.rank(dp=d, tp=t),
                        ZERO3_MODEL_FILE.format(rank=d, mp=t), [(part(d, c), 0) for c in geo.sources(t)])
