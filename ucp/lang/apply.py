"""Applying a checked UCL program to a checkpoint that already records its geometry.

ucp's own manifests record each tensor's shards; a spec adds what a saver could not know (fused
sub-parameters, vocabulary padding) and must agree with what it did record. Pure: takes shapes and
patterns, returns patterns.
"""

from __future__ import annotations

from ucp.lang import ast
from ucp.lang.parse import UclError
from ucp.lang.validate import CheckedProgram, match
from ucp.spec.layout import Layout
from ucp.spec.pattern import Pattern


def check_layout(checked: CheckedProgram, layout: Layout) -> None:
    """The spec's ``source layout`` must be the checkpoint's (an axis of size 1 is the same as none)."""
    def sizes(lay: Layout) -> dict:
        return {name: n for name, n in lay.axes if n > 1}

    if sizes(checked.layout) != sizes(layout) or checked.layout.zero != layout.zero:
        pos = checked.program.of(ast.SourceLayout)[0].pos
        raise UclError(f"the spec's source layout {checked.layout} is not the checkpoint's {layout}; "
                       "describe the layout the checkpoint was saved with", checked.file, pos.line, pos.column)


def merge_patterns(checked: CheckedProgram, params: dict[str, tuple[tuple[int, ...], Pattern]]) -> dict[str, Pattern]:
    """Each parameter's recorded pattern completed by the spec's rule for it.

    Args:
        checked: the program, after :func:`ucp.lang.validate.check`.
        params: ``{fqn: (stored shape, recorded pattern)}`` of the model's tensors.

    Returns:
        ``{fqn: pattern}``: the recorded shards and flat partitioning, with the fused parts and
        padding of the spec where the checkpoint did not record them.

    Raises:
        UclError: an unmatched tensor or unused rule (see ``match``), or a rule whose shards,
            fused parts or padding contradict what the checkpoint recorded.
    """
    matches = match(checked, {fqn: shape for fqn, (shape, _) in params.items()})
    out = {}
    for fqn, m in matches.items():
        shape, recorded = params[fqn]
        spec = m.pattern
        for what, mine, theirs in (("shards", spec.shards, recorded.shards),
                                   ("fused parts", spec.fused, recorded.fused), ("padding", spec.pad, recorded.pad)):
            conflict = mine != theirs if what == "shards" else (mine is not None and theirs is not None and mine != theirs)
            if conflict:
                raise UclError(f"{fqn}: the checkpoint records {what} {_show(theirs)}, the rule says {_show(mine)}; "
                               "the spec must describe how the checkpoint was saved", checked.file,
                               m.rule.pos.line, m.rule.pos.column)
        merged = Pattern(recorded.shards, recorded.flat, recorded.fused or spec.fused, recorded.pad or spec.pad)
        try:
            merged.validate(shape, checked.layout.names, fqn)
        except Exception as e:  # noqa: BLE001 - the data model's SpecError, placed at the rule
            raise UclError(str(e), checked.file, m.rule.pos.line, m.rule.pos.column) from None
        out[fqn] = merged
    return out


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return " ".join(f"shard({s.axis}, dim={s.dim})" for s in value) or "none (replicated)"
    return str(value)
