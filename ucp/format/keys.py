"""Tensor keys: the names of logical tensors in every ucp format.

``model/<fqn>`` for parameters and buffers, ``optim/<fqn>/<state>`` for per-parameter optimizer
state (keyed by the parameter's fully qualified name, never by its index), ``extra/<name>`` for
tensors the user adds to a checkpoint.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

from ucp.errors import SpecError

MODEL, OPTIM, EXTRA = "model", "optim", "extra"


class ParsedKey(NamedTuple):
    kind: str
    name: str
    state: str | None = None


def _check(part: str, what: str) -> str:
    if not isinstance(part, str) or not part or "/" in part:
        raise SpecError(f"{what} {part!r} must be a non-empty string without '/'")
    return part


def model_key(fqn: str) -> str:
    return f"{MODEL}/{_check(fqn, 'parameter name')}"


def optim_key(fqn: str, state: str) -> str:
    return f"{OPTIM}/{_check(fqn, 'parameter name')}/{_check(state, 'optimizer state name')}"


def extra_key(name: str) -> str:
    return f"{EXTRA}/{_check(name, 'extra name')}"


def parse_key(key: str) -> ParsedKey:
    """Split a tensor key into kind, fqn or name, and optimizer state name."""
    if isinstance(key, str):
        return _parse_str_key(key)
    return _parse_parts(key, [])


@lru_cache(maxsize=1 << 16)  # (a load parses each of its keys several times, tens of thousands in all)
def _parse_str_key(key: str) -> ParsedKey:
    return _parse_parts(key, key.split("/"))


def _parse_parts(key, parts: list[str]) -> ParsedKey:
    if len(parts) == 2 and parts[0] in (MODEL, EXTRA) and parts[1]:
        return ParsedKey(parts[0], parts[1])
    if len(parts) == 3 and parts[0] == OPTIM and parts[1] and parts[2]:
        return ParsedKey(OPTIM, parts[1], parts[2])
    raise SpecError(
        f"tensor key {key!r} is malformed; expected 'model/<fqn>', 'optim/<fqn>/<state>' or 'extra/<name>'"
    )
