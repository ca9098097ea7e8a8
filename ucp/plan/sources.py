"""Where a target tensor's data comes from when the checkpoint names it differently.

Model classes disagree on names more often than on numbers: a manually tensor-parallel GPT keeps
one fused ``attn.qkv`` where the plain GPT has ``attn.q``, ``attn.k`` and ``attn.v``; an fp32 model
keeps no master weights where a mixed-precision optimizer does. :func:`resolve` maps a target key
to :class:`Slice` s of checkpoint tensors, in the universal index space of both (no padding, fused
parts in logical order), by these rules, tried in order:

1. the key itself;
2. a *part* of a fused tensor: ``model/h.0.attn.q.weight`` is part ``q`` of
   ``model/h.0.attn.qkv.weight`` (the fused fqn's module name replaced by the part's name, as
   ``export split`` names parts; :func:`ucp.lang.names.part_name`), and the same for its
   optimizer state; a 0-d state of the fused parameter (Adam's step) is every part's;
3. a *fused* target from its parts, when the checkpoint has every part;
4. ``optim/<fqn>/master`` (fp32 master weights) from ``model/<fqn>`` (through rules 1-3) when that
   is stored in the master's dtype: a model trained in fp32 is its own master.

Pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ucp.format.keys import MODEL, OPTIM, model_key, optim_key, parse_key
from ucp.format.universal import universal_shape
from ucp.lang.names import part_name


@dataclass(frozen=True)
class Slice:
    """Universal elements ``[lo, lo + n)`` along ``dim`` of checkpoint tensor ``key`` fill elements
    ``[to, to + n)`` along the same dim of the target; ``dim`` None: the whole tensor, in place."""

    key: str
    dim: int | None = None
    lo: int = 0
    n: int = 0
    to: int = 0


@dataclass(frozen=True)
class Resolution:
    """The slices that fill one target key, the dtype they are stored in, and the rule that found them."""

    slices: tuple[Slice, ...]
    dtype: str
    rule: str  # "same", "part", "fused" or "master"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(s.key for s in self.slices)


class SourceIndex:
    """The checkpoint's tensors (``{key: meta}`` with ``shape``, ``dtype`` and ``pattern``), indexed
    for :meth:`resolve`."""

    def __init__(self, tensors: dict):
        self.tensors = tensors
        self._parts: dict[str, Slice] = {}
        self._states: dict[str, dict[str, None]] = {}  # fqn -> optimizer states held, in checkpoint order
        for key, meta in tensors.items():
            kind = parse_key(key)
            if kind.kind == OPTIM:
                self._states.setdefault(kind.name, {})[kind.state] = None
            fused = meta.pattern.fused
            if fused is None or kind.kind not in (MODEL, OPTIM):
                continue
            at = 0
            for part, size in fused.parts:
                name = part_name(kind.name, part)
                alias = model_key(name) if kind.kind == MODEL else optim_key(name, kind.state)
                self._parts.setdefault(alias, Slice(key, fused.dim, at, size, 0))
                at += size
        # a fused parameter's 0-d optimizer state (Adam's per-parameter step) belongs to each part
        for key, meta in tensors.items():
            kind = parse_key(key)
            fused_param = tensors.get(model_key(kind.name)) if kind.kind == OPTIM else None
            if fused_param is not None and fused_param.pattern.fused is not None and tuple(meta.shape) == ():
                for part, _ in fused_param.pattern.fused.parts:
                    self._parts.setdefault(optim_key(part_name(kind.name, part), kind.state), Slice(key))
        self._part_states: dict[str, dict[str, None]] = {}  # fqn of a part -> states of its fused parameter
        for alias in self._parts:
            kind = parse_key(alias)
            if kind.kind == OPTIM:
                self._part_states.setdefault(kind.name, {})[kind.state] = None

    def shape(self, key: str) -> tuple[int, ...]:
        meta = self.tensors[key]
        return universal_shape(meta.shape, meta.pattern)

    def resolve(self, key: str, shape: tuple[int, ...], pattern, dtype: str | None = None) -> Resolution | None:
        """The slices that fill target ``key`` of universal ``shape`` (its stored ``pattern`` names
        fused parts), or None when the checkpoint lacks it. ``dtype`` (the target's) decides rule 4."""
        found = self._resolve(key, tuple(shape), pattern)
        if found is not None:
            return found
        kind = parse_key(key)
        if kind.kind == OPTIM and kind.state == "master":
            via = self._resolve(model_key(kind.name), tuple(shape), pattern)
            if via is not None and (dtype is None or via.dtype == dtype):
                return Resolution(via.slices, via.dtype, "master")
        return None

    def _resolve(self, key: str, shape: tuple[int, ...], pattern) -> Resolution | None:
        if key in self.tensors:  # the caller compares shapes: a mismatch is an error, not a reason to look on
            return Resolution((Slice(key),), self.tensors[key].dtype, "same")
        part = self._parts.get(key)
        if part is not None:
            want = list(self.shape(part.key))
            if part.dim is not None:
                want[part.dim] = part.n
            if tuple(want) == shape:
                return Resolution((part,), self.tensors[part.key].dtype, "part")
        fused = pattern.fused if pattern is not None else None
        kind = parse_key(key)
        if fused is None or kind.kind not in (MODEL, OPTIM):
            return None
        slices, at = [], 0
        for name, size in fused.parts:
            fqn = part_name(kind.name, name)
            pkey = model_key(fqn) if kind.kind == MODEL else optim_key(fqn, kind.state)
            if pkey not in self.tensors:
                return None
            want = list(shape)
            want[fused.dim] = size
            if self.shape(pkey) != tuple(want):
                return None
            slices.append(Slice(pkey, fused.dim, 0, size, at))
            at += size
        dtypes = {self.tensors[s.key].dtype for s in slices}
        if len(dtypes) != 1:
            return None
        return Resolution(tuple(slices), dtypes.pop(), "fused")

    def states(self, fqn: str, pattern=None) -> list[str]:
        """Optimizer state names the checkpoint holds for parameter ``fqn``, directly or through
        rules 2 and 3 (a fused parameter: the states every part has), in the checkpoint's order."""
        own = self._states.get(fqn) or self._part_states.get(fqn)
        if own:
            return list(own)
        fused = pattern.fused if pattern is not None else None
        if fused is None:
            return []
        parts = [self._states.get(part_name(fqn, name), {}) for name, _ in fused.parts]
        return [s for s in parts[0] if all(s in p for p in parts[1:])]


def to_source(box, s: Slice):
    """The part of target universal ``box`` that slice ``s`` fills, in the source's coordinates (None: none)."""
    if s.dim is None:
        return box
    a = max(box.offsets[s.dim], s.to)
    b = min(box.offsets[s.dim] + box.sizes[s.dim], s.to + s.n)
    if a >= b:
        return None
    return replace(box, offsets=_put(box.offsets, s.dim, s.lo + a - s.to), sizes=_put(box.sizes, s.dim, b - a))


def relocate(pieces, s: Slice) -> list:
    """Source pieces of checkpoint tensor ``s.key`` cut to the slice and moved into the target's
    universal coordinates (their ``ref`` tagged with the key: chunk indices repeat across tensors)."""
    if s.dim is None:
        return [replace(p, ref=(s.key, p.ref)) for p in pieces]
    out = []
    for p in pieces:
        u = p.universal
        a, b = max(u.offsets[s.dim], s.lo), min(u.offsets[s.dim] + u.sizes[s.dim], s.lo + s.n)
        if a >= b:
            continue
        cut = a - u.offsets[s.dim]
        region = replace(p.region, offsets=_put(p.region.offsets, s.dim, p.region.offsets[s.dim] + cut),
                         sizes=_put(p.region.sizes, s.dim, b - a))
        moved = replace(u, offsets=_put(u.offsets, s.dim, s.to + a - s.lo), sizes=_put(u.sizes, s.dim, b - a))
        out.append(replace(p, ref=(s.key, p.ref), region=region, universal=moved))
    return out


def _put(t: tuple, i: int, v: int) -> tuple:
    return t[:i] + (v,) + t[i + 1:]
