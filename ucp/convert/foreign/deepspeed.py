"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3, fp32 or bf16, with or without Megatron-style tensor
parallelism, and ZeRO-1/2 with pipeline parallelism) as a source of ``ucp convert --from deepspeed``
(docs/foreign.md sections 3 and 4).

A DeepSpeed checkpoint folder (``engine.save_checkpoint(dir)``) holds ``latest`` (the tag of the
newest save) and, per tag, ``mp_rank_00_model_states.pt`` (the module's weights, the parameters'
shapes per group, the step) and, for ZeRO stages 1 and 2, one
``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per data-parallel rank: rank ``r``'s partition of
each parameter group's flat fp32 master weights and of its Adam moments, with the address of each
parameter's slice in it (``param_slice_mappings``). A ZeRO-3 save has per-rank model-states files and
splits each parameter on its own (``ceil(numel / dp)`` elements per rank, in ``fp32_flat_groups``).
Tensor- and pipeline-parallel saves have these files per model-parallel rank, and a UCL spec says how
tensor parallelism split each parameter (:mod:`ucp.convert.foreign.deepspeed_grid`).

Every file is read by :mod:`ucp.convert.foreign.torch_file`: its pickle with an unpickler that allows
exactly torch's tensor and storage globals and the classes of :data:`STAND_INS` (three DeepSpeed
classes, as inert stand-ins, and ``argparse.Namespace`` for Megatron's args), its tensors described
as byte ranges of the file, read in place by the converter. So neither deepspeed nor torch nor an
open unpickler is needed, and memory stays bounded by the tensors being copied.

