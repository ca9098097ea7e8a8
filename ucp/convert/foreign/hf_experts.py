"""Packaged rules between the tensor names Hugging Face files hold and the ones transformers holds
in memory, for mixture-of-experts models (docs/foreign.md section 1a).

transformers (5 and later) saves each expert of a MoE layer as its own tensors
(``model.layers.0.block_sparse_moe.experts.3.w1.weight``) while its model holds all experts of a
layer fused: ``mlp.experts.gate_up_proj`` ``[E, 2F, H]`` (each expert's gate and up projections
concatenated) and ``mlp.experts.down_proj`` ``[E, H, F]``. ``convert --from hf`` stacks the files'
tensors into the fused ones (each per-expert tensor a fragment at its box of the fused tensor, so
nothing is copied twice), so that a universal checkpoint loads into the live model by name;
``export`` cuts them back into the files' names. The rules work on names and shapes only: ucp
never imports transformers. A model's rules are chosen by ``model_type`` in its ``config.json``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ucp.errors import CorruptCheckpointError


@dataclass(frozen=True)
class Stack:
    """Per-expert tensors ``<prefix>.experts.<j>.<part>`` (each ``[F, ...]``, for ``j`` in ``0..E-1``)
    held as one ``<prefix>.experts.<fused>`` of shape ``[E, F * len(parts), ...]``: the experts along
    a new dim 0, each expert's parts concatenated along dim 1 in the order of ``parts``."""

    parts: tuple[str, ...]
    fused: str


@dataclass(frozen=True)
class ExpertRules:
    """How one model family's files name its tensors.

    Attributes:
        renames: ``(in the files, in memory)`` substrings of a name, replaced in that order.
        stacks: the per-expert tensors fused in memory.
    """

    renames: tuple[tuple[str, str], ...]
    stacks: tuple[Stack, ...]

    def memory_name(self, name: str) -> str:
        """A file's tensor name as the model holds it (before stacking)."""
        for disk, memory in self.renames:
            name = name.replace(disk, memory)
        return name

    def file_name(self, name: str) -> str:
        """A tensor name of the model as the files hold it."""
        for disk, memory in reversed(self.renames):
            name = name.replace(memory, disk)
        return name


_GATE_UP_DOWN = (Stack(("gate_proj.weight", "up_proj.weight"), "gate_up_proj"), Stack(("down_proj.weight",), "down_proj"))

#: ``model_type`` of ``config.json`` -> its rules (shared experts, ``mlp.shared_expert(s).*``, keep their names)
RULES: dict[str, ExpertRules] = {
    "mixtral": ExpertRules(((".block_sparse_moe.", ".mlp."),),
                           (Stack(("w1.weight", "w3.weight"), "gate_up_proj"), Stack(("w2.weight",), "down_proj"))),
    "qwen2_moe": ExpertRules((), _GATE_UP_DOWN),
    "qwen3_moe": ExpertRules((), _GATE_UP_DOWN),
    "deepseek_v3": ExpertRules((), _GATE_UP_DOWN),
}


