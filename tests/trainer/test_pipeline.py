"""Pipeline parallelism of the reference GPT: stages hold the whole model's names, a pipelined step
computes the whole model's loss and gradients (the tied embedding included), composes with data
parallelism (ZeRO 0 and FSDP2), and resumes bit-exactly from ucp checkpoints."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from tests.helpers import bit_diffs, full_state
from tests.trainer import pipeline_workloads
from ucp.errors import OptionsError
from ucp.trainer.model import GPTConfig, batch, init_gpt
from ucp.trainer.pipeline import default_microbatches, stage_module

# -- one process: the split --------------------------------------------------------------------


def test_stages_keep_the_whole_models_names_and_compose_to_it():
    cfg = GPTConfig()
    whole = init_gpt(cfg, 0)
    x, _ = batch(cfg, 0, 1)
    want = whole(x)
    names = [n for n, _ in whole.named_parameters()]
    first, last = stage_module(whole, 0, 2), stage_module(whole, 1, 2)
    a, b = [n for n, _ in first.named_parameters()], [n for n, _ in last.named_parameters()]
    assert a[:2] == ["wte.weight", "wpe.weight"] and {n.split(".")[1] for n in a[2:]} == {"0", "1"}
    assert b[0] == "wte.weight" and b[-2:] == ["ln_f.weight", "ln_f.bias"]
    assert {n.split(".")[1] for n in b[1:-2]} == {"2", "3"} and "blocks.3.mlp.fc2.weight" in b
    assert sorted(set(a) | set(b)) == sorted(names)  # every parameter, under its own name
    assert last.state_dict(keep_vars=True)["head.weight"] is last.wte.weight  # the tied head, as in GPT
    assert first.tied_weight() is last.tied_weight() is whole.wte.weight
    assert torch.equal(last(first(x)), want)  # the same arithmetic as the whole model


def test_middle_stages_hold_only_blocks():
    whole = init_gpt(GPTConfig(), 0)
    mid = stage_module(whole, 1, 4)
    assert [n for n, _ in mid.named_children()] == ["blocks"] and list(mid.blocks) == ["1"]
    assert mid.tied_weight() is None
    one = stage_module(whole, 0, 1)
    assert one.tied_weight() is None and len(one.blocks) == 4


@pytest.mark.parametrize("rank, size, match", [
    (0, 3, "does not divide the model's 4 layers"),
    (2, 2, "outside 0..1"),
    (0, 0, "positive integer"),
])
def test_stage_module_refuses_bad_splits(rank, size, match):
    with pytest.raises(OptionsError, match=match):
        stage_module(init_gpt(GPTConfig(), 0), rank, size)


def test_default_microbatches_split_the_local_batch_evenly():
    assert default_microbatches(24, 2) == 4
    assert default_microbatches(12, 2) == 4
    assert default_microbatches(6, 2) == 3
    assert default_microbatches(24, 8) == 8
    assert default_microbatches(5, 2) == 1


# -- gloo worlds: training -------------------------------------------------------------------------

# (world size, layout); "mb" (microbatches) and "schedule" default to the trainer's.
LAYOUTS = [
    (2, dict(pp=2, dp=1, zero=0)),
    (4, dict(pp=2, dp=2, zero=0)),
    (4, dict(pp=2, dp=2, zero=3)),
    (4, dict(pp=4, dp=1, zero=0, schedule="gpipe")),
]
IDS = [f"pp{l['pp']}-dp{l['dp']}-zero{l['zero']}" + (f"-{l['schedule']}" if "schedule" in l else "")
       for _, l in LAYOUTS]

# attn.k.bias shifts every score of a query row by the same amount, which softmax ignores: its
# gradient is zero in exact arithmetic, pure rounding noise in practice, and AdamW turns that noise
# into updates of order lr. No two summation orders agree on it, so it gets a looser bound.
NOISE_ONLY = "attn.k.bias"


@functools.lru_cache(maxsize=None)
def reference(dp: int = 1, microbatches: int | None = None) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # this tiny model runs ~10x slower on 2 threads, next to busy worlds
    try:
        return pipeline_workloads.reference(dp=dp, microbatches=microbatches)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(worlds, tmp_path_factory):
    """Each layout's run (train 20 steps saving at 10, resume from it), done once for all tests."""
    done: dict = {}

    def get(size: int, lay: dict) -> tuple[list[dict], str]:
        """(per-rank results, checkpoint root)."""
        key = (size, tuple(sorted(lay.items())))
        if key not in done:
            root = str(tmp_path_factory.mktemp("pipeline") / "ck")
            try:
                done[key] = worlds(size).run(pipeline_workloads.train_save_resume, lay, root, timeout=180), root
            except Exception as e:  # noqa: BLE001 - every test of the layout reports it
                done[key] = f"{type(e).__name__}: {e}"
        if isinstance(done[key], str):
            pytest.fail(f"the run of {lay} failed: {done[key]}")
        return done[key]

    return get


@pytest.mark.dist
@pytest.mark.parametrize("size, lay", LAYOUTS, ids=IDS)
def test_loss_equals_the_whole_models(runs, size, lay):
    out, _ = runs(size, lay)
    ref = reference()["losses"]
    for rank, r in enumerate(out):
        losses = r["losses"]
        assert losses[0] == pytest.approx(ref[0], rel=1e-5), f"rank {rank}: step-1 loss differs from the whole GPT"
        assert losses == pytest.approx(ref, rel=1e-5), f"rank {rank}: losses differ from the whole GPT's"
        assert len(losses) == 20 and losses[-1] < losses[0] - 0.3, f"rank {rank}: loss does not decrease: {losses}"
    assert len({tuple(r["losses"]) for r in out}) == 1  # every rank of every stage reports the same loss


