"""Wrapped models (torch.compile, activation checkpointing) save and load under their plain names."""

from __future__ import annotations

import torch
from torch import nn

import ucp
from tests.test_load_universal import _model, _train
from ucp import CheckpointOptions


def test_wrapper_prefixes_do_not_change_tensor_keys(tmp_path):
    """A torch.compile'd model with activation-checkpointed blocks saves under the plain names, and
    its checkpoint loads into the plain model (and back)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from ucp.storage.manifest_io import read_manifest
    from ucp.storage import directory as store

    m, opt = _model(0)
    _train(m, opt, 2)
    wrapped = nn.Sequential(checkpoint_wrapper(m[0]), m[1], m[2])
    compiled = torch.compile(wrapped)  # compiles lazily: only the wrapper's names matter here
    assert any("_orig_mod" in n and "_checkpoint_wrapped_module" in n for n, _ in compiled.named_parameters())
    ucp.Checkpointer(tmp_path / "ck", model=compiled, optimizer=opt, options=CheckpointOptions(fsync=False)).save(2)
    keys = set(read_manifest(store.resolve(tmp_path / "ck")).tensors)
    assert "model/0.weight" in keys and "optim/2.bias/exp_avg" in keys
    assert not any("_orig_mod" in k or "_checkpoint_wrapped" in k for k in keys)
    plain, popt = _model(1)
    ucp.Checkpointer(tmp_path / "ck", model=plain, optimizer=popt).load()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), plain.parameters()))
    again, aopt = _model(2)
    rewrapped = torch.compile(nn.Sequential(checkpoint_wrapper(again[0]), again[1], again[2]))
    ucp.Checkpointer(tmp_path / "ck", model=rewrapped, optimizer=aopt).load()
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), again.parameters()))
