"""``expert()`` and ``stage()``: tensors a rank names by an index local to its coordinate on an axis.

Mixture-of-experts code holds ``experts.{j}`` with ``j`` counted from 0 on every ``ep`` rank, and
pipeline code may hold ``layers.{i}`` counted from 0 on every stage. The universal name takes the
global index. With ``N`` the rule's ``experts=`` or ``layers=`` (split evenly over the axis's ``size``
ranks, ``N / size`` each) and ``coord`` the rank's coordinate on the axis:

- contiguous placement (the default; ``stage`` always): ``global = coord * (N / size) + local``;
- ``expert(..., placement=strided)``: ``global = local * size + coord``.

The index is the glob's capture: ``stage`` takes the first capture of the glob, ``expert`` the last.
Pure: names and manifests in, names and manifests out; every error names the rule's line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ucp.errors import UclError
from ucp.format.box import Box
from ucp.format.keys import MODEL, OPTIM, model_key, optim_key, parse_key
from ucp.format.manifest import Manifest, TensorMeta
from ucp.format.pattern import Pattern
from ucp.lang import ast
from ucp.lang.validate import INDEX_TRANSFORMS, CheckedProgram

#: transform -> (its count keyword, what it counts)
_COUNTS = {"expert": ("experts", "expert"), "stage": ("layers", "layer")}


@dataclass(frozen=True)
class IndexRule:
    """One ``expert()`` or ``stage()`` transform of a rule, with the rule (for its line) and file."""

    transform: ast.Transform
    rule: ast.Rule
    file: str

    @property
    def axis(self) -> str:
        return self.transform.args[0]

    @property
    def total(self) -> int:
        return self.transform.kw(_COUNTS[self.transform.name][0])

    @property
    def strided(self) -> bool:
        return self.transform.kw("placement") == "strided"

    def key(self) -> tuple:
        """What the mapping means, whatever the layout: globs, transform, count, placement."""
        return (self.rule.globs, self.transform.name, self.total, self.strided)

    def error(self, message: str) -> UclError:
        return UclError(message, self.file, self.transform.pos.line or self.rule.pos.line,
                        self.transform.pos.column or self.rule.pos.column)

    def group(self, rx: re.Pattern) -> str:
        """The capture holding the index: ``stage`` the glob's first, ``expert`` its last."""
        names = list(rx.groupindex)
        return names[0] if self.transform.name == "stage" else names[-1]

    def per_rank(self, size: int) -> int:
        """How many indices each of the axis's ``size`` ranks holds.

        Raises:
            UclError: the count does not split evenly over the axis.
        """
        count, what = _COUNTS[self.transform.name]
        if self.total % size:
            raise self.error(f"{self.transform.name}({self.axis}, {count}={self.total}): {self.total} {what}s do not "
                             f"split evenly over {self.axis}={size}; use an {self.axis} size that divides {self.total}")
        return self.total // size

    def to_global(self, local: int, coord: int, size: int, fqn: str) -> int:
        """The global index of ``local`` held at ``coord`` of an axis of ``size`` ranks.

        Raises:
            UclError: ``local`` is not below the count each rank holds.
        """
        each = self.per_rank(size)
        if local >= each:
            _, what = _COUNTS[self.transform.name]
            raise self.error(f"{fqn!r}: local {what} index {local} is out of range: each of the {size} {self.axis} "
                             f"rank(s) holds {each} of {self.total} (indices 0..{each - 1}); fix the count or the glob")
        return local * size + coord if self.strided else coord * each + local

    def check_global(self, index: int, fqn: str) -> None:
        """A global index must be below the count.

        Raises:
            UclError: it is not.
        """
        count, what = _COUNTS[self.transform.name]
        if index >= self.total:
            raise self.error(f"{fqn!r}: {what} index {index} is out of range for {count}={self.total}; fix the count")


def index_rules(rule: ast.Rule, file: str) -> tuple[IndexRule, ...]:
    """The ``expert()`` / ``stage()`` transforms of ``rule``."""
    return tuple(IndexRule(t, rule, file) for t in rule.transforms if t.name in INDEX_TRANSFORMS)


def renamed(fqn: str, m: re.Match, indices: dict[str, int]) -> str:
    """``fqn`` (matched as ``m``) with the captures named in ``indices`` replaced by their values."""
    out, end = [], len(fqn)
    for group in sorted(indices, key=m.start, reverse=True):
        out.append(str(indices[group]) + fqn[m.end(group):end])
        end = m.start(group)
    return fqn[:end] + "".join(reversed(out))


def first_match(checked: CheckedProgram, fqn: str):
    """``(compiled rule, its regex, the match)`` of the first rule matching ``fqn``, or None."""
    for cr in checked.rules:
        for rx in cr.regexes:
            m = rx.fullmatch(fqn)
            if m is not None:
                return cr, rx, m
    return None


