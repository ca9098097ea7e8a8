"""DeepSpeed ZeRO checkpoints (stages 1, 2 and 3, without TP/PP) as a source of ``ucp convert --from
deepspeed`` (docs/foreign.md section 3).

A DeepSpeed checkpoint folder (``engine.save_checkpoint(dir)``) holds ``latest`` (the tag of the
newest save) and, per tag, ``mp_rank_00_model_states.pt`` (the module's weights, the parameters'
shapes per group, the step) and, for ZeRO stages 1 and 2, one
``zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per data-parallel rank: rank ``r``'s partition of
each parameter group's flat fp32 master weights and of its Adam moments, with the address of each
parameter's slice in it (``param_slice_mappings``). A ZeRO-3 save has per-rank model-states files and
splits each parameter on its own (``ceil(numel / dp)`` elements per rank, in ``fp32_flat_groups``).

Every file is read with ``torch.load(weights_only=True, mmap=True)`` (pages are read as slices are
needed, so memory stays bounded by the largest slice). DeepSpeed pickles three of its own classes
in the optimizer files of the tested configurations; :data:`STAND_INS` maps exactly those names to
inert classes of this module, so neither deepspeed nor an open unpickler is needed.

Tensor keys: ``model/<fqn>`` (the module's weight, in its dtype), ``optim/<fqn>/master`` (DeepSpeed's
``fp32``), ``optim/<fqn>/exp_avg``, ``optim/<fqn>/exp_avg_sq``, ``optim/<fqn>/step`` (the group's
step, a 0-d tensor, as ``ds_to_universal`` writes it). The optimizer states are flat fragments
partitioned over ``dp``: each rank's slice of a parameter is elements ``[start, start + numel)`` of the
flattened parameter, with ``start`` from the slice's place in the group's flat buffer.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError
from ucp.spec.box import Box, FlatRange
from ucp.spec.dtypes import DTYPES
from ucp.spec.fragment import Fragment
from ucp.spec.keys import model_key
from ucp.spec.layout import Layout
from ucp.spec.manifest import Manifest, TensorMeta
from ucp.spec.pattern import Pattern

FORMAT = "deepspeed"
MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO3_MODEL_FILE = "zero_pp_rank_{rank}_mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
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
]


def load_pt(path: Path):
    """``path`` through ``torch.load(weights_only=True, mmap=True)``, DeepSpeed's classes as stand-ins."""
    import torch

    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: missing from the DeepSpeed checkpoint")
    try:
        with torch.serialization.safe_globals(STAND_INS):
            return torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as e:
        try:
            unknown = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - {n for _, n in STAND_INS})
        except Exception:
            unknown = []
        if unknown:
            why = (f"it pickles {', '.join(unknown)}, which ucp does not load (only "
                   f"{', '.join(n for _, n in STAND_INS)} are read, as inert stand-ins)")
        else:
            why = " ".join(str(e).split())[:300]
        raise CorruptCheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {why}") from None


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


def _refuse_unsupported(directory: Path) -> None:
    names = [p.name for p in directory.iterdir()]
    if any(re.search(r"mp_rank_(?!00_)\d+_(model|optim)_states\.pt$", n) for n in names) or \
            any(n.startswith("layer_") for n in names):
        raise CorruptCheckpointError(f"{directory}: a tensor- or pipeline-parallel DeepSpeed checkpoint; ucp imports "
                                     "ZeRO-1, 2 and 3 without TP/PP so far (docs/foreign.md section 3)")
    if any(n.startswith("bf16_zero_pp_rank_") for n in names):
        raise CorruptCheckpointError(f"{directory}: a DeepSpeed checkpoint of the bf16 optimizer; ucp imports fp32 "
                                     "ZeRO-1/2/3 saves so far (docs/foreign.md section 3)")


def _dtype(t, where: str) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CorruptCheckpointError(f"{where}: dtype {name} has no ucp equivalent")
    return name


