"""Wrapped models (torch.compile, activation checkpointing) save and load under their plain names."""

from __future__ import annotations

import torch
from torch import nn

import ucp
from tests.helpers import bit_diffs, state_of, tiny_model, train_step
from ucp import CheckpointOptions

SIZES = (7, 33, 5)  # Linear, ReLU, Linear: a block, an activation, a head


def test_wrapper_prefixes_do_not_change_tensor_keys(tmp_path):
    """A torch.compile'd model with activation-checkpointed blocks saves under the plain names, and
    its checkpoint loads into the plain model (and back)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from ucp.storage.manifest_io import read_manifest
    from ucp.storage import directory as store

    m, opt = tiny_model(0, SIZES, relu=True)
    for s in range(2):
        train_step(m, opt, s)
    wrapped = nn.Sequential(checkpoint_wrapper(m[0]), m[1], m[2])
    compiled = torch.compile(wrapped)  # compiles lazily: only the wrapper's names matter here
    assert any("_orig_mod" in n and "_checkpoint_wrapped_module" in n for n, _ in compiled.named_parameters())
    ucp.Checkpointer(tmp_path / "ck", model=compiled, optimizer=opt, options=CheckpointOptions(fsync=False)).save(2)
    keys = set(read_manifest(store.resolve(tmp_path / "ck")).tensors)
    assert "model/0.weight" in keys and "optim/2.bias/exp_avg" in keys
    assert not any("_orig_mod" in k or "_checkpoint_wrapped" in k for k in keys)
    plain, popt = tiny_model(1, SIZES, relu=True)
    ucp.Checkpointer(tmp_path / "ck", model=plain, optimizer=popt).load()
    assert bit_diffs(state_of(m, opt), state_of(plain, popt)) == []
    again, aopt = tiny_model(2, SIZES, relu=True)
    rewrapped = torch.compile(nn.Sequential(checkpoint_wrapper(again[0]), again[1], again[2]))
    ucp.Checkpointer(tmp_path / "ck", model=rewrapped, optimizer=aopt).load()
    assert bit_diffs(state_of(m, opt), state_of(again, aopt)) == []
