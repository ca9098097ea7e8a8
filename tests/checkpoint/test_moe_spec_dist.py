"""Issue 20's first acceptance point: experts held by a LOCAL index (``experts.{j}`` on every ep rank),
AdamW, saved at ep=2 with ``Checkpointer(spec=...)`` and loaded at ep=4 and ep=1, bit-exact for every
expert's parameters and optimizer state; and loads that would give ranks the wrong experts refused,
whatever ``strict``."""

from __future__ import annotations

import pytest

from tests.checkpoint import moe_workloads as w
from tests.helpers import bit_diffs

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def saved(worlds, tmp_path_factory):
    """ep=2 (world 2), saved with the spec; every global tensor of the job as the ranks hold it."""
    root = tmp_path_factory.mktemp("moe") / "ckpt"
    expected: dict = {}
    for state in worlds(2).run(w.train_and_save, str(root)):
        expected.update(state)
    assert {k for k in expected if k.startswith("model/experts.") and k.endswith("w1.weight")} == \
        {f"model/experts.{g}.w1.weight" for g in range(w.E)}
    return root, expected


@pytest.mark.parametrize("size", [1, 2, 4])
def test_local_index_experts_reshard_across_ep_bit_exactly(worlds, saved, size):
    root, expected = saved
    got = worlds(size).run(w.load_global, str(root))
    seen = set()
    for rank, state in enumerate(got):
        assert "error" not in state, state
        assert bit_diffs({k: expected[k] for k in state}, state) == [], f"rank {rank} at ep={size}"
        seen |= set(state)
    assert seen == set(expected)  # every expert's parameters and AdamW states came back somewhere
    assert any(k.endswith("/exp_avg_sq") for k in seen) and any(k.endswith("/step") for k in seen)


def test_a_load_without_the_checkpoints_rules_is_refused_even_with_strict_false(worlds, saved):
    root, _ = saved
    for state in worlds(2).run(w.load_global, str(root), None, False):
        assert "the checkpoint names tensors by the expert()/stage() rules" in state["error"], state
        assert "strict=False does not change that" in state["error"]


def test_a_global_checkpoint_saved_without_spec_loads_locally_only_through_a_spec(worlds, tmp_path):
    """Saved at ep=1 without a spec (local = global names): at ep=2 with strict=False and no spec, rank 1
    would take global experts 0-1 for its 2-3; refused. With the spec, bit-exact."""
    root = tmp_path / "one"
    (expected,) = worlds(1).run(w.train_and_save, str(root), None)
    for state in worlds(2).run(w.load_global, str(root), None, False):
        assert "LoadError" in state["error"] and "refused even with strict=False" in state["error"], state
        assert "model/experts.2.w1.weight" in state["error"]
    for rank, state in enumerate(worlds(2).run(w.load_global, str(root))):
        assert bit_diffs({k: expected[k] for k in state}, state) == [], f"rank {rank}"


def test_a_smaller_model_under_data_parallelism_still_loads_with_strict_false(worlds, tmp_path):
    """The local-index refusal is for layouts with ep or pp: under dp, a model with fewer experts than
    the checkpoint takes the ones it has (experts 0-1 of 0-3) with strict=False, on every rank."""
    root = tmp_path / "one"
    (expected,) = worlds(1).run(w.train_and_save, str(root), None)
    for rank, state in enumerate(worlds(2).run(w.load_smaller_under_dp, str(root))):
        assert "error" not in state, state
        assert bit_diffs({k: expected[k] for k in state}, state) == [], f"rank {rank}"


@pytest.mark.parametrize("size", [1, 4])
def test_its_universal_form_converted_with_the_same_spec_loads_alike(worlds, saved, tmp_path, size):
    from ucp.convert import convert

    root, expected = saved
    spec = tmp_path / "moe.ucl"
    spec.write_text(w.SPEC)
    convert(root, tmp_path / "u", spec, fsync=False, workers=2)
    seen = set()
    for rank, state in enumerate(worlds(size).run(w.load_global, str(tmp_path / "u"))):
        assert "error" not in state, state
        assert bit_diffs({k: expected[k] for k in state}, state) == [], f"rank {rank} at ep={size}"
        seen |= set(state)
    assert seen == set(expected)


def test_stage_local_layers_reshard_across_pp(worlds, tmp_path):
    """stage(): each pp rank holds its stage's layers by a local index; saved at pp=2, loaded at pp=1."""
    root = tmp_path / "pp"
    expected: dict = {}
    for state in worlds(2).run(w.train_and_save, str(root), w.STAGE_SPEC):
        expected.update(state)
    (state,) = worlds(1).run(w.load_global, str(root), w.STAGE_SPEC)
    assert "error" not in state, state
    assert bit_diffs(expected, state) == []
