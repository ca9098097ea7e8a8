"""Typed JSON: non-tensor training state (optimizer hyperparameters, scheduler, RNG, data-loader and
user state) stored in the manifest without pickle.

Plain JSON values stay as they are. Values JSON lacks are tagged objects with a single ``$`` key:
``{"$tuple": [...]}``, ``{"$dict": [[k, v], ...]}`` (non-string keys, or keys that start with
``$``), ``{"$float": "nan"}``, ``{"$bytes": b64}``, ``{"$ndarray": {...}}`` and ``{"$tensor": {...}}``
(small tensors, such as RNG states, inline). Anything else is refused with the path to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import sys
from typing import TYPE_CHECKING

import numpy as np

from ucp.errors import CaptureError, FormatError
from ucp.format.dtypes import dtype_name

if TYPE_CHECKING:
    import torch

_TAGS = ("$tuple", "$dict", "$float", "$bytes", "$ndarray", "$tensor")

MAX_DEPTH = 40
"""How deep an encoded value may nest (JSON arrays and objects, tags included): every document that
carries values (manifest, universal header, snapshot header) must stay within
:data:`ucp.format.jsonio.MAX_DEPTH` with the levels above them, so a deeper value is refused when it
is saved, not found unreadable when it is loaded (and a cyclic one ends there, not in RecursionError)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _tensor_bytes(t: torch.Tensor) -> tuple[str, bytes]:
    import torch

    t = t.detach().cpu().contiguous()
    # numpy lacks bfloat16 and float8: move their raw bits as unsigned integers of the same width.
    return dtype_name(t.dtype), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def encode(value, path: str = "state", _depth: int = 0):
    """Turn ``value`` into typed JSON; raises CaptureError naming ``path`` for unsupported values and for
    values nested deeper than :data:`MAX_DEPTH` (cyclic ones included)."""
    if isinstance(value, (list, tuple, dict)) and _depth + (1 if isinstance(value, (list, dict)) else 2) > MAX_DEPTH:
        raise CaptureError(f"{path}: nested deeper than {MAX_DEPTH} levels (or containing itself); flatten it")
    if isinstance(value, (np.integer, np.floating, np.bool_)):  # before float: np.float64 is a float
        return encode(value.item(), path, _depth)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"$float": repr(float(value))}
    if isinstance(value, list):
        return [encode(v, f"{path}[{i}]", _depth + 1) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return {"$tuple": [encode(v, f"{path}[{i}]", _depth + 2) for i, v in enumerate(value)]}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: encode(v, f"{path}.{k}", _depth + 1) for k, v in value.items()}
        return {"$dict": [[encode(k, f"{path}<key>", _depth + 3), encode(v, f"{path}[{k!r}]", _depth + 3)]
                          for k, v in value.items()]}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": _b64(bytes(value))}
    if isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise CaptureError(f"{path}: numpy arrays of Python objects cannot be saved; use a numeric dtype")
        return {"$ndarray": {"dtype": value.dtype.str, "shape": list(value.shape), "data": _b64(np.ascontiguousarray(value).tobytes())}}
    torch = sys.modules.get("torch")  # (a tensor exists only once torch is imported; import it no sooner)
    if torch is not None and isinstance(value, torch.Tensor):
        if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
            raise CaptureError(f"{path}: a {type(value).__name__} cannot be stored inline; keep plain tensors in non-model state")
        name, raw = _tensor_bytes(value)
        return {"$tensor": {"dtype": name, "shape": list(value.shape), "data": _b64(raw)}}
    raise CaptureError(
        f"{path}: a value of type {type(value).__name__} cannot be saved; "
        "use JSON values (numbers, strings, lists, dicts), tuples, bytes, numpy arrays or tensors"
    )


