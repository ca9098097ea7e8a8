"""Checkpoints of weights only (Hugging Face weights, a save of the model alone) load into a model
with an optimizer: a fresh optimizer stays fresh, and the result says so. An optimizer with state
the checkpoint lacks is strictness's business as before (missing keys); a checkpoint that holds
optimizer state which does not fit the optimizer is still an error."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import ucp
from tests.checkpoint.common import FAST, make, train_step
from tests.helpers import assert_bits_equal
from ucp.convert import convert
from ucp.errors import LoadError


def _load_quietly(ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a load that restores the optimizer warns of nothing
        return ckpt.load()


def test_a_save_of_the_model_alone_loads_with_a_fresh_optimizer(ckpt_root):
    model, opt, sched = make()
    train_step(model, opt, sched)
    ucp.Checkpointer(ckpt_root, model=model, options=FAST).save(1)
    model2, opt2, sched2 = make(seed=5)
    with pytest.warns(RuntimeWarning, match="weights only .*state is not restored"):
        res = ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, options=FAST).load()
    assert res.optimizer_restored is False and res.missing_keys == () and res.unexpected_keys == ()
    assert opt2.state_dict()["state"] == {}  # fresh, as it was
    for a, b in zip(model.parameters(), model2.parameters()):
        assert_bits_equal(a, b)
    train_step(model2, opt2, sched2)  # and it trains on from the loaded weights
    assert set(opt2.state_dict()["state"]) == set(range(len(list(model2.parameters()))))


def test_hugging_face_weights_load_with_a_fresh_optimizer(tmp_path):
    model, _, _ = make(opt=None)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()
               if v.dtype.is_floating_point}, tmp_path / "model.safetensors")
    convert(tmp_path / "model.safetensors", tmp_path / "u", source="hf", fsync=False)
    model2, opt2, _ = make(seed=7)
    with pytest.warns(RuntimeWarning, match="weights only") as said:
        res = ucp.Checkpointer(tmp_path / "u", model=model2, optimizer=opt2, options=FAST).load(strict=False)
    assert [w.filename for w in said] == [__file__]  # (said where load was called)
    assert res.source == "universal" and res.optimizer_restored is False
    assert res.missing_keys == ("model/bn.num_batches_tracked",)  # (an int64 buffer the file left out)
    assert opt2.state_dict()["state"] == {} and opt2.param_groups[0]["lr"] == 1e-2
    assert_bits_equal(model2.fc2.weight, model.fc2.weight)


def test_an_optimizer_that_has_state_keeps_it_on_a_load_of_weights_only(ckpt_root):
    model, _, _ = make(opt=None)
    ucp.Checkpointer(ckpt_root, model=model, options=FAST).save(1)
    model2, opt2, sched2 = make(seed=5)
    train_step(model2, opt2, sched2)
    before = opt2.state[model2.fc1.weight]["exp_avg"].clone()
    with pytest.raises(LoadError, match=r"missing optim/bn.bias/exp_avg.*strict=False"):
        ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, options=FAST).load()  # state it lacks: strict
    with pytest.warns(RuntimeWarning, match="weights only"):
        res = ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, options=FAST).load(strict=False)
    assert res.optimizer_restored is False and "optim/fc1.weight/exp_avg" in res.missing_keys
    assert_bits_equal(opt2.state[model2.fc1.weight]["exp_avg"], before)
    assert_bits_equal(model2.fc1.weight, model.fc1.weight)


def test_a_checkpoint_with_optimizer_state_restores_it_and_says_so(ckpt_root):
    model, opt, sched = make()
    train_step(model, opt, sched)
    ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, options=FAST).save(1)
    model2, opt2, _ = make(seed=5)
    res = _load_quietly(ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, options=FAST))
    assert res.optimizer_restored is True
    assert_bits_equal(opt2.state[model2.fc1.weight]["exp_avg"], opt.state[model.fc1.weight]["exp_avg"])
    res = _load_quietly(ucp.Checkpointer(ckpt_root, model=model2, options=FAST))
    assert res.optimizer_restored is False  # (no optimizer to restore: no warning either)


def test_optimizer_state_that_does_not_fit_is_still_an_error(ckpt_root):
    model, _, _ = make(opt=None)
    two_groups = torch.optim.AdamW([{"params": model.fc1.parameters()},
                                    {"params": [*model.bn.parameters(), *model.fc2.parameters()], "lr": 1e-3}])
    ucp.Checkpointer(ckpt_root, model=model, optimizer=two_groups, options=FAST).save(1)  # groups, no moments yet
    model2, opt2, _ = make(seed=5)
    with pytest.raises(LoadError, match="optimizer has 2 param group"):
        ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, options=FAST).load()
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)
    two_groups.step()  # now with moments, for fc1 only
    ucp.Checkpointer(ckpt_root, model=model, optimizer=two_groups, options=FAST).save(2)
    with pytest.raises(LoadError, match="optimizer has 2 param group"):
        ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, options=FAST).load()
