"""A top-2 mixture of experts held as MoE code holds it, and its expert-parallel exchange.

Each block's MLP becomes ``router`` (a linear map to E logits) and ``experts``: under expert
parallelism each of the ``ep`` ranks of an expert-parallel group holds ``E / ep`` experts under a
LOCAL index ``experts.{j}`` (global expert ``ep_rank * E / ep + j``), as Megatron and DeepSpeed
do; the router, attention and everything else are replicated. A checkpoint gets the global names
from the ``expert(ep, experts=E)`` rule of the trainer's UCL spec (:meth:`TrainLayout.spec`).

Routing: softmax over the E logits, the two largest probabilities taken and renormalized to sum to
1; no capacity limit, so no token is ever dropped and a token's output does not depend on ``ep``.

The exchange (chosen because it is exact and simple at this size, not because it is cheapest):
every rank of the ep group all-gathers the group's tokens and their routing, applies its own
experts to the tokens routed to them, weighted by their gates, and an all-reduce over the group
sums the partial outputs, each rank keeping its own tokens' rows. A token meets exactly two
experts, so its output is ``a + b`` plus exact zeros whatever ``ep`` is: the forward pass is the
same at every ``ep`` for the same rows and weights. Both collectives are autograd functions: the
gather's backward sums its gradient over the group and keeps the rank's rows; the all-reduce's
all-gathers the rows' gradients.

Gradients (:func:`sync_moe_grads`): the loss is the mean of the dp ranks' local losses. A
replicated parameter's gradient is averaged over every data-parallel rank. An expert's gradient
already holds the contributions of its whole ep group's tokens (through the exchange's backward),
so it is summed over the ranks holding a replica of that expert (the same ep coordinate in the
other ep groups) and divided by the number of data-parallel ranks, not by its replicas. Under
FSDP2 (``--zero 2/3``) FSDP reduces them, averaging an expert's over its replicas, and
:func:`scale_expert_grads` divides those by ``ep`` (:func:`ucp.trainer.layouts.parallelize`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' equal row blocks ``x``, concatenated in rank order (no autograd)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    """All-gather equal row blocks over ``group`` (rank order); backward sums and keeps own rows."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group))[dist.get_rank(ctx.group)], None


class _SumOwnRows(torch.autograd.Function):
    """All-reduce (sum) over ``group``, keeping this rank's row block; backward all-gathers the blocks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x.chunk(dist.get_world_size(group))[dist.get_rank(group)].clone()

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad, ctx.group), None


class MoE(nn.Module):
    """Top-2 mixture of ``experts`` experts built by ``make_expert`` (all of them, until :meth:`place`).

    Args:
        d_model: the width of the tokens.
        experts: E, the number of experts of the whole model.
        make_expert: builds one expert, a module mapping ``[n, d_model]`` to ``[n, d_model]``.
    """

    def __init__(self, d_model: int, experts: int, make_expert):
        super().__init__()
        self.n_experts = experts
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(make_expert() for _ in range(experts))
        self.first = 0  # the global index of experts.0
        self.group = None  # the expert-parallel process group (None: this rank holds every expert)

    def place(self, group) -> None:
        """Keep only this rank's experts of the ep group ``group``: ``E / ep`` of them, contiguous,
        under local indices."""
        ep, rank = dist.get_world_size(group), dist.get_rank(group)
        each = self.n_experts // ep
        self.first = rank * each
        self.experts = nn.ModuleList(list(self.experts)[self.first:self.first + each])
        self.group = group if ep > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        gates, chosen = F.softmax(self.router(h), dim=-1).topk(2, dim=-1)
        gates = gates / gates.sum(-1, keepdim=True)
        if self.group is not None:  # the ep group's tokens and routing, in rank order
            h = _GatherRows.apply(h, self.group)
            gates = _GatherRows.apply(gates, self.group)
            chosen = _all_gather_rows(chosen, self.group)
        out = torch.zeros_like(h)
        for j, expert in enumerate(self.experts):
            rows, slot = (chosen == self.first + j).nonzero(as_tuple=True)
            out = out.index_add(0, rows, gates[rows, slot, None] * expert(h[rows]))
        if self.group is not None:
            out = _SumOwnRows.apply(out, self.group)
        return out.view(shape)


def expert_parameters(model: nn.Module) -> set[int]:
    """The ids of ``model``'s expert parameters (those of every :class:`MoE`'s ``experts``)."""
    return {id(p) for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters()}


def scale_expert_grads(model: nn.Module, factor: float) -> None:
    """Multiply the gradients of ``model``'s experts by ``factor`` (FSDP2 averaged them over the
    expert's replicas; :func:`sync_moe_grads` says what they should be)."""
    experts = expert_parameters(model)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) in experts and p.grad is not None:
                p.grad.mul_(factor)


def sync_moe_grads(model: nn.Module, dp_group, expert_dp_group) -> None:
    """After backward: average replicated gradients over ``dp_group``; sum each expert's over
    ``expert_dp_group`` (the ranks holding its replicas) and divide by the dp size.

    An expert no token reached this step has no gradient: it gets zeros, as it would where its
    replicas saw tokens, so AdamW steps every expert at every layout alike.
    """
    dp = dist.get_world_size(dp_group)
    experts = expert_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    for group, members in ((dp_group, [p for p in params if id(p) not in experts]),
                           (expert_dp_group, [p for p in params if id(p) in experts])):
        if not members:
            continue
        flat = torch.cat([p.grad.reshape(-1) for p in members])
        if dist.get_world_size(group) > 1:
            dist.all_reduce(flat, group=group)
        flat /= dp
        offset = 0
        for p in members:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
