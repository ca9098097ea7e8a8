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
tensor parallelism split each parameter (:mod:`ucp.foreign.deepspeed_grid`).

Every file is read by :mod:`ucp.foreign.torch_file`: its pickle with an unpickler that allows
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

import math
import re
from argparse import Namespace
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

import numpy as np

from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError, OptionsError
from ucp.foreign import torch_file
from ucp.foreign.deepspeed_grid import geometries, grid_degrees, layer_weights
from ucp.foreign.deepspeed_grid import MODEL_FILE as GRID_MODEL_FILE
from ucp.foreign.deepspeed_grid import OPTIM_FILE as GRID_OPTIM_FILE
from ucp.spec.box import Box, FlatRange
from ucp.spec.dtypes import DTYPES, itemsize
from ucp.spec.fragment import Fragment
from ucp.spec.keys import model_key
from ucp.spec.layout import Layout
from ucp.spec.manifest import Manifest, TensorMeta
from ucp.spec.pattern import Pattern

FORMAT = "deepspeed"
MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_{mp:02d}_model_states.pt"
ZERO3_OPTIM_FILE = "zero_pp_rank_{rank}_mp_rank_{mp:02d}_optim_states.pt"
STATES = ("exp_avg", "exp_avg_sq")


class LossScaler:
    """Stand-in for ``deepspeed.runtime.fp16.loss_scaler.LossScaler``: its attributes, inert."""


class ZeroStageEnum(IntEnum):
    """Stand-in for ``deepspeed.runtime.zero.config.ZeroStageEnum``."""

    disabled = 0
    optimizer_states = 1
    gradients = 2
    weights = 3


@dataclass
class fragment_address:  # noqa: N801 - the name DeepSpeed pickles
    """Stand-in for ``deepspeed.utils.tensor_fragment.fragment_address``: a slice of a flat partition."""

    numel: int = 0
    start: int = 0

