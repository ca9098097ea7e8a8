"""Validation of CheckpointOptions and the Checkpointer's arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ucp
from ucp import CheckpointOptions
from ucp.errors import OptionsError
from ucp.format import Layout, Pattern, Shard


@pytest.mark.parametrize("kwargs, hint", [
    ({"io_threads": 0}, "1 to 64"),
    ({"io_threads": 65}, "1 to 64"),
    ({"io_threads": True}, "1 to 64"),
    ({"io_threads": 2.0}, "1 to 64"),
    ({"rng": 1}, "True or False"),
    ({"fsync": "yes"}, "True or False"),
    ({"layout": {"dp": 1}}, "Layout.from_sizes"),
    ({"patterns": {"*.weight": Pattern((Shard("tp", 0),))}}, "pass layout="),
    ({"patterns": {"*.weight": "shard"}}, "ucp.Pattern"),
    ({"layout": Layout.from_sizes(dp=1), "patterns": {"*.weight": Pattern((Shard("tp", 0),))}}, "'tp'"),
])
def test_checkpoint_options_validation(kwargs, hint):
    with pytest.raises(OptionsError) as e:
        CheckpointOptions(**kwargs)
    assert hint in str(e.value)


@pytest.mark.parametrize("keep", [0, -1, "3", 2.0, True])
def test_keep_validation(ckpt_root, keep):
    with pytest.raises(OptionsError, match="use None to keep every checkpoint, or an integer >= 1"):
        ucp.Checkpointer(ckpt_root, model=nn.Linear(2, 2), keep=keep)


def test_layout_whose_world_size_is_not_one_is_rejected(ckpt_root):
    opts = CheckpointOptions(layout=Layout.from_sizes(dp=2, tp=2))
    with pytest.raises(OptionsError) as e:
        ucp.Checkpointer(ckpt_root, model=nn.Linear(2, 2), options=opts)
    assert "4 ranks" in str(e.value) and "1" in str(e.value) and "multiply to the world size" in str(e.value)


def test_constructor_argument_validation(ckpt_root):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(OptionsError, match=r"torch\.nn\.Module.*dict"):
        ucp.Checkpointer(ckpt_root, model={"w": torch.ones(1)})
    with pytest.raises(OptionsError, match="pass model="):
        ucp.Checkpointer(ckpt_root, optimizer=opt)

    class NoStateDict:
        def step(self):
            pass

    with pytest.raises(OptionsError, match=r"scheduler must have state_dict\(\) and load_state_dict\(\)"):
        ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=NoStateDict())
    with pytest.raises(OptionsError, match=r"state\['loader'\] must have state_dict\(\) and load_state_dict\(\)"):
        ucp.Checkpointer(ckpt_root, model=model, state={"loader": object()})
    with pytest.raises(OptionsError, match="CheckpointOptions"):
        ucp.Checkpointer(ckpt_root, model=model, options={"io_threads": 2})
    assert not ckpt_root.exists()  # validation happens before anything touches storage
