"""Tensors as the other layers see them: torch dtypes from ucp's dtype names
(:func:`ucp.format.dtypes.dtype_name` goes the other way), and a tensor's bytes as one contiguous CPU
buffer, copied only when it is not one already."""

from __future__ import annotations

import torch

from ucp.errors import LoadError


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ucp's dtype name; LoadError if torch has none."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise LoadError(f"dtype {name!r} has no torch equivalent")
    return dtype


def staged(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a contiguous CPU tensor (a copy only when it is not one already)."""
    if t.device.type != "cpu":
        t = t.cpu()
    return t if t.is_contiguous() else t.contiguous()


def bytes_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def snapshot_source(t: torch.Tensor, changes: bool) -> torch.Tensor:
    """What a snapshot copies from: ``t`` contiguous; copied now when it ``changes`` before the
    optimizer's step (a module buffer); CUDA tensors stay on the device (copied on a side stream)."""
    t = t.contiguous() if t.is_cuda else staged(t)
    return t.clone() if changes else t
