"""Bounded JSON parsing for every JSON document ucp reads from a file or a peer.

``json.loads`` recurses once per nesting level, so a hostile document of a few kilobytes
(``[[[[...``) raises ``RecursionError`` inside the parser, or parses and then overflows the stack
of whatever walks the result. :func:`parse_json` refuses documents nested deeper than
:data:`MAX_DEPTH` before parsing them, rejects ``NaN``/``Infinity`` (not JSON), and turns every
failure into one :class:`~ucp.errors.FormatError` line naming the document.
"""

from __future__ import annotations

import json
import re

from ucp.errors import FormatError

MAX_DEPTH = 64
"""The deepest nesting of arrays and objects any ucp document has is under 16; 64 leaves room."""

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_KEEP_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


def too_deep(data: bytes, max_depth: int = MAX_DEPTH) -> bool:
    """Whether ``data`` may nest ``[``/``{`` more than ``max_depth`` deep (string literals skipped).

    No Python loop over tokens: strings are cut out and everything but brackets deleted in C, then
    each pass deletes the innermost ``[]``/``{}`` pairs, one nesting level per pass. ``True`` means
    deeper than allowed or unbalanced (which the parser then tells apart).
    """
    shape = _STRING.sub(b"", data).translate(None, _KEEP_BRACKETS)
    for _ in range(max_depth):
        if not shape:
            return False
        shape = shape.replace(b"[]", b"").replace(b"{}", b"")
    return bool(shape)


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_json(data: bytes | str, where: str, *, max_depth: int = MAX_DEPTH):
    """Parse ``data`` as strict JSON; ``where`` names the document in the error.

    Raises :class:`FormatError` (one line) for bytes that are not UTF-8, text that is not JSON,
    ``NaN``/``Infinity`` constants, and nesting deeper than ``max_depth``.
    """
    raw = data.encode() if isinstance(data, str) else bytes(data)
    deep = too_deep(raw, max_depth)
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:
        deep = True
    except (UnicodeDecodeError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise FormatError(f"{where} is not valid JSON: {msg}") from e
    if deep:
        raise FormatError(f"{where}: JSON nested deeper than {max_depth} levels; refusing it")
    return value
