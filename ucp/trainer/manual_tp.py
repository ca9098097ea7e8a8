"""Megatron-style tensor parallelism of the reference GPT, by hand: plain tensors, no DTensor.

Each tensor-parallel rank holds plain ``nn.Parameter`` slices of the whole model, and the forward
pass stitches them together with three autograd functions over the ``tp`` process group (only
``all_reduce`` and ``all_gather``: gloo has no ``reduce_scatter``):

- *copy to region* before a column-parallel linear: identity forward, all-reduce backward;
- *reduce from region* after a row-parallel linear: all-reduce forward, identity backward;
- *gather from region* of the vocabulary-parallel logits: all-gather forward, own slice backward.

Because the tensors are plain, ucp cannot see how they are spread: :func:`ucp_patterns` gives it
the geometry (``CheckpointOptions(layout=..., patterns=ucp_patterns(cfg, tp))``), including the
fused q/k/v projection and the padded vocabulary, which is what makes such checkpoints convertible
to the universal form. Parameter names follow :class:`~ucp.trainer.model.GPT` where the split
allows; the exception is the fused ``attn.qkv`` that replaces GPT's ``attn.q``/``k``/``v``.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from ucp import Fused, Layout, Pad, Pattern, Shard
from ucp.errors import OptionsError
from ucp.trainer.model import GPT, GPTConfig

# -- collectives as autograd functions ---------------------------------------------------------


def _size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        return grad.chunk(_size(ctx.group), dim=-1)[_rank(ctx.group)].contiguous(), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduces the gradient over ``group`` backward (input of a column-parallel op)."""
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduces (sums) over ``group`` forward; identity backward (output of a row-parallel op)."""
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenates every rank's ``x`` along the last dim forward; keeps this rank's slice backward."""
    return x if _size(group) == 1 else _GatherFromRegion.apply(x, group)


# -- geometry ------------------------------------------------------------------------------------


def _check_tp(cfg: GPTConfig, tp: int) -> None:
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise OptionsError(f"tp={tp!r}: tensor parallelism needs a positive integer size")
    if cfg.n_heads % tp:
        raise OptionsError(f"tp={tp} does not divide the model's {cfg.n_heads} attention heads "
                           "(each rank must hold whole heads); choose a tp that divides n_heads")


def padded_vocab(vocab: int, tp: int) -> int:
    """``vocab`` rounded up to a multiple of ``8 * tp`` (Megatron's padding): 250 -> 256 for tp 2 or 4.

    Raises:
        OptionsError: ``tp`` is not a positive integer.
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise OptionsError(f"tp={tp!r}: tensor parallelism needs a positive integer size")
    step = 8 * tp
    return -(-vocab // step) * step


def ucp_patterns(cfg: GPTConfig, tp: int) -> dict[str, Pattern]:
    """The geometry of :class:`ManualTPGPT`'s plain tensors for ``CheckpointOptions(patterns=...)``.

    Globs match parameter names, first match wins; names no glob matches are replicated over ``tp``.
    The token embedding is split by rows and padded to :func:`padded_vocab` rows, of which the
    first ``cfg.vocab`` are real. The fused q/k/v projection is split by rows, and each rank's
    block is its own ``[q_r; k_r; v_r]``: the *stored* global tensor is these blocks in rank order
    (what ``Shard("tp", 0)`` over the local tensors gives), not ``[q; k; v]``. ``Fused`` names the
    parts and their global sizes, so a converter that reads ``Fused`` together with the ``Shard``
    de-interleaves it into q, k and v (see :func:`gather_whole_state` for the arithmetic). Loading
    such a checkpoint at a different ``tp`` therefore needs that conversion, not a plain reshard.

    Args:
        cfg: the model's configuration.
        tp: the tensor-parallel size.

    Returns:
        ``{glob: Pattern}`` over the mesh axis ``"tp"``.

    Raises:
        OptionsError: ``tp`` is not a positive integer or does not divide ``cfg.n_heads``.
    """
    _check_tp(cfg, tp)
    d = cfg.d_model
    vocab = Pattern((Shard("tp", 0),), pad=Pad(dim=0, to=padded_vocab(cfg.vocab, tp), keep=cfg.vocab))
    qkv = Pattern((Shard("tp", 0),), fused=Fused(dim=0, parts=(("q", d), ("k", d), ("v", d))))
    rows, cols = Pattern((Shard("tp", 0),)), Pattern((Shard("tp", 1),))
    return {
        "wte.weight": vocab,
        "*.attn.qkv.weight": qkv,
        "*.attn.qkv.bias": qkv,
        "*.attn.out.weight": cols,
        "*.mlp.fc1.weight": rows,
        "*.mlp.fc1.bias": rows,
        "*.mlp.fc2.weight": cols,
    }


def tp_group(layout: Layout):
    """This rank's ``tp`` process group of ``layout`` (every rank must call this, in the same order).

    Creates one group per set of ranks that differ only in their ``tp`` coordinate, in rank order;
    returns None (one process, nothing to communicate) when the layout has no ``tp`` axis > 1.
    ``init_device_mesh(...)["tp"].get_group()`` gives the same groups when a device mesh exists.

    Args:
        layout: the job's layout, e.g. ``Layout.from_sizes(pp=2, dp=2, tp=2)``.

    Returns:
        The process group of this rank's tp peers, or None.
    """
    if layout.size("tp") == 1:
        return None
    members: dict[tuple, list[int]] = {}
    for r in range(layout.world_size):
        coords = layout.coords(r)
        members.setdefault(tuple(v for n, v in coords.items() if n != "tp"), []).append(r)
    mine = None
    for ranks in members.values():
        group = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            mine = group
    return mine


# -- the model -----------------------------------------------------------------------------------


class ColumnParallelLinear(nn.Linear):
    """``nn.Linear`` holding a slice of the output features; the input is replicated over ``tp``."""

    def __init__(self, in_features, out_features, group, bias=True, dtype=None):
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.group = group

    def forward(self, x):
        return F.linear(copy_to_tp(x, self.group), self.weight, self.bias)


class RowParallelLinear(nn.Linear):
    """``nn.Linear`` holding a slice of the input features; the bias (whole) is added once, after the sum."""

    def __init__(self, in_features, out_features, group, dtype=None):
        super().__init__(in_features, out_features, dtype=dtype)
        self.group = group

    def forward(self, x):
        return reduce_from_tp(F.linear(x, self.weight), self.group) + self.bias


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[start, start + num_embeddings)`` of the padded table; other tokens contribute zeros."""

    def __init__(self, num_embeddings, dim, start, group, dtype=None):
        super().__init__(num_embeddings, dim, dtype=dtype)
        self.start, self.group = start, group

    def forward(self, tokens):
        local = tokens - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_tp(out.masked_fill(outside.unsqueeze(-1), 0.0), self.group)


class ParallelAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, tp: int, group, dtype):
        super().__init__()
        self.head_dim, self.local = cfg.head_dim, cfg.d_model // tp
        self.qkv = ColumnParallelLinear(cfg.d_model, 3 * self.local, group, dtype=dtype)
        self.out = RowParallelLinear(self.local, cfg.d_model, group, dtype=dtype)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (z.reshape(b, t, -1, self.head_dim).transpose(1, 2) for z in self.qkv(x).split(self.local, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class ParallelMLP(nn.Module):
    def __init__(self, cfg: GPTConfig, tp: int, group, dtype):
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.d_model, 4 * cfg.d_model // tp, group, dtype=dtype)
        self.fc2 = RowParallelLinear(4 * cfg.d_model // tp, cfg.d_model, group, dtype=dtype)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ParallelBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, tp: int, group, dtype):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, dtype=dtype)
        self.attn = ParallelAttention(cfg, tp, group, dtype)
        self.ln2 = nn.LayerNorm(cfg.d_model, dtype=dtype)
        self.mlp = ParallelMLP(cfg, tp, group, dtype)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ManualTPGPT(nn.Module):
    """The reference GPT split over a tensor-parallel group, Megatron style, with plain parameters.

    Parameters (local shapes, ``d = d_model``, ``Vp = padded_vocab(vocab, tp)``): ``wte.weight``
    ``[Vp/tp, d]`` (rows of the padded table, tied to ``head.weight``), ``wpe``, ``ln*`` and
    ``ln_f`` whole, ``blocks.i.attn.qkv`` ``[3d/tp, d]`` (this rank's heads ``[q_r; k_r; v_r]``),
    ``attn.out.weight`` ``[d, d/tp]``, ``mlp.fc1`` ``[4d/tp, d]``, ``mlp.fc2.weight`` ``[d, 4d/tp]``;
    row-parallel biases are whole. Build it with :meth:`from_whole`; ``__init__`` leaves the
    parameters at torch's default initialization.

    ``embed``, ``blocks`` and ``logits`` are the seams a pipeline stage uses, as on ``GPT``;
    ``logits`` returns the whole vocabulary, float32 ``[B, T, vocab]``, on every rank.

    Args:
        cfg: the model's configuration.
        tp_group: the tensor-parallel process group; None means the default group, or one
            process when torch.distributed is not initialized.
        dtype: parameter dtype (bf16 by default; fp32 master weights belong to the optimizer).

    Raises:
        OptionsError: the group's size does not divide ``cfg.n_heads``.
    """

    def __init__(self, cfg: GPTConfig, tp_group=None, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        tp, rank = _size(tp_group), _rank(tp_group)
        _check_tp(cfg, tp)
        self.cfg, self.tp_group, self.tp, self.tp_rank = cfg, tp_group, tp, rank
        rows = padded_vocab(cfg.vocab, tp) // tp
        self.wte = VocabParallelEmbedding(rows, cfg.d_model, rank * rows, tp_group, dtype=dtype)
        self.wpe = nn.Embedding(cfg.seq, cfg.d_model, dtype=dtype)
        self.blocks = nn.ModuleList(ParallelBlock(cfg, tp, tp_group, dtype) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, dtype=dtype)
        self.head = ColumnParallelLinear(cfg.d_model, rows, tp_group, bias=False, dtype=dtype)
        self.head.weight = self.wte.weight  # tied, as in GPT

    def embed(self, tokens):
        """Token + position embeddings: what the first pipeline stage starts with."""
        return self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))

    def logits(self, x):
        """Final norm and the tied, vocabulary-parallel head, gathered: float32 ``[B, T, vocab]``."""
        local = self.head(self.ln_f(x))
        return gather_from_tp(local, self.tp_group)[..., : self.cfg.vocab].float()

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.logits(x)

    @classmethod
    def from_whole(cls, whole: GPT, tp_group=None, dtype: torch.dtype = torch.bfloat16) -> "ManualTPGPT":
        """This rank's slices of ``whole`` (the same initialized GPT on every rank), cast to ``dtype``.

        Args:
            whole: the whole model, already initialized (e.g. ``init_gpt(cfg, seed)``).
            tp_group: the tensor-parallel group (see :class:`ManualTPGPT`).
            dtype: parameter dtype.

        Raises:
            OptionsError: the group's size does not divide ``cfg.n_heads``.
        """
        model = cls(whole.cfg, tp_group, dtype)
        tp, r, cfg = model.tp, model.tp_rank, whole.cfg
        src = whole.state_dict()
        table = torch.zeros(padded_vocab(cfg.vocab, tp), cfg.d_model, dtype=src["wte.weight"].dtype)
        table[: cfg.vocab] = src["wte.weight"]
        src["wte.weight"] = table
        for i in range(cfg.n_layers):  # the stored form of qkv: each rank's [q_r; k_r; v_r], in rank order
            a = f"blocks.{i}.attn."
            for leaf in ("weight", "bias"):
                q, k, v = (src[f"{a}{p}.{leaf}"].chunk(tp, 0) for p in "qkv")
                src[f"{a}qkv.{leaf}"] = torch.cat([t for j in range(tp) for t in (q[j], k[j], v[j])])
        own = dict(model.named_parameters())  # head.weight is the tied wte.weight
        with torch.no_grad():
            for name, pattern in _patterns_by_name(model).items():
                local = src[name]
                for s in pattern.shards:
                    local = local.chunk(tp, s.dim)[r]
                own[name].copy_(local)
        return model


def _patterns_by_name(model: ManualTPGPT) -> dict[str, Pattern]:
    """Every parameter name of ``model`` (tied ones once) -> its pattern (replicated when no glob matches)."""
    globs = ucp_patterns(model.cfg, model.tp)
    out = {}
    for name, _ in model.named_parameters():
        out[name] = next((p for g, p in globs.items() if fnmatch.fnmatchcase(name, g)), Pattern())
    return out


def gather_whole_state(model: ManualTPGPT, tp_group=None, grads: bool = False) -> dict[str, torch.Tensor]:
    """Reassemble ``model``'s parameters (or their gradients) in the whole GPT's layout and names.

    A collective: every rank of the tp group must call it. For tests and debugging; ucp's own
    converter does the same arithmetic from the checkpoint's patterns.

    Args:
        model: the tensor-parallel model.
        tp_group: its tensor-parallel group (default: ``model.tp_group``).
        grads: reassemble ``.grad`` instead of the parameters (a missing gradient counts as zeros).

    Returns:
        ``{fqn: tensor}`` with ``GPT.state_dict()``'s names and shapes, in the model's dtype: ``qkv``
        de-interleaved into ``attn.q``/``attn.k``/``attn.v``, the vocabulary padding dropped, and
        ``head.weight`` the same tensor as ``wte.weight``.
    """
    group = model.tp_group if tp_group is None else tp_group
    tp = _size(group)
    out = {}
    for name, pattern in _patterns_by_name(model).items():
        p = model.get_parameter(name)
        t = (p.grad if p.grad is not None else torch.zeros_like(p)) if grads else p.detach()
        for s in pattern.shards:
            if tp > 1:
                parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(tp)]
                dist.all_gather(parts, t.contiguous(), group=group)
                t = torch.cat(parts, s.dim)
        if pattern.pad is not None:
            t = t.narrow(pattern.pad.dim, 0, pattern.pad.keep)
        if pattern.fused is None:
            out[name] = t.clone()
            continue
        # the stored fused tensor is each rank's [q_r; k_r; v_r] in rank order: regroup by part
        f = pattern.fused
        per_rank = [block.split([n // tp for _, n in f.parts], f.dim) for block in t.chunk(tp, f.dim)]
        prefix, _, leaf = name.rsplit(".", 2)
        for i, (part, _) in enumerate(f.parts):
            out[f"{prefix}.{part}.{leaf}"] = torch.cat([blocks[i] for blocks in per_rank], f.dim)
    out["head.weight"] = out["wte.weight"]
    return out
