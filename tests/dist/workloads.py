"""Functions run on every rank of a test world (module level, so they pickle by reference)."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

D, H = 6, 10  # odd sizes: FSDP2 over 4 ranks gets uneven and empty shards


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, H)
        self.fc2 = nn.Linear(H, D)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def build(kind: str, seed: int):
    """A model of ``kind`` ('tp', 'fsdp', 'fsdp_tp') initialized from ``seed``, and its AdamW."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = dist.get_world_size()
    torch.manual_seed(seed)
    model = MLP()
    if kind == "tp":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp")) if world > 2 else \
            init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        tp = mesh["tp"] if world > 2 else mesh
        parallelize_module(model, tp, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    elif kind == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    elif kind == "fsdp_tp":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
    else:
        raise ValueError(kind)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train_step(model, opt, step: int) -> float:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, D, generator=g)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def full_state(model, opt) -> dict:
    """Every parameter and optimizer state as full tensors (DTensors gathered)."""
    out = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out[f"model/{n}"] = (p.full_tensor() if isinstance(p, DTensor) else p.detach()).clone()
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{names[id(p)]}/{k}"] = (v.full_tensor() if isinstance(v, DTensor) else v).clone()
    for fqn, states in (opt.ucp_flat_state() if hasattr(opt, "ucp_flat_state") else {}).items():
        for k, (t, start) in states.items():  # this rank's flat partitions
            out[f"flat/{fqn}/{k}@{start}"] = t.clone()
    return out


