"""What a save writes: the directory's files and byte counts, plain safetensors data files, a strict
JSON manifest, and a load that never unpickles."""

from __future__ import annotations

import json
import math
import pickle

import torch

import ucp
from tests.checkpoint.common import FAST, Loader, Net, fresh_checkpointer, make, saved_checkpoint, snapshot, train_step
from tests.conftest import require
from tests.helpers import assert_bits_equal, assert_same
from ucp import CheckpointOptions
from ucp.format import Layout, Pattern, Shard
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest
from ucp.storage.safetensors_file import read_header


def test_checkpoint_directory_contents_and_byte_counts(ckpt_root):
    model, opt, sched = make()
    train_step(model, opt, sched)
    res = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched).save(1)
    assert sorted(p.name for p in res.path.iterdir()) == [store.FRAGMENT_PAGES, store.MANIFEST, store.rank_file(0), store.STATE_PAGES]
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
    assert header["format"] == "ucp.checkpoint" and header["format_version"] == "1.3" and header["step"] == 5
    ckpt, _ = fresh_checkpointer(ckpt_root)
    extras = ckpt.load().extras
    assert math.isnan(extras["loss"]) and extras["best"] == -math.inf and extras["t"] == (1, 2)


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
