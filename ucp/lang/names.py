"""Export names: what a universal tensor is called, and into which parts it is split, on export.

``export split "glob"`` splits a fused parameter into its parts along the fused dim; a part takes
the parameter's name with its module name (the second-to-last component) replaced by the part's
name: ``h.0.attn.qkv.weight`` -> ``h.0.attn.q.weight``, ``.k.``, ``.v.``. ``export rename "from" ->
"to"`` then rewrites names: the first rule whose glob matches a leading part of the name replaces
that part, with ``{i}`` captures carried into ``to``. Pure functions over the checked program.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ucp.errors import UclError
from ucp.format.pattern import Pattern
from ucp.lang import ast
from ucp.lang.validate import compile_glob

_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ExportName:
    """Export ``name`` holds elements ``[start, stop)`` of dim ``dim`` (all of it when ``dim`` is None)."""

    name: str
    dim: int | None = None
    start: int = 0
    stop: int = 0


def part_name(fqn: str, part: str) -> str:
    """``a.qkv.weight`` -> ``a.q.weight`` for part ``q``; a one-component name becomes the part's."""
    pieces = fqn.split(".")
    if len(pieces) == 1:
        return part
    pieces[-2] = part
    return ".".join(pieces)


def export_names(program: ast.Program | None, params: dict[str, Pattern], file: str = "<ucl>") -> dict[str, list[ExportName]]:
    """The export names of each parameter ``{fqn: pattern}`` under ``program``'s export rules.

    Without a program (or export rules) every parameter keeps its name, unsplit.

    Raises:
        UclError: a split rule names a parameter that is not fused, or two tensors end up with
            the same export name.
    """
    splits = [(s, [compile_glob(g, file, s.pos) for g in s.globs])
              for s in (program.statements if program is not None else ()) if isinstance(s, ast.ExportSplit)]
    renames = _renames(program, file)
    out: dict[str, list[ExportName]] = {}
    owner: dict[str, str] = {}
    for fqn, pattern in params.items():
        rule = next((s for s, rxs in splits if any(rx.fullmatch(fqn) for rx in rxs)), None)
        if rule is None:
            names = [ExportName(fqn)]
        elif pattern.fused is None:
            raise UclError(f"export split matches {fqn!r}, which has no fused parts; split only fused parameters",
                           file, rule.pos.line, rule.pos.column)
        else:
            names, at = [], 0
            for part, size in pattern.fused.parts:
                names.append(ExportName(part_name(fqn, part), pattern.fused.dim, at, at + size))
                at += size
        names = [ExportName(_rename(n.name, renames), n.dim, n.start, n.stop) for n in names]
        for n in names:
            if n.name in owner:
                raise UclError(f"export names collide: {owner[n.name]!r} and {fqn!r} would both be written as "
                               f"{n.name!r}; change the rename rules", file, 0, 0)
            owner[n.name] = fqn
        out[fqn] = names
    return out


def _renames(program: ast.Program | None, file: str) -> list:
    out = []
    for s in (program.statements if program is not None else ()):
        if isinstance(s, ast.ExportRename):
            rx = compile_glob(s.pattern, file, s.pos)
            unknown = set(_CAPTURE.findall(s.replacement)) - set(rx.groupindex)
            if unknown:
                raise UclError(f"export rename uses {{{sorted(unknown)[0]}}}, which {s.pattern!r} does not capture",
                               file, s.pos.line, s.pos.column)
            out.append((s, rx))
    return out


def renamed(program: ast.Program | None, name: str, file: str = "<ucl>") -> str:
    """``name`` after the program's rename rules (no split)."""
    return _rename(name, _renames(program, file))


def _rename(name: str, renames) -> str:
    for rule, rx in renames:
        m = rx.match(name)
        if m is None:
            continue
        replacement = rule.replacement
        for key, value in m.groupdict().items():
            replacement = replacement.replace("{" + key + "}", value)
        return replacement + name[m.end():]
    return name
