"""Synthetic training states of large jobs, for ``tools/bench_scale.py``: what every rank of a
Llama-70B, Llama-405B or MoE job under (tp, pp, dp[, ep]) and ZeRO-1 would capture, built one rank
at a time with ucp's own classes (``Layout``, ``Pattern``, ``TensorMeta``, ``Box``/``FlatRange``,
``format.values`` typed JSON), and without a byte of tensor data.

The geometry follows the trainer: parameters are plain tensors placed by patterns
(``ucp.trainer.manual_tp.ucp_patterns``: fused q/k/v and gate/up rows split over ``tp``,
``Shard("tp", 0)`` with ``Fused``; the attention output and the down projection split by columns;
the vocabulary split by rows and padded to :func:`ucp.trainer.manual_tp.padded_vocab`; norms
replicated); a pipeline stage holds its layers under their global names, the first stage also
the embedding, the last the final norm and the output head (``ucp.trainer.pipeline``); ranks are
numbered row-major over ``Layout.from_sizes(pp=, dp=, ep=, tp=)`` (``pp`` outermost, ``tp``
innermost). Optimizer state is Megatron's distributed optimizer as ``ucp.trainer.zero1.FlatAdamW``
keeps it: one flat buffer per bucket (the stage's dense parameters; with ep, its experts' in a
second one), padded to a multiple of dp, each dp rank owning ``[r*S, (r+1)*S)``: its fp32
``exp_avg``, ``exp_avg_sq`` and ``master`` of every parameter overlapping that range, as flat
pieces (pattern ``flat=dp``) of the parameter's tp box, in ``ucp_flat_state()`` order.

MoE (``ep``): each ep rank holds ``experts / ep`` whole experts of every layer of its stage, one
key per expert and weight (``layers.{i}.mlp.experts.{e}.w1.weight``), split over tp like the dense
MLP; a key is held only by its ep rank (placement by key, as pp places layers). ucp's ``flat`` is one
axis, so the dense parameters' optimizer state is flat over ``dp`` and replicated over ``ep`` (the
copies are compared and written once), not partitioned over dp x ep as Megatron does.

Non-tensor state per rank, as ``state.capture.capture_state`` encodes it: the model's (empty)
aliases, the optimizer's param groups (hyperparameters, the Adam ``step`` of the group and its
parameters' fqns: a stage's own), the scheduler and extras (equal on every rank: shared), and the
RNG states ``state.rng.capture_rng`` takes (Python, NumPy, torch CPU, one CUDA device), seeded as
Megatron does (``seed + 100 * pp_rank``; the CUDA state per rank), so the manifest stores them per rank.

Sizes are real (bf16 parameters 2 B, fp32 state 4 B), so the block-checksum counts (one per
``BLOCK_BYTES``) are those of the real job.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, replace

import numpy as np

from ucp.format import values
from ucp.format.box import Box, FlatRange
from ucp.format.dtypes import itemsize
from ucp.format.keys import model_key, optim_key
from ucp.format.layout import Layout
from ucp.format.manifest import TensorMeta
from ucp.format.pattern import REPLICATED, Fused, Pad, Pattern, Shard, local_box
from ucp.trainer.manual_tp import padded_vocab

PARAM_DTYPE = "bfloat16"
STATE_DTYPE = "float32"
FLAT_STATES = ("exp_avg", "exp_avg_sq", "master")  # FlatAdamW's order for low-precision parameters
STEP = 1000
SEED = 1234


@dataclass(frozen=True)
class Model:
    """The shape of a decoder-only transformer (optionally with routed experts)."""

    name: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    experts: int = 0  # routed experts per layer (0: a dense MLP of ``ffn``)
    expert_ffn: int = 0


MODELS = {
    "llama70b": Model("llama70b", 80, 8192, 28672, 64, 8, 128256),
    "llama405b": Model("llama405b", 126, 16384, 53248, 128, 8, 128256),
    "moe": Model("moe", 32, 4096, 0, 32, 8, 102400, experts=64, expert_ffn=1408),
}

#: world size -> (tp, pp, dp, ep) of each layout (tp x pp x dp x ep = world)
WORLDS = {
    "llama70b": {64: (8, 8, 1, 1), 512: (8, 8, 8, 1), 4096: (8, 8, 64, 1), 16384: (8, 16, 128, 1),
                 65536: (8, 16, 512, 1)},
    "llama405b": {64: (8, 8, 1, 1), 512: (8, 8, 8, 1), 4096: (8, 16, 32, 1), 16384: (8, 16, 128, 1),
                  65536: (8, 16, 512, 1)},
    "moe": {64: (2, 4, 1, 8), 512: (2, 4, 8, 8), 4096: (2, 4, 64, 8), 16384: (2, 8, 128, 8),
            65536: (2, 8, 512, 8)},
}


def sizes_for(layout: str, world: int) -> tuple[int, int, int, int]:
    """(tp, pp, dp, ep) of ``layout`` at ``world`` ranks: the table's, else dp = world / (8 * 8 * ep)
    with the table's tp and pp of the largest world below."""
    table = WORLDS[layout]
    if world in table:
        return table[world]
    below = max((w for w in table if w <= world), default=min(table))
    tp, pp, _, ep = table[below]
    if world % (tp * pp * ep):
        raise ValueError(f"world {world} is not a multiple of tp {tp} x pp {pp} x ep {ep} ({layout})")
    return tp, pp, world // (tp * pp * ep), ep


