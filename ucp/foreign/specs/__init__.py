"""UCL specs shipped with ucp for well-known foreign layouts, and reading a spec given by name or path.

A packaged spec has no ``source layout`` line (the checkpoint's layout is taken) and names its sizes
as model settings (``vocab``, ``padded_vocab``, ``q_size``, ``kv_size``, ``ffn``) that the importer reads
from the checkpoint or the user passes (``ucp convert --set NAME=N``); docs/foreign.md section 4.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ucp.errors import OptionsError

#: packaged spec name -> its file in this package
PACKAGED = {"megatron-gpt": "megatron_gpt.ucl", "megatron-llama": "megatron_llama.ucl"}


def read_spec(spec: str | Path) -> tuple[str, str]:
    """``(text, name for messages)`` of ``spec``: a packaged spec's name, or a UCL file's path.

    Raises:
        OptionsError: neither a packaged name nor a readable UCL text file.
    """
    if str(spec) in PACKAGED:
        return resources.files(__name__).joinpath(PACKAGED[str(spec)]).read_text(), str(spec)
    path = Path(spec)
    try:
        return path.read_text(), str(path)
    except FileNotFoundError:
        raise OptionsError(f"{spec}: no such spec file (packaged specs: {', '.join(PACKAGED)})") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise OptionsError(f"{spec}: not a UCL text file ({e})") from None


def apply_spec(spec: str | Path, layout, settings: dict | None = None, defaults: dict | None = None):
    """``(checked program, the text a universal checkpoint keeps)`` for ``spec`` applied to a checkpoint
    of ``layout``: read, checked with its model settings (``defaults`` read from the checkpoint, then
    the spec's ``model`` line, then ``settings``), bound to ``layout`` and compared with it. The text
    kept is the spec as written, or, where the checkpoint or the user completed it (its layout, its
    settings), the program as applied.

    Raises:
        OptionsError: no such spec; UclError: a malformed spec, or one whose layout is not ``layout``.
    """
    from ucp.lang import ast
    from ucp.lang.apply import check_layout
    from ucp.lang.parse import parse
    from ucp.lang.printer import print_program
    from ucp.lang.validate import bind_layout, check

    text, name = read_spec(spec)
    checked = bind_layout(check(parse(text, name), name, settings, defaults), layout)
    check_layout(checked, layout)
    if settings or defaults or not checked.program.of(ast.SourceLayout):
        text = print_program(checked.concrete())
    return checked, text
