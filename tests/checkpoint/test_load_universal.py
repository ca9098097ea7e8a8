"""Loading a universal checkpoint in one process: the same bits come back, from chunks."""

from __future__ import annotations

import pytest

import ucp
from tests.helpers import bit_diffs, state_of, tiny_model, train_step
from ucp import CheckpointOptions
from ucp.convert import convert
from ucp.errors import CheckpointNotFoundError

SIZES = (7, 33, 5)  # Linear, ReLU, Linear


def test_a_universal_checkpoint_loads_back_bit_exactly(tmp_path):
    m, opt = tiny_model(0, SIZES, relu=True)
    for s in range(3):
        train_step(m, opt, s)
    ucp.Checkpointer(tmp_path / "ck", model=m, optimizer=opt, options=CheckpointOptions(fsync=False)).save(3)
    convert(tmp_path / "ck", tmp_path / "u", fsync=False, chunk_bytes=1024)
    m2, opt2 = tiny_model(1, SIZES, relu=True)
    res = ucp.Checkpointer(tmp_path / "u", model=m2, optimizer=opt2).load()
    assert res.source == "universal" and res.step == 3 and res.path == tmp_path / "u"
    assert bit_diffs(state_of(m, opt), state_of(m2, opt2)) == []  # every parameter and Adam state
    train_step(m, opt, 3)
    train_step(m2, opt2, 3)
    assert bit_diffs(state_of(m, opt), state_of(m2, opt2)) == []


def test_asking_a_universal_checkpoint_for_another_step_is_refused(tmp_path):
    m, opt = tiny_model(0, SIZES, relu=True)
    ucp.Checkpointer(tmp_path / "ck", model=m, options=CheckpointOptions(fsync=False)).save(2)
    convert(tmp_path / "ck", tmp_path / "u", fsync=False)
    with pytest.raises(CheckpointNotFoundError, match="of step 2, not 5"):
        ucp.Checkpointer(tmp_path / "u", model=m).load(step=5)