class DeepSpeedFiles:
    """The loaded (memory-mapped) files of one save; ``decode`` gives a fragment's bytes."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.where: dict = {}  # fragment -> (a function returning the whole source tensor, element start)
        self._lock = threading.Lock()

    def decode(self, frag):
        import torch

        source, start = self.where[frag]
        t = source()
        n = frag.flat.numel if frag.flat is not None else frag.box.numel
        flat = t.reshape(-1)[start:start + n]
        if flat.numel() != n:
            raise CorruptCheckpointError(f"{self.directory}: {frag.key}: the slice [{start}, {start + n}) runs past its "
                                         f"partition of {t.numel()} elements")
        return flat.contiguous().view(torch.uint8).numpy()


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


def deepspeed_manifest(src) -> tuple[Path, Manifest, dict, DeepSpeedFiles]:
    """``(directory, manifest, source facts, files)`` describing the DeepSpeed save ``src``.

    Raises:
        CheckpointNotFoundError: no DeepSpeed save there, or one of its files is missing.
        CorruptCheckpointError: a file that needs a class beyond the stand-ins, a TP/PP save (not
            supported yet), or partitions that do not add up to the parameters.
    """
    from ucp.snapshot import values

    directory, tag = checkpoint_dir(src)
    _refuse_unsupported(directory)
    stage3 = not (directory / MODEL_FILE).is_file() and (directory / ZERO3_MODEL_FILE.format(rank=0)).is_file()
    model_name = ZERO3_MODEL_FILE.format(rank=0) if stage3 else MODEL_FILE
    where = directory / model_name
    model = load_pt(where)
    try:
        module = model["module"]
        param_shapes = model["param_shapes"]
        dp = int(model.get("dp_world_size") or 1)
    except (KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{where}: not a DeepSpeed model-states file (missing {e})") from None
    if stage3 and (model.get("frozen_param_shapes") or {}):
        raise CorruptCheckpointError(f"{where}: a ZeRO-3 save with frozen parameters; ucp does not import those yet")
    files = DeepSpeedFiles(directory)
    tensors, fragments, sizes = {}, [], {model_name: where.stat().st_size}
    partitioned = {fqn for shapes in param_shapes for fqn in shapes} if stage3 else set()
    for name, t in module.items():
        if name in partitioned:
            continue  # (ZeRO-3: an empty placeholder; the weight comes from the fp32 parts below)
        key = model_key(name)
        tensors[key] = TensorMeta(tuple(t.shape), _dtype(t, f"{where}: {name}"), Pattern())
        frag = Fragment(key, Box.full(tuple(t.shape)), None, tensors[key].dtype, 0, model_name, 0,
                        t.numel() * t.element_size(), 0)
        files.where[frag] = ((lambda t=t: t), 0)
        fragments.append(frag)
    optim = []
    for rank in range(dp):
        name = OPTIM_FILE.format(rank=rank)
        sd = load_pt(directory / name)
        sizes[name] = (directory / name).stat().st_size
        try:
            osd = sd["optimizer_state_dict"]
            if stage3:
                optim.append((name, osd, osd["fp32_flat_groups"], osd["optimizer_state_dict"], None))
            else:
                optim.append((name, osd, osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"],
                              osd["param_slice_mappings"]))
        except (KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{directory / name}: not a ZeRO-{3 if stage3 else '1/2'} optimizer-states "
                                         f"file (missing {e})") from None
    groups_state = []
    for g, shapes in enumerate(param_shapes):
        size = int(optim[0][2][g].numel())  # every rank's partition of group g has this many elements
        shapes = {fqn: tuple(int(d) for d in shape) for fqn, shape in shapes.items()}
        slices = _zero3_slices(shapes, dp, size, str(directory)) if stage3 else _zero12_slices(optim, g, size)
        for fqn, shape in shapes.items():
            for suffix in ("master", *STATES):
                tensors[f"optim/{fqn}/{suffix}"] = TensorMeta(shape, "float32", Pattern(flat="dp"))
            if stage3:
                tensors[model_key(fqn)] = TensorMeta(shape, "float32", Pattern(flat="dp"))
        for rank, (name, _, fp32, base, _) in enumerate(optim):
            state = base["state"][g]
            sources = {"master": fp32[g], **{s: state[s] for s in STATES}}
            for s, t in sources.items():
                if t.numel() != size or str(t.dtype) != "torch.float32":
                    raise CorruptCheckpointError(f"{directory / name}: group {g}'s {s} partition has {t.numel()} "
                                                 f"{t.dtype} elements, not {size} float32")
            if stage3:
                sources["model"] = fp32[g]  # fp32 training: the weight is its fp32 master
            for fqn, at, begin, numel in slices[rank]:
                if fqn not in shapes:
                    raise CorruptCheckpointError(f"{directory / name}: a slice of {fqn!r}, which is not in group {g} "
                                                 f"of {model_name}")
                for s, t in sources.items():
                    key = model_key(fqn) if s == "model" else f"optim/{fqn}/{s}"
                    frag = Fragment(key, Box.full(shapes[fqn]), FlatRange(begin, numel), "float32", rank, name, 0,
                                    numel * 4, 0)
                    files.where[frag] = ((lambda t=t: t), at)
                    fragments.append(frag)
        step = optim[0][3]["state"][g]["step"].reshape(())  # the group's, the same on every rank
        for fqn in shapes:
            key = f"optim/{fqn}/step"
            tensors[key] = TensorMeta((), _dtype(step, f"{directory / optim[0][0]}: group {g}'s step"), Pattern())
            frag = Fragment(key, Box.full(()), None, tensors[key].dtype, 0, optim[0][0], 0, step.element_size(), 0)
            files.where[frag] = ((lambda t=step: t), 0)
            fragments.append(frag)
        groups_state.append({k: v for k, v in optim[0][3]["param_groups"][g].items() if k != "params"}
                            | {"params": list(shapes)})
    shared = {"optimizer": values.encode({"scalars": {}, "param_groups": groups_state}, "optimizer"),
              "extras": values.encode({}, "extras")}
    layout = Layout.from_sizes(dp=dp)
    manifest = Manifest(int(model.get("global_steps") or 0), layout, tensors, tuple(fragments),
                        {"shared": shared, "ranks": {}}, files=sizes, created_by=f"deepspeed {model.get('ds_version', '')}")
    manifest.validate()
    facts = {"format": FORMAT, "path": str(directory.resolve()), "tag": tag, "dp": dp,
             "ds_version": model.get("ds_version"), "zero_stage": int(optim[0][1].get("zero_stage", 0))}
    return directory, manifest, facts, files
