"""Parallel layouts of the reference GPT, built with torch's own parallelism.

``zero`` follows ucp's meaning (``ucp.format.layout.ZERO_MODES``): 0 is DDP (or, with tensor
parallelism, data-parallel gradient averaging over the ``dp`` mesh dim), 1 is the flat ZeRO-1
optimizer of :mod:`ucp.trainer.zero1`, 2 is FSDP2 with
``reshard_after_forward=False``, 3 is FSDP2; each optionally over DTensor tensor parallelism.

A mixture-of-experts model (``GPTConfig.experts``) places its experts over ``ep`` ranks that are a
sub-group of the data-parallel ranks, as in Megatron and DeepSpeed: ucp records the job as
``dp = dp / ep`` (the replicas of each expert) times ``ep``, and the trainer's UCL spec names
experts by their global index (:mod:`ucp.trainer.moe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from torch import nn

from ucp import CheckpointOptions, Layout
from ucp.errors import OptionsError
from ucp.trainer.manual_tp import ManualTPGPT, ucp_patterns
from ucp.trainer.model import GPTConfig, loss_fn
from ucp.trainer.moe import scale_expert_grads, sync_moe_grads
from ucp.trainer.pipeline import PipelineTrainer, default_microbatches, pipeline_groups, shard_stage, stage_module


@dataclass(frozen=True)
class TrainLayout:
    """How the job is split: data, tensor and pipeline parallel sizes and the ZeRO mode.

    ``ep``: for a mixture-of-experts model, the expert-parallel size (each group of ``ep`` data-parallel
    ranks holds every expert once; 1: each rank holds them all); None for a dense model.
    """

    dp: int
    tp: int = 1
    pp: int = 1
    zero: int = 0
    manual_tp: bool = False
    ep: int | None = None

    @classmethod
    def of(cls, args, world_size: int) -> "TrainLayout":
        """The layout the trainer's options (:func:`ucp.trainer.options.add_arguments`) give on ``world_size``
        ranks: ``--dp`` defaults to ranks / (tp x pp), ``--ep`` to 1 with ``--moe``."""
        ep = args.ep if args.ep is not None else (1 if args.moe else None)
        return cls(dp=args.dp or world_size // (args.tp * args.pp), tp=args.tp, pp=args.pp, zero=args.zero,
                   manual_tp=args.manual_tp, ep=ep)

    def check(self, cfg: GPTConfig, world_size: int) -> None:
        """Refuse layouts that cannot hold the model, with what to change."""
        if self.dp * self.tp * self.pp != world_size:
            raise OptionsError(f"dp={self.dp} x tp={self.tp} x pp={self.pp} = {self.dp * self.tp * self.pp}, "
                               f"but the job has {world_size} ranks; make the product equal --nproc")
        self._check_experts(cfg)
        if self.zero == 1 and self.tp > 1 and not self.manual_tp:
            raise OptionsError("--zero 1 (the flat ZeRO-1 optimizer) needs plain tensors: with --tp use --manual-tp")
        if self.manual_tp and self.zero != 1:
            raise OptionsError("--manual-tp trains bf16 parameters with fp32 masters in the flat ZeRO-1 optimizer: "
                               "add --zero 1")
        if cfg.n_layers % self.pp:
            raise OptionsError(f"--pp {self.pp} does not divide the model's {cfg.n_layers} layers into equal stages")
        if self.pp > 1 and self.tp > 1 and not self.manual_tp:
            raise OptionsError("--pp with DTensor --tp is not supported; use --manual-tp --zero 1 for tp x pp")
        if self.pp > 1 and cfg.global_batch % self.dp == 0:
            if default_microbatches(cfg.global_batch // self.dp, self.pp) < self.pp:
                raise OptionsError(f"--pp {self.pp}: each dp rank's {cfg.global_batch // self.dp} sequences cannot "
                                   f"make {self.pp} equal microbatches; use fewer stages or a smaller --dp")
        if cfg.n_heads % self.tp:
            raise OptionsError(f"--tp {self.tp} does not divide the model's {cfg.n_heads} attention heads")
        if cfg.global_batch % self.dp:
            raise OptionsError(f"--dp {self.dp} does not divide the global batch of {cfg.global_batch} sequences")

    def _check_experts(self, cfg: GPTConfig) -> None:
        """Refuse what the mixture of experts cannot run (yet), naming what to use instead."""
        if self.ep is None:
            if cfg.experts:
                raise OptionsError(f"a model of {cfg.experts} experts needs an expert-parallel size: give --ep (1: "
                                   "every rank holds every expert)")
            return
        if not cfg.experts:
            raise OptionsError(f"--ep {self.ep} places experts: add --moe E (the number of experts)")
        if cfg.experts < 2:
            raise OptionsError(f"--moe {cfg.experts}: the top-2 router needs at least 2 experts")
        if self.ep < 1 or cfg.experts % self.ep:
            fits = ", ".join(str(n) for n in range(1, cfg.experts + 1) if cfg.experts % n == 0)
            raise OptionsError(f"--ep {self.ep} cannot hold {cfg.experts} experts in equal shares; use an --ep "
                               f"dividing --moe {cfg.experts}: {fits}")
        if self.dp % self.ep:
            raise OptionsError(f"--ep {self.ep} must divide the data-parallel size {self.dp} (the expert-parallel "
                               f"group is a sub-group of the dp ranks); use --nproc a multiple of {self.ep}")
        if self.tp > 1 or self.pp > 1 or self.manual_tp:
            raise OptionsError("--moe with tensor or pipeline parallelism is not supported yet; use --moe E --ep N "
                               "over data parallelism alone (--nproc = dp, a multiple of --ep)")
        if self.zero == 1:
            raise OptionsError("--moe with --zero 1 (the flat ZeRO-1 optimizer) is not supported yet; use --zero 0, "
                               "2 or 3")

    def spec(self, cfg: GPTConfig) -> str | None:
        """The UCL program this layout's checkpoints are saved and loaded with (``Checkpointer(spec=...)``):
        local ``experts.{j}`` named by their global index, the rest replicated; None for a dense model.
        It names no sizes of the layout, so a checkpoint resumes at any ``ep`` dividing the experts."""
        if self.ep is None:
            return None
        return (f'ucl 1\n"blocks.{{i}}.mlp.experts.{{e}}.*" : expert(ep, experts={cfg.experts})\n'
                '"*" : replicate(ep)\n')

    def checkpoint_options(self, cfg: GPTConfig):
        """ucp's options for this layout: plain-tensor geometry comes from patterns under manual TP."""
        if self.manual_tp:
            return CheckpointOptions(layout=self.layout, patterns=ucp_patterns(cfg, self.tp))
        return CheckpointOptions(layout=self.layout)

    @property
    def layout(self) -> Layout:
        """As ucp records it: ``dp`` always (the replicas of an expert under expert parallelism), ``ep``
        for a mixture of experts (its rules name the axis, even of size 1), other axes when larger than 1."""
        sizes = {n: s for n, s in (("pp", self.pp), ("tp", self.tp)) if s > 1}
        if self.ep is not None:
            return Layout.from_sizes(dp=self.dp // self.ep, ep=self.ep, zero=self.zero, **sizes)
        return Layout.from_sizes(dp=self.dp, zero=self.zero, **sizes)


@dataclass
class Parallel:
    """A model made parallel: ``module`` runs forward; ``model`` is what checkpoints see."""

    module: nn.Module
    model: nn.Module
    dp_rank: int
    dp_group: object
    pipeline: object = None  # a PipelineTrainer when pp > 1: it runs forward and backward itself
    after_backward: object = None  # what reduces the gradients when no wrapper does (mixture of experts)


def parallelize(model: nn.Module, lay: TrainLayout) -> Parallel:
    """Shard the whole, already initialized ``model`` for layout ``lay`` (every rank holds the same one)."""
    from torch.distributed.device_mesh import init_device_mesh

    if lay.pp > 1:
        return _pipeline(model, lay)
    if lay.ep is not None:
        return _expert_parallel(model, lay)
    rank = dist.get_rank()
    coords = lay.layout.coords(rank)
    mesh = init_device_mesh("cpu", (lay.dp, lay.tp), mesh_dim_names=("dp", "tp"))
    if lay.manual_tp:
        tp_model = ManualTPGPT.from_whole(model, mesh["tp"].get_group() if lay.tp > 1 else None, torch.bfloat16)
        return Parallel(tp_model, tp_model, coords.get("dp", 0), mesh["dp"].get_group())
    if lay.tp > 1:
        _tensor_parallel(model, mesh["tp"])
    if lay.zero in (2, 3):
        from torch.distributed.fsdp import fully_shard

        reshard = lay.zero == 3
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"], reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh["dp"], reshard_after_forward=reshard)
        return Parallel(model, model, coords["dp"], mesh["dp"].get_group())
    if lay.zero == 1:
        # the flat ZeRO-1 optimizer averages gradients over dp itself: no wrapper
        return Parallel(model, model, coords["dp"], mesh["dp"].get_group())
    if lay.tp == 1:
        ddp = nn.parallel.DistributedDataParallel(model, process_group=mesh["dp"].get_group())
        return Parallel(ddp, model, coords["dp"], mesh["dp"].get_group())
    # zero 0 over tensor parallelism: DDP cannot take DTensor parameters; average gradients over dp.
    group = mesh["dp"].get_group()
    if lay.dp > 1:
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p, g=group: _average_grad(p, g))
    return Parallel(model, model, coords["dp"], group)


