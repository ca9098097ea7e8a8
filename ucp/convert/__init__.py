"""Offline conversion: a distributed (or foreign) checkpoint into the universal format, and a
universal checkpoint out as Hugging Face-style safetensors. Never reaches into the memory tier."""

from ucp.convert.export import export
from ucp.convert.universal import ConvertResult, convert

__all__ = ["convert", "ConvertResult", "export"]
