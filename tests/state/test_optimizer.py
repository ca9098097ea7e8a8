"""The optimizer's non-tensor state on load (``ucp.state.optimizer``): param groups and their
hyperparameters, the step count translated between per-parameter and per-group forms, and the
groups of every saving rank merged for another layout. Real torch optimizers, no checkpoint files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from ucp.errors import LoadError
from ucp.format import values
from ucp.format.box import Box
from ucp.format.manifest import TensorMeta
from ucp.format.pattern import Pattern
from ucp.state.capture import Piece
from ucp.state.optimizer import PartScalars, merged_optimizer_state, restore_optimizer

WHERE = Path("/ckpt/step_00000003")


class GroupStep(torch.optim.SGD):
    """An optimizer that keeps its step count per param group (as the flat ZeRO-1 one does)."""

    def __init__(self, params, **kw):
        super().__init__(params, lr=0.1, **kw)
        for g in self.param_groups:
            g["step"] = 0


def two_params():
    torch.manual_seed(0)
    return nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3))


def adam_state(step: float) -> dict:
    return {"step": torch.tensor(step), "exp_avg": torch.zeros(1), "exp_avg_sq": torch.zeros(1)}


def groups(opt, **changes) -> list[dict]:
    """``opt``'s param groups as a checkpoint keeps them (params by fqn), with ``changes``."""
    fqns = ["w", "b"]
    return [{**{k: v for k, v in g.items() if k != "params"}, **changes, "params": [fqns[i] for i in g["params"]]}
            for g in opt.state_dict()["param_groups"]]


# -- the step count: per parameter or per group --------------------------------------------------


def test_a_per_group_step_becomes_every_parameters_step():
    w, b = two_params()
    opt = torch.optim.AdamW([w, b], lr=0.01)
    saved = {"param_groups": groups(opt, lr=0.5, step=7)}
    state = {0: {"exp_avg": torch.ones_like(w), "exp_avg_sq": torch.ones_like(w)},
             1: {"exp_avg": torch.ones_like(b), "exp_avg_sq": torch.ones_like(b)}}
    restore_optimizer(opt, ["w", "b"], state, saved, WHERE, strict=True)
    for p in (w, b):
        assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].item() == 7.0
    assert "step" not in opt.param_groups[0] and opt.param_groups[0]["lr"] == 0.5
    loss = (w.sum() + b.sum())
    loss.backward()
    opt.step()  # AdamW steps on from step 7
    assert opt.state[w]["step"].item() == 8.0


def test_per_parameter_steps_that_agree_become_the_groups_step():
    w, b = two_params()
    opt = GroupStep([w, b])
    state = {0: {"step": torch.tensor(3.0), "momentum_buffer": torch.ones_like(w)}, 1: {"step": torch.tensor(3.0)}}
    saved = {"param_groups": [{k: v for k, v in g.items() if k != "step"} for g in groups(opt)]}
    restore_optimizer(opt, ["w", "b"], state, saved, WHERE, strict=True)
    step = opt.param_groups[0]["step"]
    assert step == 3 and type(step) is int
    assert set(opt.state[w]) == {"momentum_buffer"} and not opt.state[b]  # no per-parameter step left
    assert torch.equal(opt.state[w]["momentum_buffer"], torch.ones_like(w))


def test_per_parameter_steps_that_disagree_are_refused_for_a_per_group_optimizer():
    w, b = two_params()
    opt = GroupStep([w, b])
    state = {0: {"step": torch.tensor(3.0)}, 1: {"step": torch.tensor(4.0)}}
    saved = {"param_groups": [{k: v for k, v in g.items() if k != "step"} for g in groups(opt)]}
    with pytest.raises(LoadError, match=r"param group 0 have different step counts \[3, 4\]"):
        restore_optimizer(opt, ["w", "b"], state, saved, WHERE, strict=True)


def test_a_saved_group_step_is_kept_over_its_parameters_steps():
    w, b = two_params()
    opt = GroupStep([w, b])
    state = {0: {"step": torch.tensor(3.0)}, 1: {"step": torch.tensor(4.0)}}
    restore_optimizer(opt, ["w", "b"], state, {"param_groups": groups(opt, step=11)}, WHERE, strict=True)
    assert opt.param_groups[0]["step"] == 11 and not any(opt.state[p] for p in (w, b))


# -- param groups and hyperparameters ------------------------------------------------------------


def test_hyperparameters_come_from_the_checkpoint_and_keys_only_the_optimizer_has_stay():
    w, b = two_params()
    opt = torch.optim.AdamW([w, b], lr=0.01, amsgrad=True)
    saved_group = {k: v for k, v in groups(opt, lr=0.25, betas=(0.5, 0.6))[0].items() if k != "amsgrad"}
    restore_optimizer(opt, ["w", "b"], {}, {"param_groups": [saved_group]}, WHERE, strict=True)
    g = opt.param_groups[0]
    assert g["lr"] == 0.25 and g["betas"] == (0.5, 0.6) and g["amsgrad"] is True
    assert g["params"] == [w, b]


def test_groups_map_by_fqn_not_by_position():
    w, b = two_params()
    opt = torch.optim.SGD([{"params": [b], "lr": 1.0}, {"params": [w], "lr": 2.0}], lr=0.1)
    saved = {"param_groups": [{"lr": 0.3, "params": ["b"]}, {"lr": 0.4, "params": ["w"]}],
             "scalars": {"w": {"seen": 5}}}
    state = {1: {"momentum_buffer": torch.full_like(w, 2.0)}}  # index 1 is w here
    restore_optimizer(opt, ["b", "w"], state, saved, WHERE, strict=True)
    assert [g["lr"] for g in opt.param_groups] == [0.3, 0.4]
    assert opt.state[w]["seen"] == 5 and torch.equal(opt.state[w]["momentum_buffer"], torch.full_like(w, 2.0))


