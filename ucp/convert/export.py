"""``export``: a universal checkpoint's model weights as Hugging Face-style safetensors.

One ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map": {name: file}}``)
when the weights exceed the shard size; with ``optimizer=True`` the optimizer states alike, as
``optimizer*.safetensors`` named ``<export name>/<state>``. Names and splits follow the UCL
spec's export rules (:mod:`ucp.lang.names`), then the Hugging Face names of the model its
``config.json`` describes (fused experts cut back into per-expert tensors,
:mod:`ucp.convert.foreign.hf_experts`); the config files are written beside the weights, so that
``from_pretrained`` takes the directory as it is. Tensors stream one at a time from the universal
arrays into the files; the output directory appears only when complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ucp.convert.foreign.hf import config_rules, read_configs
from ucp.convert.foreign.hf_experts import Cut, ExpertRules, unstacked
from ucp.errors import CheckpointNotFoundError, OptionsError
from ucp.format.dtypes import DTYPES, itemsize
from ucp.format.keys import MODEL, OPTIM, parse_key
from ucp.format.universal import ArrayMeta, UniversalHeader, stored_dtype
from ucp.lang.apply import read_program
from ucp.lang.names import ExportName, export_names, renamed
from ucp.storage.directory import list_steps
from ucp.storage.safetensors_file import Slot, write_stream
from ucp.storage.location import local_path
from ucp.storage.objstore import as_location
from ucp.storage.staging import Staging
from ucp.storage.universal_io import array_reader, is_universal, read_header

#: shard size above which the weights are split over several files (Hugging Face's default)
DEFAULT_SHARD_BYTES = 5 * 10**9
CAST_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: ``files`` the safetensors files holding the tensors, ``indexes`` the
    ``*.safetensors.index.json`` files listing a sharded group's files (none when each group fits one),
    ``configs`` the model config files written beside them."""

    out: str
    files: tuple[str, ...]
    tensors: int
    nbytes: int
    seconds: float
    indexes: tuple[str, ...] = ()
    configs: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Item:
    """One exported tensor: a region of one universal array (``cut`` names it and says where)."""

    key: str
    meta: ArrayMeta
    cut: Cut
    dtype: str
    suffix: str = ""

    @property
    def name(self) -> str:
        return self.cut.name + self.suffix

    @property
    def shape(self) -> tuple[int, ...]:
        return self.cut.shape

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * itemsize(self.dtype)

    def region(self) -> tuple[slice, ...]:
        return tuple(slice(a, a + n) for a, n in zip(self.cut.starts, self.cut.sizes))


def _cuts(part: ExportName, shape: tuple[int, ...], rules: ExpertRules | None) -> list[Cut]:
    """The exported tensors of export name ``part`` of a tensor of ``shape``: under the Hugging Face
    names of ``rules`` when given (a fused expert tensor cut into its experts)."""
    if part.dim is None:
        if rules is not None:
            return unstacked(part.name, shape, rules)
        return [Cut(part.name, (0,) * len(shape), tuple(shape), False)]
    starts, sizes = [0] * len(shape), list(shape)
    starts[part.dim], sizes[part.dim] = part.start, part.stop - part.start
    return [Cut(rules.file_name(part.name) if rules is not None else part.name, tuple(starts), tuple(sizes), False)]


def export(universal, out, spec: str | Path | None = None, *, optimizer: bool = False,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: str | None = None, config=None,
           progress: Callable[[int], None] | None = None, total: Callable[[int], None] | None = None,
           fsync: bool = True) -> ExportResult:
    """Write the model weights (and with ``optimizer`` the optimizer states) of a universal checkpoint.

    Args:
        universal: a universal checkpoint directory (made by ``convert``).
        out: the directory to create; must not exist.
        spec: a UCL file whose export rules (rename, split) apply; default: the spec the checkpoint
            was converted with, if any.
        optimizer: also write the optimizer states.
        max_shard_bytes: start a new file when the next tensor would pass this size.
        dtype: cast floating-point weights to ``float32``, ``bfloat16`` or ``float16``; default: keep.
        config: paths of model config files to write beside the weights: model directories (their
            ``config.json`` and ``generation_config.json``) or those files; default: the ones the
            checkpoint kept from a Hugging Face source (``convert --from hf``). A ``config.json``
            whose ``model_type`` has packaged expert rules (Mixtral, Qwen2/3-MoE, DeepSeek-V3) also
            gives the weights their Hugging Face names (fused experts cut into one tensor each).
        progress: called with byte counts as tensors are written; ``total`` once with the sum.

    Raises:
        CheckpointNotFoundError: ``universal`` is not a universal checkpoint.
        OptionsError: ``out`` exists, or an option is out of range.
        UclError: the export rules are malformed or make names collide.
        CorruptCheckpointError: a chunk fails its checksum, or a config file is not a JSON object.
    """
    t0 = time.perf_counter()
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise OptionsError(f"max_shard_bytes={max_shard_bytes!r}: use a positive number of bytes")
    if dtype is not None and dtype not in CAST_DTYPES:
        raise OptionsError(f"dtype={dtype!r}: use one of {', '.join(CAST_DTYPES)}, or None to keep each tensor's")
    universal, out = as_location(universal), local_path(out, "export")
    if not is_universal(universal):
        distributed = (universal / "manifest.json").exists() or bool(list_steps(universal))
        what = "a distributed checkpoint; run 'ucp convert' on it first" if distributed \
            else "not a universal checkpoint (no zarr.json)" if universal.exists() else "no such directory"
        raise CheckpointNotFoundError(f"{universal}: {what}")
    header = read_header(universal)
    configs = read_configs(config) if config else dict(header.source.get("config_files", {}))
    groups = _items(header, read_program(spec, header.spec), optimizer, dtype, config_rules(configs))
    if total is not None:
        total(sum(i.nbytes for items in groups.values() for i in items))
    staging = Staging(out, fsync=fsync)
    files: list[str] = []
    indexes: list[str] = []
    with staging:
        for prefix, items in groups.items():
            data, index = _write_group(staging.path, prefix, items, universal, header, max_shard_bytes, progress, fsync)
            files += data
            indexes += index
        for name, text in configs.items():
            (staging.path / name).write_bytes(text.encode())
        staging.commit()
    count = sum(len(v) for v in groups.values())
    nbytes = sum(i.nbytes for items in groups.values() for i in items)
    return ExportResult(str(out), tuple(files), count, nbytes, time.perf_counter() - t0, tuple(indexes),
                        tuple(configs))