def smaller(tp: int, pp: int, dp: int, ep: int) -> tuple[int, int, int, int]:
    """The load target: a world 25% smaller, dp reduced (12288 = 8 x 16 x 96 from 8 x 16 x 128);
    with a dp that 4 does not divide, pp reduced instead (48 = 8 x 6 x 1 from 8 x 8 x 1)."""
    if dp % 4 == 0:
        return tp, pp, dp * 3 // 4, ep
    if pp % 4 == 0:
        return tp, pp * 3 // 4, dp, ep
    raise ValueError(f"no 25% smaller world for tp {tp} pp {pp} dp {dp} ep {ep}")


@dataclass(frozen=True)
class Param:
    """One parameter of the model: its fqn, stored global shape, pattern and flat buffer."""

    fqn: str
    shape: tuple[int, ...]
    pattern: Pattern
    bucket: str = "dense"  # "dense" or "expert": the optimizer's flat buffer it belongs to

    @property
    def decays(self) -> bool:
        return len(self.shape) > 1  # norms go to the group without weight decay


@dataclass(frozen=True)
class SimPiece:
    """What one rank holds of one tensor key (``ucp.state.capture.Piece`` without its data)."""

    key: str
    meta: TensorMeta
    box: Box
    flat: FlatRange | None = None

    @property
    def numel(self) -> int:
        return self.flat.numel if self.flat is not None else self.box.numel

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.meta.dtype)


