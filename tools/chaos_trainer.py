#!/usr/bin/env python
"""One trainer rank of ``tools/chaos.py``: the reference GPT on FSDP2 over the ranks of the nodes still
alive, with a snapshot after every step, reporting to the harness's store.

The harness owns the rendezvous store (a ``TCPStore`` on 127.0.0.1), so the job can re-form after
any node dies, node 0 included. Attempt ``a`` joins the process group under the store prefix
``attempt<a>`` and reports under ``attempt<a>/chaos`` (rank 0 unless said otherwise):

* ``restored``: ``{"step", "source", "digest", "t"}`` after ``Checkpointer.load()``; ``source`` is
  ``"memory"``, ``"durable"`` or ``"none"`` (nothing to restore: training starts at step 1, the
  digest is null);
* ``step/<s>``: ``{"t", "dt", "check", "digest", "loss"}`` once step ``s`` is trained and handed to
  ``save(s)``: ``t`` the wall-clock time then, ``dt`` the step's time (batch, forward, backward,
  optimizer step, ``save``, and the wait of ``--step-seconds``), ``check`` the time of the harness's
  checks after it (the global loss, the digest), ``digest`` the digest of the state ``save(s)``
  snapshots; then ``progress`` = ``s``;
* ``held/<rank>`` (every rank): the rank reached the hold step (``--hold``) and waits there to be
  killed: the harness kills nodes at step boundaries (the snapshot of the hold step finishes in the
  background meanwhile).

The digest is layout-independent: sha256 over every parameter and AdamW state tensor taken whole
(the FSDP2 shards of the ranks concatenated in mesh order, i.e. ``DTensor.full_tensor()``), in sorted
key order, each with its key, dtype and shape, then the step. So the state restored on 3 nodes
compares bit-exactly with the one recorded on 4 nodes before the failure. One ``gather_object`` per
step (not one all-gather per tensor) keeps it cheap.

The global batch is ``world size x --rows-per-rank`` sequences, so any number of surviving ranks
divides it.

    RANK=.. WORLD_SIZE=.. LOCAL_RANK=.. python tools/chaos_trainer.py --store-port P --attempt A
        --node N --job JOB --root DIR --steps S [--hold STEP] ...
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="chaos_trainer.py", description="One trainer rank of tools/chaos.py.")
    p.add_argument("--store-host", default="127.0.0.1")
    p.add_argument("--store-port", type=int, required=True)
    p.add_argument("--attempt", type=int, required=True)
    p.add_argument("--node", type=int, required=True, help="this rank's node id (the harness's numbering)")
    p.add_argument("--job", required=True, help="the node's job name: which snapshot agent is the node's")
    p.add_argument("--root", required=True, help="the durable checkpoint root, shared by every node")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--persist-every", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--parity", type=int, default=1)
    p.add_argument("--rows-per-rank", type=int, default=2)
    p.add_argument("--hold", type=int, default=0, help="stop after this step (snapshot handed over) and wait to be killed")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds for gloo collectives, the agent's requests and its durable writes")
    p.add_argument("--hold-timeout", type=float, default=300.0, help="seconds to wait at --hold before giving up")
    p.add_argument("--inprocess", action="store_true",
                   help="recover in-process (ucp.run_in_process) instead of exiting: --hold is then a list of steps, "
                        "after each of which the rank waits for the harness's release/<step> and trains on")
    p.add_argument("--holds", default="", help="with --inprocess: the steps to hold at, comma-separated")
    p.add_argument("--detect-timeout", type=float, default=10.0,
                   help="with --inprocess: the process group's timeout (bounds hang detection)")
    p.add_argument("--heartbeat", type=float, default=0.2, help="with --inprocess: seconds between heartbeats")
    p.add_argument("--dead-after", type=float, default=2.0,
                   help="with --inprocess: seconds without a heartbeat after which a rank that did not rejoin is lost")
    p.add_argument("--step-seconds", type=float, default=0.0,
                   help="emulated step time: each step sleeps until it took at least this long")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="with --inprocess: run_in_process(probe=False) (no liveness ports)")
    return p.parse_args(argv)


def config(world: int, rows_per_rank: int):
    """The reference GPT, small: two layers of width 64, a vocabulary of 61, sequences of 16."""
    from ucp.trainer.model import GPTConfig

    return GPTConfig(vocab=61, seq=16, d_model=64, n_heads=4, n_layers=2, global_batch=world * rows_per_rank)


def state_tensors(model, opt) -> dict:
    """Every parameter and optimizer state tensor by key: ``model/<fqn>``, ``optim/<fqn>/<name>``."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {f"model/{n}": p for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{names[id(p)]}/{k}"] = v
    return out


