"""The trainer's command-line options, without importing torch (``ucp --help`` stays instant)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of one trainer rank (shared by ``ucp train`` and ``python -m ucp.trainer.train``)."""
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (DTensor), default 1")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages, default 1")
    p.add_argument("--dp", type=int, default=None, help="data-parallel size, default: ranks / (tp x pp)")
    p.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3),
                   help="data-parallel sharding: 0 DDP, 2 FSDP2 keeping parameters gathered after forward, 3 FSDP2")
    p.add_argument("--manual-tp", action="store_true",
                   help="Megatron-style tensor parallelism by hand: fused QKV, padded vocabulary, bf16 parameters "
                        "with fp32 masters (needs --zero 1)")
    p.add_argument("--moe", type=int, default=0, metavar="E",
                   help="make each block's MLP a top-2 mixture of E experts (softmax router, the two largest gates "
                        "renormalized, no token dropped); default 0: a dense MLP")
    p.add_argument("--ep", type=int, default=None, metavar="N",
                   help="with --moe: expert-parallel size, dividing E and the data-parallel size; each group of N "
                        "consecutive ranks holds every expert once, as experts.{j} with a local index j (global "
                        "expert rank_in_group x E/N + j), the rest replicated; default 1. Checkpoints name experts "
                        "globally (a UCL expert() rule), so they resume at any --ep dividing E. With --zero 0, 2 or "
                        "3; not with --tp, --pp or --zero 1 yet")
    p.add_argument("--steps", type=int, default=20, help="train until this step, default 20")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps into --ckpt (0: never)")
    p.add_argument("--ckpt", default=None, help="checkpoint root to save into")
    p.add_argument("--keep", type=int, default=None, help="keep the newest N checkpoints (default: all)")
    p.add_argument("--resume", default=None, metavar="CKPT", help="load this checkpoint (a root: its newest) first")
    p.add_argument("--seed", type=int, default=0, help="initialization and data seed, default 0")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate, default 3e-3")
    return p


def forward_argv(args) -> list[str]:
    """``args`` (parsed by :func:`add_arguments`) back as a command line for each rank."""
    out = []
    for name in ("tp", "pp", "dp", "zero", "moe", "ep", "steps", "save_every", "ckpt", "keep", "resume", "seed", "lr"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name.replace('_', '-')}", str(value)]
    return out + (["--manual-tp"] if args.manual_tp else [])
