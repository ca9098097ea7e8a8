"""Resharding loads of the reference trainer (issue 5, stage c): a checkpoint saved under one layout
loads under another, from the distributed checkpoint itself or from its universal form. Manual TP
(fused QKV re-split, vocabulary re-padded, flat ZeRO-1 partitions re-cut) and flat ZeRO-1 over
another number of ranks; every parameter and optimizer state equals the source's gathered tensors
bit for bit. (Between optimizer classes that keep their state differently, e.g. the flat ZeRO-1
optimizer's step in its param group versus AdamW's per-parameter step, there is no translation yet.)"""

from __future__ import annotations

import numpy as np
import pytest

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


@pytest.fixture(scope="module")
def sources(worlds, tmp_path_factory):
    """Trained checkpoints: manual TP tp2 x dp2 ZeRO-1 (bf16) and flat ZeRO-1 dp4 (fp32), on 4 ranks."""
    out = {}
    for name, lay in (("manual", dict(dp=2, tp=2, zero=1, manual_tp=True)), ("zero1", dict(dp=4, zero=1))):
        root = tmp_path_factory.mktemp(name)
        gathered = _union(worlds(4).run(cw.save_and_gather, lay, str(root / "ckpt"), 3))
        convert(root / "ckpt", root / "universal", fsync=False, workers=2)
        out[name] = (root, lay, gathered)
    return out


CASES = [
    ("manual", 4, dict(dp=1, tp=4, zero=1, manual_tp=True)),   # tp 2 -> 4: qkv re-split, vocab re-padded
    ("manual", 2, dict(dp=1, tp=2, zero=1, manual_tp=True)),   # dp 2 -> 1: flat partitions re-cut
    ("zero1", 2, dict(dp=2, zero=1)),                          # dp 4 -> 2: flat partitions re-cut
    ("zero1", 3, dict(dp=3, zero=1)),                          # dp 4 -> 3: flat partitions re-cut
]


@pytest.mark.parametrize("form", ["ckpt", "universal"])
@pytest.mark.parametrize("src, size, lay", CASES, ids=[f"{c[0]}-to-{cw_id}" for c, cw_id in
                                                        zip(CASES, ["tp4", "dp1", "dp2", "dp3"])])
def test_a_checkpoint_loads_under_another_layout(worlds, sources, src, size, lay, form):
    root, _, want = sources[src]
    out = worlds(size).run(rw.load_and_gather, lay, str(root / form))
    got = _union([r["state"] for r in out])
    assert all(r["step"] == 3 for r in out)
    assert out[0]["source"] == ("universal" if form == "universal" else "durable")
    assert sorted(got) == sorted(want), f"keys differ: {sorted(set(got) ^ set(want))}"
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
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
