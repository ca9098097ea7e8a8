"""bf16 parameters, tied weights and modules' extra state through a save and a load."""

from __future__ import annotations

import copy

import torch
from torch import nn

import ucp
from tests.checkpoint.common import FAST
from tests.helpers import assert_bits_equal, assert_same
from ucp.format import values
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest


def test_bf16_parameters_round_trip_bit_exactly(ckpt_root):
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).to(torch.bfloat16)
    special = torch.tensor([0x7FC1, 0x7F81, 0xFFC0, 0x8000, 0x0001, 0x7F80, 0xFF80, 0x3F80], dtype=torch.int32)
    with torch.no_grad():
        model[0].bias.view(torch.int16).copy_(special.to(torch.int16))  # NaN payloads, -0, subnormal, inf
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 4, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    with torch.no_grad():
        model[0].bias.view(torch.int16).copy_(special.to(torch.int16))
    ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, options=FAST).save(1)
    m = read_manifest(store.step_dir(ckpt_root, 1))
    assert m.tensors["model/0.weight"].dtype == "bfloat16"
    assert m.tensors["optim/0.weight/momentum_buffer"].dtype == "bfloat16"

    model2 = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)).to(torch.bfloat16)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, options=FAST).load()
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert_bits_equal(b, a, n)
    assert torch.equal(model2[0].bias.view(torch.int16), special.to(torch.int16))
    assert_same(opt2.state_dict(), opt.state_dict())


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def test_tied_weights_are_saved_once_and_load_into_both(ckpt_root):
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, options=FAST).save(1)
    m = read_manifest(store.step_dir(ckpt_root, 1))
    assert "model/emb.weight" in m.tensors and "model/head.weight" not in m.tensors
    assert len(m.fragments_of("model/emb.weight")) == 1
    assert not any("head.weight" in f.key for f in m.fragments)
    assert values.decode(m.state["shared"]["model"])["aliases"] == {"head.weight": "emb.weight"}

    torch.manual_seed(1)
    model2 = Tied()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, options=FAST).load()
    assert model2.head.weight is model2.emb.weight
    assert_bits_equal(model2.emb.weight, model.emb.weight)
    assert_bits_equal(model2.head.weight, model.emb.weight)
    assert_same(opt2.state_dict(), opt.state_dict())


class WithExtraState(nn.Module):
    """A module whose get_extra_state returns a value that is not a parameter (TransformerEngine-style)."""

    def __init__(self, tensor_state: bool):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.tensor_state = tensor_state
        self.meta = {"scale": 1.0, "history": (0, 0)}
        self.blob = torch.zeros(3)

    def get_extra_state(self):
        return self.blob.clone() if self.tensor_state else copy.deepcopy(self.meta)

    def set_extra_state(self, state):
        if self.tensor_state:
            self.blob = state.clone()
        else:
            self.meta = copy.deepcopy(state)


def test_module_extra_state_round_trips(ckpt_root):
    model = nn.Sequential(WithExtraState(tensor_state=False))
    model[0].meta = {"scale": 2.5, "history": (3, 4)}
    ucp.Checkpointer(ckpt_root, model=model, options=FAST).save(1)
    fresh = nn.Sequential(WithExtraState(tensor_state=False))
    ucp.Checkpointer(ckpt_root, model=fresh, options=FAST).load()
    assert fresh[0].meta == {"scale": 2.5, "history": (3, 4)}


def test_module_tensor_extra_state_round_trips(ckpt_root):
    # get_extra_state may return a tensor (TransformerEngine's FP8 modules do); load must hand the saved
    # value back through set_extra_state.
    model = nn.Sequential(WithExtraState(tensor_state=True))
    model[0].blob = torch.tensor([1.0, 2.0, 3.0])
    ucp.Checkpointer(ckpt_root, model=model, options=FAST).save(1)
    fresh = nn.Sequential(WithExtraState(tensor_state=True))
    ucp.Checkpointer(ckpt_root, model=fresh, options=FAST).load()
    assert_bits_equal(fresh[0].blob, torch.tensor([1.0, 2.0, 3.0]))