def _sharded_dim0(t) -> bool:
    """A DTensor sharded on dim 0 over a 1-D mesh (FSDP2): its whole is its shards concatenated."""
    from torch.distributed.tensor import DTensor, Shard

    return isinstance(t, DTensor) and t.device_mesh.ndim == 1 and tuple(t.placements) == (Shard(0),)


def digest(model, opt, step: int) -> str | None:
    """The layout-independent sha256 of the whole state at ``step`` (a collective; rank 0 gets it)."""
    from torch.distributed.tensor import DTensor

    tensors = state_tensors(model, opt)
    local, whole = {}, {}
    for key in sorted(tensors):
        t = tensors[key].detach()
        if _sharded_dim0(t):
            local[key] = t.to_local().cpu()
        elif isinstance(t, DTensor):
            whole[key] = t.full_tensor().cpu()  # (collective, in the same key order on every rank)
        else:
            whole[key] = t.cpu()  # the same on every rank (AdamW's step count)
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, gathered, dst=0)
    if dist.get_rank() != 0:
        return None
    h = hashlib.sha256()
    for key in sorted(tensors):
        if key in local:
            order = tensors[key].device_mesh.mesh.flatten().tolist()
            t = torch.cat([gathered[r][key] for r in order], 0)
        else:
            t = whole[key]
        t = t.contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(f"step={step}".encode())
    return h.hexdigest()


FALLBACK_STATUS = 3  # the exit status of a rank whose in-process recovery fell back to a relaunch


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=args.timeout)
    base = dist.TCPStore(args.store_host, args.store_port, is_master=False, timeout=timeout)
    if args.inprocess:
        return main_inprocess(args, rank, world, base)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{args.attempt}", base), rank=rank,
                            world_size=world, timeout=timeout)
    report = dist.PrefixStore(f"attempt{args.attempt}/chaos", base)
    try:
        train(args, rank, world, report)
        dist.barrier()  # no rank tears down while a peer's collectives are in flight
    finally:
        dist.destroy_process_group()
    # as ucp.trainer.train: torch + FSDP2 on gloo may abort in the interpreter's teardown; all is done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main_inprocess(args, rank: int, world: int, base) -> int:
    """The rank under ``ucp.run_in_process``: a lost node makes the survivors recover in this
    process. Records go under ``g<generation>/`` of the attempt's report (``restored`` with the
    recovery's phases, ``step/<s>``), holds under ``held/<member>/<step>``."""
    import ucp
    from ucp.errors import RecoveryFallbackError
    from ucp.trainer.layouts import TrainLayout
    from ucp.trainer.train import build as build_gpt
    # what build imports on first use, imported before the job (docs/recovery.md): the recovery's
    # collection then does not scan these modules' objects
    import torch.distributed.device_mesh  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    report = dist.PrefixStore(f"attempt{args.attempt}/chaos", base)
    holds = {int(s) for s in args.holds.split(",") if s}

    def build(w):
        cfg = config(w.world_size, args.rows_per_rank)
        lay = TrainLayout(dp=w.world_size, zero=3)
        par, opt = build_gpt(cfg, lay, args.seed)
        ck = ucp.Checkpointer(
            args.root, model=par.model, optimizer=opt, options=lay.checkpoint_options(cfg),
            snapshot=ucp.SnapshotOptions(every=1, persist_every=args.persist_every, job=args.job,
                                         timeout=args.timeout, persist_timeout=args.timeout),
            redundancy=ucp.RedundancyOptions(group=args.group, parity=args.parity))
        ck.trainer = (cfg, lay, par)  # (held by the Checkpointer only: freed with it when the generation breaks)
        return ck

    def train_loop(ck, res, w):
        cfg, lay, par = ck.trainer
        g = dist.PrefixStore(f"g{w.generation}", report)
        restored = res.step if res is not None else 0
        t0 = time.perf_counter()
        d = digest(par.model, ck.optimizer, restored) if res is not None else None
        if w.rank == 0:  # (the digest is the harness's check: its time, "check", is not the recovery's)
            g.set("restored", json.dumps({"step": restored, "source": res.source if res is not None else "none",
                                          "digest": d, "t": time.time(), "check": time.perf_counter() - t0,
                                          "phases": w.phases, "lost": list(w.lost),
                                          "members": list(w.members)}))
            report.set("generation", str(w.generation))
        print(f"[chaos node {args.node} member {w.member} rank {w.rank}/{w.world_size}] generation {w.generation}: "
              f"restored step {restored} from {res.source if res is not None else 'nothing'}", file=sys.stderr,
              flush=True)
        loop(args, cfg, lay, par, ck.optimizer, ck, restored, g, w.rank,
             lambda step: hold_inprocess(args, report, w.member, step) if step in holds else None)
        ck.wait()

    try:
        ucp.run_in_process(build, train_loop, store=base, member=rank, world_size=world, timeout=args.detect_timeout,
                           heartbeat=args.heartbeat, dead_after=args.dead_after, namespace=f"attempt{args.attempt}",
                           probe=args.probe)
    except RecoveryFallbackError as e:
        print(f"[chaos node {args.node} member {rank}] in-process recovery fell back to a relaunch: {e}",
              file=sys.stderr, flush=True)
        sys.stderr.flush()
        os._exit(FALLBACK_STATUS)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def hold_inprocess(args, report, member: int, step: int) -> None:
    """Wait at ``step`` until the harness has killed (or stopped) the nodes it fails there and
    says ``release/<step>``."""
    report.set(f"held/{member}/{step}", "1")
    deadline = time.monotonic() + args.hold_timeout
    while not report.check([f"release/{step}"]):
        if time.monotonic() > deadline:
            raise SystemExit(f"chaos_trainer: held at step {step} for {args.hold_timeout:g} s and nobody released me")
        time.sleep(0.002)