def bit_diffs(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ in any bit (or are missing on one side)."""
    diffs = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x.view(torch.uint8) if x.dtype == torch.uint8 else x, y):
            diffs.append(k)
    return diffs


def save_and_resume(kind: str, root: str, before: int = 3, after: int = 3) -> dict:
    """Train, save, train on; then a fresh model and optimizer load and train the same steps."""
    import ucp

    model, opt = build(kind, seed=0)
    for s in range(before):
        train_step(model, opt, s)
    res = ucp.Checkpointer(root, model=model, optimizer=opt).save(before)
    saved = full_state(model, opt)
    ref = [train_step(model, opt, s) for s in range(before, before + after)]

    model2, opt2 = build(kind, seed=1)  # different init, optimizer never stepped
    loaded = ucp.Checkpointer(root, model=model2, optimizer=opt2).load()
    diffs = bit_diffs(saved, full_state(model2, opt2))
    got = [train_step(model2, opt2, s) for s in range(before, before + after)]
    return {"step": loaded.step, "source": loaded.source, "diffs": diffs, "ref": ref, "got": got,
            "layout": str(ucp.Checkpointer(root, model=model2).layout), "nbytes": res.nbytes, "read": loaded.nbytes}


def save_diverged(root: str, bad_rank: int) -> str:
    """Perturb a replicated tensor on one rank; the save must refuse and name that rank."""
    import ucp
    from ucp.errors import DistributedError

    model, opt = build("tp", seed=0)
    train_step(model, opt, 0)
    if dist.get_rank() == bad_rank:
        with torch.no_grad():
            model.norm.weight.add_(1e-3)
    try:
        ucp.Checkpointer(root, model=model, optimizer=opt).save(1)
    except DistributedError as e:
        return str(e)
    return "no error"


def die_mid_save(root: str, victim: int) -> str:
    """Save step 1, then SIGKILL rank ``victim`` halfway through writing step 2's data file."""
    import ucp
    import ucp.checkpoint.checkpointer as ckmod

    model, opt = build("tp", seed=0)
    train_step(model, opt, 0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt)
    ck.save(1)
    train_step(model, opt, 1)
    if dist.get_rank() == victim:
        real = ckmod.write_file

        def half_then_die(path, entries, *a, **k):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
            return real(path, entries, *a, **k)

        ckmod.write_file = half_then_die
    try:
        ck.save(2)
    except Exception as e:  # noqa: BLE001 - the survivor must fail, not hang
        return f"{type(e).__name__}: {e}"
    return "no error"


class FlatMomentum(torch.optim.Optimizer):
    """ZeRO-1 in miniature: each dp rank owns a flat chunk of every parameter's momentum and fp32
    master copy, updates its chunk, and all-gathers the parameters. Reports its state to ucp
    through ``ucp_flat_state``."""

    ucp_flat_axis = "dp"

    def __init__(self, named_params, lr=0.05, beta=0.9):
        named_params = list(named_params)
        super().__init__([p for _, p in named_params], dict(lr=lr, beta=beta))
        from ucp.format.pattern import chunk_bounds

        rank, world = dist.get_rank(), dist.get_world_size()
        self.world = world
        self.chunks = {}
        for name, p in named_params:
            lo, hi = chunk_bounds(p.numel(), world, rank)
            self.chunks[name] = (p, lo, torch.zeros(hi - lo), p.detach().reshape(-1)[lo:hi].clone())

    def ucp_flat_state(self):
        return {n: {"momentum": (m, lo), "master": (w, lo)} for n, (p, lo, m, w) in self.chunks.items()}

    @torch.no_grad()
    def step(self):
        g = self.param_groups[0]
        for p, lo, m, w in self.chunks.values():
            m.mul_(g["beta"]).add_(p.grad.reshape(-1)[lo:lo + m.numel()])
            w.sub_(g["lr"] * m)
            size = -(-p.numel() // self.world)
            mine = torch.zeros(size)
            mine[: w.numel()] = w
            parts = [torch.empty(size) for _ in range(self.world)]
            dist.all_gather(parts, mine)
            p.copy_(torch.cat(parts)[: p.numel()].view(p.shape))


def flat_zero1_resume(root: str, before: int = 3, after: int = 3) -> dict:
    import ucp

    def make(seed):
        torch.manual_seed(seed)
        model = MLP()
        return model, FlatMomentum(model.named_parameters())

    def local(opt):
        return {f"{n}/{k}": t.clone() for n, st in opt.ucp_flat_state().items() for k, (t, _) in st.items()}

    model, opt = make(0)
    for s in range(before):
        train_step(model, opt, s)
    ucp.Checkpointer(root, model=model, optimizer=opt).save(before)
    saved = {**full_state(model, opt), **local(opt)}
    ref = [train_step(model, opt, s) for s in range(before, before + after)]
    model2, opt2 = make(1)
    ucp.Checkpointer(root, model=model2, optimizer=opt2).load()
    diffs = bit_diffs(saved, {**full_state(model2, opt2), **local(opt2)})
    got = [train_step(model2, opt2, s) for s in range(before, before + after)]
    return {"diffs": diffs, "ref": ref, "got": got}


def save_disagreeing_steps(root: str) -> str:
    """Step 1 is saved; then rank 0 saves step 3 while the others save step 1 again."""
    import ucp
    from ucp.errors import DistributedError

    model, opt = build("fsdp", seed=0)
    train_step(model, opt, 0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt)
    ck.save(1)
    try:
        ck.save(3 if dist.get_rank() == 0 else 1)
    except DistributedError as e:
        return str(e)
    return "no error"


def load_corrupted(root: str) -> dict:
    """Save, flip a byte of one fragment (rank 0), load: every rank gets the corruption's class."""
    import ucp
    from ucp.errors import CorruptCheckpointError, DistributedError
    from ucp.storage.manifest_io import read_manifest

    model, opt = build("tp", seed=0)
    train_step(model, opt, 0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt)
    res = ck.save(1)
    if dist.get_rank() == 0:
        f = max(read_manifest(res.path).fragments, key=lambda f: f.length)
        with open(res.path / f.file, "r+b") as fh:
            fh.seek(f.offset)
            b = fh.read(1)
            fh.seek(f.offset)
            fh.write(bytes([b[0] ^ 1]))
    dist.barrier()
    try:
        ck.load()
    except CorruptCheckpointError as e:
        return {"both": isinstance(e, DistributedError), "exit_code": e.exit_code, "msg": str(e)}
    return {"both": None}
