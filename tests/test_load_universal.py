"""Loading a universal checkpoint in one process: the same bits come back, from chunks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ucp
from ucp import CheckpointOptions
from ucp.convert import convert
from ucp.errors import CheckpointNotFoundError


def _model(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(7, 33), nn.ReLU(), nn.Linear(33, 5))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def _train(m, opt, steps):
    for s in range(steps):
        x = torch.randn(4, 7, generator=torch.Generator().manual_seed(s))
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def test_a_universal_checkpoint_loads_back_bit_exactly(tmp_path):
    m, opt = _model(0)
    _train(m, opt, 3)
    ucp.Checkpointer(tmp_path / "ck", model=m, optimizer=opt, options=CheckpointOptions(fsync=False)).save(3)
    convert(tmp_path / "ck", tmp_path / "u", fsync=False, chunk_bytes=1024)
    m2, opt2 = _model(1)
    res = ucp.Checkpointer(tmp_path / "u", model=m2, optimizer=opt2).load()
    assert res.source == "universal" and res.step == 3 and res.path == tmp_path / "u"
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), n
    for p, p2 in zip(m.parameters(), m2.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], opt2.state[p2][k]), k
    _train(m, opt, 1)
    _train(m2, opt2, 1)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))


def test_asking_a_universal_checkpoint_for_another_step_is_refused(tmp_path):
    m, opt = _model(0)
    ucp.Checkpointer(tmp_path / "ck", model=m, options=CheckpointOptions(fsync=False)).save(2)
    convert(tmp_path / "ck", tmp_path / "u", fsync=False)
    with pytest.raises(CheckpointNotFoundError, match="of step 2, not 5"):
        ucp.Checkpointer(tmp_path / "u", model=m).load(step=5)