def decode(value, path: str = "state"):
    """Inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        tag, body = next(iter(value.items()))
        try:
            if tag == "$tuple":
                return tuple(decode(v, path) for v in body)
            if tag == "$dict":
                return {decode(k, path): decode(v, path) for k, v in body}
            if tag == "$float":
                return float(body)
            if tag == "$bytes":
                return base64.b64decode(body)
            if tag == "$ndarray":
                arr = np.frombuffer(base64.b64decode(body["data"]), dtype=np.dtype(body["dtype"]))
                return arr.reshape(body["shape"]).copy()
            import torch

            raw = bytearray(base64.b64decode(body["data"]))
            dtype = getattr(torch, body["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown dtype {body['dtype']!r}")
            if not raw:
                if math.prod(body["shape"]) != 0:  # (a declared shape is never allocated without its bytes)
                    raise ValueError(f"shape {body['shape']} without data")
                return torch.empty(body["shape"], dtype=dtype)
            return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(body["shape"]).clone()
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
            raise FormatError(f"{path}: malformed {tag} value ({e})") from e
    return {k: decode(v, f"{path}.{k}") for k, v in value.items()}


def split_state(per_rank: list[dict]) -> dict:
    """Non-tensor state: entries equal on every rank are stored once, the others per rank."""
    shared, ranks = {}, {str(r): {} for r in range(len(per_rank))}
    for name in sorted(set().union(*per_rank)):
        vals = [s.get(name) for s in per_rank]
        if all(name in s for s in per_rank) and all(v == vals[0] for v in vals):
            shared[name] = vals[0]
        else:
            for r, s in enumerate(per_rank):
                if name in s:
                    ranks[str(r)][name] = s[name]
    return {"shared": shared, "ranks": {r: v for r, v in ranks.items() if v}}


def value_digest(value) -> bytes:
    """A name for a typed JSON value: equal values (as JSON), equal names (16 bytes of BLAKE2b)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


_ABSENT = bytes(16)  # the digest of a name a rank does not hold


def state_offer(rank: int, state: dict) -> dict:
    """Rank ``rank``'s non-tensor ``state`` as it is folded to the committing rank (:func:`fold_state`):
    the digest of each of its values, and each distinct value once."""
    digests = {name: value_digest(value) for name, value in state.items()}
    return {"lo": rank, "n": 1, "names": digests, "values": {d: state[name] for name, d in digests.items()}}


def fold_state(a: dict, b: dict) -> dict:
    """Two folds of :func:`state_offer` s as one, ``a`` of the ranks just below ``b``'s (as a binomial
    tree folds them): each name's digests, rank after rank, in one byte string (16 bytes a rank; what
    travels is a few bytes per rank, however large the state), and each distinct value once (the ranks
    of a pipeline stage, say, hold their optimizer's param groups alike: one copy travels)."""
    if a["lo"] + a["n"] != b["lo"]:
        raise ValueError(f"the states of ranks {a['lo']}..{a['lo'] + a['n'] - 1} and {b['lo']}.."
                         f"{b['lo'] + b['n'] - 1} are not adjacent")
    names = {name: a["names"].get(name, _ABSENT * a["n"]) + b["names"].get(name, _ABSENT * b["n"])
             for name in {**a["names"], **b["names"]}}
    return {"lo": a["lo"], "n": a["n"] + b["n"], "names": names, "values": {**a["values"], **b["values"]}}


def split_folded_state(folded: dict, world_size: int) -> dict:
    """:func:`split_state` of the states of ranks ``0 .. world_size - 1`` from their fold: a value
    is shared when every rank holds it alike (the same digest); equal values of several ranks are
    the same object."""
    if (folded["lo"], folded["n"]) != (0, world_size):
        raise ValueError(f"the fold holds the states of ranks {folded['lo']}..{folded['lo'] + folded['n'] - 1}, "
                         f"not of 0..{world_size - 1}")
    values = folded["values"]
    shared, per = {}, {str(r): {} for r in range(world_size)}
    for name in sorted(folded["names"]):
        blob = folded["names"][name]
        digests = [blob[i:i + 16] for i in range(0, 16 * world_size, 16)]
        held = set(digests)
        if _ABSENT not in held and len(held) == 1:
            shared[name] = values[digests[0]]
            continue
        for r, d in enumerate(digests):
            if d != _ABSENT:
                per[str(r)][name] = values[d]
    return {"shared": shared, "ranks": {r: v for r, v in per.items() if v}}


def rank_state(state: dict, rank: int) -> dict:
    """Rank ``rank``'s view of the non-tensor state: shared entries overlaid with its own."""
    return {**state.get("shared", {}), **state.get("ranks", {}).get(str(rank), {})}
