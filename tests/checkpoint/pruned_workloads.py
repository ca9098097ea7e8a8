"""Workloads of tests/checkpoint/test_pruned_while_read.py run on every rank of a gloo world."""

from __future__ import annotations

import os

import torch.distributed as dist

from tests.helpers import bit_diffs, build_mlp, full_state, mlp_step


def load_newest_pruned_on_one_rank(root: str, aside: str) -> tuple:
    """Save steps 4 and 5 (5 held aside), then load the newest while rank 1 alone sees step 4 pruned
    (step 5 put in place, step 4 deleted manifest first) just before it opens its files. Every rank
    must start over together and load step 5 bit-exactly. Returns (step loaded, differences)."""
    import ucp
    import ucp.checkpoint.load as load_module
    from ucp.checkpoint.readers import FragmentReader
    from ucp.storage import directory as store

    model, opt = build_mlp("tp", seed=0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt)
    for step in (4, 5):
        mlp_step(model, opt, step)
        ck.save(step)
    want = full_state(model, opt)
    dist.barrier()
    if dist.get_rank() == 0:
        os.rename(store.step_dir(root, 5), aside)
    dist.barrier()
    pruned = []

    class Pruned(FragmentReader):
        def __init__(self, directory, manifest=None, **kwargs):
            if dist.get_rank() == 1 and not pruned:
                pruned.append(directory)
                os.rename(aside, store.step_dir(root, 5))  # another job's save of step 5, then its keep=1
                store.remove_checkpoint(store.step_dir(root, 4))
            super().__init__(directory, manifest, **kwargs)

    fresh, fresh_opt = build_mlp("tp", seed=1)
    real = load_module.FragmentReader
    load_module.FragmentReader = Pruned
    try:
        result = ucp.Checkpointer(root, model=fresh, optimizer=fresh_opt).load()
    finally:
        load_module.FragmentReader = real
    return result.step, bit_diffs(full_state(fresh, fresh_opt), want)
