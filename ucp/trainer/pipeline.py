"""Pipeline parallelism of the reference GPT with ``torch.distributed.pipelining``.

A pipeline of ``pp`` stages splits the model's blocks contiguously and evenly: stage ``s`` of
``pp`` holds blocks ``[s * n / pp, (s + 1) * n / pp)`` under their *global* names (``blocks.3.*``
on stage 1 of 2), the first stage also the embeddings (``wte``, ``wpe``) and the last the final
norm and the head (``ln_f``, ``head``). So every parameter keeps the whole model's name, and a
checkpoint of a pipeline has the same keys as one of the whole model.

The tied embedding: the head's weight is the token embedding. The first stage needs it to embed,
the last to compute logits, so both hold a copy, registered on both under ``wte.weight``
(``head.weight`` is its alias, as in the whole model); ucp stores the two copies once and checks
that they agree. They stay equal the way Megatron keeps its embedding copies equal: both start
from the same values, and after every backward the two gradients (the embedding's on the first
stage, the head's on the last) are all-reduced (summed) over a two-rank *embedding group* that
links the first and the last stage of each pipeline; each copy then holds the whole model's
gradient of the tied weight, and identical optimizers make identical updates (bit-identical: a sum
of two values does not depend on their order).

Data parallelism composes with it in two ways. ZeRO 0: each stage's gradients are averaged over
its ``dp`` group by hand after the schedule's backward (:meth:`PipelineTrainer.step` does it when
given ``dp_group`` and the stage is not FSDP-sharded; ``average_dp_grads=False`` leaves it to an
optimizer that reduces them itself). FSDP2 (ZeRO 2/3): :func:`shard_stage` applies ``fully_shard``
to each block and to the stage over the ``dp`` mesh; the pipeline schedule drives FSDP's gradient
reduction itself, and the tied gradients are summed shard by shard (both copies are sharded alike).
Ranks are laid out as ucp's layouts are, row-major with ``pp`` outermost:
``rank = (pp_rank * dp + dp_rank) * tp + tp_rank`` (see :func:`pipeline_groups`).

Typical use on every rank::

    g = pipeline_groups(pp=2, dp=2)
    stage = stage_module(init_gpt(cfg, seed), g.pp_rank, g.pp_size)
    if zero in (2, 3):
        shard_stage(stage, g.mesh["dp"], reshard_after_forward=zero == 3)
    opt = torch.optim.AdamW(stage.parameters(), lr=3e-3, weight_decay=0.1)
    pipe = PipelineTrainer(stage, g.pp_group, g.pp_rank, g.pp_size, loss_fn,
                           embed_group=g.embed_group, dp_group=g.dp_group)
    for step in steps:
        x, y = batch(cfg, seed, step)       # the global batch; this dp rank takes its rows
        loss = pipe.step(x[rows], y[rows])  # forward + backward; the global-batch loss on every rank
        opt.step(); opt.zero_grad()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ucp.errors import OptionsError

__all__ = [
    "FIRST_MODULES", "LAST_MODULES", "GPTStage", "stage_module", "PipelineGroups", "pipeline_groups",
    "shard_stage", "default_microbatches", "PipelineTrainer",
]

#: Top-level submodules of the whole model that the first stage takes (the embeddings).
FIRST_MODULES = ("wte", "wpe")
#: Top-level submodules of the whole model that the last stage takes (``wte``: the tied head weight).
LAST_MODULES = ("wte", "ln_f", "head")


class GPTStage(nn.Module):
    """One pipeline stage of a GPT-like model: optional embeddings, some blocks, optional head.

    Built by :func:`stage_module`. It runs the whole model's own ``embed`` and ``logits`` (its
    class's methods, called on this stage, which holds the same attribute names), so it works for
    any model that exposes ``embed``/``blocks``/``logits`` over ``wte``/``wpe``/``ln_f``/``head``.

    Attributes:
        pp_rank, pp_size: this stage and the number of stages.
        is_first, is_last: whether this stage embeds (takes tokens) / ends with the logits.
        layers: the global indices of the blocks held (``blocks`` is keyed by them).
    """

    def __init__(self, whole: nn.Module, pp_rank: int, pp_size: int):
        super().__init__()
        # Plain attributes the model's embed/logits may read (cfg, a tp group, ...), by reference.
        for name, value in vars(whole).items():
            if not name.startswith("_") and name != "training":
                object.__setattr__(self, name, value)
        n = len(whole.blocks)
        per = n // pp_size
        self._whole_cls = type(whole)
        self.pp_rank, self.pp_size = pp_rank, pp_size
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp_size - 1
        self.layers = range(pp_rank * per, (pp_rank + 1) * per)
        # Registration order follows the whole model's (wte, wpe, blocks, ln_f, head), so names and
        # the order of parameters match it; head.weight is wte.weight, named once as wte.weight.
        taken = (FIRST_MODULES if self.is_first else ()) + (LAST_MODULES if self.is_last else ())
        for name in dict.fromkeys(m for m in taken if m in ("wte", "wpe")):
            if getattr(whole, name, None) is not None:
                self.add_module(name, getattr(whole, name))
        self.blocks = nn.ModuleDict({str(i): whole.blocks[i] for i in self.layers})
        for name in dict.fromkeys(m for m in taken if m not in ("wte", "wpe")):
            if getattr(whole, name, None) is not None:
                self.add_module(name, getattr(whole, name))

    def embed(self, tokens):
        return self._whole_cls.embed(self, tokens)

    def logits(self, x):
        return self._whole_cls.logits(self, x)

    def forward(self, x):
        """Tokens ``[B, T]`` on the first stage, activations ``[B, T, d]`` on the others."""
        if self.is_first:
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if self.is_last:
            x = self.logits(x)
        return x

    def tied_weight(self) -> torch.Tensor | None:
        """The tied embedding copy (``wte.weight``) when this stage shares it with another, else None."""
        if self.pp_size == 1 or not (self.is_first or self.is_last):
            return None
        return self.wte.weight


def stage_module(whole: nn.Module, pp_rank: int, pp_size: int) -> GPTStage:
    """This stage's part of ``whole`` (an initialized GPT-like model, the same on every rank).

    The stage takes ``whole``'s submodules themselves, not copies: discard ``whole`` afterwards.

    Args:
        whole: a model exposing ``embed``, ``blocks`` (a sequence), ``logits`` and ``wte``.
        pp_rank: this stage, ``0 <= pp_rank < pp_size``.
        pp_size: the number of stages; it must divide the number of blocks.

    Raises:
        OptionsError: ``pp_size`` does not divide the number of layers, or ``pp_rank`` is out of range.
    """
    for attr in ("embed", "blocks", "logits", "wte"):
        if not hasattr(whole, attr):
            raise OptionsError(f"a pipeline stage needs a model with .{attr}; {type(whole).__name__} has none")
    if isinstance(pp_size, bool) or not isinstance(pp_size, int) or pp_size < 1:
        raise OptionsError(f"pp_size={pp_size!r}: the number of pipeline stages must be a positive integer")
    if isinstance(pp_rank, bool) or not isinstance(pp_rank, int) or not 0 <= pp_rank < pp_size:
        raise OptionsError(f"pp_rank={pp_rank!r} is outside 0..{pp_size - 1}")
    n = len(whole.blocks)
    if n % pp_size:
        raise OptionsError(f"--pp {pp_size} does not divide the model's {n} layers (n_layers); "
                           f"each stage must hold the same number of layers: choose a pp that divides {n}")
    return GPTStage(whole, pp_rank, pp_size)


# -- process groups ------------------------------------------------------------------------------


@dataclass
class PipelineGroups:
    """This rank's place in a (pp, dp[, tp]) layout and its process groups.

    Attributes:
        mesh: the ``DeviceMesh`` over ``("pp", "dp")`` (``("pp", "dp", "tp")`` when tp > 1);
            ``mesh["dp"]`` is what FSDP2 shards over.
        pp_group: the ranks of this pipeline (same dp and tp coordinates), in stage order.
        dp_group: the ranks holding the same stage (and tp slice).
        embed_group: the first and the last stage of this pipeline (None when pp == 1 or this
            rank is a middle stage): where the tied embedding's gradients are summed.
    """

    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    mesh: object
    pp_group: object
    dp_group: object
    embed_group: object | None

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def pipeline_groups(pp: int, dp: int = 1, tp: int = 1) -> PipelineGroups:
    """Build the mesh and groups of a ``(pp, dp, tp)`` layout; a collective: every rank calls it.

    Ranks enumerate the layout row-major, ``pp`` outermost (ucp's ``Layout.from_sizes(pp=, dp=, tp=)``
    order): ``rank = (pp_rank * dp + dp_rank) * tp + tp_rank``. The mesh comes from
    ``init_device_mesh``; the embedding groups from ``dist.new_group``, one per (dp, tp)
    coordinate, created by every rank in the same order (as ``new_group`` requires).

    Raises:
        OptionsError: the sizes do not multiply to the world size.
    """
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if pp * dp * tp != world:
        raise OptionsError(f"pp={pp} x dp={dp} x tp={tp} = {pp * dp * tp}, but the job has {world} ranks")
    rank = dist.get_rank()
    rest, tp_rank = divmod(rank, tp)
    pp_rank, dp_rank = divmod(rest, dp)
    shape, names = ((pp, dp, tp), ("pp", "dp", "tp")) if tp > 1 else ((pp, dp), ("pp", "dp"))
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    embed_group = None
    if pp > 1:
        for d in range(dp):
            for t in range(tp):
                ranks = [(0 * dp + d) * tp + t, ((pp - 1) * dp + d) * tp + t]
                group = dist.new_group(ranks)
                if rank in ranks:
                    embed_group = group
    return PipelineGroups(pp_rank, pp, dp_rank, dp, tp_rank, tp, mesh,
                          mesh["pp"].get_group(), mesh["dp"].get_group(), embed_group)


def shard_stage(stage: nn.Module, dp_mesh, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over ``dp_mesh``: ``fully_shard`` each block, then the stage (its embeddings and head).

    ``reshard_after_forward=False`` is ZeRO 2, True ZeRO 3. The tied ``wte.weight`` of the last
    stage belongs to the stage's root group together with ``head`` (the same parameter).
    """
    from torch.distributed.fsdp import fully_shard

    for block in stage.blocks.values():
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(stage, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    return stage


# -- training ------------------------------------------------------------------------------------


def default_microbatches(rows: int, pp_size: int) -> int:
    """The most microbatches, up to ``max(4, pp_size)``, that split ``rows`` sequences evenly."""
    cap = max(4, pp_size)
    return max(n for n in range(1, min(cap, rows) + 1) if rows % n == 0)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _is_fsdp(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


SCHEDULES = ("1f1b", "gpipe")


class PipelineTrainer:
    """Forward and backward of one training step through a pipeline schedule.

    Args:
        stage: this rank's stage (from :func:`stage_module`, possibly :func:`shard_stage`-ed).
        pp_group: the process group of this pipeline (``PipelineGroups.pp_group``).
        pp_rank, pp_size: this stage and the number of stages.
        loss_fn: ``loss_fn(logits, targets) -> scalar``, a mean over the microbatch.
        n_microbatches: microbatches per step (None: :func:`default_microbatches` of the local batch).
            They must split the local batch evenly: the step's loss and gradients are then the
            average over microbatches, which is the mean over the whole local batch.
        embed_group: the first/last-stage group (``PipelineGroups.embed_group``) for the tied
            embedding's gradients; needed when ``pp_size > 1`` on the first and last stage.
        dp_group: the data-parallel group: the returned loss is averaged over it, and so are the
            gradients when ``average_dp_grads``.
        average_dp_grads: average the gradients over ``dp_group`` after backward (ZeRO 0). None
            (default): unless the stage is FSDP-sharded, since FSDP reduces its own; pass False for
            an optimizer that reduces them itself (the flat ZeRO-1 one).
        schedule: ``"1f1b"`` (``Schedule1F1B``, needs ``n_microbatches >= pp_size``) or ``"gpipe"``.
        device: where the stage computes and its activations travel (``"cpu"`` with gloo).

    Raises:
        OptionsError: an argument is invalid.
    """

    def __init__(self, stage: nn.Module, pp_group, pp_rank: int, pp_size: int, loss_fn,
                 n_microbatches: int | None = None, *, embed_group=None, dp_group=None,
                 average_dp_grads: bool | None = None, schedule: str = "1f1b", device: torch.device | str = "cpu"):
        if schedule not in SCHEDULES:
            raise OptionsError(f"schedule={schedule!r}: use one of {', '.join(SCHEDULES)}")
        if n_microbatches is not None and (isinstance(n_microbatches, bool) or not isinstance(n_microbatches, int)
                                           or n_microbatches < 1):
            raise OptionsError(f"n_microbatches={n_microbatches!r}: use a positive integer (or None)")
        self.stage, self.pp_group, self.pp_rank, self.pp_size = stage, pp_group, pp_rank, pp_size
        self.loss_fn, self.n_microbatches, self.schedule_name = loss_fn, n_microbatches, schedule
        self.embed_group, self.dp_group, self.device = embed_group, dp_group, torch.device(device)
        self.is_first, self.is_last = pp_rank == 0, pp_rank == pp_size - 1
        self.average_dp_grads = (not _is_fsdp(stage)) if average_dp_grads is None else bool(average_dp_grads)
        if pp_size > 1 and (self.is_first or self.is_last) and embed_group is None:
            raise OptionsError("the first and last stages share the tied embedding: pass embed_group "
                               "(pipeline_groups(...).embed_group) so its gradients can be summed")
        self._schedules: dict[int, object] = {}

    def _schedule(self, n: int):
        """The schedule for ``n`` microbatches, built on first use (with its own ``PipelineStage``)."""
        if n not in self._schedules:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            if self.schedule_name == "1f1b" and n < self.pp_size:
                raise OptionsError(f"the 1F1B schedule needs at least as many microbatches as stages "
                                   f"({n} < {self.pp_size}); use more microbatches or schedule='gpipe'")
            # No example inputs: the stage infers its activations' shapes on the first step (one
            # extra forward of a microbatch and a backward to the inputs only, no parameter grads).
            stage = PipelineStage(self.stage, self.pp_rank, self.pp_size, self.device, group=self.pp_group)
            cls = Schedule1F1B if self.schedule_name == "1f1b" else ScheduleGPipe
            self._schedules[n] = cls(stage, n, loss_fn=self.loss_fn)
        return self._schedules[n]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward and backward of one local batch; returns the loss of the global batch on every rank.

        ``x`` (inputs, ``[rows, T]``) is read on the first stage, ``y`` (targets) on the last;
        other ranks may pass anything of the same length (or the same tensors). Gradients are left
        in ``.grad`` (averaged over microbatches and data-parallel ranks, the tied embedding's
        summed over its two copies) for the caller's ``optimizer.step()``.
        """
        rows = x.shape[0] if x is not None else y.shape[0]
        n = self.n_microbatches or default_microbatches(rows, self.pp_size)
        if rows % n:
            raise OptionsError(f"{n} microbatches do not split the local batch of {rows} sequences evenly")
        schedule = self._schedule(n)
        losses: list[torch.Tensor] = []
        args = (x,) if self.is_first else ()
        schedule.step(*args, target=y if self.is_last else None, losses=losses if self.is_last else None,
                      return_outputs=False)
        self._sync_grads()
        if self.is_last:
            loss = torch.stack([l.detach().float() for l in losses]).mean()
        else:
            loss = torch.zeros((), dtype=torch.float32, device=self.device)
        if self.pp_size > 1:
            dist.broadcast(loss, group=self.pp_group, group_src=self.pp_size - 1)
        if self.dp_group is not None and dist.get_world_size(self.dp_group) > 1:
            dist.all_reduce(loss, group=self.dp_group)
            loss /= dist.get_world_size(self.dp_group)
        return loss.item()

    def _sync_grads(self) -> None:
        """Average gradients over dp (ZeRO 0), then sum the tied embedding's over its two copies."""
        if self.average_dp_grads and self.dp_group is not None and (size := dist.get_world_size(self.dp_group)) > 1:
            params = [p for p in self.stage.parameters() if p.requires_grad]
            for p in params:
                if p.grad is None:  # a parameter this step did not reach: it still joins the average
                    p.grad = torch.zeros_like(p)
            grads = [_local(p.grad) for p in params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.dp_group)
            flat /= size
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
        tied = self.stage.tied_weight() if hasattr(self.stage, "tied_weight") else None
        if tied is not None:
            if tied.grad is None:
                tied.grad = torch.zeros_like(tied)
            dist.all_reduce(_local(tied.grad), group=self.embed_group)