def loop(args, cfg, lay, par, opt, ck, restored: int, report, rank: int, after_step) -> None:
    """Train steps ``restored + 1 .. --steps``, a snapshot after each, with a record per step on
    ``report`` (rank 0); ``after_step(step)`` runs once a step is recorded."""
    from ucp.trainer.model import batch, loss_fn

    world = dist.get_world_size()
    rows = cfg.global_batch // lay.dp
    for step in range(restored + 1, args.steps + 1):
        t0 = time.perf_counter()
        x, y = batch(cfg, args.seed, step)
        lo = par.dp_rank * rows
        loss = loss_fn(par.module(x[lo:lo + rows]), y[lo:lo + rows])
        loss.backward()
        opt.step()
        opt.zero_grad()
        ck.save(step)
        if args.step_seconds:
            time.sleep(max(0.0, args.step_seconds - (time.perf_counter() - t0)))
        t1 = time.perf_counter()
        dt, done = t1 - t0, time.time()
        total = loss.detach().clone()
        dist.all_reduce(total)
        d = digest(par.model, opt, step)  # the state save(step) snapshots: nothing changed it since
        if rank == 0:  # (the loss and the digest are the harness's checks, not training: timed apart)
            report.set(f"step/{step}", json.dumps({"t": done, "dt": dt, "check": time.perf_counter() - t1,
                                                   "digest": d, "loss": total.item() / world}))
            report.set("progress", str(step))
        after_step(step)


def train(args, rank: int, world: int, report) -> None:
    import ucp
    from ucp.trainer.layouts import TrainLayout
    from ucp.trainer.train import build

    cfg = config(world, args.rows_per_rank)
    lay = TrainLayout(dp=world, zero=3)
    par, opt = build(cfg, lay, args.seed)
    ck = ucp.Checkpointer(
        args.root, model=par.model, optimizer=opt, options=lay.checkpoint_options(cfg),
        snapshot=ucp.SnapshotOptions(every=1, persist_every=args.persist_every, job=args.job, timeout=args.timeout,
                                     persist_timeout=args.timeout),
        redundancy=ucp.RedundancyOptions(group=args.group, parity=args.parity))
    res = ck.load()
    restored = res.step if res is not None else 0
    t0 = time.perf_counter()
    d = digest(par.model, opt, restored) if res is not None else None
    if rank == 0:  # (the digest is the harness's check: its time, "check", is not the recovery's)
        report.set("restored", json.dumps({"step": restored, "source": res.source if res is not None else "none",
                                           "digest": d, "t": time.time(), "check": time.perf_counter() - t0}))
    print(f"[chaos node {args.node} rank {rank}/{world}] attempt {args.attempt}: restored step {restored} "
          f"from {res.source if res is not None else 'nothing'}", file=sys.stderr, flush=True)
    loop(args, cfg, lay, par, opt, ck, restored, report, rank, lambda step: hold(args, report, rank, step))
    ck.wait()
    ck.close()


def hold(args, report, rank: int, step: int) -> None:
    """At ``--hold``: say so and wait to be killed (the relaunch path)."""
    if step != args.hold:
        return
    report.set(f"held/{rank}", str(step))
    deadline = time.monotonic() + args.hold_timeout
    while time.monotonic() < deadline:  # the harness kills this process here
        time.sleep(0.05)
    raise SystemExit(f"chaos_trainer: held at step {step} for {args.hold_timeout:g} s and nobody killed me")


if __name__ == "__main__":
    sys.exit(main())