#: DeepSpeed's classes in the tested configurations' files -> the inert stand-ins they load as
STAND_INS = [
    (LossScaler, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (ZeroStageEnum, "deepspeed.runtime.zero.config.ZeroStageEnum"),
    (fragment_address, "deepspeed.utils.tensor_fragment.fragment_address"),
    (Namespace, "argparse.Namespace"),  # Megatron's args in the client state: plain attributes
]


def load_pt(path: Path):
    """``path``'s object, read without torch (:func:`ucp.foreign.torch_file.load`: tensors as
    :class:`StoredTensor` s, DeepSpeed's classes as stand-ins, any other class refused by name)."""
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: missing from the DeepSpeed checkpoint")
    return torch_file.load(path, {name: cls for cls, name in STAND_INS})


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


def _dtype(t, where: str) -> str:
    if isinstance(t, np.ndarray):
        return str(t.dtype)
    if not isinstance(t, torch_file.StoredTensor):
        raise CorruptCheckpointError(f"{where}: a {type(t).__name__} where a tensor was expected")
    name = t.dtype
    if name not in DTYPES:
        raise CorruptCheckpointError(f"{where}: dtype {name} has no ucp equivalent")
    return name


class DeepSpeedFiles:
    """How the fragments that are not plain byte ranges of the files are made; ``decode`` gives their
    bytes (None for the others, which the converter reads in place)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.where: dict = {}  # fragment -> [(a StoredTensor or a numpy array, element start), ...]

    def decode(self, frag):
        """The fragment's bytes: its slice of a non-contiguous tensor, or the mean of its copies' slices
        (as ``ds_to_universal`` takes it: ``sum(copies) / len(copies)``, in the tensor's dtype)."""
        sources = self.where.get(frag)
        if sources is None:
            return None
        n = frag.flat.numel if frag.flat is not None else frag.box.numel
        copies = []
        for source, start in sources:
            a = source.array() if isinstance(source, torch_file.StoredTensor) else source
            flat = a.reshape(-1)[start:start + n]
            if flat.size != n:
                raise CorruptCheckpointError(f"{self.directory}: {frag.key}: the slice [{start}, {start + n}) runs past "
                                             f"its partition of {a.size} elements")
            copies.append(flat)
        if len(copies) == 1:
            out = np.ascontiguousarray(copies[0])
        elif frag.dtype in ("float32", "float64"):
            out = sum(copies) / len(copies)  # (IEEE adds and a divide, as torch does them)
        else:
            import torch  # (bfloat16 / float16 arithmetic as torch rounds it)

            dtype = getattr(torch, frag.dtype)
            ts = [torch.from_numpy(np.ascontiguousarray(c)).view(dtype) for c in copies]
            out = (sum(ts) / len(ts)).view(torch.uint8).numpy()
        return out.view(np.uint8).reshape(-1)


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


def model_settings(model: dict) -> dict[str, int]:
    """The sizes a packaged spec names (docs/foreign.md section 4), from what the save records:
    ``universal_checkpoint_info`` (``original_vocab_size``, ``padded_vocab_size``) and Megatron's ``args``."""
    info = model.get("universal_checkpoint_info") or {}
    args = vars(model["args"]) if isinstance(model.get("args"), Namespace) else {}
    out: dict[str, int] = {}

    def put(name, value):
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[name] = value

    put("vocab", info.get("original_vocab_size"))
    put("padded_vocab", info.get("padded_vocab_size") or args.get("padded_vocab_size"))
    hidden, heads = args.get("hidden_size"), args.get("num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        head_dim = args.get("kv_channels") or hidden // heads
        kv_heads = args.get("num_key_value_heads") or args.get("num_query_groups") or heads
        put("q_size", heads * head_dim)
        put("kv_size", kv_heads * head_dim)
    put("ffn", args.get("ffn_hidden_size"))
    return out


def _checked_spec(spec, settings: dict | None, layout: Layout, model: dict):
    """The spec (a packaged name or a file) checked with the save's settings (overridden by
    ``settings``) and bound to ``layout``; None without a spec."""
    if spec is None:
        return None
    from ucp.foreign.specs import read_spec
    from ucp.lang.apply import check_layout
    from ucp.lang.parse import parse
    from ucp.lang.validate import bind_layout, check

    text, name = read_spec(spec)
    checked = bind_layout(check(parse(text, name), name, settings, defaults=model_settings(model)), layout)
    check_layout(checked, layout)
    return checked


class _Manifest:
    """The tensors, fragments and file sizes of a manifest under construction."""

    def __init__(self, directory: Path, layout: Layout):
        self.directory, self.layout = directory, layout
        self.files = DeepSpeedFiles(directory)
        self.tensors: dict[str, TensorMeta] = {}
        self.fragments: list[Fragment] = []
        self.sizes: dict[str, int] = {}

    def file(self, name: str) -> str:
        self.sizes.setdefault(name, (self.directory / name).stat().st_size)
        return name

    def rank(self, **coords) -> int:
        return self.layout.rank({a: coords.get(a, 0) for a in self.layout.names})

    def add(self, key: str, box: Box, flat: FlatRange | None, dtype: str, rank: int, file: str, sources: list) -> None:
        """A fragment of ``key`` read from ``sources`` (``(a whole source tensor, element start)`` each;
        several are averaged). One contiguous source is a byte range of its file, read in place."""
        numel = flat.numel if flat is not None else box.numel
        for source, _ in sources:
            if isinstance(source, torch_file.StoredTensor) and source.dtype != dtype:
                raise CorruptCheckpointError(f"{source.path}: {key} is {source.dtype} here, {dtype} elsewhere")
        (first, start), plain = sources[0], len(sources) == 1
        if plain and isinstance(first, torch_file.StoredTensor) and first.contiguous:
            offset, length = first.byte_range(start, numel)
            frag = Fragment(key, box, flat, dtype, rank, self.file(first.path.name), offset, length, 0)
        else:
            frag = Fragment(key, box, flat, dtype, rank, self.file(file), 0, numel * itemsize(dtype), 0)
            self.files.where[frag] = sources
        self.fragments.append(frag)


def deepspeed_manifest(src, spec=None, settings: dict | None = None):
    """``(directory, manifest, source facts, files, spec text)`` describing the DeepSpeed save ``src``.

    Args:
        src: a save's directory (``global_step<N>``) or the folder whose ``latest`` names one.
        spec: a UCL spec (a packaged name such as ``megatron-gpt``, or a file) saying how tensor
            parallelism split each parameter; required when the save has tp > 1.
        settings: model settings for the spec, over those read from the save.

    Raises:
        CheckpointNotFoundError: no DeepSpeed save there, or one of its files is missing.
        CorruptCheckpointError: a file that needs a class beyond the stand-ins, an unsupported kind of
            save (ZeRO stage 0), or partitions that do not add up.
        OptionsError / UclError: a tp > 1 save without a spec, or a spec that does not fit it.
    """
    directory, tag = checkpoint_dir(src)
    prefix = _refuse_unsupported(directory)
    stage3 = not (directory / MODEL_FILE).is_file() and (directory / ZERO3_MODEL_FILE.format(rank=0, mp=0)).is_file()
    if stage3:
        directory, manifest, facts, files, checked = _zero3(directory, spec, settings, prefix)
    else:
        directory, manifest, facts, files, checked = _zero12(directory, spec, settings, prefix)
    facts["bf16"] = prefix == "bf16_"
    facts["tag"] = tag
    if checked is not None:
        from ucp.lang.printer import print_program

        facts["spec"] = str(spec)
    return directory, manifest, facts, files, (print_program(checked.concrete()) if checked is not None else None)


def _optim_entry(directory: Path, name: str, stage3: bool):
    sd = load_pt(directory / name)
    try:
        osd = sd["optimizer_state_dict"]
        if stage3:
            return name, osd, osd["fp32_flat_groups"], osd["optimizer_state_dict"], None
        return name, osd, osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"], osd["param_slice_mappings"]
    except (KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{directory / name}: not a ZeRO-{3 if stage3 else '1/2'} optimizer-states "
                                     f"file (missing {e})") from None


def _flat_sources(entry, g: int, size: int, directory: Path) -> dict:
    """``{state: rank's flat partition of group g}`` (master, exp_avg, exp_avg_sq), checked."""
    name, _, fp32, base, _ = entry
    try:
        state = base["state"][g]
        sources = {"master": fp32[g], **{s: state[s] for s in STATES}}
    except (KeyError, IndexError, TypeError) as e:
        raise CorruptCheckpointError(f"{directory / name}: group {g} lacks its optimizer state ({e})") from None
    for s, t in sources.items():
        if not isinstance(t, torch_file.StoredTensor) or t.numel() != size or t.dtype != "float32":
            what = f"{t.numel()} {t.dtype} elements" if isinstance(t, torch_file.StoredTensor) else type(t).__name__
            raise CorruptCheckpointError(f"{directory / name}: group {g}'s {s} partition has {what}, not {size} "
                                         "float32 elements")
    return sources


def _model(directory: Path, name: str):
    where = directory / name
    model = load_pt(where)
    try:
        model["param_shapes"], model["module"]  # noqa: B018 - both must be there
    except (KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{where}: not a DeepSpeed model-states file (missing {e})") from None
    return model


def _zero12(directory: Path, spec, settings, prefix: str):
    model0 = _model(directory, MODEL_FILE)
    tp, pp = grid_degrees(directory, model0)
    dp = int(model0.get("dp_world_size") or 1)
    if tp > 1 and spec is None:
        raise OptionsError(f"{directory}: a tensor-parallel DeepSpeed save (tp={tp}); pass a UCL spec saying how each "
                           "parameter is split (--spec megatron-gpt, --spec megatron-llama or a file; docs/foreign.md)")
    grid = [(s, t) for s in range(pp) for t in range(tp)]
    models = {(s, t): model0 if s == t == 0 else _model(directory, GRID_MODEL_FILE.format(mp=s * tp + t))
              for s, t in grid}
    optim = {(s, t): [_optim_entry(directory, prefix + GRID_OPTIM_FILE.format(dp=d, mp=s * tp + t), False) for d in range(dp)]
             for s, t in grid}
    zero = int(optim[(0, 0)][0][1].get("zero_stage", 1))
    sizes = {"pp": pp} if pp > 1 else {}
    sizes.update(dp=dp, **({"tp": tp} if tp > 1 or spec is not None else {}))
    layout = Layout.from_sizes(zero=zero, **sizes)
    out = _Manifest(directory, layout)
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
    checked = _checked_spec(spec, settings, layout, model0)
    geo = geometries(checked, local, tp)
    for fqn, g in geo.items():  # the module's weights
        lacking = [t for t in range(tp) if fqn not in weights[t]]
        if lacking:
            raise CorruptCheckpointError(f"{directory}: the weight of {fqn!r} is in none of tp rank {lacking[0]}'s "
                                         "model files")
        dtype = _dtype(weights[0][fqn][0], f"{directory / weights[0][fqn][1]}: {fqn}")
        key = model_key(fqn)
        out.tensors[key] = TensorMeta(g.shape, dtype, g.pattern)
        for t in range(tp):
            if g.sources(t):
                out.add(key, g.box(t, tp), None, dtype, out.rank(pp=owner.get(fqn, 0), tp=t), weights[t][fqn][1],
                        [(weights[c][fqn][0], 0) for c in g.sources(t)])
    slices = {(s, t): [_zero12_slices(optim[(s, t)], g, int(optim[(s, t)][0][2][g].numel()))
                       for g in range(len(models[(s, t)]["param_shapes"]))] for s, t in grid}
    flat = {(s, t): [[_flat_sources(e, g, int(optim[(s, t)][0][2][g].numel()), directory) for e in optim[(s, t)]]
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
                    places = [(c, _place(slices[(s, c)][g][d], fqn, begin, numel, directory, c))
                              for c in geo[fqn].sources(t)]
                    pattern = geo[fqn].pattern
                    for state in ("master", *STATES):
                        key = f"optim/{fqn}/{state}"
                        out.tensors.setdefault(key, TensorMeta(geo[fqn].shape, "float32",
                                                               Pattern(pattern.shards, "dp", pattern.fused, pattern.pad)))
                        out.add(key, geo[fqn].box(t, tp), FlatRange(begin, numel), "float32",
                                out.rank(pp=s, dp=d, tp=t), entries[d][0],
                                [(flat[(s, c)][g][d][state], where) for c, where in places])
            step = _step(entries[0], g, directory)
            for fqn in shapes:
                if owner[fqn] != s or t != 0:
                    continue
                key = f"optim/{fqn}/step"
                out.tensors[key] = TensorMeta((), _dtype(step, f"{directory / entries[0][0]}: group {g}'s step"),
                                              Pattern())
                out.add(key, Box.full(()), None, out.tensors[key].dtype, out.rank(pp=s), entries[0][0],
                        [(step, 0)])
            if t == 0:
                _merge_group(groups_state, g, entries[0][3]["param_groups"][g], [f for f in shapes if owner[f] == s])
    facts = {"format": FORMAT, "path": str(directory.resolve()), "dp": dp, "tp": tp, "pp": pp,
             "ds_version": model0.get("ds_version"), "zero_stage": zero}
    return directory, _finish(out, model0, groups_state), facts, out.files, checked


def _step(entry, g: int, directory: Path):
    """Group ``g``'s step (the same on every rank) as a 0-d tensor: a stored one, or an array of a number."""
    try:
        step = entry[3]["state"][g]["step"]
    except (KeyError, IndexError, TypeError) as e:
        raise CorruptCheckpointError(f"{directory / entry[0]}: group {g} has no step ({e})") from None
    if isinstance(step, torch_file.StoredTensor) and step.numel() == 1:
        return replace(step, shape=(), stride=())
    if isinstance(step, (int, float)) and not isinstance(step, bool):
        return np.array(step, dtype=np.float32)  # (as torch's Adam keeps it)
    raise CorruptCheckpointError(f"{directory / entry[0]}: group {g}'s step is a {type(step).__name__}, not a number")


def _place(slices: list, fqn: str, begin: int, numel: int, directory: Path, c: int) -> int:
    """Where a tp rank's copy of ``fqn``'s slice ``[begin, begin + numel)`` starts in its partition (an
    averaged parameter's copies sit at the same place of every tp rank's flat groups)."""
    for f, at, b, n in slices:
        if f == fqn and (b, n) == (begin, numel):
            return at
    raise CorruptCheckpointError(f"{directory}: tp ranks 0 and {c} partition {fqn!r} differently; its copies cannot "
                                 "be averaged")


def _merge_group(groups_state: list, g: int, group: dict, names: list) -> None:
    if len(groups_state) <= g:
        groups_state.append({k: v for k, v in group.items() if k != "params"} | {"params": []})
    groups_state[g]["params"].extend(n for n in names if n not in groups_state[g]["params"])


def _finish(out: _Manifest, model: dict, groups_state: list) -> Manifest:
    from ucp.snapshot import values

    shared = {"optimizer": values.encode({"scalars": {}, "param_groups": groups_state}, "optimizer"),
              "extras": values.encode({}, "extras")}
    manifest = Manifest(int(model.get("global_steps") or 0), out.layout, out.tensors, tuple(out.fragments),
                        {"shared": shared, "ranks": {}}, files=out.sizes,
                        created_by=f"deepspeed {model.get('ds_version', '')}")
    manifest.validate()
    return manifest


def _zero3(directory: Path, spec, settings, prefix: str):
    """A ZeRO-3 save: per (dp rank d, tp rank t) ``zero_pp_rank_<d>_mp_rank_<t>_model_states.pt`` (each tp rank's
    local shapes; its module holds empty placeholders) and the optimizer file with ``fp32_flat_groups``."""
    model0 = _model(directory, ZERO3_MODEL_FILE.format(rank=0, mp=0))
    dims = model0.get("checkpoint_parallel_dimensions") or {}
    tp = int(dims.get("tp_degree") or model0.get("mp_world_size") or 1)
    dp = int(model0.get("dp_world_size") or 1)
    if tp > 1 and spec is None:
        raise OptionsError(f"{directory}: a tensor-parallel DeepSpeed save (tp={tp}); pass a UCL spec saying how each "
                           "parameter is split (--spec megatron-gpt, --spec megatron-llama or a file; docs/foreign.md)")
    models = [model0] + [_model(directory, ZERO3_MODEL_FILE.format(rank=0, mp=t)) for t in range(1, tp)]
    # frozen parameters (no optimizer state): each dp rank's part is in its own model file
    frozen = [{n: tuple(int(d) for d in shape) for n, shape in (m.get("frozen_param_shapes") or {}).items()}
              for m in models]
    holders = {(d, t): models[t] if d == 0 else _model(directory, ZERO3_MODEL_FILE.format(rank=d, mp=t))
               for d in range(dp) for t in range(tp)} if frozen[0] else {}
    optim = [[_optim_entry(directory, prefix + ZERO3_OPTIM_FILE.format(rank=d, mp=t), True) for d in range(dp)]
             for t in range(tp)]
    layout = Layout.from_sizes(zero=3, dp=dp, **({"tp": tp} if tp > 1 or spec is not None else {}))
    out = _Manifest(directory, layout)
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
    checked = _checked_spec(spec, settings, layout, model0)
    geo = geometries(checked, local, tp)
    for name in local:
        if name in partitioned:
            continue
        key = model_key(name)
        dtype = _dtype(models[0]["module"][name], f"{directory / ZERO3_MODEL_FILE.format(rank=0, mp=0)}: {name}")
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
        flat = [[_flat_sources(e, g, sizes[t], directory) for e in optim[t]] for t in range(tp)]
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
                    places = [(c, _place(slices[c][d], fqn, begin, numel, directory, c)) for c in geo[fqn].sources(t)]
                    for state in ("master", *STATES, "model"):
                        # (the weight is its fp32 master: ZeRO-3 keeps no other copy)
                        key = model_key(fqn) if state == "model" else f"optim/{fqn}/{state}"
                        source = "master" if state == "model" else state
                        out.add(key, geo[fqn].box(t, tp), FlatRange(begin, numel), "float32", out.rank(dp=d, tp=t),
                                optim[t][d][0], [(flat[c][d][source], where) for c, where in places])
        step = _step(optim[0][0], g, directory)
        for fqn in shapes:
            key = f"optim/{fqn}/step"
            out.tensors[key] = TensorMeta((), _dtype(step, f"{directory / optim[0][0][0]}: group {g}'s step"), Pattern())
            out.add(key, Box.full(()), None, out.tensors[key].dtype, 0, optim[0][0][0], [(step, 0)])
        _merge_group(groups_state, g, optim[0][0][3]["param_groups"][g], list(shapes))
    facts = {"format": FORMAT, "path": str(directory.resolve()), "dp": dp, "tp": tp, "pp": 1,
             "ds_version": model0.get("ds_version"), "zero_stage": 3}
    return directory, _finish(out, model0, groups_state), facts, out.files, checked


def _zero3_frozen(out: _Manifest, directory: Path, name: str, geo, holders: dict, numel: int, tp: int, dp: int) -> None:
    """A frozen ZeRO-3 parameter: dp rank ``d`` holds elements ``[d * ceil(numel / dp), ...)`` of each tp rank's
    slice, in its model file's ``frozen_param_fragments`` (the last part padded)."""
    def part(d: int, t: int):
        where = directory / ZERO3_MODEL_FILE.format(rank=d, mp=t)
        try:
            return holders[(d, t)]["frozen_param_fragments"][name]
        except (KeyError, TypeError):
            raise CorruptCheckpointError(f"{where}: no frozen_param_fragments entry for {name!r}") from None

    first = part(0, 0)
    dtype = _dtype(first, f"{directory / ZERO3_MODEL_FILE.format(rank=0, mp=0)}: {name}")
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