def test_another_number_of_groups_is_refused_strictly_and_keeps_the_current_ones_otherwise():
    w, b = two_params()
    opt = torch.optim.SGD([w, b], lr=0.1)
    saved = {"param_groups": [{"lr": 0.3, "params": ["w"]}, {"lr": 0.4, "params": ["b"]}]}
    with pytest.raises(LoadError, match=r"has 2 param group\(s\), this one has 1"):
        restore_optimizer(opt, ["w", "b"], {}, saved, WHERE, strict=True)
    restore_optimizer(opt, ["w", "b"], {}, saved, WHERE, strict=False)
    assert opt.param_groups[0]["lr"] == 0.1


def test_a_group_holding_parameters_the_checkpoints_group_does_not_is_refused_strictly():
    w, b = two_params()
    opt = torch.optim.SGD([w, b], lr=0.1)
    saved = {"param_groups": [{"lr": 0.3, "params": ["w"]}]}
    with pytest.raises(LoadError, match=r"param group 0 holds parameters the checkpoint's group 0 does not \(b\)"):
        restore_optimizer(opt, ["w", "b"], {}, saved, WHERE, strict=True)
    restore_optimizer(opt, ["w", "b"], {}, saved, WHERE, strict=False)
    assert opt.param_groups[0]["lr"] == 0.3


def test_a_parameter_loaded_under_other_names_takes_their_non_tensor_state():
    q = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([q], lr=0.1)
    saved = {"param_groups": [{"lr": 0.2, "params": ["qkv"]}], "scalars": {"qkv": {"n": 4}}}
    restore_optimizer(opt, ["q"], {0: {"momentum_buffer": torch.ones(2)}}, saved, WHERE, strict=True,
                      names={"q": ("qkv",)})
    assert opt.state[q]["n"] == 4 and opt.param_groups[0]["lr"] == 0.2


# -- the 0-d state of a fused parameter's parts ----------------------------------------------------


def _scalar(key: str, value: float) -> Piece:
    return Piece(key, torch.tensor(value), TensorMeta((), "float32", Pattern()), Box.full(()))


def test_the_parts_step_counts_give_one_value_when_they_agree():
    parts = PartScalars([_scalar(f"optim/{p}/step", 3.0) for p in "qkv"])
    assert parts.value("here").item() == 3.0
    odd = PartScalars([_scalar("optim/q/step", 3.0), _scalar("optim/k/step", 3.0), _scalar("optim/v/step", 5.0)])
    with pytest.raises(LoadError, match=r"here: the parts optim/q/step, optim/k/step, optim/v/step hold different "
                                        r"values \(3\.0, 3\.0, 5\.0\)"):
        odd.value("here")


# -- every saving rank's groups, merged ----------------------------------------------------------


def _state(shared=None, **ranks) -> dict:
    out = {"ranks": {r.removeprefix("r"): {"optimizer": values.encode(o, "optimizer")} for r, o in ranks.items()}}
    if shared is not None:
        out["shared"] = {"optimizer": values.encode(shared, "optimizer")}
    return out


def test_merged_groups_hold_every_ranks_parameters_in_rank_order():
    state = _state(
        r10={"scalars": {"c": {"n": 3}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["c"]}]},
        r2={"scalars": {"b": {"n": 2}}, "param_groups": [{"lr": 0.1, "params": ["b", "a"]},
                                                          {"lr": 0.5, "params": ["e"]}]},
        r0={"scalars": {"a": {"n": 1}}, "param_groups": [{"lr": 0.1, "params": ["a"]}]},
    )
    merged = merged_optimizer_state(state, WHERE)
    assert merged["scalars"] == {"a": {"n": 1}, "b": {"n": 2}, "c": {"n": 3}}
    assert merged["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.99), "params": ["a", "b", "c"]},
                                      {"lr": 0.5, "params": ["e"]}]


def test_the_shared_optimizer_state_comes_first():
    state = _state(shared={"param_groups": [{"lr": 0.1, "params": ["s"]}]},
                   r0={"param_groups": [{"lr": 0.1, "params": ["a"]}]})
    assert merged_optimizer_state(state, WHERE)["param_groups"] == [{"lr": 0.1, "params": ["s", "a"]}]


def test_ranks_disagreeing_about_a_hyperparameter_are_refused():
    state = _state(r0={"param_groups": [{"lr": 0.1, "params": ["a"]}]},
                   r1={"param_groups": [{"lr": 0.2, "params": ["b"]}]})
    with pytest.raises(LoadError, match=r"disagree about 'lr' of optimizer param group 0 \(0\.1 vs 0\.2\)"):
        merged_optimizer_state(state, WHERE)


def test_tensor_hyperparameters_are_compared_by_value():
    same_lr = _state(r0={"param_groups": [{"lr": torch.tensor(0.1), "params": ["a"]}]},
                     r1={"param_groups": [{"lr": torch.tensor(0.1), "params": ["b"]}]})
    assert merged_optimizer_state(same_lr, WHERE)["param_groups"][0]["params"] == ["a", "b"]
    other_lr = _state(r0={"param_groups": [{"lr": torch.tensor(0.1), "params": ["a"]}]},
                      r1={"param_groups": [{"lr": torch.tensor(0.3), "params": ["b"]}]})
    with pytest.raises(LoadError, match="disagree about 'lr'"):
        merged_optimizer_state(other_lr, WHERE)


def test_no_optimizer_state_merges_to_nothing():
    assert merged_optimizer_state({"ranks": {"0": {}}}, WHERE) == {"scalars": {}, "param_groups": []}
