"""The data model shared by every layer: pure data, no I/O, no torch.distributed."""

from ucp.format.box import Box, FlatRange
from ucp.format.fragment import Fragment
from ucp.format.keys import extra_key, model_key, optim_key, parse_key
from ucp.format.layout import ZERO_MODES, Layout
from ucp.format.manifest import FORMAT_VERSION, Manifest, TensorMeta
from ucp.format.pattern import REPLICATED, Fused, Pad, Pattern, Shard, local_box

__all__ = [
    "Box", "FlatRange", "Fragment", "Layout", "ZERO_MODES", "Manifest", "TensorMeta", "FORMAT_VERSION",
    "Pattern", "Shard", "Fused", "Pad", "REPLICATED", "local_box",
    "model_key", "optim_key", "extra_key", "parse_key",
]
