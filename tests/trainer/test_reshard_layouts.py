"""The resharding matrix of the reference trainer (issue 5): a checkpoint saved under one layout
loads under another, from the distributed checkpoint itself or from its universal form, and every
parameter and optimizer state equals the source's gathered tensors bit for bit, or the documented
cast of them where the dtypes differ.

Within a model class: manual TP (fused QKV re-split, vocabulary re-padded, flat ZeRO-1 partitions
re-cut) and flat ZeRO-1 over another number of ranks. Across classes: flat ZeRO-1 (step per param
group) to FSDP2's AdamW (step per parameter) and back; manual TP (bf16, fused ``attn.qkv``, fp32
masters) to DTensor TP (fp32, ``attn.q``/``k``/``v``: parameters from the masters) and back
(parameters rounded to bf16, masters from the fp32 parameters); 4 -> 2, 4 -> 3 and 2 -> 4 ranks."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.trainer import convert_workloads as cw
from tests.trainer import reshard_workloads as rw
from ucp.convert import convert

pytestmark = pytest.mark.dist


def _union(per_rank: list[dict]) -> dict:
    out: dict = {}
    for state in per_rank:
        for k, v in state.items():
            if k in out:
                np.testing.assert_array_equal(out[k], v, err_msg=f"ranks disagree on {k}")
            out[k] = v
    return out


SOURCES = {
    "manual": (4, dict(dp=2, tp=2, zero=1, manual_tp=True)),  # bf16, fused qkv, fp32 masters, group step
    "zero1": (4, dict(dp=4, zero=1)),                         # fp32 flat ZeRO-1, group step
    "dtensor": (2, dict(dp=1, tp=2, zero=0)),                 # fp32 DTensor TP, AdamW: step per parameter
}


@pytest.fixture(scope="module")
def sources(worlds, tmp_path_factory):
    """Checkpoints trained 3 steps under each of :data:`SOURCES`, with their universal forms."""
    out = {}
    for name, (size, lay) in SOURCES.items():
        root = tmp_path_factory.mktemp(name)
        gathered = _union(worlds(size).run(cw.save_and_gather, lay, str(root / "ckpt"), 3))
        convert(root / "ckpt", root / "universal", fsync=False, workers=2)
        out[name] = (root, lay, gathered)
    return out


CASES = [
    ("manual", 4, dict(dp=1, tp=4, zero=1, manual_tp=True)),   # tp 2 -> 4: qkv re-split, vocab re-padded
    ("manual", 2, dict(dp=1, tp=2, zero=1, manual_tp=True)),   # dp 2 -> 1: flat partitions re-cut
    ("zero1", 2, dict(dp=2, zero=1)),                          # 4 -> 2: flat partitions re-cut
    ("zero1", 3, dict(dp=3, zero=1)),                          # 4 -> 3: flat partitions re-cut
    ("zero1", 4, dict(dp=4, zero=3)),                          # ZeRO 1 -> 3: group step -> per-parameter
    ("zero1", 3, dict(dp=3, zero=2)),                          # ZeRO 1 -> 2 on 4 -> 3 ranks
    ("dtensor", 4, dict(dp=2, tp=2, zero=3)),                  # 2 -> 4, ZeRO 0 -> 3 over DTensor TP
    ("dtensor", 4, dict(dp=4, zero=1)),                        # 2 -> 4, per-parameter step -> group step
    ("manual", 4, dict(dp=2, tp=2, zero=0)),                   # manual TP -> DTensor TP: split qkv, cast
    ("dtensor", 4, dict(dp=2, tp=2, zero=1, manual_tp=True)),  # DTensor TP -> manual TP: fuse qkv, cast
]
CASE_IDS = ["manual-tp4", "manual-dp1", "zero1-dp2", "zero1-dp3", "zero1-to-zero3", "zero1-to-zero2-dp3",
            "dtensor-2to4-fsdp", "dtensor-2to4-zero1", "manual-to-dtensor", "dtensor-to-manual"]
STEPS = 3
_PART = re.compile(r"^(.*\.attn\.)([qkv])(\.(?:weight|bias))$")


def _lookup(want: dict, key: str):
    """``key`` of the source's gathered state, also as a part of a fused ``attn.qkv`` or as the
    parts of one (the names the loader maps between; written here from the GPT's names)."""
    if key in want:
        return want[key]
    kind, fqn, *state = key.split("/")
    name = lambda f: "/".join([kind, f, *state])  # noqa: E731
    m = _PART.match(fqn)
    if m and name(f"{m[1]}qkv{m[3]}") in want:
        fused = want[name(f"{m[1]}qkv{m[3]}")]
        d = fused.shape[0] // 3
        i = "qkv".index(m[2])
        return fused[i * d:(i + 1) * d]
    if ".attn.qkv." in fqn:
        parts = [want.get(name(fqn.replace(".qkv.", f".{p}."))) for p in "qkv"]
        if all(p is not None for p in parts):
            return np.concatenate(parts)
    return None


def _bf16_bits(fp32: np.ndarray) -> np.ndarray:
    return torch.from_numpy(fp32).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def expected(want: dict, key: str, like: np.ndarray) -> np.ndarray:
    """What target ``key`` (gathered as ``like``) must hold after loading the source ``want``: the
    same tensor; for another dtype the parameter's fp32 master (exact) or the parameter cast with
    ``Tensor.to`` (fp32 -> bf16 rounds to nearest even); a master the source lacks is its fp32
    parameter; an AdamW step the source keeps per group is the step count."""
    kind, fqn, *state = key.split("/")
    found = _lookup(want, key)
    if found is not None and found.dtype == like.dtype:
        return found
    if kind == "model":
        master = _lookup(want, f"optim/{fqn}/master")
        if master is not None and master.dtype == like.dtype:
            return master
        if found is not None and found.dtype == np.float32 and like.dtype == np.uint16:
            return _bf16_bits(found)
    if state == ["master"]:
        return _lookup(want, f"model/{fqn}")
    if state == ["step"] and found is None:
        return np.array(STEPS, dtype=np.float32)
    raise AssertionError(f"{key}: no expectation from the source's {sorted(want)[:4]}...")


@pytest.mark.parametrize("form", ["ckpt", "universal"])
@pytest.mark.parametrize("src, size, lay", CASES, ids=CASE_IDS)
def test_a_checkpoint_loads_under_another_layout(worlds, sources, src, size, lay, form):
    root, _, want = sources[src]
    out = worlds(size).run(rw.load_and_gather, lay, str(root / form))
    got = _union([r["state"] for r in out])
    assert all(r["step"] == STEPS for r in out)
    assert out[0]["source"] == ("universal" if form == "universal" else "durable")
    if src == "manual" and not lay.get("manual_tp"):
        assert "model/blocks.0.attn.q.weight" in got and "model/blocks.0.attn.qkv.weight" not in got
    if src == "dtensor" and lay.get("manual_tp"):
        assert "optim/blocks.0.attn.qkv.weight/master" in got and "model/blocks.0.attn.q.weight" not in got
    for k, v in got.items():
        e = expected(want, k, v)
        assert e.shape == v.shape and e.dtype == v.dtype, f"{k}: {v.dtype}{v.shape} vs expected {e.dtype}{e.shape}"
        np.testing.assert_array_equal(v, e, err_msg=k)
    # Adam's step count, kept per parameter or per param group
    steps = [g for r in out for g in r["group_steps"] if g is not None]
    assert all(s == STEPS for s in steps) and (steps or any(k.endswith("/step") for k in got))
    # every parameter and state of the source reached the target, under its name or another; an fp32
    # master became the fp32 parameter, per-parameter steps the group's
    covered = {k for k in want if _lookup(got, k) is not None
               or (k.endswith("/master") and _lookup(got, "model/" + k.split("/")[1]) is not None)
               or (k.endswith("/step") and steps)}
    assert covered == set(want), f"not loaded: {sorted(set(want) - covered)[:5]}"
    assert len({tuple(r["losses"]) for r in out}) == 1


@pytest.mark.parametrize("form", ["ckpt", "universal"])
def test_an_fp32_layout_takes_a_bf16_manual_tp_model_from_its_masters(worlds, sources, form):
    root, _, want = sources["manual"]
    out = worlds(2).run(rw.load_model_cast, dict(dp=2, zero=3), str(root / form))
    got = {k: v for k, v in _union(out).items() if f"optim/{k.removeprefix('model/')}/master" in want}
    assert {"model/wte.weight", "model/blocks.0.mlp.fc1.weight", "model/blocks.1.attn.out.weight"} <= set(got)
    for key, value in got.items():
        master = want[f"optim/{key.removeprefix('model/')}/master"]
        np.testing.assert_array_equal(value.view(np.uint32), master.view(np.uint32), err_msg=key)