@pytest.mark.dist
@pytest.mark.parametrize("size, lay", LAYOUTS, ids=IDS)
def test_parameters_match_the_whole_model_after_training(runs, size, lay):
    out, _ = runs(size, lay)
    dp = lay["dp"]
    mb = lay.get("mb") or default_microbatches(GPTConfig().global_batch // dp, lay["pp"])
    ref = reference(dp, mb)["params"]
    seen = set()
    for rank, r in enumerate(out):
        for key, got in r["params"].items():
            seen.add(key)
            want = ref[key]
            # any real error (a missed gradient, the tied sync) is far beyond these bounds
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"rank {rank} {key}: {m}")
            if NOISE_ONLY not in key:
                err = ((got - want).norm() / want.norm()).item()
                assert err < 1e-5, f"rank {rank} {key}: relative error {err:.2e} after 20 steps"
    assert seen == set(ref)  # the stages together hold every parameter of the whole model


@pytest.mark.dist
@pytest.mark.parametrize("size, lay", LAYOUTS, ids=IDS)
def test_tied_embedding_copies_stay_bit_identical(runs, size, lay):
    out, _ = runs(size, lay)
    holders = [(rank, r["tied"]) for rank, r in enumerate(out) if r["tied"]]
    stages = {out[rank]["stage"] for rank, _ in holders}
    assert stages == {0, lay["pp"] - 1}, f"the tied embedding is on stages {stages}"
    rank0, first = holders[0]
    assert set(first) == {"model/wte.weight", "optim/wte.weight/exp_avg", "optim/wte.weight/exp_avg_sq",
                          "optim/wte.weight/step"}
    for rank, tied in holders[1:]:
        assert set(tied) == set(first)
        for key, value in tied.items():
            assert torch.equal(value, first[key]), f"{key} differs between ranks {rank0} and {rank}"


@pytest.mark.dist
@pytest.mark.parametrize("size, lay", LAYOUTS, ids=IDS)
def test_resumes_bit_exactly(runs, size, lay):
    out, _ = runs(size, lay)
    for rank, r in enumerate(out):
        assert r["step"] == 10 and r["diffs"] == [], f"rank {rank}: state differs after load: {r['diffs']}"
        assert r["resumed"] == r["losses"][10:], f"rank {rank}: resumed losses differ from the uninterrupted run"
        assert r["diffs_end"] == [], f"rank {rank}: state after the resumed steps differs: {r['diffs_end']}"


@pytest.mark.dist
@pytest.mark.parametrize("size, lay", LAYOUTS, ids=IDS)
def test_checkpoint_stores_each_tensor_once_under_the_whole_models_keys(runs, size, lay):
    m = runs(size, lay)[0][0]["manifest"]
    pp, dp, zero = lay["pp"], lay["dp"], lay["zero"]
    assert m["layout"] == f"pp={pp} dp={dp} zero={zero}"
    whole = {f"model/{n}" for n, _ in init_gpt(GPTConfig(), 0).named_parameters()}
    tensors = m["tensors"]
    assert {k for k in tensors if k.startswith("model/")} == whole  # head.weight: an alias, not a tensor
    assert "model/head.weight" not in tensors and any(k.startswith("model/blocks.3.") for k in tensors)
    assert {"optim/wte.weight/exp_avg", "optim/blocks.3.mlp.fc2.weight/exp_avg_sq"} <= set(tensors)
    by_key: dict = {}
    for key, offsets, sizes, rank in m["fragments"]:
        by_key.setdefault(key, []).append((offsets, sizes, rank))
    for key, shape in tensors.items():
        frags = by_key.get(key, [])
        regions = [(o, s) for o, s, _ in frags]
        assert len(set(regions)) == len(regions), f"{key} has a region stored twice: {frags}"
        stored = sum(math.prod(sizes) for _, sizes in regions)
        assert stored == math.prod(shape), f"{key} is not stored exactly once: {frags}"
    # the tied embedding: written once (one fragment per FSDP shard) although two stages hold it
    assert len(by_key["model/wte.weight"]) == (dp if zero == 3 else 1)
    # stage-local tensors come from the ranks of their stage (rank = pp_rank * dp + dp_rank)
    last_stage = range((pp - 1) * dp, pp * dp)
    assert all(rank in last_stage for _, _, rank in by_key["model/blocks.3.mlp.fc2.weight"])
    assert all(rank in last_stage for _, _, rank in by_key["model/ln_f.weight"])
    assert all(rank < dp for _, _, rank in by_key["model/wpe.weight"])


def load_into_whole_model(root: str, strict: bool) -> dict:
    """Load a pipeline checkpoint into the whole GPT and its AdamW in this (single) process."""
    import ucp

    whole = init_gpt(GPTConfig(), 7)
    opt = torch.optim.AdamW(whole.parameters(), lr=1.0, weight_decay=0.0)
    ucp.Checkpointer(root, model=whole, optimizer=opt).load(strict=strict)
    assert whole.head.weight is whole.wte.weight
    group = opt.param_groups[0]
    assert group["lr"] == pipeline_workloads.LR and group["weight_decay"] == pipeline_workloads.WD
    return full_state(whole, opt)


@pytest.mark.dist
@pytest.mark.parametrize("size, lay", LAYOUTS, ids=IDS)
def test_checkpoint_loads_into_the_whole_model(runs, size, lay):
    """A pipeline checkpoint is an ordinary one: the whole model in one process loads it bit-exactly,
    strictly (its optimizer's one param group holds what every stage's group held)."""
    out, root = runs(size, lay)
    saved = {}
    for r in out:
        saved.update(r["saved"])  # the stages' states together: every key of the whole model's
    assert bit_diffs(saved, load_into_whole_model(root, strict=True)) == []
