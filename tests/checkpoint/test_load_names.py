"""Loading tensors the checkpoint names differently (ucp.plan.sources), and reading only the blocks
of a fragment a destination needs (format 1.1 block checksums), in one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ucp
from tests.helpers import flip_byte
from tests.synthetic import write_checkpoint
from ucp.convert import convert
from ucp.errors import CorruptCheckpointError, LoadError
from ucp.format import Layout, Pattern
from ucp.format.manifest import BLOCK_BYTES
from ucp.format.pattern import Fused
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest

D, COLS = 1024, BLOCK_BYTES // (1024 * 4)  # one fp32 part = exactly one block
QKV = Pattern(fused=Fused(0, (("q", D), ("k", D), ("v", D))))


class Split(nn.Module):
    """The plain attention's projections: q, k, v of their own."""

    def __init__(self, parts="qkv"):
        super().__init__()
        for p in parts:
            self.register_module(p, nn.Linear(COLS, D, bias=False))


class Fused_(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(COLS, 3 * D, bias=False)


def _fused_checkpoint(tmp_path, form: str, block_bytes: int = BLOCK_BYTES):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * D, COLS, generator=g)
    write_checkpoint(tmp_path / "ckpt", 3, {"model/attn.qkv.weight": (w.numpy(), "float32", QKV)}, Layout.single(),
                     block_bytes=block_bytes)
    if form == "universal":
        convert(tmp_path / "ckpt", tmp_path / "u", fsync=False)
        return w, tmp_path / "u"
    return w, tmp_path / "ckpt"


