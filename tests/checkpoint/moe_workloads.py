"""Rank functions for mixture-of-experts models held as MoE code holds them (module level: they pickle).

Every rank of an ``ep`` axis of the job's size owns ``experts.{j}`` with a LOCAL index ``j``; the global
expert is ``rank * E / ep + j``. The router and an attention-like projection are replicated. Training
uses the same input on every rank and a loss that adds the replicated part to the experts' parts, so
the replicas stay identical.
"""

from __future__ import annotations

E = 4
SPEC = 'ucl 1\n"experts.{e}.*" : expert(ep, experts=4)\n"*" : replicate(ep)\n'
#: the same model as a pipeline would hold it: ``experts`` are then the stage's layers, local to its ``pp`` rank
STAGE_SPEC = 'ucl 1\n"experts.{i}.*" : stage(pp, layers=4)\n"*" : replicate(pp)\n'


def _build(seed: int):
    import torch
    import torch.distributed as dist
    from torch import nn

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(8, 16)
            self.w2 = nn.Linear(16, 8, bias=False)

    class MoE(nn.Module):
        def __init__(self, local: int):
            super().__init__()
            self.attn = nn.Linear(8, 8)
            self.router = nn.Linear(8, E, bias=False)
            self.experts = nn.ModuleList(Expert() for _ in range(local))

    ep, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(seed)
    whole = MoE(E)  # every expert, the same on every rank; this rank keeps its own
    model = MoE(E // ep)
    model.attn.load_state_dict(whole.attn.state_dict())
    model.router.load_state_dict(whole.router.state_dict())
    for j in range(E // ep):
        model.experts[j].load_state_dict(whole.experts[rank * (E // ep) + j].state_dict())
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, opt, step: int) -> None:
    import torch
    import torch.distributed as dist

    rank, each = dist.get_rank(), len(model.experts)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
    loss = model.router(torch.tanh(model.attn(x))).pow(2).mean()
    for j, expert in enumerate(model.experts):
        loss = loss + (rank * each + j + 1) * expert.w2(torch.relu(expert.w1(x))).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def global_state(model, opt) -> dict:
    """``{global name: tensor}`` of this rank's parameters and AdamW states (exp_avg, exp_avg_sq, step)."""
    import torch.distributed as dist

    rank, each = dist.get_rank(), len(model.experts)
    out = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if parts[0] == "experts":
            parts[1] = str(rank * each + int(parts[1]))
        name = ".".join(parts)
        out[f"model/{name}"] = p.detach().clone()
        for state, value in opt.state.get(p, {}).items():
            out[f"optim/{name}/{state}"] = value.detach().clone()
    return out


def _checkpointer(root: str, model, opt, spec, axis: str | None = None):
    import torch.distributed as dist

    import ucp

    axis = axis or ("pp" if spec is not None and "stage(" in spec else "ep")
    options = ucp.CheckpointOptions(layout=ucp.Layout.from_sizes(**{axis: dist.get_world_size()}), fsync=False)
    return ucp.Checkpointer(root, model=model, optimizer=opt, options=options, spec=spec)


def train_and_save(root: str, spec: str | None = SPEC, steps: int = 3) -> dict:
    """Train a few steps at ep = the world size, save with ``spec``; this rank's global state."""
    model, opt = _build(seed=0)
    for s in range(steps):
        _step(model, opt, s)
    _checkpointer(root, model, opt, spec).save(steps)
    return global_state(model, opt)


def load_global(root: str, spec: str | None = SPEC, strict: bool = True) -> dict:
    """A fresh model (other seed, AdamW never stepped) at ep = the world size loads ``root``; its
    global state, or the error's one line."""
    model, opt = _build(seed=1)
    try:
        _checkpointer(root, model, opt, spec).load(strict=strict)
    except Exception as e:  # noqa: BLE001 - the test checks the message
        return {"error": f"{type(e).__name__}: {e}"}
    return global_state(model, opt)


def load_smaller_under_dp(root: str) -> dict:
    """The model with fewer experts (E / world) under data parallelism (layout dp = the world size, no
    spec) loads ``root`` with strict=False: a smaller model, not local indices, so not refused; its
    state by its own names, or the error's one line."""
    model, opt = _build(seed=1)
    try:
        _checkpointer(root, model, opt, None, axis="dp").load(strict=False)
    except Exception as e:  # noqa: BLE001 - the test checks the message
        return {"error": f"{type(e).__name__}: {e}"}
    return {f"model/{n}": p.detach().clone() for n, p in model.named_parameters()}
