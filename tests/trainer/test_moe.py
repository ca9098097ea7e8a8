"""The reference trainer's mixture of experts (``ucp train --moe E --ep N``): the top-2 layer against a
dense reference, the expert-parallel exchange against the unplaced layer, training alike at every ep,
the layout's refusals and the UCL spec it saves with."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from tests.trainer import moe_workloads as w
from ucp.errors import OptionsError
from ucp.lang.apply import LiveSpec
from ucp.trainer.layouts import TrainLayout
from ucp.trainer.model import GPTConfig, batch, init_gpt, loss_fn


def test_the_layer_is_a_renormalized_top2_mixture_of_its_experts():
    moe = w.layer()
    x = w.inputs(1)
    got = moe(x).detach()
    with torch.no_grad():
        for s in range(x.shape[0]):
            for t in range(x.shape[1]):
                h = x[s, t]
                probs = F.softmax(moe.router.weight @ h, dim=-1)
                top = sorted(range(w.E), key=lambda e: -probs[e].item())[:2]
                gate = probs[top] / probs[top].sum()
                want = sum(g * moe.experts[e](h[None])[0] for g, e in zip(gate, top))
                torch.testing.assert_close(got[s, t], want, rtol=1e-5, atol=1e-6)
    # and nothing of the other experts: changing one a token did not choose leaves its output alone
    first = x[:1, :1]
    before = moe(first).detach()
    chosen = set(F.softmax(moe.router(first[0, 0]), -1).topk(2).indices.tolist())
    with torch.no_grad():
        for p in moe.experts[min(set(range(w.E)) - chosen)].parameters():
            p.add_(1.0)
    assert torch.equal(moe(first).detach(), before)


def test_every_expert_gets_a_gradient_and_the_router_too():
    moe = w.layer()
    (moe(w.inputs(1)) * w.inputs(2)).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for e in moe.experts for p in e.parameters())  # 48 tokens reach all 4


def test_the_model_with_experts_is_initialized_whole_from_the_seed():
    cfg = GPTConfig(experts=8)
    a, b = init_gpt(cfg, 0), init_gpt(cfg, 0)
    names = [n for n, _ in a.named_parameters()]
    assert "blocks.3.mlp.router.weight" in names and "blocks.3.mlp.experts.7.fc2.weight" in names
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.blocks[0].mlp.experts[0].fc1.weight, a.blocks[0].mlp.experts[1].fc1.weight)


def test_the_layout_records_ep_inside_dp_and_the_spec_names_experts_globally():
    cfg, lay = GPTConfig(experts=8), TrainLayout(dp=4, ep=2)
    lay.check(cfg, 4)
    assert lay.layout.axes == (("dp", 2), ("ep", 2))
    # the ep groups are consecutive ranks: rank 3 is the second of the second group
    assert lay.layout.coords(3) == {"dp": 1, "ep": 1}
    spec = LiveSpec(lay.spec(cfg), "<spec>", lay.layout, lay.layout.coords(3))
    assert spec.place("blocks.2.mlp.experts.1.fc1.weight")[0] == "blocks.2.mlp.experts.5.fc1.weight"
    assert spec.place("blocks.2.mlp.router.weight")[0] == "blocks.2.mlp.router.weight"
    # --moe without --ep (ep 1): the axis is recorded all the same, the names are the local ones
    one = TrainLayout(dp=2, ep=1)
    assert one.layout.axes == (("dp", 2), ("ep", 1))
    assert LiveSpec(one.spec(cfg), "<spec>", one.layout, {"dp": 1, "ep": 0}).place(
        "blocks.0.mlp.experts.7.fc2.bias")[0] == "blocks.0.mlp.experts.7.fc2.bias"
    assert TrainLayout(dp=2).spec(GPTConfig()) is None


@pytest.mark.parametrize("experts, lay, world, words", [
    (8, dict(dp=3, ep=3), 3, "--ep 3 cannot hold 8 experts in equal shares; use an --ep dividing --moe 8: 1, 2, 4, 8"),
    (8, dict(dp=2, ep=4), 2, "--ep 4 must divide the data-parallel size 2"),
    (0, dict(dp=2, ep=2), 2, "--ep 2 places experts: add --moe E"),
    (8, dict(dp=2), 2, "needs an expert-parallel size"),
    (1, dict(dp=1, ep=1), 1, "the top-2 router needs at least 2 experts"),
    (8, dict(dp=1, tp=2, ep=1), 2, "--moe with tensor or pipeline parallelism is not supported yet"),
    (8, dict(dp=2, pp=2, ep=2), 4, "--moe with tensor or pipeline parallelism is not supported yet"),
    (8, dict(dp=2, ep=2, zero=1), 2, "--moe with --zero 1 (the flat ZeRO-1 optimizer) is not supported yet; use --zero 0, 2 or 3"),
])
def test_layouts_the_experts_cannot_run_are_refused_naming_what_to_use(experts, lay, world, words):
    with pytest.raises(OptionsError, match="^" + "[^\n]*") as e:
        TrainLayout(**lay).check(GPTConfig(experts=experts), world)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.dist
@pytest.mark.parametrize("size", [2, 4])
def test_the_expert_parallel_layer_computes_what_the_whole_layer_does(worlds, size):
    """ep = size over 8 sequences, each rank its share: each rank's output rows are the whole
    layer's, bit for bit (a token meets two experts: a + b plus exact zeros at any ep); each expert's
    gradient, held by one rank, is the whole batch's; the replicated router's sums to it over ranks."""
    whole = w.run_layer(w.layer(), slice(0, 8))
    got = worlds(size).run(w.placed_layer, 8 // size)
    assert torch.equal(torch.cat([g["out"] for g in got]), whole["out"])
    experts = {k: v for g in got for k, v in g["grads"].items() if k.startswith("experts.")}
    assert set(experts) == {k for k in whole["grads"] if k.startswith("experts.")}
    for k, v in experts.items():
        torch.testing.assert_close(v, whole["grads"][k], rtol=1e-5, atol=1e-7)
    router = torch.stack([g["grads"]["router.weight"] for g in got]).sum(0)
    torch.testing.assert_close(router, whole["grads"]["router.weight"], rtol=1e-5, atol=1e-7)


@pytest.mark.dist
@pytest.mark.parametrize("world, ep, zero", [(2, 2, 0), (2, 1, 0), (4, 2, 0), (4, 4, 0), (2, 2, 3), (4, 2, 3), (4, 2, 2),
                                             (2, 1, 3)])
def test_reduced_gradients_are_the_whole_batchs(worlds, world, ep, zero):
    """After the trainer's reduction every rank holds, for each parameter it holds (experts by global
    index), the gradient of the global batch's mean loss that one process computes: replicated ones
    averaged over dp, each expert's summed over its replicas and divided by dp (not by its replicas:
    scaled gradients would hide behind AdamW's scale invariance in a comparison of losses); under
    FSDP2 (zero 2/3) too."""
    cfg = GPTConfig(experts=8)
    model = init_gpt(cfg, 0)
    x, y = batch(cfg, 0, 1)
    loss_fn(model(x), y).backward()
    whole = {w.global_name(model, n): p.grad for n, p in model.named_parameters()}
    seen = set()
    for rank, grads in enumerate(worlds(world).run(w.synced_grads, world, ep, zero)):
        assert len(grads) == len(whole) - (8 - 8 // ep) * 4 * cfg.n_layers
        for k, g in grads.items():
            torch.testing.assert_close(g, whole[k], rtol=1e-4, atol=1e-7, msg=lambda m, k=k: f"rank {rank} {k}: {m}")
        seen |= set(grads)
    assert seen == set(whole)


@pytest.mark.dist
def test_training_goes_the_same_way_with_experts_placed(worlds):
    """Losses of steps 1-3 with 8 experts on 4 ranks at ep 2 (two replicas of each expert) agree with
    one process's within 1e-5."""
    ref = worlds(1).run(w.train_losses, 1, 1)[0]
    assert ref[2] < ref[0]
    for rank, losses in enumerate(worlds(4).run(w.train_losses, 4, 2)):
        assert losses == pytest.approx(ref, rel=1e-5), f"rank {rank}: {losses} vs {ref}"


@pytest.mark.dist
def test_an_fsdp2_checkpoint_of_placed_experts_resumes_at_other_ep_and_zero(worlds, tmp_path):
    """Saved under FSDP2 at ep 2 on 2 ranks (experts and the rest as DTensors), resumed under DDP-style
    zero 0 at ep 4 on 4 ranks and at ep 1 on one: step 3's loss is the uninterrupted run's (1e-5)."""
    root = str(tmp_path / "ck")
    uninterrupted = worlds(2).run(w.train_save_continue, 2, 2, 3, root)[0]
    for world, ep, zero in ((4, 4, 0), (1, 1, 0)):
        for rank, losses in enumerate(worlds(world).run(w.resume, world, ep, zero, root)):
            assert losses == pytest.approx(uninterrupted[2:], rel=1e-5), f"world {world} ep {ep} rank {rank}"
