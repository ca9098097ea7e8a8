"""Hugging Face weights as a source of ``ucp convert --from hf`` (docs/foreign.md section 1).

A Hugging Face model directory holds its weights as one ``model.safetensors`` or as shards listed
by ``model.safetensors.index.json`` (``{"weight_map": {name: file}}``). Each tensor becomes the
tensor key ``model/<name>``, a whole fragment of a one-rank checkpoint at its byte offset in its
file, so the ordinary converter streams it into the universal format. The files carry no
checksums: the converter computes each fragment's CRC-32C as it reads (recorded in the universal
checkpoint's fragment table) instead of checking one.
"""

from __future__ import annotations

import json
from pathlib import Path

from ucp.convert.foreign.source import SourceRecord, refuse_step
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError
from ucp.format.box import Box
from ucp.format.dtypes import SAFETENSORS_TO_NAME, itemsize
from ucp.format.fragment import Fragment
from ucp.format.keys import model_key
from ucp.format.layout import Layout
from ucp.format.manifest import Manifest, TensorMeta
from ucp.format.pattern import Pattern
from ucp.storage.safetensors_file import read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FORMAT = "huggingface.safetensors"


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
        try:
            doc = json.loads(index.read_text())
            weight_map = doc["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in weight_map.items()):
                raise TypeError("weight_map must map tensor names to file names")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CorruptCheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
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


def hf_source(src, step: int | None = None, spec=None, settings: dict | None = None) -> SourceRecord:
    """The Hugging Face weights at ``src`` described for ``convert`` (one checkpoint: no ``step``; a
    ``spec`` is applied by the converter).

    Raises:
        CheckpointNotFoundError: no weights there, or a file the index lists is missing.
        CorruptCheckpointError: a malformed index or header, an unknown dtype, a tensor whose bytes
            do not fit its shape or its file, or an index naming a tensor its file lacks.
    """
    refuse_step(step, "Hugging Face weights have no steps; leave it out")
    directory, weight_map, files = hf_files(src)
    tensors, fragments, sizes, found = {}, [], {}, {}
    for name in files:
        path = directory / name
        header, start = read_header(path)
        size = path.stat().st_size
        sizes[name] = size
        for tname, entry in header.items():
            if tname == "__metadata__":
                continue
            where = f"{path}: tensor {tname!r}"
            try:
                dtype = SAFETENSORS_TO_NAME[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except KeyError as e:
                raise CorruptCheckpointError(f"{where}: unknown dtype or missing field ({e})") from None
            except (TypeError, ValueError) as e:
                raise CorruptCheckpointError(f"{where}: malformed entry ({e})") from None
            numel = 1
            for s in shape:
                numel *= s
            if any(s < 0 for s in shape) or end - begin != numel * itemsize(dtype) or begin < 0 or start + end > size:
                raise CorruptCheckpointError(f"{where}: bytes [{begin}, {end}) do not hold {dtype}{list(shape)} "
                                             f"within the file's {size - start} data bytes")
            if tname in found:
                raise CorruptCheckpointError(f"{where}: also in {found[tname]}")
            found[tname] = name
            if weight_map is not None and weight_map.get(tname) != name:
                continue  # the index places it elsewhere (or nowhere): not part of the model
            key = model_key(tname)
            tensors[key] = TensorMeta(shape, dtype, Pattern())
            fragments.append(Fragment(key, Box.full(shape), None, dtype, 0, name, start + begin, end - begin, 0))
    if weight_map is not None:
        missing = sorted(t for t, f in weight_map.items() if found.get(t) != f)
        if missing:
            raise CorruptCheckpointError(f"{directory / INDEX}: {len(missing)} tensor(s) not in the file the index "
                                         f"names, e.g. {missing[0]!r} in {weight_map[missing[0]]}")
    if not tensors:
        raise CheckpointNotFoundError(f"{directory}: the safetensors file(s) {files} hold no tensor")
    manifest = Manifest(0, Layout.single(), tensors, tuple(fragments), files=sizes, created_by=FORMAT)
    manifest.validate()
    return SourceRecord(directory, manifest, {"format": FORMAT, "path": str(directory.resolve()), "files": files})