class Attn(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.attn = inner


@pytest.mark.parametrize("form", ["ckpt", "universal"])
def test_split_projections_load_their_rows_of_a_fused_qkv(tmp_path, form):
    w, path = _fused_checkpoint(tmp_path, form)
    m = Attn(Split())
    res = ucp.Checkpointer(path, model=m).load()
    assert res.missing_keys == () and res.unexpected_keys == ()
    for i, p in enumerate("qkv"):
        assert torch.equal(getattr(m.attn, p).weight, w[i * D:(i + 1) * D]), p


@pytest.mark.parametrize("form", ["ckpt", "universal"])
def test_a_fused_qkv_loads_from_split_projections(tmp_path, form):
    g = torch.Generator().manual_seed(1)
    parts = {p: torch.randn(D // 4, 8, generator=g) for p in "qkv"}
    write_checkpoint(tmp_path / "ckpt", 2, {f"model/attn.{p}.weight": (t.numpy(), "float32", Pattern())
                                            for p, t in parts.items()}, Layout.single())
    path = tmp_path / "ckpt"
    if form == "universal":
        convert(path, tmp_path / "u", fsync=False)
        path = tmp_path / "u"
    m = Attn(nn.Module())
    m.attn.qkv = nn.Linear(8, 3 * D // 4, bias=False)
    opts = ucp.CheckpointOptions(layout=Layout.single(), patterns={"attn.qkv.weight": Pattern(fused=Fused(0, tuple((p, D // 4) for p in "qkv")))})
    res = ucp.Checkpointer(path, model=m, options=opts).load()
    assert res.unexpected_keys == ()
    assert torch.equal(m.attn.qkv.weight, torch.cat([parts[p] for p in "qkv"]))


def test_a_part_reads_only_its_blocks_of_the_fused_fragment(tmp_path):
    w, path = _fused_checkpoint(tmp_path, "ckpt")
    m = Attn(Split("q"))
    res = ucp.Checkpointer(path, model=m).load(strict=False)
    assert res.unexpected_keys == ("model/attn.qkv.weight",)  # its k and v rows go nowhere
    assert torch.equal(m.attn.q.weight, w[:D])
    assert res.nbytes == BLOCK_BYTES  # q's block, not the whole 3-block fragment
    # without block checksums (format 1.0) the fragment is read whole, to verify its one checksum
    _, old = _fused_checkpoint(tmp_path / "old", "ckpt", block_bytes=0)
    res = ucp.Checkpointer(old, model=Attn(Split("q"))).load(strict=False)
    assert res.nbytes == 3 * BLOCK_BYTES


def test_a_corrupted_block_is_named_and_blocks_not_read_do_not_matter(tmp_path):
    _, path = _fused_checkpoint(tmp_path, "ckpt")
    directory = store.resolve(path, None)
    (frag,) = read_manifest(directory).fragments
    flip_byte(directory / frag.file, frag.offset + 2 * BLOCK_BYTES + 12345, 0x40)  # in v's rows: block 2
    ucp.Checkpointer(path, model=Attn(Split("qk"))).load(strict=False)  # q and k: blocks 0 and 1
    with pytest.raises(CorruptCheckpointError, match=r"fragment of model/attn\.qkv\.weight .*block 2 at bytes .* "
                                                     r"fails its checksum"):
        ucp.Checkpointer(path, model=Attn(Split("v"))).load(strict=False)


def test_strict_load_refuses_a_fused_tensor_only_partly_used(tmp_path):
    _, path = _fused_checkpoint(tmp_path, "ckpt")
    with pytest.raises(LoadError, match=r"missing none, unexpected model/attn\.qkv\.weight"):
        ucp.Checkpointer(path, model=Attn(Split("qk"))).load()


def test_strict_load_reports_a_part_the_checkpoint_lacks(tmp_path):
    _, path = _fused_checkpoint(tmp_path, "ckpt")
    m = Attn(Split("qkx"))
    with pytest.raises(LoadError, match=r"missing model/attn\.x\.weight"):
        ucp.Checkpointer(path, model=m).load()


def test_masters_a_checkpoint_lacks_come_from_its_fp32_parameters(tmp_path):
    """The other direction of a master: an optimizer keeping fp32 masters of bf16 parameters (as flat
    partitions, like Megatron's distributed optimizer), loaded from an fp32 checkpoint without
    masters, gets the fp32 parameters as its masters, exactly; the parameters are rounded."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(4, 6, generator=g) * 1.2345
    write_checkpoint(tmp_path / "ckpt", 1, {"model/w": (w.numpy(), "float32", Pattern())}, Layout.single())

    class Masters(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
            self.master = torch.zeros(24)

        def ucp_flat_state(self):
            return {"w": {"master": (self.master, 0)}}

    m = nn.Module()
    m.w = nn.Parameter(torch.zeros(4, 6, dtype=torch.bfloat16))
    opt = Masters([m.w])
    res = ucp.Checkpointer(tmp_path / "ckpt", model=m, optimizer=opt).load(cast=True, strict=False)  # no groups saved
    assert res.missing_keys == () and res.unexpected_keys == ()
    np.testing.assert_array_equal(opt.master.numpy(), w.reshape(-1).numpy())
    assert torch.equal(m.w.detach(), w.to(torch.bfloat16))


def test_parts_cutting_through_blocks_read_the_blocks_they_touch_exactly(tmp_path):
    """Parts of 1000 rows in blocks of 1024 rows: each part's run starts or ends inside a block; the
    cut blocks go through a scratch buffer, whole blocks straight into the parameter."""
    rows = BLOCK_BYTES // (COLS * 4)
    n = rows * 3 // 4 + 232  # not a multiple of the rows a block holds
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3 * n, COLS, generator=g)
    pattern = Pattern(fused=Fused(0, (("q", n), ("k", n), ("v", n))))
    write_checkpoint(tmp_path / "ckpt", 1, {"model/attn.qkv.weight": (w.numpy(), "float32", pattern)}, Layout.single())

    def split(parts):
        m = Attn(nn.Module())
        for p in parts:
            m.attn.register_module(p, nn.Linear(COLS, n, bias=False))
        return m

    m = split("qkv")
    ucp.Checkpointer(tmp_path / "ckpt", model=m).load()
    for i, p in enumerate("qkv"):
        assert torch.equal(getattr(m.attn, p).weight, w[i * n:(i + 1) * n]), p
    res = ucp.Checkpointer(tmp_path / "ckpt", model=split("k")).load(strict=False)
    first, last = n * COLS * 4 // BLOCK_BYTES, -(-2 * n * COLS * 4 // BLOCK_BYTES)
    assert res.nbytes == (last - first) * BLOCK_BYTES  # the blocks k's rows touch, each once


class _Counting(torch.optim.Optimizer):
    """Keeps a tensor and a plain number per parameter (as some optimizers keep a step count)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.1})

    def step(self):
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                st["n"] = st.get("n", 0) + 1
                st["acc"] = st.get("acc", torch.zeros_like(p)) + p.detach()


def _fused_model_and_options():
    m = Attn(Fused_())
    opts = ucp.CheckpointOptions(layout=Layout.single(), patterns={"attn.qkv.weight": QKV})
    return m, opts


def test_adams_per_parameter_step_of_a_fused_parameter_reaches_every_part(tmp_path):
    m, opts = _fused_model_and_options()
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    for _ in range(3):
        m.attn.qkv(torch.randn(2, COLS)).sum().backward()
        opt.step()
        opt.zero_grad()
    ucp.Checkpointer(tmp_path, model=m, optimizer=opt, options=opts).save(3)
    split = Attn(Split())
    opt2 = torch.optim.AdamW(split.parameters(), lr=0.01)
    res = ucp.Checkpointer(tmp_path, model=split, optimizer=opt2).load()  # strict
    assert res.missing_keys == () and res.unexpected_keys == ()
    saved = opt.state[m.attn.qkv.weight]
    for i, p in enumerate("qkv"):
        st = opt2.state[getattr(split.attn, p).weight]
        assert st["step"].item() == 3 and torch.equal(st["exp_avg"], saved["exp_avg"][i * D:(i + 1) * D])
    split.attn.q(torch.randn(2, COLS)).sum().backward()
    opt2.step()  # the state is whole: Adam steps on


def test_non_tensor_state_follows_a_parameter_loaded_under_other_names(tmp_path):
    m, opts = _fused_model_and_options()
    opt = _Counting(m.parameters())
    opt.step()
    opt.step()
    ucp.Checkpointer(tmp_path, model=m, optimizer=opt, options=opts).save(2)
    split = Attn(Split())
    opt2 = _Counting(split.parameters())
    ucp.Checkpointer(tmp_path, model=split, optimizer=opt2).load()
    assert [opt2.state[getattr(split.attn, p).weight]["n"] for p in "qkv"] == [2, 2, 2]


def test_a_master_the_checkpoint_lacks_is_missing_not_taken_from_a_bf16_model(tmp_path):
    """Rule 4 gives a master only from a model tensor of the master's dtype: a bf16 model is none."""
    m = nn.Module()
    m.w = nn.Parameter(torch.randn(4, 6).to(torch.bfloat16))
    ucp.Checkpointer(tmp_path, model=m).save(1)

    class Masters(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["master"] = torch.full(p.shape, 7.0)

    opt = Masters([m.w])
    with pytest.raises(LoadError, match=r"missing optim/w/master"):
        ucp.Checkpointer(tmp_path, model=m, optimizer=opt).load()
    ucp.Checkpointer(tmp_path, model=m, optimizer=opt).load(strict=False)
    assert (opt.state[m.w]["master"] == 7.0).all()  # kept (torch's load_state_dict casts it like its parameter)
