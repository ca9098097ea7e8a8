"""Checkpoints written by other systems, described as ucp manifests so that ``ucp convert`` takes
them in (issue 8): Hugging Face safetensors (:mod:`ucp.convert.foreign.hf`), PyTorch DCP
(:mod:`ucp.convert.foreign.dcp`), DeepSpeed ZeRO (:mod:`ucp.convert.foreign.deepspeed`)."""

from __future__ import annotations

#: ``ucp convert --from`` choices: the source formats ``convert`` reads.
SOURCES = ("ucp", "hf", "dcp", "deepspeed")
