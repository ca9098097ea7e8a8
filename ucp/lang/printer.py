"""The canonical text of a UCL program: ``parse(print_program(p)) == p`` for every program ``p``."""

from __future__ import annotations

from ucp.lang import ast


def _value(v) -> str:
    return f'"{v.text}"' if isinstance(v, ast.Quoted) else str(v)


def _settings(settings) -> str:
    return " ".join(f"{s.name}={_value(s.value)}" for s in settings)


def _call(t: ast.Transform) -> str:
    args = [_value(a) for a in t.args] + [f"{k}={_value(v)}" for k, v in t.kwargs]
    return f"{t.name}({', '.join(args)})"


def print_statement(s) -> str:
    if isinstance(s, ast.SourceLayout):
        return f"source layout {_settings(s.settings)}"
    if isinstance(s, ast.Model):
        return f"model {_settings(s.settings)}"
    if isinstance(s, ast.Rule):
        return ", ".join(f'"{g}"' for g in s.globs) + " : " + " ".join(_call(t) for t in s.transforms)
    if isinstance(s, ast.Optimizer):
        tail = f" {_settings(s.settings)}" if s.settings else ""
        return f"optimizer {s.name} states {' '.join(s.states)}{tail}"
    if isinstance(s, ast.ExportRename):
        return f'export rename "{s.pattern}" -> "{s.replacement}"'
    if isinstance(s, ast.ExportSplit):
        return "export split " + ", ".join(f'"{g}"' for g in s.globs)
    raise TypeError(f"not a UCL statement: {s!r}")


def print_program(program: ast.Program) -> str:
    """The program as canonical UCL text (one statement per line)."""
    return "\n".join([f"ucl {program.version}", *(print_statement(s) for s in program.statements)]) + "\n"
