"""Applying a UCL spec to a checkpoint: the one place a spec is read, checked, bound to the
checkpoint's layout and compared with what the checkpoint records (``ucp convert`` of ucp's own and of
foreign checkpoints, and ``ucp export``'s rename rules, all come here).

ucp's own manifests record each tensor's shards; a spec adds what a saver could not know (fused
sub-parameters, vocabulary padding) and must agree with what it did record. Pure: takes the spec's
text, shapes and patterns, returns patterns.
"""

from __future__ import annotations

from pathlib import Path

from ucp.errors import UclError
from ucp.format.layout import Layout
from ucp.format.pattern import Pattern
from ucp.lang import ast
from ucp.lang.indices import first_match, index_rules, renamed
from ucp.lang.parse import parse
from ucp.lang.printer import print_program
from ucp.lang.specs import read_spec
from ucp.lang.validate import CheckedProgram, bind_layout, check, lower, match


def apply_spec(spec: str | Path, layout, settings: dict | None = None, defaults: dict | None = None):
    """``(checked program, the text a universal checkpoint keeps)`` for ``spec`` applied to a checkpoint
    of ``layout``: read, checked with its model settings (``defaults`` read from the checkpoint, then
    the spec's ``model`` line, then ``settings``), bound to ``layout`` and compared with it. The text
    kept is the spec as written, or, where the checkpoint or the user completed it (its layout, its
    settings), the program as applied.

    Raises:
        OptionsError: no such spec; UclError: a malformed spec, or one whose layout is not ``layout``.
    """
    text, name = read_spec(spec)
    checked = bind_layout(check(parse(text, name), name, settings, defaults), layout)
    check_layout(checked, layout)
    if settings or defaults or not checked.program.of(ast.SourceLayout):
        text = print_program(checked.concrete())
    return checked, text


def read_program(spec: str | Path | None, stored: str | None):
    """``(checked program, file name for messages)`` of the UCL file ``spec``, else of the ``stored``
    text a universal checkpoint keeps; None when there is neither (``ucp export``'s rename rules)."""
    if spec is not None:
        text, file = read_spec(spec, packaged=False)
    elif stored:
        text, file = stored, "<spec stored in the checkpoint>"
    else:
        return None
    return check(parse(text, file), file).program, file


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


#: transforms that describe how a foreign or converted checkpoint was written, not a live model
_NOT_LIVE = {
    "flat": "a live optimizer reports its flat partitions itself (ucp_flat_state)",
    "average": "a live save refuses replicas that differ; average them before saving",
    "tied": "ucp finds tied parameters of a live model by identity",
}


class LiveSpec:
    """A UCL program applied to a live model on one rank: the global name and pattern of each of its
    tensors (``Checkpointer(spec=...)``), the same language as ``ucp convert --spec``.

    Args:
        text: the program's text.
        file: its name in messages.
        layout: the job's layout; the program's axes must be its axes (a ``source layout`` line, if
            any, must be this layout).
        coords: this rank's coordinates on the layout's axes.

    Raises:
        UclError: a malformed program, an axis the layout lacks, a transform a live model cannot take
            (``flat``, ``average``, ``tied``), or a count that does not split over its axis.
    """

    def __init__(self, text: str, file: str, layout: Layout, coords: dict):
        checked = check(parse(text, file), file)
        if checked.layout is not None:
            check_layout(checked, layout)
        self.checked = bind_layout(checked, layout)
        self.layout, self.coords, self.file = layout, dict(coords), file
        self.text = print_program(checked.program)
        for cr in self.checked.rules:
            for t in cr.rule.transforms:
                if t.name in _NOT_LIVE:
                    raise UclError(f"{t.name}() cannot describe a live model: {_NOT_LIVE[t.name]}; remove it (it is "
                                   "for ucp convert)", file, t.pos.line, t.pos.column)
            for ir in index_rules(cr.rule, file):
                ir.per_rank(layout.size(ir.axis))
                if any(s.axis == ir.axis for s in lower(cr.rule).shards):
                    raise ir.error(f"{ir.transform.name}({ir.axis}, ...) and shard({ir.axis}, ...) in one rule: the "
                                   f"axis either places whole tensors or splits them; keep one")
        self._placed: dict[str, tuple[str, Pattern]] = {}

    def place(self, fqn: str) -> tuple[str, Pattern]:
        """``(global name, pattern)`` of this rank's tensor ``fqn``: the first rule matching it gives its
        pattern, and its ``expert()`` / ``stage()`` transforms its global index.

        Raises:
            UclError: no rule matches ``fqn``, or its local index is out of range.
        """
        placed = self._placed.get(fqn)
        if placed is None:
            found = first_match(self.checked, fqn)
            if found is None:
                axis = self.layout.names[0]
                raise UclError(f"tensor {fqn!r} is matched by no rule of the spec; add one, e.g. "
                               f'"{fqn}" : replicate({axis})', self.file, 0, 0)
            cr, rx, m = found
            indices = {ir.group(rx): ir.to_global(int(m.group(ir.group(rx))), self.coords.get(ir.axis, 0),
                                                  self.layout.size(ir.axis), fqn)
                       for ir in index_rules(cr.rule, self.file)}
            placed = self._placed[fqn] = (renamed(fqn, m, indices) if indices else fqn, lower(cr.rule))
        return placed

    def mapping(self) -> tuple:
        """What the program's ``expert()`` / ``stage()`` rules mean whatever the layout (see
        :func:`index_mapping`)."""
        return index_mapping(self.checked)


def index_mapping(checked: CheckedProgram) -> tuple:
    """The ``expert()`` / ``stage()`` mappings of a checked program (globs, transform, count, placement):
    two programs with equal mappings give tensors the same global names on any layout."""
    return tuple(ir.key() for cr in checked.rules for ir in index_rules(cr.rule, checked.file))


def recorded_mapping(text: str | None) -> tuple:
    """:func:`index_mapping` of the spec text a checkpoint records (none: no mapping)."""
    if not text:
        return ()
    return index_mapping(check(parse(text, "<spec recorded in the checkpoint>"), "<spec recorded in the checkpoint>"))
