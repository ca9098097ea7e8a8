"""Validation passes over a parsed UCL program, each small and separate.

:func:`check` validates a program on its own (version, declarations, every transform's
arguments, axes named in the source layout, glob syntax). :func:`match` applies its rules to a
model's tensors: first matching rule wins, every tensor must be matched, every rule must match
something, dims and fused sizes must fit the shapes. Each error names file, line and column and
says how to fix it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from ucp.errors import UclError
from ucp.format.layout import Layout
from ucp.format.pattern import Fused, Pad, Pattern, Shard
from ucp.lang import ast

VERSION = 1

#: transform -> (number of positional args, required keywords, optional keywords, any extra int keywords)
SIGNATURES = {
    "replicate": (1, (), (), False),
    "shard": (1, ("dim",), (), False),
    "fused": (0, ("dim",), (), True),
    "pad": (0, ("dim", "to", "keep"), (), False),
    "average": (1, (), (), False),
    "stage": (1, ("layers",), (), False),
    "expert": (1, ("experts",), ("placement",), False),
    "tied": (1, (), (), False),
    "flat": (1, (), (), False),
}
_AXIS_ARG = {"replicate", "shard", "average", "stage", "expert", "flat"}
_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: keywords whose value is a word of their own, not a model setting: keyword -> the words it takes
_WORDS = {("expert", "placement"): ("contiguous", "strided")}
#: transforms that rename a tensor by the rank holding it: the captured index is local to the axis
INDEX_TRANSFORMS = ("stage", "expert")


def _err(msg: str, file: str, pos: ast.Pos) -> UclError:
    return UclError(msg, file, pos.line, pos.column)


@dataclass(frozen=True)
class CompiledRule:
    rule: ast.Rule
    regexes: tuple[re.Pattern, ...]


@dataclass(frozen=True)
class CheckedProgram:
    """A program that passed :func:`check`: its source layout, model settings and compiled rules."""

    program: ast.Program
    file: str
    layout: Layout | None
    model: dict
    rules: tuple[CompiledRule, ...]

    def concrete(self) -> ast.Program:
        """The program with its source layout and every model setting it was checked with written out
        (what a universal checkpoint keeps as the spec it was made with)."""
        keep = [st for st in self.program.statements if not isinstance(st, (ast.SourceLayout, ast.Model))]
        head = []
        if self.layout is not None:
            head.append(ast.SourceLayout(tuple(ast.Setting(n, v) for n, v in self.layout.axes)
                                         + (ast.Setting("zero", self.layout.zero),)))
        if self.model:
            head.append(ast.Model(tuple(ast.Setting(n, v) for n, v in self.model.items())))
        return replace(self.program, statements=tuple(head + keep))


def _named_axes(checked: CheckedProgram) -> tuple[str, ...]:
    """The axes a layout-less program's rules name, in order of appearance."""
    names: dict[str, None] = {}
    for cr in checked.rules:
        for t in cr.rule.transforms:
            if t.name in _AXIS_ARG:
                names[t.args[0]] = None
    return tuple(names)


def bind_layout(checked: CheckedProgram, layout: Layout) -> CheckedProgram:
    """A program without a ``source layout`` line, bound to the checkpoint's ``layout``: every axis its
    rules name must be one of the layout's. A program with one is returned unchanged (the caller
    compares the two, see ``ucp.lang.apply.check_layout``)."""
    if checked.layout is not None:
        return checked
    for cr in checked.rules:
        for t in cr.rule.transforms:
            if t.name in _AXIS_ARG and t.args[0] not in layout.names:
                raise _err(f"{t.name}() names axis {t.args[0]!r}, which the checkpoint's layout {layout} lacks",
                           checked.file, t.pos)
    return replace(checked, layout=layout)


