"""The Checkpointer in one process: what a load restores after a save, bit-exactly (floats by
their bit patterns): model, optimizer, scheduler, RNG, stateful objects and extras."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

import ucp
from tests.checkpoint.common import FAST, Loader, Net, draw, make, snapshot, train_step
from tests.helpers import assert_bits_equal, assert_same
from ucp import CheckpointOptions
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest


def test_save_then_load_on_same_objects_restores_everything_bit_exactly(ckpt_root):
    model, opt, sched = make()
    loader = Loader()
    for _ in range(3):
        train_step(model, opt, sched)
    loader.pos, loader.epoch, loader.order, loader.seen = 17, 2, (2, 0, 1), {3: (4, 5), -1: ()}
    ckpt = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, state={"loader": loader},
                            options=FAST)
    ema = torch.tensor([1.5, float("nan"), -0.0, float("inf")])
    extras = {"tokens": 123456789012, "name": "run-1", "cfg": {"a": [1, 2.5, None, True], "b": {}}, "ema": ema}
    saved = snapshot(model, opt, sched, loader)
    assert saved["optim"]["state"][0]["exp_avg"].abs().sum() > 0  # the optimizer really has state
    res = ckpt.save(3, extras=extras)
    assert res.step == 3 and res.path == store.step_dir(ckpt_root, 3) and res.nbytes > 0
    after_save = draw()

    # Disturb every component.
    for _ in range(2):
        train_step(model, opt, sched)
    with torch.no_grad():
        model.bn.running_mean.add_(1.0)
        model.bn.running_var.mul_(3.0)
        model.bn.num_batches_tracked.add_(10)
    for g in opt.param_groups:
        g["lr"] = 0.777
        g["weight_decay"] = 0.5
    loader.pos, loader.order, loader.seen = 99, (9,), {}
    draw()
    assert not torch.equal(model.fc1.weight, saved["model"]["fc1.weight"])

    got = ckpt.load()
    assert got.step == 3 and got.source == "durable" and got.path == res.path
    assert got.missing_keys == () and got.unexpected_keys == ()
    assert_same(draw(), after_save, "rng draws")
    assert_same(snapshot(model, opt, sched, loader), saved)
    assert opt.param_groups[0]["lr"] == saved["optim"]["param_groups"][0]["lr"] != 0.777
    assert loader.order == (2, 0, 1) and loader.seen == {3: (4, 5), -1: ()} and loader.window == [(1, "a"), (2, "b")]
    assert set(got.extras) == set(extras)
    assert_same({k: v for k, v in got.extras.items() if k != "ema"}, {k: v for k, v in extras.items() if k != "ema"})
    assert_bits_equal(got.extras["ema"], ema, "extras ema")


def test_batchnorm_running_stats_and_counter_are_restored_into_a_fresh_model(ckpt_root):
    model, opt, sched = make()
    for _ in range(4):
        train_step(model, opt, sched)
    ucp.Checkpointer(ckpt_root, model=model, options=FAST).save(1)
    fresh = Net()
    assert fresh.bn.num_batches_tracked.item() == 0
    ucp.Checkpointer(ckpt_root, model=fresh, options=FAST).load()
    for name in ("running_mean", "running_var", "num_batches_tracked", "weight", "bias"):
        assert_bits_equal(getattr(fresh.bn, name), getattr(model.bn, name), name)
    assert fresh.bn.num_batches_tracked.item() == 4


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_resumed_loop_into_unstepped_optimizer_matches_uninterrupted_loop(ckpt_root, opt_name):
    model, opt, sched = make(opt_name)
    for _ in range(3):
        train_step(model, opt, sched)
    ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST).save(3)
    saved_optim = copy.deepcopy(opt.state_dict())
    reference = [train_step(model, opt, sched) for _ in range(4)]

    model2, opt2, sched2 = make(opt_name, seed=99, lr=0.5)  # different weights and lr, no optimizer state
    assert len(opt2.state) == 0
    res = ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, scheduler=sched2, options=FAST).load()
    assert res.step == 3
    assert_same(opt2.state_dict(), saved_optim)
    if opt_name == "adamw":
        st = opt2.state[model2.fc1.weight]
        assert set(st) == {"step", "exp_avg", "exp_avg_sq"}
        assert st["step"].item() == 3.0
    else:
        assert set(opt2.state[model2.fc1.weight]) == {"momentum_buffer"}
    resumed = [train_step(model2, opt2, sched2) for _ in range(4)]
    assert resumed == reference  # exact float equality
    assert_same({k: v for k, v in model2.state_dict().items()}, {k: v for k, v in model.state_dict().items()})


def test_load_into_stepped_optimizer_overwrites_its_state(ckpt_root):
    model, opt, sched = make()
    for _ in range(2):
        train_step(model, opt, sched)
    ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST).save(2)
    saved = snapshot(model, opt, sched)
    model2, opt2, sched2 = make(seed=7)
    for _ in range(5):
        train_step(model2, opt2, sched2)
    ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, scheduler=sched2, options=FAST).load()
    assert_same(snapshot(model2, opt2, sched2), saved)


def test_param_group_hyperparameters_and_scheduler_are_restored(ckpt_root):
    model, opt, sched = make()
    opt.param_groups[0]["lr"] = 0.0123
    opt.param_groups[0]["betas"] = (0.8, 0.95)
    for _ in range(3):
        train_step(model, opt, sched)
    ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST).save(1)
    saved_groups = copy.deepcopy(opt.state_dict()["param_groups"])
    saved_sched = copy.deepcopy(sched.state_dict())
    model2, opt2, sched2 = make(lr=3.0)
    ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, scheduler=sched2, options=FAST).load()
    assert_same(opt2.state_dict()["param_groups"], saved_groups)
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and isinstance(opt2.param_groups[0]["betas"], tuple)
    assert_same(sched2.state_dict(), saved_sched)
    assert sched2.last_epoch == 3 and sched2.get_last_lr() == sched.get_last_lr()


def test_rng_states_are_restored(ckpt_root):
    model, _, _ = make(opt=None)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt = ucp.Checkpointer(ckpt_root, model=model, options=FAST)
    ckpt.save(0)
    expected = [draw() for _ in range(3)]
    later = [draw() for _ in range(3)]
    assert later[0][0] != expected[0][0] and not torch.equal(later[0][2], expected[0][2])
    ckpt.load()
    assert_same([draw() for _ in range(3)], expected)


def test_rng_false_leaves_generators_alone(ckpt_root):
    model, _, _ = make(opt=None)
    ckpt = ucp.Checkpointer(ckpt_root, model=model, options=CheckpointOptions(rng=False, fsync=False))
    ckpt.save(0)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    ckpt.load()
    assert_bits_equal(torch.rand(3), expected)


def test_stateful_object_round_trip_keeps_tuples_and_int_keys(ckpt_root):
    model, _, _ = make(opt=None)
    loader = Loader()
    loader.pos, loader.order, loader.seen = 5, (4, 3, (2, 1)), {0: (1,), 10: ("x", 2)}
    ucp.Checkpointer(ckpt_root, model=model, state={"loader": loader}, options=FAST).save(1)
    other = Loader()
    ucp.Checkpointer(ckpt_root, model=make(opt=None)[0], state={"loader": other}, options=FAST).load()
    assert_same(other.state_dict(), loader.state_dict())
    assert other.order == (4, 3, (2, 1)) and other.seen == {0: (1,), 10: ("x", 2)}


def test_extras_json_values_and_tensors_round_trip(ckpt_root):
    model, _, _ = make(opt=None)
    bf = torch.tensor([1.0, -0.0, 3.5], dtype=torch.bfloat16)
    extras = {"i": 7, "f": 0.1, "s": "x", "l": [1, [2, 3]], "d": {"k": None}, "b": False,
              "t": torch.arange(12, dtype=torch.int64).reshape(3, 4), "bf": bf, "scalar": torch.tensor(2.5)}
    ucp.Checkpointer(ckpt_root, model=model, options=FAST).save(1, extras=extras)
    got = ucp.Checkpointer(ckpt_root, model=make(opt=None)[0], options=FAST).load().extras
    assert set(got) == set(extras)
    for k, v in extras.items():
        assert_same(got[k], v, k)


class NumpyStats:
    """A stateful object whose state holds numpy scalars, as metric trackers often do."""

    def __init__(self):
        self.stats = {"best": np.float64("inf"), "last": np.float64("nan"), "mean": np.float64(0.25), "n": np.int64(3)}

    def state_dict(self):
        return dict(self.stats)

    def load_state_dict(self, sd):
        self.stats = dict(sd)


def test_state_with_numpy_float_scalars_saves_and_loads(ckpt_root):
    # A save that succeeds must load: numpy float64 NaN/inf values must not make the manifest unreadable.
    model = make(opt=None)[0]
    ucp.Checkpointer(ckpt_root, model=model, state={"stats": NumpyStats()}, options=FAST).save(1)
    other = NumpyStats()
    other.stats = {}
    res = ucp.Checkpointer(ckpt_root, model=make(opt=None)[0], state={"stats": other}, options=FAST).load()
    assert res.step == 1
    assert other.stats["best"] == math.inf and math.isnan(other.stats["last"])
    assert other.stats["mean"] == 0.25 and other.stats["n"] == 3


def test_empty_and_zero_dim_tensors_round_trip(ckpt_root):
    model = nn.Linear(2, 2)
    model.register_buffer("empty", torch.empty(0, 3, dtype=torch.bfloat16))
    model.register_buffer("count", torch.tensor(5))
    extras = {"z": torch.empty(0), "s": torch.tensor(-0.0)}
    ucp.Checkpointer(ckpt_root, model=model, options=FAST).save(1, extras=extras)
    m = read_manifest(store.step_dir(ckpt_root, 1))
    assert m.tensors["model/empty"].shape == (0, 3) and m.fragments_of("model/empty") == []
    fresh = nn.Linear(2, 2)
    fresh.register_buffer("empty", torch.empty(0, 3, dtype=torch.bfloat16))
    fresh.register_buffer("count", torch.tensor(0))
    res = ucp.Checkpointer(ckpt_root, model=fresh, options=FAST).load()
    assert fresh.count.item() == 5 and fresh.empty.shape == (0, 3)
    assert_bits_equal(fresh.weight, model.weight)
    assert_bits_equal(res.extras["z"], torch.empty(0))
    assert_bits_equal(res.extras["s"], torch.tensor(-0.0))


def test_multiple_param_groups_plateau_scheduler_and_noncontiguous_param_resume_exactly(ckpt_root):
    def build(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 2))
        m[2].weight = nn.Parameter(torch.randn(5, 2).t())  # a non-contiguous parameter
        decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in m.named_parameters() if not n.endswith("weight")]
        opt = torch.optim.Adam([{"params": decay, "weight_decay": 0.1, "name": "decay"},
                                {"params": rest, "weight_decay": 0.0}], lr=0.01, amsgrad=True)
        return m, opt, torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)

    def step(m, opt, sched):
        loss = m(torch.randn(3, 4)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step(loss.item())
        return loss.item()

    m, opt, sched = build(0)
    for _ in range(4):
        step(m, opt, sched)
    ucp.Checkpointer(ckpt_root, model=m, optimizer=opt, scheduler=sched, options=FAST).save(4)
    saved = snapshot(m, opt, sched)
    reference = [step(m, opt, sched) for _ in range(3)]
    m2, opt2, sched2 = build(1)
    ucp.Checkpointer(ckpt_root, model=m2, optimizer=opt2, scheduler=sched2, options=FAST).load()
    assert_same(snapshot(m2, opt2, sched2), saved)
    assert opt2.param_groups[0]["name"] == "decay"
    assert [step(m2, opt2, sched2) for _ in range(3)] == reference