def _pipeline(model: nn.Module, lay: TrainLayout) -> Parallel:
    """Pipeline stages (``torch.distributed.pipelining``) over data parallelism (zero 0/1/2/3),
    optionally over manual tensor parallelism."""
    g = pipeline_groups(lay.pp, lay.dp, lay.tp)
    if lay.manual_tp:
        model = ManualTPGPT.from_whole(model, g.mesh["tp"].get_group() if lay.tp > 1 else None, torch.bfloat16)
    stage = stage_module(model, g.pp_rank, g.pp_size)
    if lay.zero in (2, 3):
        shard_stage(stage, g.mesh["dp"], reshard_after_forward=lay.zero == 3)
    # zero 1: the flat optimizer averages over dp itself; FSDP reduces its own gradients
    pipe = PipelineTrainer(stage, g.pp_group, g.pp_rank, g.pp_size, loss_fn, embed_group=g.embed_group,
                           dp_group=g.dp_group, average_dp_grads=False if lay.zero == 1 else None)
    return Parallel(stage, stage, g.dp_rank, g.dp_group, pipeline=pipe)


def _expert_parallel(model: nn.Module, lay: TrainLayout) -> Parallel:
    """Each ep group of consecutive ranks (ucp's ``ep`` axis, innermost) holds every expert once.

    zero 0: gradients reduced by :func:`ucp.trainer.moe.sync_moe_grads` (DDP cannot hold parameters
    that differ between its ranks). zero 2/3: FSDP2 shards each expert over its replicas (the ``dp``
    mesh dim; their gradients averaged there, then divided by ep: summed over the replicas and divided
    by the whole dp size; gloo has no pre-multiplied reduce-scatter for FSDP's own divide factor), and
    the rest HSDP-style over the (dp, ep) mesh: sharded within the ep group, replicated across
    groups, gradients averaged over all (at ep 1, sharded over dp: FSDP2 of the whole model).
    """
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (lay.dp // lay.ep, lay.ep), mesh_dim_names=("dp", "ep"))
    for block in model.blocks:
        block.mlp.place(mesh["ep"].get_group())
    dp_group = dist.group.WORLD  # tp = pp = 1: every rank is a data-parallel rank
    if lay.zero in (2, 3):
        from torch.distributed.fsdp import fully_shard

        reshard, rest = lay.zero == 3, mesh if lay.ep > 1 else mesh["dp"]
        for block in model.blocks:
            for expert in block.mlp.experts:
                fully_shard(expert, mesh=mesh["dp"], reshard_after_forward=reshard)
            fully_shard(block, mesh=rest, reshard_after_forward=reshard)
        fully_shard(model, mesh=rest, reshard_after_forward=reshard)
        return Parallel(model, model, dist.get_rank(), dp_group,
                        after_backward=partial(scale_expert_grads, model, 1 / lay.ep) if lay.ep > 1 else None)
    return Parallel(model, model, dist.get_rank(), dp_group,
                    after_backward=partial(sync_moe_grads, model, dp_group, mesh["dp"].get_group()))


def _average_grad(p: torch.Tensor, group) -> None:
    grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
    dist.all_reduce(grad, group=group)
    grad.div_(dist.get_world_size(group))


def _tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Megatron's split with DTensor: q, k, v and fc1 by output features, out and fc2 by input features."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.blocks:
        parallelize_module(block, tp_mesh, {
            "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.out": RowwiseParallel(), "mlp.fc1": ColwiseParallel(), "mlp.fc2": RowwiseParallel(),
        })