def stage_layers(n: int, pp: int, stage: int) -> range:
    """The layers stage ``stage`` of ``pp`` holds: contiguous, as even as can be (126 over 16: 7 or 8)."""
    return range(stage * n // pp, (stage + 1) * n // pp)


def _patterns(m: Model, tp: int) -> dict[str, Pattern]:
    """The trainer's patterns (``ucp_patterns``) for this model at ``tp``."""
    head_dim = m.hidden // m.heads
    q, kv = m.hidden, m.kv_heads * head_dim
    rows, cols = Pattern((Shard("tp", 0),)), Pattern((Shard("tp", 1),))
    vocab = Pattern((Shard("tp", 0),), pad=Pad(0, padded_vocab(m.vocab, tp), m.vocab))
    return {
        "vocab": vocab,
        "qkv": Pattern((Shard("tp", 0),), fused=Fused(0, (("q", q), ("k", kv), ("v", kv)))),
        "fc1": Pattern((Shard("tp", 0),), fused=Fused(0, (("gate", m.ffn), ("up", m.ffn)))) if m.ffn else rows,
        "rows": rows,
        "cols": cols,
    }


@functools.lru_cache(maxsize=None)
def stage_params(m: Model, tp: int, pp: int, ep: int, stage: int, ep_rank: int) -> tuple[Param, ...]:
    """The parameters stage ``stage`` holds on ep rank ``ep_rank``, in ``state_dict`` order."""
    pat = _patterns(m, tp)
    head_dim = m.hidden // m.heads
    qkv_rows = m.hidden + 2 * m.kv_heads * head_dim
    vocab_rows = padded_vocab(m.vocab, tp)
    out: list[Param] = []
    if stage == 0:
        out.append(Param("embed.weight", (vocab_rows, m.hidden), pat["vocab"]))
    per_ep = m.experts // ep if m.experts else 0
    for i in stage_layers(m.layers, pp, stage):
        p = f"layers.{i}"
        out += [Param(f"{p}.input_norm.weight", (m.hidden,), REPLICATED),
                Param(f"{p}.attn.qkv.weight", (qkv_rows, m.hidden), pat["qkv"]),
                Param(f"{p}.attn.o.weight", (m.hidden, m.hidden), pat["cols"]),
                Param(f"{p}.post_attn_norm.weight", (m.hidden,), REPLICATED)]
        if not m.experts:
            out += [Param(f"{p}.mlp.fc1.weight", (2 * m.ffn, m.hidden), pat["fc1"]),
                    Param(f"{p}.mlp.fc2.weight", (m.hidden, m.ffn), pat["cols"])]
            continue
        out.append(Param(f"{p}.mlp.router.weight", (m.experts, m.hidden), REPLICATED))
        for e in range(ep_rank * per_ep, (ep_rank + 1) * per_ep):
            x = f"{p}.mlp.experts.{e}"
            out += [Param(f"{x}.w1.weight", (m.expert_ffn, m.hidden), pat["rows"], "expert"),
                    Param(f"{x}.w3.weight", (m.expert_ffn, m.hidden), pat["rows"], "expert"),
                    Param(f"{x}.w2.weight", (m.hidden, m.expert_ffn), pat["cols"], "expert")]
    if stage == pp - 1:
        out += [Param("norm.weight", (m.hidden,), REPLICATED),
                Param("head.weight", (vocab_rows, m.hidden), pat["vocab"])]
    return tuple(out)


def _rng_state(seed: int) -> dict:
    """What ``state.rng.capture_rng`` returns for generators seeded with ``seed`` (no CUDA)."""
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return {"python": random.Random(seed).getstate(), "numpy": np.random.RandomState(seed).get_state(),
            "torch": g.get_state()}


@functools.lru_cache(maxsize=64)
def _stage_rng(seed: int) -> dict:
    return values.encode(_rng_state(seed), "rng")


class ScaleJob:
    """A synthetic job: ``model`` under tp x pp x dp (x ep) with ZeRO-1; :meth:`pieces` and
    :meth:`state` are what rank ``r`` captures, built on demand (nothing is kept per rank)."""

    def __init__(self, model: str | Model, tp: int, pp: int, dp: int, ep: int = 1):
        self.model = MODELS[model] if isinstance(model, str) else model
        if self.model.experts and self.model.experts % ep:
            raise ValueError(f"ep {ep} does not divide {self.model.experts} experts")
        if not self.model.experts and ep != 1:
            raise ValueError("a dense model has no ep axis")
        self.tp, self.pp, self.dp, self.ep = tp, pp, dp, ep
        sizes = {"pp": pp, "dp": dp, "tp": tp} | ({"ep": ep} if self.model.experts else {})
        self.layout = Layout.from_sizes(zero=1, **sizes)
        self.world = self.layout.world_size

    @property
    def name(self) -> str:
        return self.model.name

    def describe(self) -> dict:
        return {"layout": self.model.name, "tp": self.tp, "pp": self.pp, "dp": self.dp, "ep": self.ep,
                "world": self.world}

    def params(self, rank: int) -> tuple[Param, ...]:
        c = self.layout.coords(rank)
        return stage_params(self.model, self.tp, self.pp, self.ep, c["pp"], c.get("ep", 0))

    @functools.lru_cache(maxsize=256)
    def _model_pieces(self, stage: int, ep_rank: int, tp_rank: int) -> tuple[SimPiece, ...]:
        coords = {"pp": stage, "ep": ep_rank, "tp": tp_rank, "dp": 0}
        sizes = self.layout.sizes
        return tuple(SimPiece(model_key(p.fqn), TensorMeta(p.shape, PARAM_DTYPE, p.pattern),
                              local_box(p.pattern, p.shape, sizes, coords))
                     for p in stage_params(self.model, self.tp, self.pp, self.ep, stage, ep_rank))

    def model_pieces(self, rank: int) -> tuple[SimPiece, ...]:
        c = self.layout.coords(rank)
        return self._model_pieces(c["pp"], c.get("ep", 0), c["tp"])

    def flat_pieces(self, rank: int) -> list[SimPiece]:
        """The optimizer's flat partitions this rank owns (``FlatAdamW.ucp_flat_state`` through
        ``state.capture.flat_state_pieces``): per bucket, the parameters overlapping ``[r*S, (r+1)*S)``."""
        c = self.layout.coords(rank)
        mp = self.model_pieces(rank)
        params = self.params(rank)
        out = []
        for bucket in ("dense", "expert"):
            members = [(p, piece) for p, piece in zip(params, mp) if p.bucket == bucket]
            total = sum(piece.box.numel for _, piece in members)
            if not total:
                continue
            share = -(-total // self.dp)
            lo, hi = c["dp"] * share, (c["dp"] + 1) * share
            off = 0
            for p, piece in members:
                a, b = max(off, lo), min(off + piece.box.numel, hi)
                if a < b:
                    flat = FlatRange(a - off, b - a)
                    meta = TensorMeta(p.shape, STATE_DTYPE, replace(p.pattern, flat="dp"))
                    out += [SimPiece(optim_key(p.fqn, s), meta, piece.box, flat) for s in FLAT_STATES]
                off += piece.box.numel
        return out

    def pieces(self, rank: int) -> list[SimPiece]:
        """Everything rank ``rank`` captures, in capture order: parameters, then flat optimizer state."""
        return list(self.model_pieces(rank)) + self.flat_pieces(rank)

    def state(self, rank: int, step: int = STEP) -> dict:
        """Rank ``rank``'s non-tensor state, typed JSON per component (``capture_state``'s ``state``)."""
        import torch

        c = self.layout.coords(rank)
        params = self.params(rank)
        hyper = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8}
        groups = [dict(hyper, weight_decay=wd, step=step, params=[p.fqn for p in params if p.decays == decays])
                  for wd, decays in ((0.1, True), (0.0, False))]
        sched = {"base_lrs": [3e-4, 3e-4], "last_epoch": step, "verbose": False, "_step_count": step + 1,
                 "_get_lr_called_within_step": False, "_last_lr": [2.9e-4, 2.9e-4], "lr_lambdas": [None, None]}
        cuda = torch.tensor([(SEED + rank) & 0xFF] * 8 + [step & 0xFF] + [0] * 7, dtype=torch.uint8)
        rng = dict(_stage_rng(SEED + 100 * c["pp"]), cuda=values.encode([cuda], "rng.cuda"))
        return {
            "model": values.encode({"aliases": {}, "extra_state": {}}, "model"),
            "optimizer": values.encode({"scalars": {}, "param_groups": groups}, "optimizer"),
            "scheduler": values.encode(sched, "scheduler"),
            "extras": values.encode({"step": step, "consumed_samples": step * 1024}, "extras"),
            "rng": rng,
        }

    def total_bytes(self) -> int:
        """Bytes of the whole checkpoint (every region once): parameters + fp32 optimizer state."""
        seen = set()
        total = 0
        for stage in range(self.pp):
            for e in range(self.ep):
                for p in stage_params(self.model, self.tp, self.pp, self.ep, stage, e):
                    if p.fqn not in seen:
                        seen.add(p.fqn)
                        total += math.prod(p.shape) * (itemsize(PARAM_DTYPE) + len(FLAT_STATES) * itemsize(STATE_DTYPE))
        return total
