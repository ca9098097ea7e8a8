"""Reading the files of a DeepSpeed save and assembling a ucp manifest of them, shared by the ZeRO-1/2
(:mod:`ucp.convert.foreign.deepspeed`) and ZeRO-3 (:mod:`ucp.convert.foreign.deepspeed_zero3`) readers: the stand-ins
for DeepSpeed's pickled classes, the model and optimizer files' checked contents, the settings a
packaged spec names, and :class:`ManifestParts`, which turns ``(tensor, element start)`` sources into
fragments (a byte range of a file where the bytes lie in place, decoded otherwise)."""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, replace
from enum import IntEnum
from pathlib import Path

import numpy as np

from ucp.convert.foreign import torch_file
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError
from ucp.format import values
from ucp.format.box import Box, FlatRange
from ucp.format.dtypes import DTYPES, itemsize
from ucp.format.fragment import Fragment
from ucp.format.layout import Layout
from ucp.format.manifest import Manifest, TensorMeta
from ucp.lang.apply import apply_spec
from ucp.lang.indices import index_rules

FORMAT = "deepspeed"
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
    """``path``'s object, read without torch (:func:`ucp.convert.foreign.torch_file.load`: tensors as
    :class:`StoredTensor` s, DeepSpeed's classes as stand-ins, any other class refused by name)."""
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: missing from the DeepSpeed checkpoint")
    return torch_file.load(path, {name: cls for cls, name in STAND_INS})


def tensor_dtype(t, where: str) -> str:
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


def checked_spec(spec, settings: dict | None, layout: Layout, model: dict):
    """``(checked spec, its text as applied)``: the spec (a packaged name or a file) checked with the
    settings the save records (overridden by the spec's ``model`` line, then by ``settings``) and bound
    to ``layout``; ``(None, None)`` without a spec."""
    if spec is None:
        return None, None
    checked, text = apply_spec(spec, layout, settings, model_settings(model))
    for cr in checked.rules:
        for ir in index_rules(cr.rule, checked.file):
            raise ir.error(f"{ir.transform.name}() is not applied to DeepSpeed saves yet; remove the rule")
    return checked, text


class ManifestParts:
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


def optim_entry(directory: Path, name: str, stage3: bool):
    sd = load_pt(directory / name)
    try:
        osd = sd["optimizer_state_dict"]
        if stage3:
            return name, osd, osd["fp32_flat_groups"], osd["optimizer_state_dict"], None
        return name, osd, osd["single_partition_of_fp32_groups"], osd["base_optimizer_state"], osd["param_slice_mappings"]
    except (KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{directory / name}: not a ZeRO-{3 if stage3 else '1/2'} optimizer-states "
                                     f"file (missing {e})") from None


def flat_sources(entry, g: int, size: int, directory: Path) -> dict:
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


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def model_file(directory: Path, name: str):
    """A model-states file's dict, its fields checked for the types DeepSpeed writes: ``param_shapes`` a
    list of ``{name: shape}`` with shapes lists of integers >= 0 (never a string read as digits),
    ``module`` a dict, the world sizes and the step integers."""
    where = directory / name
    model = load_pt(where)
    try:
        shapes, module = model["param_shapes"], model["module"]
    except (KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"{where}: not a DeepSpeed model-states file (missing {e})") from None

    def refuse(what: str, value) -> None:
        text = " ".join(repr(value).split())
        raise CorruptCheckpointError(f"{where}: {what} is {type(value).__name__} "
                                     f"{text if len(text) <= 40 else text[:37] + '...'}, not what DeepSpeed writes")

    if not isinstance(shapes, list):
        refuse("param_shapes", shapes)
    for group in shapes:
        if not isinstance(group, dict):
            refuse("a group of param_shapes", group)
        for fqn, shape in group.items():
            if not isinstance(fqn, str) or not isinstance(shape, (tuple, list)) or not all(map(_whole, shape)):
                refuse(f"the shape of {fqn!r}", shape)
    if module is not None and not isinstance(module, dict):
        refuse("module", module)
    for key in ("dp_world_size", "mp_world_size", "global_steps"):
        if model.get(key) is not None and not _whole(model[key]):
            refuse(key, model[key])
    return model


def group_step(entry, g: int, directory: Path):
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


def place(slices: list, fqn: str, begin: int, numel: int, directory: Path, c: int) -> int:
    """Where a tp rank's copy of ``fqn``'s slice ``[begin, begin + numel)`` starts in its partition (an
    averaged parameter's copies sit at the same place of every tp rank's flat groups)."""
    for f, at, b, n in slices:
        if f == fqn and (b, n) == (begin, numel):
            return at
    raise CorruptCheckpointError(f"{directory}: tp ranks 0 and {c} partition {fqn!r} differently; its copies cannot "
                                 "be averaged")


def merge_group(groups_state: list, g: int, group: dict, names: list) -> None:
    if len(groups_state) <= g:
        groups_state.append({k: v for k, v in group.items() if k != "params"} | {"params": []})
    groups_state[g]["params"].extend(n for n in names if n not in groups_state[g]["params"])


def finish(out: ManifestParts, model: dict, groups_state: list) -> Manifest:
    shared = {"optimizer": values.encode({"scalars": {}, "param_groups": groups_state}, "optimizer"),
              "extras": values.encode({}, "extras")}
    manifest = Manifest(int(model.get("global_steps") or 0), out.layout, out.tensors, tuple(out.fragments),
                        {"shared": shared, "ranks": {}}, files=out.sizes,
                        created_by=f"deepspeed {model.get('ds_version', '')}")
    manifest.validate()
    return manifest
