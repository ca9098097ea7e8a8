"""ucp: fault-tolerant checkpointing for distributed PyTorch training.

Public entry points: :class:`Checkpointer` (save/load hooks for a training loop) and
:class:`LoadResult`. The data model lives in :mod:`ucp.spec`.
"""

__version__ = "0.1.0"

from ucp.errors import UcpError  # noqa: E402

__all__ = ["__version__", "UcpError", "Checkpointer", "CheckpointOptions", "SnapshotOptions", "RedundancyOptions",
           "LoadResult"]


def __getattr__(name):
    # Keep ``import ucp`` light (the CLI's --help must not import torch); load the hooks on use.
    if name in ("Checkpointer", "CheckpointOptions", "LoadResult"):
        from ucp import checkpointer

        return getattr(checkpointer, name)
    if name in ("SnapshotOptions", "RedundancyOptions"):
        from ucp import options

        return getattr(options, name)
    raise AttributeError(f"module 'ucp' has no attribute {name!r}")
