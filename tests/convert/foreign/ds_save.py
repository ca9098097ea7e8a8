"""A real DeepSpeed ZeRO save for the import tests, run under torchrun on CPU (DS_ACCELERATOR=cpu, gloo):

    torchrun --nproc-per-node 2 tests/convert/foreign/ds_save.py STAGE OUT [bf16] [frozen]

Trains a small MLP two steps with DeepSpeed's AdamW, saves with ``engine.save_checkpoint(OUT)``, and
writes ``OUT/expected.safetensors`` (rank 0): every parameter's module weight and, through
DeepSpeed's own ``safe_get_full_*`` accessors, its fp32 master and Adam moments, whole.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    bf16, frozen = "bf16" in sys.argv[3:], "frozen" in sys.argv[3:]
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    # odd sizes: the flat partitions split parameters mid-way and the last one is padded
    model = torch.nn.Sequential(torch.nn.Linear(7, 11), torch.nn.ReLU(), torch.nn.Linear(11, 5))
    if frozen:  # (fine-tuning: the first layer is not trained; ZeRO-3 keeps its partitions in the model files)
        model[0].requires_grad_(False)
    cfg = {"train_batch_size": 4 * dist.get_world_size(), "train_micro_batch_size_per_gpu": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
           "zero_optimization": {"stage": stage}, "steps_per_print": 10**6}
    if bf16:  # (stage 0: DeepSpeed's BF16_Optimizer, which partitions like ZeRO-1 and names its files bf16_*)
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=cfg)
    for s in range(2):
        x = torch.randn(4, 7, generator=torch.Generator().manual_seed(100 + 10 * s + dist.get_rank()))
        x = x.to(torch.bfloat16) if bf16 else x
        engine.backward(engine(x).float().pow(2).mean())
        engine.step()
    engine.save_checkpoint(out)
    expected = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:  # a frozen parameter: its weight only (ZeRO-3: gathered from its partitions)
            with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
                expected[f"model/{name}"] = p.detach().clone()
            continue
        # (ZeRO-3 partitions the module's own parameters: in fp32 training the weight is the master)
        expected[f"model/{name}"] = (safe_get_full_fp32_param(p) if stage == 3 else p.detach()).clone()
        expected[f"optim/{name}/master"] = safe_get_full_fp32_param(p).clone()
        for state in ("exp_avg", "exp_avg_sq"):
            expected[f"optim/{name}/{state}"] = safe_get_full_optimizer_state(p, state).clone()
    if dist.get_rank() == 0:
        from safetensors.torch import save_file

        save_file(expected, os.path.join(out, "expected.safetensors"))
    dist.barrier()


if __name__ == "__main__":
    main()
    # Everything is written and closed. Leave without running C++ static destructors: one of
    # DeepSpeed's background threads, still joinable then, can abort the process ("terminate called
    # without an active exception") after a successful save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
