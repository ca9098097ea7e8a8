"""Loading with other dtypes (cast=True): a parameter with an fp32 master comes from the master,
exactly; anything else converts as Tensor.to does. Without cast=True a dtype change is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ucp
from tests.helpers import assert_bits_equal
from tests.synthetic import write_checkpoint
from ucp.convert import convert
from ucp.errors import LoadError
from ucp.format import Layout, Pattern


class One(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4, 6, dtype=dtype))


@pytest.fixture
def fp32_master():
    g = torch.Generator().manual_seed(0)
    master = torch.randn(4, 6, generator=g) * 1.2345  # not representable in bf16
    return master, master.to(torch.bfloat16)


@pytest.mark.parametrize("form", ["ckpt", "universal"])
def test_an_fp32_model_loads_a_bf16_checkpoint_from_its_masters(tmp_path, fp32_master, form):
    master, bf16 = fp32_master
    write_checkpoint(tmp_path / "ckpt", 5, {
        "model/w": (bf16.view(torch.uint16).numpy(), "bfloat16", Pattern()),
        "optim/w/master": (master.numpy(), "float32", Pattern()),
    }, Layout.single())
    path = tmp_path / "ckpt"
    if form == "universal":
        convert(path, tmp_path / "u", fsync=False)
        path = tmp_path / "u"
    m = One(torch.float32)
    with pytest.raises(LoadError, match="pass cast=True"):
        ucp.Checkpointer(path, model=m).load()
    ucp.Checkpointer(path, model=m).load(cast=True)
    assert_bits_equal(m.w, master)  # the master, not the widened bf16


def test_without_a_master_values_convert_as_tensor_to_does(tmp_path, fp32_master):
    master, bf16 = fp32_master
    write_checkpoint(tmp_path / "a", 1, {"model/w": (master.numpy(), "float32", Pattern())}, Layout.single())
    m = One(torch.bfloat16)
    ucp.Checkpointer(tmp_path / "a", model=m).load(cast=True)
    assert_bits_equal(m.w, bf16)
    write_checkpoint(tmp_path / "b", 1, {"model/w": (bf16.view(torch.uint16).numpy(), "bfloat16", Pattern())},
                     Layout.single())
    m32 = One(torch.float32)
    ucp.Checkpointer(tmp_path / "b", model=m32).load(cast=True)
    assert_bits_equal(m32.w, bf16.to(torch.float32))