def rules_for(config) -> ExpertRules | None:
    """The rules of the model ``config`` (a parsed ``config.json``) describes; None when its
    ``model_type`` has none (a dense model: names are the same in files and in memory)."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return RULES.get(model_type) if isinstance(model_type, str) else None


@dataclass(frozen=True)
class Placed:
    """A file tensor's place in a tensor of the model: ``name`` at box ``offsets`` + ``sizes``."""

    name: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def stacked(tensors: dict[str, tuple[str, tuple[int, ...]]], rules: ExpertRules,
            where: str) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, Placed]]:
    """The model's tensors made of the files' ``tensors`` (``{name: (dtype, shape)}``).

    Returns:
        ``({model name: (dtype, shape)}, {file name: its place})``.

    Raises:
        CorruptCheckpointError: naming ``where`` and the layer: experts missing (a gap in ``0..E-1``
            or a part of one), experts of different shapes or dtypes, or a fused name the files
            also hold.
    """
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    places: dict[str, Placed] = {}
    groups: dict[tuple[str, Stack], dict[tuple[int, str], str]] = {}
    patterns = [(s, re.compile(rf"^(.+)\.experts\.(\d+)\.({'|'.join(map(re.escape, s.parts))})$")) for s in rules.stacks]
    for name, (dtype, shape) in tensors.items():
        memory = rules.memory_name(name)
        for stack, pattern in patterns:
            m = pattern.match(memory)
            if m is not None:
                groups.setdefault((m[1], stack), {})[(int(m[2]), m[3])] = name
                break
        else:
            if memory in out:
                raise CorruptCheckpointError(f"{where}: two tensors are named {memory!r} once renamed for the model")
            out[memory] = (dtype, shape)
            places[name] = Placed(memory, (0,) * len(shape), shape)
    for (prefix, stack), members in groups.items():
        fused = f"{prefix}.experts.{stack.fused}"
        experts = 1 + max(j for j, _ in members)
        lacking = [f"{j}.{p}" for j in range(experts) for p in stack.parts if (j, p) not in members]
        if lacking:
            raise CorruptCheckpointError(f"{where}: {fused} stacks experts 0-{experts - 1}, but the files lack "
                                         f"{prefix}.experts.{lacking[0]} ({len(lacking)} missing)")
        first = tensors[members[(0, stack.parts[0])]]
        for (j, p), name in sorted(members.items()):
            if tensors[name] != first or not first[1]:
                raise CorruptCheckpointError(f"{where}: {name} is {tensors[name][0]}{list(tensors[name][1])}, "
                                             f"expert 0's {stack.parts[0]} {first[0]}{list(first[1])}: "
                                             f"experts stacked into {fused} must agree")
        dtype, (rows, *rest) = first
        if fused in out:
            raise CorruptCheckpointError(f"{where}: the files hold {fused} and its experts "
                                         f"{prefix}.experts.<j>.*; keep one of them")
        out[fused] = (dtype, (experts, rows * len(stack.parts), *rest))
        for (j, p), name in members.items():
            places[name] = Placed(fused, (j, stack.parts.index(p) * rows, *[0] * len(rest)), (1, rows, *rest))
    return out, places


@dataclass(frozen=True)
class Cut:
    """An exported tensor ``name``: elements ``[starts, starts + shape)`` of a model tensor, with its
    dim 0 dropped when ``squeeze`` (one expert of a stack)."""

    name: str
    starts: tuple[int, ...]
    sizes: tuple[int, ...]
    squeeze: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return self.sizes[1:] if self.squeeze else self.sizes


def unstacked(name: str, shape: tuple[int, ...], rules: ExpertRules) -> list[Cut]:
    """The files' tensors that model tensor ``name`` of ``shape`` is cut into: one per expert and
    part of a fused expert tensor, else the tensor itself under its files' name.

    Raises:
        CorruptCheckpointError: a fused expert tensor whose dim 1 does not split into its parts.
    """
    for stack in rules.stacks:
        suffix = f".experts.{stack.fused}"
        if name.endswith(suffix) and len(shape) >= 2:
            prefix = name[:-len(suffix)]
            experts, rows, rest = shape[0], shape[1], shape[2:]
            if rows % len(stack.parts):
                raise CorruptCheckpointError(f"{name}{list(shape)}: dim 1 does not split into the "
                                             f"{len(stack.parts)} parts {', '.join(stack.parts)}")
            step = rows // len(stack.parts)
            return [Cut(rules.file_name(f"{prefix}.experts.{j}.{part}"), (j, i * step, *[0] * len(rest)),
                        (1, step, *rest), True)
                    for j in range(experts) for i, part in enumerate(stack.parts)]
    return [Cut(rules.file_name(name), (0,) * len(shape), tuple(shape), False)]
