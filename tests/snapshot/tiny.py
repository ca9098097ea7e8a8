"""A tiny model with a deterministic training step, and bit-exact state comparison, for the
memory-tier tests."""

from __future__ import annotations

import torch


def tiny_model(seed: int = 0):
    """A two-layer MLP and its AdamW, initialized from ``seed``."""
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(32, 200), torch.nn.Linear(200, 3))
    return m, torch.optim.AdamW(m.parameters(), lr=0.01)


def train_step(m, opt, s: int) -> None:
    """Step ``s`` of the tiny model: the same batch for the same ``s``."""
    g = torch.Generator().manual_seed(s)
    m(torch.randn(4, 32, generator=g)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def state_of(m, opt) -> dict:
    """Copies of every parameter, buffer and optimizer state tensor, by ucp-like keys."""
    out = {f"model/{k}": v.clone() for k, v in m.state_dict().items()}
    names = {id(p): n for n, p in m.named_parameters()}
    out.update({f"optim/{names[id(p)]}/{k}": v.clone() for p, st in opt.state.items() for k, v in st.items()})
    return out


def same(a: dict, b: dict) -> bool:
    """The same keys and bit-identical tensors."""
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
