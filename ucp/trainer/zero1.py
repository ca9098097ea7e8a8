"""A flat ZeRO-1 optimizer in the style of Megatron's distributed optimizer.

Parameters are flattened into one buffer per dtype (in parameter order), padded to a multiple of
the data-parallel size; data-parallel rank ``r`` owns the contiguous range ``[r*S, (r+1)*S)`` of it:
its AdamW moments and its fp32 master weights. A step averages the gradients over the data-parallel
group (all-reduce: gloo has no reduce-scatter), updates the owned range, and all-gathers the updated
parameters. Parameters may be bf16 or fp16: the fp32 masters are the truth, parameters a rounded
copy. For fp32 parameters the owned slice of the parameters *is* the master, so no separate master
is saved for them.

ucp sees the partitions through ``ucp_flat_state()``: for each parameter, this rank's elements
``[start, start + n)`` of the parameter (flattened, in its tensor-parallel local box) of
``exp_avg``, ``exp_avg_sq`` and, for low-precision parameters, ``master``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class _Bucket:
    """One dtype's flat buffer: parameters at offsets, this rank's owned range and its state."""

    dtype: torch.dtype
    params: list  # (fqn, param, offset)
    size: int  # per-rank share S (the padded total is S * dp)
    lo: int
    master: torch.Tensor = field(default=None)
    exp_avg: torch.Tensor = field(default=None)
    exp_avg_sq: torch.Tensor = field(default=None)

    @property
    def keeps_master(self) -> bool:
        return self.dtype != torch.float32

    def owned(self):
        """``(fqn, param, start in param, start in share, n)`` for every parameter overlapping the share."""
        hi = self.lo + self.size
        for fqn, p, off in self.params:
            a, b = max(off, self.lo), min(off + p.numel(), hi)
            if a < b:
                yield fqn, p, a - off, a - self.lo, b - a


class FlatAdamW(torch.optim.Optimizer):
    """AdamW whose state (and fp32 master weights) is partitioned over the data-parallel group.

    Args:
        named_params: ``(fqn, parameter)`` pairs, e.g. ``model.named_parameters()``.
        dp_group: the data-parallel process group (None: the default group).
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        own_bucket: fqns that get a flat buffer of their own. A parameter held by several pipeline
            stages (the tied embedding on the first and the last) must be partitioned the same way
            on each, whatever else the stage holds; then its copies' partitions are the same regions.
    """

    ucp_flat_axis = "dp"

    def __init__(self, named_params, dp_group=None, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 own_bucket=()):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        super().__init__([p for _, p in named], dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, step=0))
        self.dp_group = dp_group
        self.dp_rank = dist.get_rank(dp_group)
        self.dp_size = dist.get_world_size(dp_group)
        self.buckets: list[_Bucket] = []
        def bucket_of(n, p):
            return (p.dtype, n if n in own_bucket else None)

        for which in dict.fromkeys(bucket_of(n, p) for n, p in named):
            dtype = which[0]
            params, off = [], 0
            for n, p in named:
                if bucket_of(n, p) == which:
                    params.append((n, p, off))
                    off += p.numel()
            size = -(-off // self.dp_size)
            b = _Bucket(dtype, params, size, self.dp_rank * size)
            b.exp_avg = torch.zeros(size)
            b.exp_avg_sq = torch.zeros(size)
            b.master = torch.zeros(size)
            self._refresh_master(b)
            self.buckets.append(b)

    def _refresh_master(self, b: _Bucket) -> None:
        """fp32 masters from the parameters (exact for fp32; for low precision only at start)."""
        with torch.no_grad():
            for _, p, start, at, n in b.owned():
                b.master[at:at + n] = p.detach().reshape(-1)[start:start + n].float()

    def ucp_flat_state(self) -> dict:
        out: dict = {}
        for b in self.buckets:
            names = ("exp_avg", "exp_avg_sq", "master") if b.keeps_master else ("exp_avg", "exp_avg_sq")
            for fqn, _, start, at, n in b.owned():
                out[fqn] = {name: (getattr(b, name)[at:at + n], start) for name in names}
        return out

    def load_state_dict(self, state_dict) -> None:
        """Restore hyperparameters (and the step); partitions were filled in place by ucp. The
        masters of fp32 parameters are the parameters themselves: re-read them."""
        super().load_state_dict(state_dict)
        for b in self.buckets:
            if not b.keeps_master:
                self._refresh_master(b)

    @torch.no_grad()
    def step(self, closure=None):
        group = self.param_groups[0]
        group["step"] += 1
        t = group["step"]
        (beta1, beta2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
        for b in self.buckets:
            flat = torch.zeros(b.size * self.dp_size)
            for _, p, off in b.params:
                if p.grad is not None:
                    flat[off:off + p.numel()] = p.grad.reshape(-1)
            dist.all_reduce(flat, group=self.dp_group)
            g = flat[b.lo:b.lo + b.size].div_(self.dp_size)
            b.master.mul_(1 - lr * wd)
            b.exp_avg.lerp_(g, 1 - beta1)
            b.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (b.exp_avg_sq / (1 - beta2 ** t)).sqrt_().add_(eps)
            b.master.addcdiv_(b.exp_avg, denom, value=-lr / (1 - beta1 ** t))
            shares = [torch.empty(b.size, dtype=b.dtype) for _ in range(self.dp_size)]
            dist.all_gather(shares, b.master.to(b.dtype), group=self.dp_group)
            whole = torch.cat(shares)
            for _, p, off in b.params:
                p.copy_(whole[off:off + p.numel()].view(p.shape))
        return None
