"""The reference trainer: a small GPT trained under real parallel layouts on CPU (gloo).

It produces checkpoints that look like large-model checkpoints (tensor, pipeline and data
parallel; ZeRO / FSDP sharding) for the tests, the demo and the benchmarks. ``python -m
ucp.trainer.train`` runs one rank under ``torchrun``; ``ucp train --nproc N`` launches N local ranks.
"""