def compile_glob(glob: str, file: str = "<ucl>", pos: ast.Pos = ast.Pos()) -> re.Pattern:
    """``*`` any text, ``?`` one character, ``{i}`` a captured non-negative integer named ``i``."""
    out, names, i = [], set(), 0
    while i < len(glob):
        c = glob[i]
        if c == "{":
            m = _CAPTURE.match(glob, i)
            if not m:
                raise _err(f"glob {glob!r}: '{{' must open a capture like {{i}}", file, pos)
            if m.group(1) in names:
                raise _err(f"glob {glob!r} captures {{{m.group(1)}}} twice", file, pos)
            names.add(m.group(1))
            out.append(f"(?P<{m.group(1)}>[0-9]+)")
            i = m.end()
            continue
        if c == "}":
            raise _err(f"glob {glob!r}: '}}' without a capture", file, pos)
        out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    if not glob:
        raise _err("an empty glob matches nothing; give a tensor name or pattern", file, pos)
    return re.compile("".join(out))


def _resolve(t: ast.Transform, model: dict, file: str) -> ast.Transform:
    """``t`` with keyword values that name a model setting replaced by the setting's integer."""
    kwargs = []
    for key, value in t.kwargs:
        if isinstance(value, str) and (t.name, key) not in _WORDS:
            if value not in model:
                known = f" (settings: {', '.join(sorted(model))})" if model else ""
                raise _err(f"{t.name}({key}={value}): {value!r} is not a model setting{known}; declare it with "
                           f"'model {value}=N', or for a packaged spec pass it to convert (--set {value}=N)", file, t.pos)
            value = model[value]
        kwargs.append((key, value))
    return replace(t, kwargs=tuple(kwargs))


def _check_call(t: ast.Transform, axes: tuple[str, ...] | None, file: str) -> None:
    if t.name not in SIGNATURES:
        raise _err(f"unknown transform {t.name!r}; known: {', '.join(SIGNATURES)}", file, t.pos)
    npos, required, optional, extra_ints = SIGNATURES[t.name]
    if len(t.args) != npos:
        raise _err(f"{t.name}() takes {npos} positional argument(s), got {len(t.args)}", file, t.pos)
    kw = dict(t.kwargs)
    if len(kw) != len(t.kwargs):
        raise _err(f"{t.name}() repeats a keyword argument", file, t.pos)
    for key in required:
        if key not in kw:
            raise _err(f"{t.name}() needs {key}=...", file, t.pos)
    for key, value in kw.items():
        if key not in required and key not in optional and not extra_ints:
            raise _err(f"{t.name}() takes no argument {key!r}", file, t.pos)
        words = _WORDS.get((t.name, key))
        if words is not None:
            if value not in words:
                raise _err(f"{t.name}({key}={value}): use {key}={' or '.join(words)}", file, t.pos)
        elif not isinstance(value, int):
            raise _err(f"{t.name}({key}=...) must be an integer, got {value!r}", file, t.pos)
    if t.name in _AXIS_ARG:
        axis = t.args[0]
        if not isinstance(axis, str) or (axes is not None and axis not in axes):
            raise _err(f"{t.name}() names axis {axis!r}, which the source layout lacks (it has {', '.join(axes) or 'none'})",
                       file, t.pos)
    if t.name == "tied" and not isinstance(t.args[0], ast.Quoted):
        raise _err('tied() takes the quoted name of the parameter it is tied to, e.g. tied("wte.weight")', file, t.pos)
    if t.name == "fused":
        parts = [(k, v) for k, v in t.kwargs if k != "dim"]
        if not parts or any(v < 1 for _, v in parts):
            raise _err("fused() needs the sizes of its parts, e.g. fused(dim=0, q=4096, k=1024, v=1024)", file, t.pos)
    if t.name == "pad" and not 0 < kw["keep"] <= kw["to"]:
        raise _err(f"pad(): keep={kw['keep']} must be between 1 and to={kw['to']}", file, t.pos)
    if t.name in INDEX_TRANSFORMS and kw[SIGNATURES[t.name][1][0]] < 1:
        raise _err(f"{t.name}(): {SIGNATURES[t.name][1][0]}={kw[SIGNATURES[t.name][1][0]]} must be at least 1", file, t.pos)


