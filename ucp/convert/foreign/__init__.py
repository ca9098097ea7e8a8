"""Checkpoints written by other systems, described as ucp manifests so that ``ucp convert`` takes
them in (issue 8): Hugging Face safetensors (:mod:`ucp.convert.foreign.hf`), PyTorch DCP
(:mod:`ucp.convert.foreign.dcp`), DeepSpeed ZeRO (:mod:`ucp.convert.foreign.deepspeed`). Each importer
is registered here by its ``--from`` name and returns one
:class:`~ucp.convert.foreign.source.SourceRecord`."""

from __future__ import annotations

from ucp.convert.foreign.dcp import dcp_source
from ucp.convert.foreign.deepspeed import deepspeed_source
from ucp.convert.foreign.hf import hf_source

#: ``--from`` name -> importer ``(src, step, spec, settings) -> SourceRecord``
IMPORTERS = {"hf": hf_source, "dcp": dcp_source, "deepspeed": deepspeed_source}

#: ``ucp convert --from`` choices: ucp's own checkpoints, then the importers'.
SOURCES = ("ucp", *IMPORTERS)
