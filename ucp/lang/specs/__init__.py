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


def read_spec(spec: str | Path, packaged: bool = True) -> tuple[str, str]:
    """``(text, name for messages)`` of ``spec``: a packaged spec's name (unless ``packaged`` is off),
    or a UCL file's path.

    Raises:
        OptionsError: neither a packaged name nor a readable UCL text file.
    """
    if packaged and str(spec) in PACKAGED:
        return resources.files(__name__).joinpath(PACKAGED[str(spec)]).read_text(), str(spec)
    path = Path(spec)
    try:
        return path.read_text(), str(path)
    except FileNotFoundError:
        also = f" (packaged specs: {', '.join(PACKAGED)})" if packaged else ""
        raise OptionsError(f"{spec}: no such spec file{also}") from None
    except (UnicodeDecodeError, IsADirectoryError) as e:
        raise OptionsError(f"{spec}: not a UCL text file ({e})") from None