def _items(header: UniversalHeader, program, optimizer: bool, dtype: str | None,
           rules: ExpertRules | None) -> dict[str, list[_Item]]:
    prog, file = program if program is not None else (None, "<ucl>")
    params = {parse_key(k).name: a.pattern for k, a in header.tensors.items() if k.startswith(MODEL + "/")}
    names = export_names(prog, params, file)
    groups: dict[str, list[_Item]] = {"model": [], "optimizer": []}
    for key, meta in header.tensors.items():
        kind, fqn, state = parse_key(key)
        out_dtype = dtype if dtype is not None and meta.dtype in CAST_DTYPES else meta.dtype
        if kind == MODEL:
            groups["model"] += [_Item(key, meta, c, out_dtype) for n in names[fqn] for c in _cuts(n, meta.shape, rules)]
        elif kind == OPTIM and optimizer:
            parts = names.get(fqn)
            model = header.tensors.get(f"{MODEL}/{fqn}")
            if parts is not None and model is not None and meta.shape == () and len(parts) == 1:
                # a 0-d state (a step count) goes with each tensor its parameter is cut into
                cuts = [Cut(c.name, (), (), False) for c in _cuts(parts[0], model.shape, rules)]
            else:
                if parts is None or model is None or model.shape != meta.shape:
                    parts = [ExportName(parts[0].name if parts and len(parts) == 1 else renamed(prog, fqn, file))]
                cuts = [c for n in parts for c in _cuts(n, meta.shape, rules)]
            groups["optimizer"] += [_Item(key, meta, c, out_dtype, f"/{state}") for c in cuts]
    return {k: v for k, v in groups.items() if v}


def _write_group(stage: Path, prefix: str, items: list[_Item], universal: Path, header, max_shard_bytes: int,
                 progress, fsync: bool) -> tuple[list[str], list[str]]:
    """Write one group (``model`` or ``optimizer``): ``(its safetensors files, its index file if sharded)``."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    n = len(shards)
    names = [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for name, shard in zip(names, shards):
        slots = [Slot(i.name, DTYPES[i.dtype][1], i.shape, i.nbytes) for i in shard]

        held: dict = {}  # the fused expert tensor being cut: read once, not once per expert

        def produce(j: int, shard=shard, held=held):
            item = shard[j]
            if item.cut.squeeze:  # (an expert's chunks hold the other experts too)
                if held.get("key") != item.key:
                    held.clear()
                    with array_reader(universal, item.key, item.meta) as reader:
                        held.update(key=item.key, data=reader.read(tuple(slice(0, n) for n in item.meta.shape)))
                data = held["data"][item.region()]
            else:
                held.clear()
                with array_reader(universal, item.key, item.meta) as reader:
                    data = reader.read(item.region())
            data = _cast(data, item.meta.dtype, item.dtype)
            if progress is not None:
                progress(item.nbytes)
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8)

        write_stream(stage / name, slots, produce, {"format": "pt"}, fsync)
    if n > 1:
        index = {"metadata": {"total_size": sum(i.nbytes for i in items)},
                 "weight_map": {i.name: name for name, shard in zip(names, shards) for i in shard}}
        (stage / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names, [f"{prefix}.safetensors.index.json"]
    return names, []


def _cast(data: np.ndarray, src: str, dst: str) -> np.ndarray:
    """``data`` (stored bits of dtype ``src``) as dtype ``dst``, rounded as torch rounds."""
    if src == dst:
        return data
    import torch

    t = torch.from_numpy(np.ascontiguousarray(data)).view(getattr(torch, src)).to(getattr(torch, dst))
    return t.view(getattr(torch, stored_dtype(dst))).numpy()
