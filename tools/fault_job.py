#!/usr/bin/env python
"""The small training script ``tools/faults.py`` runs as a user would: a tiny MLP with AdamW on a
gloo world of ``WORLD_SIZE`` local ranks (or one process), saved and loaded with ``ucp.Checkpointer``.

Two commands, each printing one JSON line per event on stdout (rank 0 only):

* ``run ROOT --actions A,B,...``: the actions in order, each ``load`` (newest), ``load:STEP``,
  ``save:STEP`` (train one step, then save it) or ``sleep:SECONDS``. An event is
  ``{"action", "ok", "step", "digest", "error", "kind", "t"}``: ``t`` when it ended (a save also has
``t0``, when ``save`` was called), ``digest`` the sha256 of every saved tensor
  (model and optimizer, by key, bit-exact), ``error`` the first line of a failure and ``lines`` how
  many lines it had, ``kind`` ``"ucp"`` for a :class:`ucp.errors.UcpError` and the class name of
  anything else (then the traceback goes to stderr). A failed save does not end the run unless
  ``--stop-on-error``.
* ``load PATH [PATH ...]``: in one process, load each checkpoint (a ``ROOT``, ``ROOT@STEP`` or a
  universal directory) into a fresh model and report its event; one process for many checks keeps
  torch's import out of every trial.

``--size N`` sets the hidden width (the state grows with it), ``--seed`` the model and data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse(argv=None):
    p = argparse.ArgumentParser(prog="fault_job.py")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("root")
    r.add_argument("--actions", required=True)
    r.add_argument("--keep", type=int, default=None)
    r.add_argument("--stop-on-error", action="store_true")
    ld = sub.add_parser("load")
    ld.add_argument("paths", nargs="+")
    for q in (r, ld):
        q.add_argument("--size", type=int, default=16)
        q.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build(size: int, seed: int):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, size), torch.nn.ReLU(), torch.nn.Linear(size, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train_step(model, opt, seed: int, step: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed * 100003 + step)
    x = torch.randn(4, 8, generator=g)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def digest(model, opt) -> str:
    """sha256 over every parameter and optimizer state tensor, by name, with dtype and shape."""
    import torch

    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model/{n}": t for n, t in model.state_dict().items()}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{names[id(p)]}/{k}"] = v
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def arm_kill_point() -> None:
    """``FAULT_KILL=NAME:N`` (``NAME`` an ``os`` function such as ``replace``, ``fsync``, ``write``):
    this process SIGKILLs itself at the N-th call of ``os.NAME`` once the save of step
    ``FAULT_KILL_STEP`` has begun (a fixed kill point inside a save)."""
    spec = os.environ.get("FAULT_KILL")
    if not spec:
        return
    import signal

    name, _, n = spec.partition(":")
    real = getattr(os, name)
    calls = [0]

    def wrapped(*a, **kw):
        if ARMED[0]:
            calls[0] += 1
            if calls[0] >= int(n or 1):
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)

    setattr(os, name, wrapped)


ARMED = [False]


def failure(e: BaseException) -> dict:
    from ucp.errors import UcpError

    text = str(e)
    lines = text.splitlines() or [""]
    kind = "ucp" if isinstance(e, UcpError) else type(e).__name__
    if kind != "ucp":
        traceback.print_exc()
    return {"ok": False, "error": lines[0][:400], "lines": len(lines), "kind": kind, "cls": type(e).__name__}


def emit(event: dict, rank: int = 0) -> None:
    if rank == 0:
        print(json.dumps(event), flush=True)


def run(args) -> None:
    import torch
    import torch.distributed as dist

    import ucp

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model, opt = build(args.size, args.seed)
    arm_kill_point()
    ck = ucp.Checkpointer(args.root, model=model, optimizer=opt, keep=args.keep)
    try:
        for action in args.actions.split(","):
            name, _, arg = action.partition(":")
            ev = {"action": action}
            try:
                if name == "sleep":
                    time.sleep(float(arg))
                    continue
                if name == "load":
                    res = ck.load(int(arg) if arg else None)
                    ev.update(ok=True, step=None if res is None else res.step, digest=digest(model, opt))
                elif name == "save":
                    train_step(model, opt, args.seed, int(arg))
                    ev["digest"] = digest(model, opt)
                    emit({"action": action, "begin": True, "digest": ev["digest"]}, rank)
                    ARMED[0] = str(arg) == os.environ.get("FAULT_KILL_STEP")
                    ev["t0"] = time.time()
                    ck.save(int(arg))
                    ARMED[0] = False
                    ev.update(ok=True, step=int(arg))
                else:
                    raise SystemExit(f"fault_job.py: unknown action {action!r}")
            except Exception as e:  # noqa: BLE001 - reported as an event, judged by the harness
                ev.update(failure(e))
            ev["t"] = time.time()
            emit(ev, rank)
            if not ev["ok"] and args.stop_on_error:
                break
        ck.close()
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def load(args) -> None:
    import torch

    import ucp

    torch.set_num_threads(1)
    for path in args.paths:
        root, at, step = path.rpartition("@") if "@" in path else (path, "", "")
        ev = {"path": path}
        try:
            model, opt = build(args.size, args.seed)
            ck = ucp.Checkpointer(root, model=model, optimizer=opt)
            res = ck.load(int(step) if at else None)
            ev.update(ok=True, step=None if res is None else res.step, digest=digest(model, opt))
            ck.close()
        except Exception as e:  # noqa: BLE001 - reported, judged by the harness
            ev.update(failure(e))
        emit(ev)


def main(argv=None) -> int:
    args = parse(argv)
    (run if args.cmd == "run" else load)(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch + gloo may abort in the interpreter's teardown; everything is reported


if __name__ == "__main__":
    sys.exit(main())