def _check_captures(rule: ast.Rule, regexes, file: str) -> None:
    """A rule with ``stage()`` or ``expert()`` takes the index from a capture of each of its globs:
    ``stage`` the first, ``expert`` the last; with both, each glob needs two captures."""
    wanted = sum(t.name in INDEX_TRANSFORMS for t in rule.transforms)
    if not wanted:
        return
    for glob, rx in zip(rule.globs, regexes):
        if len(rx.groupindex) < wanted:
            which = " and ".join(t.name + "()" for t in rule.transforms if t.name in INDEX_TRANSFORMS)
            example = '"layers.{i}.experts.{e}.*"' if wanted == 2 else '"experts.{e}.*"'
            raise _err(f"glob {glob!r} captures {len(rx.groupindex)} index(es) but {which} map(s) {wanted}: capture "
                       f"the index with {{name}}, e.g. {example}", file, rule.pos)


def check(program: ast.Program, file: str = "<ucl>", settings: dict | None = None,
          defaults: dict | None = None) -> CheckedProgram:
    """Validate ``program`` on its own. Raises UclError at the first problem.

    Args:
        program: the parsed program.
        file: its name in error messages.
        settings: model settings that override the program's ``model`` line (given by the user);
            keyword values of the rules that name a setting take its integer.
        defaults: model settings the ``model`` line and ``settings`` override (read from the
            checkpoint, for a packaged spec's sizes).

    A program without a ``source layout`` line leaves ``layout`` None: it describes any layout whose
    axes its rules name, and :func:`bind_layout` gives it the checkpoint's.
    """
    if program.version != VERSION:
        raise _err(f"UCL version {program.version} is not supported; this ucp reads 'ucl {VERSION}'", file, program.pos)
    for kind, what in ((ast.SourceLayout, "source layout"), (ast.Model, "model"), (ast.Optimizer, "optimizer")):
        found = program.of(kind)
        if len(found) > 1:
            raise _err(f"'{what}' is given twice (first on line {found[0].pos.line}); give it once", file, found[1].pos)
    layouts = program.of(ast.SourceLayout)
    sizes, zero = [], 0
    for s in (layouts[0].settings if layouts else ()):
        if not isinstance(s.value, int):
            raise _err(f"layout {s.name}={s.value!r}: sizes are integers", file, s.pos)
        if s.name == "zero":
            zero = s.value
        else:
            sizes.append((s.name, s.value))
    layout = None
    if layouts:
        try:
            layout = Layout(tuple(sizes), zero=zero)
        except Exception as e:  # noqa: BLE001 - Layout's SpecError says what is wrong
            raise _err(str(e), file, layouts[0].pos) from None
    model = {}
    for name, value in (defaults or {}).items():
        if isinstance(value, int) and not isinstance(value, bool):
            model[name] = value
    for m in program.of(ast.Model):
        for s in m.settings:
            if not isinstance(s.value, int):
                raise _err(f"model {s.name}={s.value!r}: model settings are integers", file, s.pos)
            model[s.name] = s.value
    for name, value in (settings or {}).items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise UclError(f"model setting {name}={value!r}: model settings are integers", file, 0, 0)
        model[name] = value
    rules = []
    for rule in program.rules:
        rule = replace(rule, transforms=tuple(_resolve(t, model, file) for t in rule.transforms))
        for t in rule.transforms:
            _check_call(t, layout.names if layout is not None else None, file)
        names = [t.name for t in rule.transforms]
        for n in set(names):
            if names.count(n) > 1 and n not in ("shard",):
                raise _err(f"{n}() appears twice in one rule", file, rule.pos)
        regexes = tuple(compile_glob(g, file, rule.pos) for g in rule.globs)
        _check_captures(rule, regexes, file)
        rules.append(CompiledRule(rule, regexes))
    for opt in program.of(ast.Optimizer):
        if len(set(opt.states)) != len(opt.states):
            raise _err("optimizer states are listed twice", file, opt.pos)
    for ex in program.of(ast.ExportRename):
        compile_glob(ex.pattern, file, ex.pos)
    return CheckedProgram(program, file, layout, model, tuple(rules))


