"""Strict and non-strict loads: missing and unexpected tensors, shapes and dtypes that do not match."""

from __future__ import annotations

import pytest
from torch import nn

import ucp
from tests.checkpoint.common import FAST, Loader, Net, fresh_checkpointer, make, saved_checkpoint, train_step
from tests.helpers import assert_bits_equal
from ucp.errors import LoadError


def test_strict_load_into_model_with_extra_layer_names_missing_keys(ckpt_root):
    model = make(opt=None)[0]
    ucp.Checkpointer(ckpt_root, model=model, options=FAST).save(1)
    bigger = Net(extra_layer=True)
    before = bigger.fc1.weight.detach().clone()
    with pytest.raises(LoadError) as e:
        ucp.Checkpointer(ckpt_root, model=bigger, options=FAST).load()
    msg = str(e.value)
    assert "model/fc3.weight" in msg and "model/fc3.bias" in msg and "strict=False" in msg
    assert_bits_equal(bigger.fc1.weight, before)  # nothing was loaded


def test_non_strict_load_loads_what_matches_and_reports_the_rest(ckpt_root):
    bigger = Net(extra_layer=True)
    ucp.Checkpointer(ckpt_root / "big", model=bigger, options=FAST).save(1)
    small = make(opt=None, seed=3)[0]
    ucp.Checkpointer(ckpt_root / "small", model=small, options=FAST).save(1)

    target = Net(extra_layer=True)
    fc3 = target.fc3.weight.detach().clone()
    res = ucp.Checkpointer(ckpt_root / "small", model=target, options=FAST).load(strict=False)
    assert res.missing_keys == ("model/fc3.bias", "model/fc3.weight")
    assert res.unexpected_keys == ()
    assert_bits_equal(target.fc1.weight, small.fc1.weight)
    assert_bits_equal(target.bn.running_var, small.bn.running_var)
    assert_bits_equal(target.fc3.weight, fc3)

    target_small = Net()
    res = ucp.Checkpointer(ckpt_root / "big", model=target_small, options=FAST).load(strict=False)
    assert res.missing_keys == ()
    assert res.unexpected_keys == ("model/fc3.bias", "model/fc3.weight")
    assert_bits_equal(target_small.fc2.weight, bigger.fc2.weight)

    with pytest.raises(LoadError, match="model/fc3.weight"):
        ucp.Checkpointer(ckpt_root / "big", model=Net(), options=FAST).load()


def test_non_strict_load_with_optimizer_loads_matching_state(ckpt_root):
    # strict=False promises "load what matches": the optimizer state of the shared parameters
    # should load although the new model (and its optimizer) has an extra layer.
    model, opt, sched = make()
    for _ in range(2):
        train_step(model, opt, sched)
    ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, options=FAST).save(1)
    model2, opt2, _ = make(extra_layer=True, seed=4)
    res = ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, options=FAST).load(strict=False)
    assert "model/fc3.weight" in res.missing_keys
    assert_bits_equal(model2.fc1.weight, model.fc1.weight)
    assert_bits_equal(opt2.state[model2.fc1.weight]["exp_avg"], opt.state[model.fc1.weight]["exp_avg"])


def test_shape_mismatch_raises_load_error_naming_tensor(ckpt_root):
    ucp.Checkpointer(ckpt_root, model=nn.Linear(4, 3), options=FAST).save(1)
    with pytest.raises(LoadError, match=r"model/weight.*\[3, 4\]"):
        ucp.Checkpointer(ckpt_root, model=nn.Linear(5, 3), options=FAST).load()


def test_load_with_scheduler_or_state_the_checkpoint_lacks_raises(ckpt_root):
    model, opt, sched = make()
    ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, options=FAST).save(1)
    m2, o2, s2 = make()
    with pytest.raises(LoadError, match="scheduler"):
        ucp.Checkpointer(ckpt_root, model=m2, optimizer=o2, scheduler=s2, options=FAST).load()
    with pytest.raises(LoadError, match="loader"):
        ucp.Checkpointer(ckpt_root, model=m2, optimizer=o2, state={"loader": Loader()}, options=FAST).load()


def test_dtype_mismatch_is_refused_not_cast(ckpt_root):
    saved_checkpoint(ckpt_root)
    ckpt, model = fresh_checkpointer(ckpt_root)
    model.double()
    with pytest.raises(LoadError, match="fc1.weight is float32 in the checkpoint, float64 here"):
        ckpt.load()
