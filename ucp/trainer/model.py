"""A small GPT and its synthetic data.

The model: token + position embeddings, pre-norm blocks (causal self-attention, a GELU MLP or a
top-2 mixture of GELU-MLP experts), a final norm and an output head tied to the token embedding; no
dropout. It is always initialized *whole* from the seed, before any sharding (or placing of
experts), so every layout starts from the same parameters.

The data: sequences drawn from a fixed random Markov chain (each token has a few likely
successors, so the loss has something to learn), generated from the seed and the step alone: the
global batch of a step is the same whatever the layout, and each data-parallel rank takes its slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ucp.trainer.moe import MoE


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 250  # deliberately not a multiple of 2, 3 or 4: vocabulary padding gets exercised
    seq: int = 32
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 4
    global_batch: int = 24  # divisible by 2, 3 and 4
    experts: int = 0  # > 0: each block's MLP is a top-2 mixture of this many experts (ucp.trainer.moe)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds n_heads / tp of them
        q, k, v = (proj(x).view(b, t, -1, self.head_dim).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.fc2 = nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MoE(cfg.d_model, cfg.experts, lambda: MLP(cfg)) if cfg.experts else MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        self.head.weight = self.wte.weight  # tied

    def embed(self, tokens):
        """Token + position embeddings: what the first pipeline stage starts with."""
        return self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))

    def logits(self, x):
        """Final norm and the tied output head: what the last pipeline stage ends with."""
        return self.head(self.ln_f(x))

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.logits(x)


def init_gpt(cfg: GPTConfig, seed: int) -> GPT:
    """The whole model, initialized from ``seed`` alone (GPT-2 style: N(0, 0.02), scaled residual outs)."""
    gen = torch.Generator().manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif "ln" in name:
                p.fill_(1.0)
            else:
                std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("out.weight", "fc2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def batch(cfg: GPTConfig, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: (inputs, targets), each ``[global_batch, seq]`` int64."""
    table_gen = torch.Generator().manual_seed(seed)
    # each token's successors: 4 likely ones (fixed by the seed) and a little uniform noise
    likely = torch.randint(cfg.vocab, (cfg.vocab, 4), generator=table_gen)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    tokens = torch.empty(cfg.global_batch, cfg.seq + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(cfg.vocab, (cfg.global_batch,), generator=gen)
    for t in range(cfg.seq):
        pick = torch.randint(4, (cfg.global_batch,), generator=gen)
        noise = torch.randint(cfg.vocab, (cfg.global_batch,), generator=gen)
        use_noise = torch.rand(cfg.global_batch, generator=gen) < 0.1
        nxt = likely[tokens[:, t], pick]
        tokens[:, t + 1] = torch.where(use_noise, noise, nxt)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every token of the (local) batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
