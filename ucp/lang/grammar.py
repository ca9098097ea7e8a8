"""Finding and loading UCL's Lark grammar.

In an installed wheel the top-level ``grammar/`` folder is force-included as ``ucp/grammar/`` and
loaded by package; in a source checkout (editable install) the same files are read from the
repository's ``grammar/`` folder.
"""

from __future__ import annotations

import functools
from pathlib import Path

from lark import Lark

GRAMMAR_FILE = "ucl.lark"


def grammar_dir() -> Path:
    """The folder holding the grammar files, installed or in a checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "grammar", package.parent / "grammar"):
        if (candidate / GRAMMAR_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"UCL grammar {GRAMMAR_FILE} not found next to the ucp package; reinstall ucp")


@functools.lru_cache(maxsize=None)
def parser() -> Lark:
    """A cached LALR parser for UCL, with line and column tracking for error messages."""
    options = dict(parser="lalr", propagate_positions=True, maybe_placeholders=False)
    if (Path(__file__).resolve().parent.parent / "grammar" / GRAMMAR_FILE).is_file():
        return Lark.open_from_package("ucp", GRAMMAR_FILE, ("grammar",), **options)
    return Lark((grammar_dir() / GRAMMAR_FILE).read_text(), **options)