@dataclass(frozen=True)
class Match:
    """What one tensor takes: the rule that matched, its captures and the lowered pattern."""

    rule: ast.Rule
    captures: dict
    pattern: Pattern


def lower(rule: ast.Rule) -> Pattern:
    """The pattern a rule's ``shard``, ``flat``, ``fused`` and ``pad`` transforms make (``expert`` and
    ``stage`` rename tensors instead: :mod:`ucp.lang.indices`)."""
    shards, flat, fused, pad = [], None, None, None
    for t in rule.transforms:
        kw = dict(t.kwargs)
        if t.name == "shard":
            shards.append(Shard(t.args[0], kw["dim"]))
        elif t.name == "flat":
            flat = t.args[0]
        elif t.name == "fused":
            fused = Fused(kw["dim"], tuple((k, v) for k, v in t.kwargs if k != "dim"))
        elif t.name == "pad":
            pad = Pad(kw["dim"], kw["to"], kw["keep"])
    return Pattern(tuple(shards), flat, fused, pad)


def match_names(checked: CheckedProgram, names) -> dict[str, tuple[ast.Rule, Pattern]]:
    """``{name: (rule, its pattern)}``: the first rule matching each tensor name, before any shape is
    known (a foreign checkpoint's global shapes follow from its local ones and the rule's shards).

    Raises:
        UclError: a name no rule matches, or a rule that matches no name.
    """
    out = {}
    used = [False] * len(checked.rules)
    for name in names:
        for i, cr in enumerate(checked.rules):
            if any(rx.fullmatch(name) for rx in cr.regexes):
                used[i] = True
                out[name] = (cr.rule, lower(cr.rule))
                break
        else:
            raise UclError(f"tensor {name!r} is matched by no rule; add a rule for it", checked.file, 0, 0)
    _unused(checked, used)
    return out


def _unused(checked: CheckedProgram, used: list[bool]) -> None:
    for cr, hit in zip(checked.rules, used):
        if not hit:
            globs = ", ".join(f'"{g}"' for g in cr.rule.globs)
            raise _err(f"rule {globs} matches no tensor (an earlier rule may take them all); fix or remove it",
                       checked.file, cr.rule.pos)


def match(checked: CheckedProgram, shapes: dict[str, tuple[int, ...]]) -> dict[str, Match]:
    """Apply the rules to ``{tensor name: global shape}``: first match wins.

    Raises:
        UclError: a tensor no rule matches, a rule that matches nothing, or a rule whose
            dims or sizes do not fit a tensor it matches.
    """
    file = checked.file
    axes = checked.layout.names if checked.layout is not None else _named_axes(checked)
    out: dict[str, Match] = {}
    used = [False] * len(checked.rules)
    for name, shape in shapes.items():
        for i, cr in enumerate(checked.rules):
            m = next((m for rx in cr.regexes if (m := rx.fullmatch(name))), None)
            if m is None:
                continue
            used[i] = True
            try:
                pattern = lower(cr.rule)
                pattern.validate(tuple(shape), axes, name)
            except Exception as e:  # noqa: BLE001 - SpecError from the data model, placed at the rule
                raise _err(f"{e} (the rule matches tensor {name!r} of shape {list(shape)})", file, cr.rule.pos) from None
            out[name] = Match(cr.rule, {k: int(v) for k, v in m.groupdict().items()}, pattern)
            break
        else:
            raise UclError(f"tensor {name!r} (shape {list(shape)}) is matched by no rule; add a rule for it, "
                           f'e.g. "{name}" : replicate({(axes or ("dp",))[0]})', file, 0, 0)
    _unused(checked, used)
    return out
