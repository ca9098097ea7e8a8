"""A job under ``ucp.run_in_process`` with its default store (torchrun's), for test_inprocess.py:

    torchrun --standalone --nproc-per-node 2 tests/checkpoint/inprocess_job.py ROOT JOB

Each rank writes ``rank R/W generation G agent-store S`` to ``ROOT/said-R`` once it has trained and snapshot two
steps (a file per rank: the ranks share torchrun's stdout, where two lines can run together)."""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ucp  # noqa: E402
from tests.helpers import tiny_model, train_step  # noqa: E402


def main(root: str, job: str) -> int:
    def build(world):
        model, opt = tiny_model()
        return ucp.Checkpointer(root, model=model, optimizer=opt,
                                snapshot=ucp.SnapshotOptions(job=job, persist_every=None))

    def train(ckpt, restored, world):
        for step in (1, 2):
            train_step(ckpt.model, ckpt.optimizer, step)
            total = torch.ones(1)
            dist.all_reduce(total)
            assert total.item() == world.world_size
            ckpt.save(step)
        ckpt.wait()
        Path(root, f"said-{world.rank}").write_text(
            f"rank {world.rank}/{world.world_size} generation {world.generation} "
            f"agent-store {os.environ.get('TORCHELASTIC_USE_AGENT_STORE')}")
        return 0

    return ucp.run_in_process(build, train, timeout=20)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
