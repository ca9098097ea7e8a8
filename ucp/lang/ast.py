"""UCL's abstract syntax: plain frozen dataclasses, built by the parser, read by the passes.

Every node keeps the line and column it came from so that validation errors can point at it;
positions are left out of equality, so a program equals its printed-and-reparsed self.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Pos:
    """Where a node starts in the source (1-based line and column); 0 when built by hand."""

    line: int = 0
    column: int = 0


@dataclass(frozen=True)
class Quoted:
    """A quoted string value (a glob, a parameter name), as opposed to a bare name."""

    text: str


@dataclass(frozen=True)
class Setting:
    """``name=value`` of a ``source layout`` or ``model`` line, or of an optimizer."""

    name: str
    value: int | str | Quoted
    pos: Pos = field(default=Pos(), compare=False)


@dataclass(frozen=True)
class Transform:
    """``name(positional..., key=value...)``, e.g. ``shard(tp, dim=0)``."""

    name: str
    args: tuple = ()
    kwargs: tuple[tuple[str, int | str | Quoted], ...] = ()
    pos: Pos = field(default=Pos(), compare=False)

    def kw(self, key: str, default=None):
        return dict(self.kwargs).get(key, default)


@dataclass(frozen=True)
class Rule:
    """Tensors whose name matches one of ``globs`` take ``transforms`` (first matching rule wins)."""

    globs: tuple[str, ...]
    transforms: tuple[Transform, ...]
    pos: Pos = field(default=Pos(), compare=False)


@dataclass(frozen=True)
class Optimizer:
    """``optimizer NAME states S... [master=DTYPE]``: the optimizer's per-parameter states."""

    name: str
    states: tuple[str, ...]
    settings: tuple[Setting, ...] = ()
    pos: Pos = field(default=Pos(), compare=False)


@dataclass(frozen=True)
class ExportRename:
    """``export rename "PATTERN" -> "REPLACEMENT"``: how ``ucp export`` names a tensor."""

    pattern: str
    replacement: str
    pos: Pos = field(default=Pos(), compare=False)


@dataclass(frozen=True)
class ExportSplit:
    """``export split "GLOB", ...``: fused tensors ``ucp export`` writes as their parts."""

    globs: tuple[str, ...]
    pos: Pos = field(default=Pos(), compare=False)


@dataclass(frozen=True)
class SettingsLine:
    """A line of ``name=value`` settings."""

    settings: tuple[Setting, ...]
    pos: Pos = field(default=Pos(), compare=False)


class SourceLayout(SettingsLine):
    """``source layout AXIS=N ... [zero=Z]``: the layout the checkpoint was saved with."""


class Model(SettingsLine):
    """``model NAME=N ...``: model settings the rules may name (``vocab``, ``layers``, ...)."""


@dataclass(frozen=True)
class Program:
    """A whole UCL program: its version and its statements, in source order."""

    version: int
    statements: tuple = ()
    pos: Pos = field(default=Pos(), compare=False)

    def of(self, kind: type) -> list:
        return [s for s in self.statements if isinstance(s, kind)]

    @property
    def rules(self) -> list[Rule]:
        return self.of(Rule)
