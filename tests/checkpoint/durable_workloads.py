"""Rank functions of the durable distributed checkpoint tests (module level, so they pickle by reference)."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from tests.helpers import MLP, bit_diffs, build_mlp, flip_byte, full_state, mlp_step


def save_and_resume(kind: str, root: str, before: int = 3, after: int = 3) -> dict:
    """Train, save, train on; then a fresh model and optimizer load and train the same steps."""
    import ucp

    model, opt = build_mlp(kind, seed=0)
    for s in range(before):
        mlp_step(model, opt, s)
    res = ucp.Checkpointer(root, model=model, optimizer=opt).save(before)
    saved = full_state(model, opt)
    ref = [mlp_step(model, opt, s) for s in range(before, before + after)]

    model2, opt2 = build_mlp(kind, seed=1)  # different init, optimizer never stepped
    loaded = ucp.Checkpointer(root, model=model2, optimizer=opt2).load()
    diffs = bit_diffs(saved, full_state(model2, opt2))
    got = [mlp_step(model2, opt2, s) for s in range(before, before + after)]
    return {"step": loaded.step, "source": loaded.source, "diffs": diffs, "ref": ref, "got": got,
            "layout": str(ucp.Checkpointer(root, model=model2).layout), "nbytes": res.nbytes, "read": loaded.nbytes}


def save_diverged(root: str, bad_rank: int) -> str:
    """Perturb a replicated tensor on one rank; the save must refuse and name that rank."""
    import ucp
    from ucp.errors import DistributedError

    model, opt = build_mlp("tp", seed=0)
    mlp_step(model, opt, 0)
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
    import ucp.storage.rank_files as rank_files  # what writes a rank's file, for a save and the agents

    model, opt = build_mlp("tp", seed=0)
    mlp_step(model, opt, 0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt)
    ck.save(1)
    mlp_step(model, opt, 1)
    if dist.get_rank() == victim:
        real = rank_files.write_file

        def half_then_die(path, entries, *a, **k):
            with open(path, "wb") as f:
                f.write(b"\0" * 100)
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
            return real(path, entries, *a, **k)

        rank_files.write_file = half_then_die
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
        mlp_step(model, opt, s)
    ucp.Checkpointer(root, model=model, optimizer=opt).save(before)
    saved = {**full_state(model, opt), **local(opt)}
    ref = [mlp_step(model, opt, s) for s in range(before, before + after)]
    model2, opt2 = make(1)
    ucp.Checkpointer(root, model=model2, optimizer=opt2).load()
    diffs = bit_diffs(saved, {**full_state(model2, opt2), **local(opt2)})
    got = [mlp_step(model2, opt2, s) for s in range(before, before + after)]
    return {"diffs": diffs, "ref": ref, "got": got}


def save_disagreeing_steps(root: str) -> str:
    """Step 1 is saved; then rank 0 saves step 3 while the others save step 1 again."""
    import ucp
    from ucp.errors import DistributedError

    model, opt = build_mlp("fsdp", seed=0)
    mlp_step(model, opt, 0)
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

    model, opt = build_mlp("tp", seed=0)
    mlp_step(model, opt, 0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt)
    res = ck.save(1)
    if dist.get_rank() == 0:
        f = max(read_manifest(res.path).fragments, key=lambda f: f.length)
        flip_byte(res.path / f.file, f.offset, 1)
    dist.barrier()
    try:
        ck.load()
    except CorruptCheckpointError as e:
        return {"both": isinstance(e, DistributedError), "exit_code": e.exit_code, "msg": str(e)}
    return {"both": None}


def save_with_a_reused_plan(root: str, bad_rank: int) -> dict:
    """Three saves of one Checkpointer: the plan is made for the first and reused by the second;
    before the third, rank ``bad_rank`` perturbs a replicated tensor: the reused plan still compares
    the replicas and refuses. Returns the plans made here and the third save's error."""
    import ucp
    import ucp.checkpoint.save as save_mod
    from ucp.errors import DistributedError

    made = []
    real = save_mod.plan_save
    save_mod.plan_save = lambda *a, **k: made.append(1) or real(*a, **k)
    try:
        model, opt = build_mlp("tp", seed=0)
        mlp_step(model, opt, 0)
        ck = ucp.Checkpointer(root, model=model, optimizer=opt)
        ck.save(1)
        mlp_step(model, opt, 1)
        ck.save(2)
        saved = full_state(model, opt)
        if dist.get_rank() == bad_rank:
            with torch.no_grad():
                model.norm.weight.add_(1e-3)
        try:
            ck.save(3)
            error = "no error"
        except DistributedError as e:
            error = str(e)
        model2, opt2 = build_mlp("tp", seed=1)
        loaded = ucp.Checkpointer(root, model=model2, optimizer=opt2).load()
        return {"made": len(made), "error": error, "loaded": loaded.step, "diffs": bit_diffs(saved, full_state(model2, opt2))}
    finally:
        save_mod.plan_save = real
