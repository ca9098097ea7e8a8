"""Hugging Face weights as a source of ``ucp convert --from hf`` (docs/foreign.md section 1).

A Hugging Face model directory holds its weights as one ``model.safetensors`` or as shards listed
by ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``). Each tensor becomes the
tensor key ``model/<name>``, a whole fragment of a one-rank checkpoint at its byte offset in its
file, so the ordinary converter streams it into the universal format. The files carry no
checksums: the converter computes each fragment's CRC-32C as it reads (recorded in the universal
checkpoint's fragment table) instead of checking one.

A model directory's ``config.json`` and ``generation_config.json`` are kept in the universal
header (its ``source.config_files``), so that ``export`` writes them back; the config's
``model_type`` chooses the rules of :mod:`ucp.convert.foreign.hf_experts` that stack per-expert
tensors into the fused ones transformers holds in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

from ucp.convert.foreign.hf_experts import Placed, rules_for, stacked
from ucp.convert.foreign.source import SourceRecord, refuse_step
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError, OptionsError
from ucp.format.box import Box
from ucp.format.dtypes import SAFETENSORS_TO_NAME, itemsize
from ucp.format.fragment import Fragment
from ucp.format.jsonio import parse_json
from ucp.format.keys import model_key
from ucp.format.layout import Layout
from ucp.format.manifest import Manifest, TensorMeta
from ucp.format.pattern import Pattern
from ucp.format.universal import CONFIG_FILES
from ucp.storage.safetensors_file import read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FORMAT = "huggingface.safetensors"
#: the largest config file kept (they are a few KiB; the universal header holds them)
MAX_CONFIG_BYTES = 1 << 20


def read_configs(paths) -> dict[str, str]:
    """``{file name: text}`` of the config files at ``paths``: each a model directory (its files of
    :data:`CONFIG_FILES` that exist) or one of those files. A later path's file replaces an earlier one's.

    Raises:
        CheckpointNotFoundError: a path that does not exist.
        CorruptCheckpointError: a file that is not a JSON object, or larger than :data:`MAX_CONFIG_BYTES`.
        OptionsError: a file named other than :data:`CONFIG_FILES`.
    """
    out = {}
    for path in map(Path, paths):
        if path.is_dir():
            found = [path / n for n in CONFIG_FILES if (path / n).is_file()]
        elif path.is_file():
            if path.name not in CONFIG_FILES:
                raise OptionsError(f"{path}: a config file is named {' or '.join(CONFIG_FILES)} (or give the "
                                   "model directory that holds them)")
            found = [path]
        else:
            raise CheckpointNotFoundError(f"{path}: no such file or directory")
        for f in found:
            if f.stat().st_size > MAX_CONFIG_BYTES:
                raise CorruptCheckpointError(f"{f}: {f.stat().st_size} bytes; a config file is at most "
                                             f"{MAX_CONFIG_BYTES} bytes")
            data = f.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorruptCheckpointError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not isinstance(parse_json(data, str(f)), dict):
                raise CorruptCheckpointError(f"{f}: not a JSON object")
            out[f.name] = text
    return out


def config_rules(configs: dict[str, str]):
    """The expert rules (:mod:`ucp.convert.foreign.hf_experts`) of the model ``configs`` describe, or None."""
    text = configs.get(CONFIG_FILES[0])
    return rules_for(parse_json(text.encode(), CONFIG_FILES[0])) if text is not None else None


def hf_files(src) -> tuple[Path, dict[str, str] | None, list[str]]:
    """``(directory, weight map or None, data file names)`` of the weights at ``src``: a model
    directory (with an index, or one ``model.safetensors``) or a single ``.safetensors`` file."""
    src = Path(src)
    if src.is_file():
        return src.parent, None, [src.name]
    if not src.is_dir():
        raise CheckpointNotFoundError(f"{src}: no such file or directory")
    index = src / INDEX
    if index.is_file():
        doc = parse_json(index.read_bytes(), str(index))
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in weight_map.items()):
            raise CorruptCheckpointError(f"{index}: not a safetensors index (its 'weight_map' must map tensor names "
                                         "to file names)")
        files = sorted(set(weight_map.values()))
        for name in files:
            if Path(name).name != name:
                raise CorruptCheckpointError(f"{index}: file {name!r} is not in the model directory")
            if not (src / name).is_file():
                raise CheckpointNotFoundError(f"{src / name}: listed in {INDEX} but missing")
        return src, weight_map, files
    if (src / SINGLE).is_file():
        return src, None, [SINGLE]
    found = sorted(p.name for p in src.glob("*.safetensors"))
    hint = f" (it holds {', '.join(found[:3])}{'...' if len(found) > 3 else ''}: pass one file)" if found else ""
    raise CheckpointNotFoundError(f"{src}: no {SINGLE} or {INDEX}{hint}")


def _entry(path: Path, tname: str, entry) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    """``(dtype, shape, (begin, end))`` of a header entry, each field of exactly its type: a shape is a
    list of integers >= 0 (never a string such as ``"22"``), ``data_offsets`` two integers, begin <= end."""
    where = f"{path}: tensor {tname!r}"
    if not isinstance(entry, dict):
        raise CorruptCheckpointError(f"{where}: its header entry is a {type(entry).__name__}, not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_TO_NAME:
        raise CorruptCheckpointError(f"{where}: unknown dtype {_brief(dtype)}")
    if not isinstance(shape, list) or not all(_whole(n) for n in shape):
        raise CorruptCheckpointError(f"{where}: shape {_brief(shape)} is not a list of integers >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_whole(n) for n in offsets)
            or offsets[0] > offsets[1]):
        raise CorruptCheckpointError(f"{where}: data_offsets {_brief(offsets)} is not [begin, end] with integers "
                                     "0 <= begin <= end")
    return SAFETENSORS_TO_NAME[dtype], tuple(shape), (offsets[0], offsets[1])


def _whole(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 63


def _brief(value) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 40 else text[:37] + "..."


def _refuse_overlaps(path: Path, spans: list[tuple[int, int, str]]) -> None:
    """No two tensors of a file share a byte (each would read the other's bytes)."""
    spans = sorted(s for s in spans if s[1] > s[0])
    for (b0, e0, t0), (b1, e1, t1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CorruptCheckpointError(f"{path}: tensors {t0!r} (bytes [{b0}, {e0})) and {t1!r} (bytes [{b1}, {e1})) "
                                         "overlap in the data section")


def hf_source(src, step: int | None = None, spec=None, settings: dict | None = None) -> SourceRecord:
    """The Hugging Face weights at ``src`` described for ``convert`` (one checkpoint: no ``step``; a
    ``spec`` is applied by the converter). A model directory's config files are kept in the facts
    (``config_files``), and per-expert tensors of a MoE model it describes are stacked as
    transformers holds them (:mod:`ucp.convert.foreign.hf_experts`).

    Raises:
        CheckpointNotFoundError: no weights there, or a file the index lists is missing.
        CorruptCheckpointError: a malformed index, header or config file, an unknown dtype, a tensor
            whose bytes do not fit its shape or its file, an index naming a tensor its file lacks, or
            experts that do not stack (one missing, shapes that differ).
    """
    refuse_step(step, "Hugging Face weights have no steps; leave it out")
    directory, weight_map, files = hf_files(src)
    found, sizes, held = {}, {}, {}  # held: tensor name -> (dtype, shape, file, offset, length)
    for name in files:
        path = directory / name
        header, start = read_header(path)
        size = path.stat().st_size
        sizes[name] = size
        spans = []
        for tname, entry in header.items():
            if tname == "__metadata__":
                continue
            dtype, shape, (begin, end) = _entry(path, tname, entry)
            if end - begin != math.prod(shape) * itemsize(dtype) or start + end > size:
                raise CorruptCheckpointError(f"{path}: tensor {tname!r}: bytes [{begin}, {end}) do not hold "
                                             f"{dtype}{list(shape)} within the file's {size - start} data bytes")
            spans.append((begin, end, tname))
            where = f"{path}: tensor {tname!r}"
            if tname in found:
                raise CorruptCheckpointError(f"{where}: also in {found[tname]}")
            found[tname] = name
            if weight_map is not None and weight_map.get(tname) != name:
                continue  # the index places it elsewhere (or nowhere): not part of the model
            held[tname] = (dtype, shape, name, start + begin, end - begin)
        _refuse_overlaps(path, spans)
    if weight_map is not None:
        missing = sorted(t for t, f in weight_map.items() if found.get(t) != f)
        if missing:
            raise CorruptCheckpointError(f"{directory / INDEX}: {len(missing)} tensor(s) not in the file the index "
                                         f"names, e.g. {missing[0]!r} in {weight_map[missing[0]]}")
    if not held:
        raise CheckpointNotFoundError(f"{directory}: the safetensors file(s) {files} hold no tensor")
    configs = read_configs([src]) if Path(src).is_dir() else {}
    rules = config_rules(configs)
    if rules is not None:
        shapes, places = stacked({t: (h[0], h[1]) for t, h in held.items()}, rules, str(directory))
    else:
        shapes = {t: (h[0], h[1]) for t, h in held.items()}
        places = {t: Placed(t, (0,) * len(h[1]), h[1]) for t, h in held.items()}
    tensors = {model_key(t): TensorMeta(shape, dtype, Pattern()) for t, (dtype, shape) in shapes.items()}
    fragments = []
    for tname, (dtype, _, name, offset, length) in held.items():
        place = places[tname]
        fragments.append(Fragment(model_key(place.name), Box(place.offsets, place.sizes), None, dtype, 0, name,
                                  offset, length, 0))
    manifest = Manifest(0, Layout.single(), tensors, tuple(fragments), files=sizes, created_by=FORMAT)
    manifest.validate()
    facts = {"format": FORMAT, "path": str(directory.resolve()), "files": files}
    if configs:
        facts["config_files"] = configs
    return SourceRecord(directory, manifest, facts)
