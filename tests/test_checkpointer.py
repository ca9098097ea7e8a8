"""The public hooks in one process: what a save holds, what a load restores, and how they fail.

Tensors are moved without arithmetic, so every comparison is bit-exact (floats by their bit patterns).
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import ucp
from tests.conftest import require
from ucp import CheckpointOptions
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError, FormatError, LoadError, OptionsError, UcpError
from ucp.format import values
from ucp.format import Layout, Pattern, Shard
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest
from ucp.storage.safetensors_file import read_header

FAST = CheckpointOptions(fsync=False)
_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- helpers -----------------------------------------------------------------------------------


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and bytes (floats compared by bit pattern, so NaN payloads and -0.0 count)."""
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), what
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.is_floating_point():
        it = _INT_OF_SIZE[a.element_size()]
        assert torch.equal(a.detach().contiguous().view(it), b.detach().contiguous().view(it)), what
    else:
        assert torch.equal(a, b), what


def assert_same(a, b, path: str = "value") -> None:
    """Deep, type-exact equality; tensors bit-exact, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        assert_bits_equal(a, b, path)
        return
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b) or set(a) == set(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


class Net(nn.Module):
    def __init__(self, extra_layer: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 3)
        if extra_layer:
            self.fc3 = nn.Linear(3, 3)

    def forward(self, x):
        x = self.fc2(torch.relu(self.bn(self.fc1(x))))
        return self.fc3(x) if hasattr(self, "fc3") else x


class Loader:
    """A resumable data loader stand-in whose state holds tuples, ints and int-keyed dicts."""

    def __init__(self):
        self.pos = 0
        self.epoch = 0
        self.order = (0, 1, 2)
        self.seen = {}

    def state_dict(self):
        return {"pos": self.pos, "epoch": self.epoch, "order": self.order, "seen": dict(self.seen),
                "window": [(1, "a"), (2, "b")]}

    def load_state_dict(self, sd):
        self.pos, self.epoch, self.order, self.seen = sd["pos"], sd["epoch"], sd["order"], dict(sd["seen"])
        self.window = sd["window"]


def make(opt: str = "adamw", seed: int = 0, lr: float = 1e-2, extra_layer: bool = False):
    torch.manual_seed(seed)
    model = Net(extra_layer)
    if opt == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    elif opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    else:
        optimizer = None
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5) if optimizer is not None else None
    return model, optimizer, sched


def train_step(model, optimizer, sched) -> float:
    x = torch.randn(8, 6)
    y = torch.randn(8, 3)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    sched.step()
    return loss.item()


def snapshot(model, optimizer, sched, loader=None):
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optim": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
        "sched": copy.deepcopy(sched.state_dict()) if sched is not None else None,
        "loader": copy.deepcopy(loader.state_dict()) if loader is not None else None,
    }


def draw():
    return random.random(), np.random.rand(3).tolist(), torch.rand(4)



def write_signed(mpath, header: dict) -> None:
    """Write an edited manifest header with a valid checksum (a writer that means it)."""
    from ucp.codecs.checksum import crc32c
    from ucp.format.manifest import canonical_json
    from ucp.storage.manifest_io import HEADER_CRC

    header = {k: v for k, v in header.items() if k != HEADER_CRC}
    header[HEADER_CRC] = crc32c(canonical_json(header))
    mpath.write_text(json.dumps(header))

def saved_checkpoint(root, **save_kwargs):
    """A trained model saved at step 5 under ``root``: (checkpoint dir, model, optimizer, scheduler)."""
    model, opt, sched = make()
    for _ in range(3):
        train_step(model, opt, sched)
    ucp.Checkpointer(root, model=model, optimizer=opt, scheduler=sched, options=FAST).save(5, **save_kwargs)
    return store.step_dir(root, 5), model, opt, sched


def fresh_checkpointer(root, **kw):
    model, opt, sched = make(seed=123)
    return ucp.Checkpointer(root, model=model, optimizer=opt, scheduler=sched, options=FAST, **kw), model


# -- full round trip ---------------------------------------------------------------------------


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


def test_checkpoint_directory_contents_and_byte_counts(ckpt_root):
    model, opt, sched = make()
    train_step(model, opt, sched)
    res = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched).save(1)
    assert sorted(p.name for p in res.path.iterdir()) == [store.FRAGMENT_TABLE, store.MANIFEST, store.rank_file(0)]
    m = read_manifest(res.path)
    expected_keys = {f"model/{k}" for k in model.state_dict()} | {
        f"optim/{n}/{s}" for n in dict(model.named_parameters()) for s in ("step", "exp_avg", "exp_avg_sq")}
    assert set(m.tensors) == expected_keys
    assert m.step == 1 and m.layout == Layout.single()
    assert res.nbytes == m.nbytes == sum(f.length for f in m.fragments)
    total = sum(v.numel() * v.element_size() for v in model.state_dict().values()) + sum(
        v.numel() * v.element_size() for st in opt.state.values() for v in st.values())
    assert res.nbytes == total
    m2, opt2, _ = make(seed=2)
    got = ucp.Checkpointer(ckpt_root, model=m2, optimizer=opt2).load()
    assert got.nbytes == m.nbytes


def test_patterns_with_a_single_rank_layout_are_recorded(ckpt_root):
    pattern = Pattern((Shard("tp", 0),))
    opts = CheckpointOptions(layout=Layout.from_sizes(tp=1), patterns={"fc1.*": pattern}, fsync=False)
    model = make(opt=None)[0]
    ucp.Checkpointer(ckpt_root, model=model, options=opts).save(1)
    m = read_manifest(store.step_dir(ckpt_root, 1))
    assert m.tensors["model/fc1.weight"].pattern == pattern
    assert m.tensors["model/fc2.weight"].pattern == Pattern()
    fresh = Net()
    ucp.Checkpointer(ckpt_root, model=fresh, options=opts).load()
    assert_bits_equal(fresh.fc1.weight, model.fc1.weight)


# -- dtypes and aliasing -----------------------------------------------------------------------


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


# -- finding checkpoints, retention, partial saves ---------------------------------------------


def test_load_on_empty_root_returns_none(ckpt_root):
    model = make(opt=None)[0]
    assert ucp.Checkpointer(ckpt_root, model=model).load() is None  # root does not exist yet
    ckpt_root.mkdir()
    assert ucp.Checkpointer(ckpt_root, model=model).load() is None


def test_load_missing_step_raises_not_found_naming_the_step(ckpt_root):
    model = make(opt=None)[0]
    ckpt = ucp.Checkpointer(ckpt_root, model=model, options=FAST)
    ckpt.save(1)
    with pytest.raises(CheckpointNotFoundError, match=r"step 42"):
        ckpt.load(step=42)
    assert ckpt.load(step=1).step == 1


def test_load_missing_step_on_missing_root_names_the_step(ckpt_root):
    ckpt = ucp.Checkpointer(ckpt_root, model=make(opt=None)[0])
    with pytest.raises(CheckpointNotFoundError) as e:
        ckpt.load(step=42)
    assert "42" in str(e.value)


def test_saving_an_existing_step_raises_and_keeps_the_checkpoint(ckpt_root):
    model, opt, sched = make()
    ckpt = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
    ckpt.save(4)
    before = {p.name: p.read_bytes() for p in store.step_dir(ckpt_root, 4).iterdir()}
    train_step(model, opt, sched)
    with pytest.raises(UcpError, match="exists already"):
        ckpt.save(4)
    assert {p.name: p.read_bytes() for p in store.step_dir(ckpt_root, 4).iterdir()} == before


@pytest.mark.parametrize("step", [-1, True, 1.0, "3", None])
def test_save_rejects_bad_steps(ckpt_root, step):
    ckpt = ucp.Checkpointer(ckpt_root, model=make(opt=None)[0], options=FAST)
    with pytest.raises(OptionsError, match="non-negative integer"):
        ckpt.save(step)
    assert not ckpt_root.exists() or not any(ckpt_root.iterdir())


def test_keep_two_retains_only_newest_two(ckpt_root):
    model, opt, sched = make()
    ckpt = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, keep=2, options=FAST)
    for step in (1, 2, 3, 4):
        train_step(model, opt, sched)
        ckpt.save(step)
    assert [s for s, _ in store.list_steps(ckpt_root)] == [3, 4]
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["step_00000003", "step_00000004"]
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(step=2)
    assert ckpt.load().step == 4


def _make_partial(root, src_step: int, dst_step: int):
    """Simulate a save of ``dst_step`` that died before its commit: data files, no manifest."""
    dst = store.step_dir(root, dst_step)
    shutil.copytree(store.step_dir(root, src_step), dst)
    (dst / store.MANIFEST).unlink()
    (dst / "junk.bin").write_bytes(b"half written")
    return dst


def test_partial_save_is_invisible_and_pruned_only_once_older_than_newest_complete(ckpt_root):
    model, opt, sched = make()
    ckpt = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, keep=2, options=FAST)
    ckpt.save(1)
    train_step(model, opt, sched)
    ckpt.save(2)
    partial = _make_partial(ckpt_root, 2, 7)

    assert ckpt.load().step == 2
    with pytest.raises(CheckpointNotFoundError):
        ckpt.load(step=7)

    train_step(model, opt, sched)
    ckpt.save(5)  # newest complete is 5 < 7: the partial may still be in flight, keep it
    assert partial.is_dir()
    assert [s for s, _ in store.list_steps(ckpt_root)] == [2, 5]

    train_step(model, opt, sched)
    ckpt.save(8)  # now 7 < 8: a dead save, pruned
    assert not partial.exists()
    assert [s for s, _ in store.list_steps(ckpt_root)] == [5, 8]
    assert [s for s, _ in store.list_steps(ckpt_root, complete=False)] == [5, 8]


def test_save_over_a_stale_partial_of_the_same_step_replaces_it(ckpt_root):
    model, opt, sched = make()
    ckpt = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
    ckpt.save(1)
    partial = _make_partial(ckpt_root, 1, 3)
    train_step(model, opt, sched)
    saved = snapshot(model, opt, sched)
    ckpt.save(3)
    assert store.is_complete(partial) and not (partial / "junk.bin").exists()
    train_step(model, opt, sched)
    assert ckpt.load().step == 3
    assert_same(snapshot(model, opt, sched), saved)


def test_only_partial_saves_load_returns_none(ckpt_root):
    model = make(opt=None)[0]
    ckpt = ucp.Checkpointer(ckpt_root, model=model, options=FAST)
    ckpt.save(1)
    _make_partial(ckpt_root, 1, 2)
    store.remove_checkpoint(store.step_dir(ckpt_root, 1))
    assert ckpt.load() is None


def test_closed_checkpointer_refuses_work(ckpt_root):
    with ucp.Checkpointer(ckpt_root, model=make(opt=None)[0], options=FAST) as ckpt:
        ckpt.save(1)
    with pytest.raises(UcpError, match="closed"):
        ckpt.save(2)
    with pytest.raises(UcpError, match="closed"):
        ckpt.load()


# -- corruption --------------------------------------------------------------------------------


def _fragment(path, key: str):
    frags = [f for f in read_manifest(path).fragments if f.key == key]
    assert len(frags) == 1
    return frags[0]


def test_flipped_byte_in_fragment_raises_corrupt_naming_file_and_key(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    f = _fragment(path, "model/fc1.weight")
    data_file = path / f.file
    raw = bytearray(data_file.read_bytes())
    raw[f.offset + f.length // 2] ^= 0x01
    data_file.write_bytes(bytes(raw))
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    msg = str(e.value)
    assert str(data_file) in msg and "model/fc1.weight" in msg and "checksum" in msg


def test_failed_load_is_named_and_an_older_checkpoint_restores_exactly(ckpt_root):
    # Reads go straight into the live tensors (no bounce copy), so a load that fails its checksum
    # leaves the model unspecified (docs/format-checkpoint.md rule 16); the documented way on is to
    # load another checkpoint, which must then restore every bit.
    model, opt, sched = make()
    for _ in range(3):
        train_step(model, opt, sched)
    ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
    ck.save(4)
    good = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, opt, sched)
    ck.save(5)
    f = _fragment(store.step_dir(ckpt_root, 5), "model/fc2.weight")
    data_file = store.step_dir(ckpt_root, 5) / f.file
    raw = bytearray(data_file.read_bytes())
    raw[f.offset] ^= 0x40
    data_file.write_bytes(bytes(raw))
    ckpt, fresh = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match="model/fc2.weight") as e:
        ckpt.load()
    assert f.file in str(e.value) and "step_00000005" in str(e.value)
    assert ckpt.load(step=4).step == 4
    for n, p in fresh.named_parameters():
        assert_bits_equal(p, good[n], n)


def test_flipped_byte_in_optimizer_state_is_detected_too(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    f = _fragment(path, "optim/fc2.weight/exp_avg_sq")
    data_file = path / f.file
    with open(data_file, "r+b") as fh:
        fh.seek(f.offset + f.length - 1)
        b = fh.read(1)
        fh.seek(f.offset + f.length - 1)
        fh.write(bytes([b[0] ^ 0x80]))
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match="optim/fc2.weight/exp_avg_sq"):
        ckpt.load()


def test_truncated_rank_file_raises_corrupt_naming_file_and_key(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    frags = read_manifest(path).fragments
    last = max(frags, key=lambda f: f.offset)
    data_file = path / last.file
    os.truncate(data_file, last.offset + last.length - 1)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    msg = str(e.value)
    assert str(data_file) in msg and last.key in msg and "truncated" in msg


def test_rank_file_truncated_to_its_header_raises_corrupt(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    m = read_manifest(path)
    data_file = path / m.fragments[0].file
    _, data_start = read_header(data_file)
    os.truncate(data_file, data_start)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    assert str(data_file) in str(e.value)
    assert any(f.key in str(e.value) for f in m.fragments)


def test_corrupt_fragment_table_raises_corrupt(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    table = path / store.FRAGMENT_TABLE
    raw = bytearray(table.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    table.write_bytes(bytes(raw))
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match=store.FRAGMENT_TABLE):
        ckpt.load()


def test_missing_fragment_table_raises_corrupt(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    (path / store.FRAGMENT_TABLE).unlink()
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match="missing"):
        ckpt.load()


def test_deleted_data_file_raises_naming_it(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    data_file = path / store.rank_file(0)
    data_file.unlink()
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError) as e:
        ckpt.load()
    assert str(data_file) in str(e.value) and "missing" in str(e.value)


def test_manifest_from_a_newer_major_version_asks_to_upgrade(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["format_version"] = "9.0"
    write_signed(mpath, header)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match="upgrade") as e:
        ckpt.load()
    assert "9.0" in str(e.value)


def test_manifest_newer_minor_version_still_loads(ckpt_root):
    path, model, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["format_version"] = "1.7"
    header["a_field_from_the_future"] = {"x": [1, 2]}  # readers ignore fields they do not know
    write_signed(mpath, header)
    ckpt, model2 = fresh_checkpointer(ckpt_root)
    assert ckpt.load().step == 5
    assert_bits_equal(model2.fc1.weight, model.fc1.weight)


def test_manifest_naming_a_file_outside_the_directory_is_rejected(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    (ckpt_root / "evil.parquet").write_bytes((path / store.FRAGMENT_TABLE).read_bytes())
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    header["fragment_table"]["file"] = "../evil.parquet"
    write_signed(mpath, header)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match="plain file name"):
        ckpt.load()


def test_loader_finds_fragments_by_offset_not_by_safetensors_name(ckpt_root):
    # Format rule 18: the fragment table, not the safetensors header, says where bytes are.
    path, model, *_ = saved_checkpoint(ckpt_root)
    data_file = path / store.rank_file(0)
    raw = data_file.read_bytes()
    (n,) = np.frombuffer(raw[:8], dtype="<u8")
    head = raw[8:8 + int(n)].replace(b'"model/', b'"MODEL/').replace(b'"optim/', b'"OPTIM/')
    assert len(head) == n
    data_file.write_bytes(raw[:8] + head + raw[8 + int(n):])
    ckpt, fresh = fresh_checkpointer(ckpt_root)
    assert ckpt.load().step == 5
    assert_bits_equal(fresh.fc1.weight, model.fc1.weight)


def test_manifest_that_is_not_json_raises_format_error(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    (path / store.MANIFEST).write_bytes(b"{not json")
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match="JSON"):
        ckpt.load()


# -- never unpickled ---------------------------------------------------------------------------


def test_load_never_unpickles(ckpt_root, monkeypatch):
    model, opt, sched = make()
    loader = Loader()
    for _ in range(2):
        train_step(model, opt, sched)
    ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, state={"loader": loader},
                     options=FAST).save(2, extras={"t": torch.ones(2), "v": (1, 2)})
    saved = snapshot(model, opt, sched, loader)

    def refuse(*a, **k):
        raise AssertionError("ucp unpickled something during a load")

    class RefusingUnpickler:
        def __init__(self, *a, **k):
            refuse()

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    monkeypatch.setattr(torch, "load", refuse)
    model2, opt2, sched2 = make(seed=5)
    loader2 = Loader()
    res = ucp.Checkpointer(ckpt_root, model=model2, optimizer=opt2, scheduler=sched2, state={"loader": loader2},
                           options=FAST).load()
    assert res.step == 2 and res.extras["v"] == (1, 2)
    assert_same(snapshot(model2, opt2, sched2, loader2), saved)


def test_manifest_is_strict_json_even_with_non_finite_values(ckpt_root):
    def no_constants(name):
        raise AssertionError(f"manifest.json holds the non-JSON literal {name}")

    path, *_ = saved_checkpoint(ckpt_root, extras={"loss": float("nan"), "best": float("-inf"), "t": (1, 2)})
    header = json.loads((path / store.MANIFEST).read_bytes(), parse_constant=no_constants)
    assert header["format"] == "ucp.checkpoint" and header["format_version"] == "1.1" and header["step"] == 5
    ckpt, _ = fresh_checkpointer(ckpt_root)
    extras = ckpt.load().extras
    assert math.isnan(extras["loss"]) and extras["best"] == -math.inf and extras["t"] == (1, 2)


# -- strictness --------------------------------------------------------------------------------


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


# -- options -----------------------------------------------------------------------------------


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


# -- the files are plain safetensors -----------------------------------------------------------


def test_rank_file_is_valid_safetensors_holding_every_fragment(ckpt_root):
    path, model, opt, _ = saved_checkpoint(ckpt_root, extras={"ema": torch.arange(5, dtype=torch.float16)})
    m = read_manifest(path)
    data_file = path / store.rank_file(0)
    header, data_start = read_header(data_file)
    assert header["__metadata__"] == {"format": "ucp.checkpoint", "rank": "0"}
    by_offset = {data_start + e["data_offsets"][0]: name for name, e in header.items() if name != "__metadata__"}
    assert len(by_offset) == len(m.fragments) == len(header) - 1
    assert m.files == {data_file.name: data_file.stat().st_size}

    params = dict(model.state_dict())
    names = {id(p): n for n, p in model.named_parameters()}
    optim_state = {f"optim/{names[id(p)]}/{k}": v for p, st in opt.state.items() for k, v in st.items()}
    safetensors = require("safetensors")  # the reference reader: fails under CI=true if absent
    with safetensors.safe_open(str(data_file), framework="pt") as sf:
        assert sf.metadata() == {"format": "ucp.checkpoint", "rank": "0"}
        assert set(sf.keys()) == set(by_offset.values())
        for f in m.fragments:
            t = sf.get_tensor(by_offset[f.offset])
            assert str(t.dtype) == f"torch.{f.dtype}" and t.numel() == f.numel
            if f.key.startswith("model/"):
                expected = params[f.key.removeprefix("model/")]
            elif f.key.startswith("optim/"):
                expected = optim_state[f.key]
            else:
                expected = torch.arange(5, dtype=torch.float16)
            assert_bits_equal(t, expected.reshape(t.shape), f.key)


def test_rollback_then_save_keeps_the_new_checkpoint(ckpt_root):
    # resume from 100 after 200 was saved (a loss spike, say): the next save is the newest one,
    # retention removes the abandoned run's checkpoint, never the one just written
    model, opt, sched = make()
    ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, keep=1, options=FAST)
    ck.save(100)
    ck.save(200)
    assert [s for s, _ in store.list_steps(ckpt_root)] == [200]
    res = ck.save(150)
    assert res.path.is_dir() and store.is_complete(res.path)
    assert [s for s, _ in store.list_steps(ckpt_root)] == [150]
    assert ck.load().step == 150


def test_pruning_failure_does_not_fail_a_committed_save(ckpt_root, monkeypatch):
    model, opt, sched = make()
    ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, keep=1, options=FAST)
    ck.save(1)

    def refuse(*a, **k):
        raise PermissionError("read-only old checkpoint")

    monkeypatch.setattr(store, "prune", refuse)
    with pytest.warns(UserWarning, match="pruning old ones failed"):
        res = ck.save(2)
    assert store.is_complete(res.path) and ck.load().step == 2


def test_a_changed_value_in_the_manifest_is_caught_by_its_checksum(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    text = mpath.read_text()
    assert '"step": 5' in text
    mpath.write_text(text.replace('"step": 5', '"step": 6'))  # still valid JSON, still a valid manifest
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(CorruptCheckpointError, match="manifest.json: checksum mismatch"):
        ckpt.load()


def test_dtype_mismatch_is_refused_not_cast(ckpt_root):
    saved_checkpoint(ckpt_root)
    ckpt, model = fresh_checkpointer(ckpt_root)
    model.double()
    with pytest.raises(LoadError, match="fc1.weight is float32 in the checkpoint, float64 here"):
        ckpt.load()


@pytest.mark.parametrize("edit, words", [
    (lambda h: h.update(files=["abc"]), "malformed"),
    (lambda h: h["state"].update(ranks=[1, 2]), "'ranks' map rank numbers"),
    (lambda h: h["state"]["ranks"].update({"7": {}}), "'ranks' map rank numbers"),
    (lambda h: h.update(format_version="1"), "MAJOR.MINOR"),
])
def test_malformed_manifests_get_a_format_error(ckpt_root, edit, words):
    path, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    header = json.loads(mpath.read_bytes())
    edit(header)
    write_signed(mpath, header)
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match=words):
        ckpt.load()


def test_nan_in_the_manifest_is_not_json(ckpt_root):
    path, *_ = saved_checkpoint(ckpt_root)
    mpath = path / store.MANIFEST
    mpath.write_text(mpath.read_text().replace('"step": 5', '"step": NaN'))
    ckpt, _ = fresh_checkpointer(ckpt_root)
    with pytest.raises(FormatError, match="not valid JSON"):
        ckpt.load()
