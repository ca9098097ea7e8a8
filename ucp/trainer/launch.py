"""Launching N local trainer ranks with torch's elastic launcher (what ``torchrun`` runs)."""

from __future__ import annotations

import logging
import os
import socket
import sys

from ucp.errors import OptionsError, UcpError
from ucp.trainer.layouts import TrainLayout
from ucp.trainer.model import GPTConfig
from ucp.trainer.options import forward_argv


def free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def launch(nproc: int, entrypoint, *args, run_id: str = "ucp") -> dict:
    """Run ``entrypoint(*args)`` (a function, or a program path with its arguments) on ``nproc`` local
    ranks over a c10d rendezvous on 127.0.0.1; returns ``{rank: return value}``.

    Raises:
        UcpError: a rank failed (its error is on stderr, printed by that rank).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"{run_id}-{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=free_endpoint(), max_restarts=0,
                          monitor_interval=0.1, start_method="spawn")
    try:
        return elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as e:
        failures = ", ".join(f"rank {r}: {f.message or f'exit code {f.exitcode}'}".strip() for r, f in sorted(e.failures.items()))
        raise UcpError(f"training failed on {len(e.failures)} rank(s) ({failures}); see the log above") from None


def launch_training(args) -> int:
    """``ucp train``: check the layout here (one clear line if it cannot work), then launch."""
    if args.nproc < 1:
        raise OptionsError(f"--nproc {args.nproc}: run at least one process")
    for name in ("tp", "pp", "steps") + (("ep",) if args.ep is not None else ()):
        if getattr(args, name) < 1:
            raise OptionsError(f"--{name} {getattr(args, name)}: use an integer >= 1")
    if args.moe < 0:
        raise OptionsError(f"--moe {args.moe}: use the number of experts (0: a dense MLP)")
    if args.dp is None and args.nproc % (args.tp * args.pp):
        raise OptionsError(f"--nproc {args.nproc} is not a multiple of tp x pp = {args.tp * args.pp}")
    TrainLayout.of(args, args.nproc).check(GPTConfig(experts=args.moe), args.nproc)
    if args.save_every and not args.ckpt:
        raise OptionsError("--save-every needs --ckpt ROOT to save into")
    launch(args.nproc, sys.executable, "-u", "-m", "ucp.trainer.train", *forward_argv(args), run_id="ucp-train")
    return 0
