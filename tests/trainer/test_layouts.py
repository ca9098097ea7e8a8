"""The reference trainer under each parallel layout: trains, starts from the same parameters, and
resumes bit-exactly from its own checkpoints."""

from __future__ import annotations

import pytest

from tests.trainer import workloads
from ucp.trainer.model import GPTConfig, batch, init_gpt, loss_fn

pytestmark = pytest.mark.dist

# (world size, layout) pairs; zero 1, manual TP and pipeline layouts join as they land.
LAYOUTS = [
    (4, dict(dp=4, zero=0)),
    (4, dict(dp=4, zero=1)),
    (2, dict(dp=2, zero=1)),
    (4, dict(dp=2, tp=2, zero=3)),
    (4, dict(dp=2, tp=2, zero=0)),
    (2, dict(dp=2, zero=2)),
    (2, dict(dp=1, tp=2, zero=0)),
    (4, dict(dp=2, pp=2, zero=3)),
    (4, dict(dp=2, pp=2, zero=0)),
]
# bf16 parameters (fp32 masters in the flat ZeRO-1 optimizer): same training checks, looser step-1 match
MANUAL_TP = [
    (4, dict(dp=2, tp=2, zero=1, manual_tp=True)),
    (2, dict(dp=1, tp=2, zero=1, manual_tp=True)),
    (8, dict(dp=2, tp=2, pp=2, zero=1, manual_tp=True)),
]


def _id(lay):
    return (f"dp{lay['dp']}-tp{lay.get('tp', 1)}-pp{lay.get('pp', 1)}-zero{lay['zero']}"
            + ("-manual" if lay.get("manual_tp") else ""))


IDS = [_id(lay) for _, lay in LAYOUTS]


def reference_step1_loss(seed: int = 0) -> float:
    cfg = GPTConfig()
    x, y = batch(cfg, seed, 1)
    return loss_fn(init_gpt(cfg, seed)(x), y).item()


@pytest.mark.parametrize("size, lay", LAYOUTS, ids=IDS)
def test_initial_parameters_equal_the_whole_model(worlds, size, lay):
    out = worlds(size).run(workloads.init_matches_whole_model, lay)
    for rank, r in enumerate(out):
        assert r["diffs"] == [], f"rank {rank}: initial parameters differ from init_gpt(seed): {r['diffs']}"
    assert sorted(set().union(*(r["keys"] for r in out))) == out[0]["all"]  # together the ranks hold it all


@pytest.mark.parametrize("size, lay", LAYOUTS + MANUAL_TP, ids=IDS + [_id(lay) for _, lay in MANUAL_TP])
def test_trains_and_resumes_bit_exactly(worlds, tmp_path, size, lay):
    out = worlds(size).run(workloads.train_save_resume, lay, str(tmp_path / "ck"))
    ref = reference_step1_loss()
    rel = 1e-2 if lay.get("manual_tp") else 1e-5
    for rank, r in enumerate(out):
        losses = r["losses"]
        assert len(losses) == 20 and losses[-1] < losses[0] - 0.3, f"rank {rank}: loss does not decrease: {losses}"
        assert losses[0] == pytest.approx(ref, rel=rel), "step-1 loss must agree with the single-process model"
        assert r["step"] == 10 and r["diffs"] == [], f"rank {rank}: state differs after load: {r['diffs']}"
        assert r["resumed"] == losses[10:], f"rank {rank}: resumed losses differ from the uninterrupted run"
    assert len({tuple(r["losses"]) for r in out}) == 1  # every rank reports the same global losses