Tensor keys: ``model/<fqn>`` (the module's weight, in its dtype), ``optim/<fqn>/master`` (DeepSpeed's
``fp32``), ``optim/<fqn>/exp_avg``, ``optim/<fqn>/exp_avg_sq``, ``optim/<fqn>/step`` (the group's
step, a 0-d tensor, as ``ds_to_universal`` writes it). The optimizer states are flat fragments
partitioned over ``dp``: each rank's slice of a parameter is elements ``[start, start + numel)`` of the
flattened parameter (of its tp rank's slice), with ``start`` from the slice's place in the group's
flat buffer.
"""

from __future__ import annotations

import re
from pathlib import Path

from ucp.convert.foreign.deepspeed_files import (
    FORMAT,
    STAND_INS,
    STATES,
    DeepSpeedFiles,
    ManifestParts,
    checked_spec,
    finish,
    flat_sources,
    group_step,
    load_pt,
    merge_group,
    model_file,
    model_settings,
    optim_entry,
    place,
    tensor_dtype,
)
from ucp.convert.foreign.deepspeed_grid import MODEL_FILE as GRID_MODEL_FILE
from ucp.convert.foreign.deepspeed_grid import OPTIM_FILE as GRID_OPTIM_FILE
from ucp.convert.foreign.deepspeed_grid import geometries, grid_degrees, layer_weights
from ucp.convert.foreign.deepspeed_zero3 import ZERO3_MODEL_FILE, zero3_manifest
from ucp.convert.foreign.source import SourceRecord, refuse_step
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError, OptionsError, UcpError
from ucp.format.box import Box, FlatRange
from ucp.format.keys import model_key
from ucp.format.layout import Layout
from ucp.format.manifest import TensorMeta
from ucp.format.pattern import Pattern

MODEL_FILE = "mp_rank_00_model_states.pt"
__all__ = ["deepspeed_source", "checkpoint_dir", "load_pt", "model_settings", "DeepSpeedFiles", "STAND_INS", "FORMAT",
           "STATES"]


def checkpoint_dir(src) -> tuple[Path, str]:
    """``(directory of one save, its tag)``: ``src`` is a save's directory, or a folder whose
    ``latest`` file names one."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointNotFoundError(f"{src}: no such directory")
    if (src / MODEL_FILE).is_file() or list(src.glob("*model_states.pt")):
        return src, src.name
    latest = src / "latest"
    if not latest.is_file():
        raise CheckpointNotFoundError(f"{src}: neither a DeepSpeed save ({MODEL_FILE}) nor a folder with a 'latest' file")
    tag = latest.read_text().strip()
    if not tag or Path(tag).name != tag or not (src / tag).is_dir():
        raise CorruptCheckpointError(f"{latest}: names {tag!r}, which is not a save in {src}")
    return src / tag, tag


def _refuse_unsupported(directory: Path) -> str:
    """The optimizer files' prefix (``""``, or ``"bf16_"`` for a bf16 run); a kind of save ucp does not
    read is refused."""
    names = [p.name for p in directory.iterdir()]
    prefixes = {m.group(1) for n in names if (m := re.fullmatch(r"(bf16_)?zero_pp_rank_\d+_mp_rank_\d+_optim_states\.pt", n))}
    if len(prefixes) > 1:
        raise CorruptCheckpointError(f"{directory}: holds both zero_pp_rank_* and bf16_zero_pp_rank_* optimizer files; "
                                     "remove the ones of the other run")
    if not prefixes:
        raise CorruptCheckpointError(f"{directory}: no ZeRO optimizer files (zero_pp_rank_*_optim_states.pt); a ZeRO "
                                     "stage 0 save keeps its optimizer inside the model file, which ucp does not "
                                     "import (docs/foreign.md section 3)")
    return prefixes.pop() or ""


def deepspeed_source(src, step: int | None = None, spec=None, settings: dict | None = None) -> SourceRecord:
    """The DeepSpeed save ``src`` described for ``convert``, the ``spec`` applied here (it says how tensor
    parallelism split each parameter).

    Args:
        src: a save's directory (``global_step<N>``) or the folder whose ``latest`` names one.
        step: must be None (the directory names the save).
        spec: a UCL spec (a packaged name such as ``megatron-gpt``, or a file) saying how tensor
            parallelism split each parameter; required when the save has tp > 1.
        settings: model settings for the spec, over those read from the save.

    Raises:
        CheckpointNotFoundError: no DeepSpeed save there, or one of its files is missing.
        CorruptCheckpointError: a file that needs a class beyond the stand-ins, an unsupported kind of
            save (ZeRO stage 0), or partitions that do not add up.
        OptionsError / UclError: a tp > 1 save without a spec, or a spec that does not fit it.
    """
    refuse_step(step, "pass the save's directory (global_step<N>) or its folder (its 'latest'), not a step")
    directory, tag = checkpoint_dir(src)
    prefix = _refuse_unsupported(directory)
    stage3 = not (directory / MODEL_FILE).is_file() and (directory / ZERO3_MODEL_FILE.format(rank=0, mp=0)).is_file()
    try:
        if stage3:
            directory, manifest, facts, files, spec_text = zero3_manifest(directory, spec, settings, prefix)
        else:
            directory, manifest, facts, files, spec_text = _zero12(directory, spec, settings, prefix)
    except UcpError:
        raise  # (said already: a missing spec, a spec that does not fit, a file named; OptionsError is a ValueError)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as e:
        # The files' pickles are read as plain data (no DeepSpeed classes run): a value of the wrong type or
        # shape where DeepSpeed writes another (a str for a size, a list for a dict) surfaces here, said in
        # one line naming the save rather than as the Python error of whichever access met it first.
        raise CorruptCheckpointError(f"{directory}: its files do not hold what a DeepSpeed save holds "
                                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    facts["bf16"] = prefix == "bf16_"
    facts["tag"] = tag
    if spec is not None:
        facts["spec"] = str(spec)
    return SourceRecord(directory, manifest, facts, decode=files.decode, spec_applied=True, spec_text=spec_text)


def _zero12_slices(optim: list, g: int, size: int) -> list[list[tuple[str, int, int, int]]]:
    """Per rank, ``(fqn, start in the rank's partition, start in the parameter, numel)`` of each
    parameter slice of group ``g`` (ZeRO-1/2: ``param_slice_mappings``; a parameter's element 0 is
    at its first slice, on the lowest rank holding it)."""
    first: dict[str, int] = {}
    for rank, (_, _, _, _, mappings) in enumerate(optim):
        for fqn, addr in mappings[g].items():
            first.setdefault(fqn, rank * size + int(addr.start))
    return [[(fqn, int(addr.start), rank * size + int(addr.start) - first[fqn], int(addr.numel))
             for fqn, addr in mappings[g].items()] for rank, (_, _, _, _, mappings) in enumerate(optim)]


def _zero12(directory: Path, spec, settings, prefix: str):
    model0 = model_file(directory, MODEL_FILE)
    tp, pp = grid_degrees(directory, model0)
    dp = int(model0.get("dp_world_size") or 1)
    if tp > 1 and spec is None:
        raise OptionsError(f"{directory}: a tensor-parallel DeepSpeed save (tp={tp}); pass a UCL spec saying how each "
                           "parameter is split (--spec megatron-gpt, --spec megatron-llama or a file; docs/foreign.md)")
    grid = [(s, t) for s in range(pp) for t in range(tp)]
    models = {(s, t): model0 if s == t == 0 else model_file(directory, GRID_MODEL_FILE.format(mp=s * tp + t))
              for s, t in grid}
    optim = {(s, t): [optim_entry(directory, prefix + GRID_OPTIM_FILE.format(dp=d, mp=s * tp + t), False) for d in range(dp)]
             for s, t in grid}
    zero = int(optim[(0, 0)][0][1].get("zero_stage", 1))
    sizes = {"pp": pp} if pp > 1 else {}
    sizes.update(dp=dp, **({"tp": tp} if tp > 1 or spec is not None else {}))
    layout = Layout.from_sizes(zero=zero, **sizes)
    out = ManifestParts(directory, layout)
    # every parameter: its stage (the first holding it), its shape on each tp rank, its weights
    owner, local = {}, {}
    for s, t in grid:
        for shapes in models[(s, t)]["param_shapes"]:
            for fqn, shape in shapes.items():
                owner.setdefault(fqn, s)
                if owner[fqn] == s:
                    local.setdefault(fqn, [None] * tp)[t] = tuple(int(d) for d in shape)
    weights = []  # per tp rank: {fqn: (tensor, file)}
    for t in range(tp):
        if pp == 1:
            module = models[(0, t)]["module"] or {}
            weights.append({n: (w, GRID_MODEL_FILE.format(mp=t)) for n, w in module.items()})
        else:
            names = {fqn for s in range(pp) for shapes in models[(s, t)]["param_shapes"] for fqn in shapes}
            weights.append(layer_weights(directory, t, names, load_pt))
    for fqn, (w, _) in weights[0].items():
        if fqn not in local:  # a buffer or frozen parameter (no optimizer state), from the module
            local[fqn] = [tuple(weights[t][fqn][0].shape) if fqn in weights[t] else None for t in range(tp)]
    missing = [f"{fqn} (tp rank {t})" for fqn, shapes in local.items() for t, sh in enumerate(shapes) if sh is None]
    if missing:
        raise CorruptCheckpointError(f"{directory}: no tensor for {', '.join(missing[:5])}")
    checked, spec_text = checked_spec(spec, settings, layout, model0)
    geo = geometries(checked, local, tp)
    for fqn, g in geo.items():  # the module's weights
        lacking = [t for t in range(tp) if fqn not in weights[t]]
        if lacking:
            raise CorruptCheckpointError(f"{directory}: the weight of {fqn!r} is in none of tp rank {lacking[0]}'s "
                                         "model files")
        dtype = tensor_dtype(weights[0][fqn][0], f"{directory / weights[0][fqn][1]}: {fqn}")
        key = model_key(fqn)
        out.tensors[key] = TensorMeta(g.shape, dtype, g.pattern)
        for t in range(tp):
            if g.sources(t):
                out.add(key, g.box(t, tp), None, dtype, out.rank(pp=owner.get(fqn, 0), tp=t), weights[t][fqn][1],
                        [(weights[c][fqn][0], 0) for c in g.sources(t)])
    slices = {(s, t): [_zero12_slices(optim[(s, t)], g, int(optim[(s, t)][0][2][g].numel()))
                       for g in range(len(models[(s, t)]["param_shapes"]))] for s, t in grid}
    flat = {(s, t): [[flat_sources(e, g, int(optim[(s, t)][0][2][g].numel()), directory) for e in optim[(s, t)]]
                     for g in range(len(models[(s, t)]["param_shapes"]))] for s, t in grid}
    groups_state: list[dict] = []
    for s, t in grid:
        entries = optim[(s, t)]
        for g, shapes in enumerate(models[(s, t)]["param_shapes"]):
            for d, mine in enumerate(slices[(s, t)][g]):
                for fqn, at, begin, numel in mine:
                    if fqn not in shapes:
                        raise CorruptCheckpointError(f"{directory / entries[d][0]}: a slice of {fqn!r}, which is not "
                                                     f"in group {g} of {GRID_MODEL_FILE.format(mp=s * tp + t)}")
                    if owner[fqn] != s or not geo[fqn].sources(t):
                        continue
                    places = [(c, place(slices[(s, c)][g][d], fqn, begin, numel, directory, c))
                              for c in geo[fqn].sources(t)]
                    pattern = geo[fqn].pattern
                    for state in ("master", *STATES):
                        key = f"optim/{fqn}/{state}"
                        out.tensors.setdefault(key, TensorMeta(geo[fqn].shape, "float32",
                                                               Pattern(pattern.shards, "dp", pattern.fused, pattern.pad)))
                        out.add(key, geo[fqn].box(t, tp), FlatRange(begin, numel), "float32",
                                out.rank(pp=s, dp=d, tp=t), entries[d][0],
                                [(flat[(s, c)][g][d][state], where) for c, where in places])
            step = group_step(entries[0], g, directory)
            for fqn in shapes:
                if owner[fqn] != s or t != 0:
                    continue
                key = f"optim/{fqn}/step"
                out.tensors[key] = TensorMeta((), tensor_dtype(step, f"{directory / entries[0][0]}: group {g}'s step"),
                                              Pattern())
                out.add(key, Box.full(()), None, out.tensors[key].dtype, out.rank(pp=s), entries[0][0],
                        [(step, 0)])
            if t == 0:
                merge_group(groups_state, g, entries[0][3]["param_groups"][g], [f for f in shapes if owner[f] == s])
    facts = {"format": FORMAT, "path": str(directory.resolve()), "dp": dp, "tp": tp, "pp": pp,
             "ds_version": model0.get("ds_version"), "zero_stage": zero}
    return directory, finish(out, model0, groups_state), facts, out.files, spec_text
