"""ucp: fault-tolerant checkpointing for distributed PyTorch training.

The public API, everything a user passes in or gets back, is importable from here:
:class:`Checkpointer` (save/load hooks for a training loop) with its options
(:class:`CheckpointOptions`, :class:`SnapshotOptions`, :class:`RedundancyOptions`) and results
(:class:`SaveResult`, :class:`LoadResult`); the layout and pattern types a user describes a job with
(:class:`Layout`, :class:`Pattern`, :class:`Shard`, :class:`Fused`, :class:`Pad`, ``REPLICATED``);
:func:`export` (``ucp.convert.convert`` converts); :func:`run_in_process` (recovery in-process after
ranks are lost) with its :class:`World`; the errors (:mod:`ucp.errors`). The package's
layers are described in ``docs/architecture.md``.
"""

__version__ = "0.1.0"

from ucp.errors import UcpError  # noqa: E402

# name -> module that defines it; loaded on first use so that ``import ucp`` (and the CLI's --help)
# stays light: the hooks import torch.
_PUBLIC = {
    "Checkpointer": "ucp.checkpoint.checkpointer",
    "SaveResult": "ucp.checkpoint.results",
    "LoadResult": "ucp.checkpoint.results",
    "CheckpointOptions": "ucp.options",
    "SnapshotOptions": "ucp.options",
    "RedundancyOptions": "ucp.options",
    "Layout": "ucp.format.layout",
    "Pattern": "ucp.format.pattern",
    "Shard": "ucp.format.pattern",
    "Fused": "ucp.format.pattern",
    "Pad": "ucp.format.pattern",
    "REPLICATED": "ucp.format.pattern",
    "export": "ucp.convert.export",
    "run_in_process": "ucp.checkpoint.inprocess",
    "World": "ucp.checkpoint.inprocess",
}

__all__ = ["__version__", "UcpError", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib  # (lazy: see _PUBLIC)

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ucp' has no attribute {name!r}")