def place_manifest(checked: CheckedProgram, manifest: Manifest) -> Manifest:
    """``manifest`` with the tensors of ``expert()`` / ``stage()`` rules under their global names.

    A tensor the checkpoint records sharded over the rule's axis (dim ``D`` split over ``ep``: each
    rank's shard is its local tensor of that name) becomes one tensor per coordinate of the axis, named
    by the global index, its fragments moved with it; the optimizer states sharing that shard move too,
    those that are not sharded (0-d step counts) are copied to every global name. A tensor recorded
    without a shard over the axis already has its global name (saved with a live spec, or at axis size
    1): its index is checked against the count.

    Raises:
        UclError: at the rule: a count that does not split over the axis, an index out of range, a
            shard that is not the outermost split of its dim or does not split evenly, or global names
            that collide with tensors the checkpoint has.
    """
    layout = manifest.layout
    tensors = dict(manifest.tensors)
    frags: dict[str, list] = {}
    for f in manifest.fragments:
        frags.setdefault(f.key, []).append(f)
    by_fqn: dict[str, list[str]] = {}
    for key in manifest.tensors:
        parsed = parse_key(key)
        if parsed.kind in (MODEL, OPTIM):
            by_fqn.setdefault(parsed.name, []).append(key)
    todo = []
    for key, meta in manifest.tensors.items():
        parsed = parse_key(key)
        if parsed.kind != MODEL:
            continue
        found = first_match(checked, parsed.name)
        if found is None:
            continue  # (``match`` reports tensors no rule matches)
        cr, rx, m = found
        rules = index_rules(cr.rule, checked.file)
        sharded = [ir for ir in rules if any(s.axis == ir.axis for s in meta.pattern.shards)]
        for ir in rules:
            if ir in sharded:
                ir.to_global(int(m.group(ir.group(rx))), 0, layout.size(ir.axis), parsed.name)
            else:
                ir.per_rank(layout.size(ir.axis))
                ir.check_global(int(m.group(ir.group(rx))), parsed.name)
        if len(sharded) > 1:
            raise sharded[1].error(f"{parsed.name!r} is sharded over both {sharded[0].axis} and {sharded[1].axis}; "
                                   "only one local index per tensor can be mapped")
        if sharded:
            todo.append((sharded[0], parsed.name, m, rx, meta))
    if not todo:
        return manifest
    families = {fqn: [(key, tensors.pop(key), frags.pop(key, [])) for key in by_fqn[fqn]] for _, fqn, _, _, _ in todo}
    for ir, fqn, m, rx, meta in todo:
        _split_local(ir, fqn, m, rx, meta, layout, tensors, frags, families[fqn])
    return replace(manifest, tensors=tensors, fragments=tuple(f for fs in frags.values() for f in fs))


def _split_local(ir: IndexRule, fqn: str, m: re.Match, rx: re.Pattern, meta: TensorMeta, layout, tensors: dict,
                 frags: dict, family: list) -> None:
    """Add to ``tensors`` and ``frags`` the tensors of ``family`` (``fqn``'s ``(key, meta, fragments)`` and
    its optimizer states', taken out of them), ``fqn`` sharded over ``ir.axis``: one per coordinate."""
    shard = next(s for s in meta.pattern.shards if s.axis == ir.axis)
    size = layout.size(ir.axis)
    if next(s for s in meta.pattern.shards if s.dim == shard.dim) != shard:
        raise ir.error(f"{fqn!r}: its shard over {ir.axis} is not the outermost split of dim {shard.dim}; "
                       "a local index needs the axis to split the dim first")
    if meta.shape[shard.dim] % size:
        raise ir.error(f"{fqn!r}: dim {shard.dim} of size {meta.shape[shard.dim]} does not split evenly over "
                       f"{ir.axis}={size}, so its shards are not whole local tensors")
    chunk = meta.shape[shard.dim] // size
    local = int(m.group(ir.group(rx)))
    names = [renamed(fqn, m, {ir.group(rx): ir.to_global(local, c, size, fqn)}) for c in range(size)]
    for key, kmeta, old in family:
        parsed = parse_key(key)
        split = shard in kmeta.pattern.shards and tuple(kmeta.shape) == tuple(meta.shape)
        for c, name in enumerate(names):
            new = model_key(name) if parsed.kind == MODEL else optim_key(name, parsed.state)
            if new in tensors or new in frags:
                raise ir.error(f"{fqn!r} held at {ir.axis}={c} is global {name!r}, which the checkpoint also holds; "
                               "the checkpoint's names are global already, or the count is wrong")
            if not split:
                tensors[new] = kmeta
                frags[new] = [replace(f, key=new) for f in old]
                continue
            shape = list(kmeta.shape)
            shape[shard.dim] = chunk
            pattern = Pattern(tuple(s for s in kmeta.pattern.shards if s != shard), kmeta.pattern.flat,
                              kmeta.pattern.fused, kmeta.pattern.pad)
            tensors[new] = TensorMeta(tuple(shape), kmeta.dtype, pattern)
            frags[new] = [_moved(f, new, shard.dim, c, chunk, ir) for f in old
                          if c * chunk <= f.box.offsets[shard.dim] < (c + 1) * chunk or
                          (f.box.sizes[shard.dim] == 0 and f.box.offsets[shard.dim] == c * chunk)]


def _moved(f, key: str, dim: int, c: int, chunk: int, ir: IndexRule):
    """Fragment ``f`` of coordinate ``c``'s chunk, renamed ``key`` with its box in the chunk's index space."""
    lo = f.box.offsets[dim] - c * chunk
    if lo + f.box.sizes[dim] > chunk:
        raise ir.error(f"{f.key}: a fragment of rank {f.rank} spans more than one {ir.axis} rank's shard; "
                       "its shards are not local tensors")
    offsets = list(f.box.offsets)
    offsets[dim] = lo
    return replace(f, key=key, box=Box(tuple(offsets), f.box.sizes))
