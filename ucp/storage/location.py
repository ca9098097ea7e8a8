"""Where a checkpoint is: a local path, or a URL that fsspec serves (``s3://bucket/run``).

A URL must be served or refused, never reinterpreted: ``Path("s3://bucket/run")`` is the local
relative path ``s3:/bucket/run``, and a writer taking it would save into a directory named ``s3:``
(and a verifier report that copy OK). Every entry that takes a checkpoint path passes it through
:func:`local_path` unless it serves URLs itself; ``file://`` URLs are local paths.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ucp.errors import LocationError

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_MANGLED = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # the first part of Path("s3://b/x"): "s3:"


def is_url(location) -> bool:
    """Whether ``location`` names a place through fsspec (``memory://x``, ``s3://b/x``), not a local path
    (``file://`` URLs are local)."""
    return isinstance(location, str) and bool(_SCHEME.match(location)) and not location.startswith("file://")


def local_path(location, what: str) -> Path:
    """``location`` as a local path, for ``what`` (the entry taking it, named in the error).

    Raises:
        LocationError: ``location`` is a URL (or a ``Path`` made of one, whose first part is
            ``scheme:``), which ``what`` does not serve.
    """
    if is_url(location):
        raise LocationError(f"{location}: {what} takes a local path, not a URL; write a local checkpoint, or make a "
                            "universal one on object storage with 'ucp convert SRC URL'")
    if isinstance(location, str):
        location = location.removeprefix("file://")
    elif not isinstance(location, os.PathLike):  # (an object store's location, ucp.storage.objstore.ObjectPath)
        raise LocationError(f"{location}: {what} takes a local path, not a location on an object store")
    path = Path(location)
    if not path.is_absolute() and path.parts and _MANGLED.fullmatch(path.parts[0]):
        raise LocationError(f"{path}: looks like a URL made into a path ({path.parts[0]}/ lost a '/'); {what} takes a "
                            f"local path: pass a URL as a string, or a local directory named so by its absolute path")
    return path
