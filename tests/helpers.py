"""What many tests share: bit-exact comparisons, tiny models with a deterministic training step, and
the small MLP the multi-process tests parallelize.

Comparisons are bit-exact: floats are compared by their bit patterns, so NaN payloads and -0.0
count, and a dtype change is a difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# -- bit-exact comparison ----------------------------------------------------------------------


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (floats by their bit patterns)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().contiguous(), b.detach().contiguous()
    if a.is_floating_point():
        it = INT_OF_SIZE[a.element_size()]
        return torch.equal(a.view(it), b.view(it))
    return torch.equal(a, b)


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    """:func:`bits_equal`, as an assertion that says what differs."""
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), what
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert bits_equal(a, b), f"{what}: the bits differ"


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Two numpy arrays of the same shape, dtype and bytes."""
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def difference(a, b, path: str = "value", *, key_order: bool = True) -> str | None:
    """Where two values differ (None if nowhere): deep and type-exact; tensors and arrays bit-exact;
    NaN equal to NaN. Dicts must list their keys in the same order unless ``key_order=False``."""
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        return None if bits_equal(a, b) else f"{path}: the bits differ"
    if isinstance(a, np.ndarray):
        return None if same_bits(a, b) else f"{path}: the arrays differ"
    if isinstance(a, dict):
        if list(a) != list(b) and (key_order or set(a) != set(b)):
            return f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            if (d := difference(a[k], b[k], f"{path}[{k!r}]", key_order=key_order)) is not None:
                return d
        return None
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            if (d := difference(x, y, f"{path}[{i}]", key_order=key_order)) is not None:
                return d
        return None
    if isinstance(a, float) and math.isnan(a):
        return None if math.isnan(b) else f"{path}: nan != {b!r}"
    return None if a == b else f"{path}: {a!r} != {b!r}"


def same(a, b) -> bool:
    """No :func:`difference` between ``a`` and ``b`` (dict keys in the same order)."""
    return difference(a, b) is None


def assert_same(a, b, path: str = "value") -> None:
    """No :func:`difference` between ``a`` and ``b``, dict keys in any order; the message names where."""
    d = difference(a, b, path, key_order=False)
    assert d is None, d


def bit_diffs(a: dict, b: dict) -> list[str]:
    """The keys of two ``{key: tensor}`` states whose tensors differ in dtype, shape or any bit, or
    that one side lacks."""
    return sorted(set(a) ^ set(b)) + sorted(k for k in set(a) & set(b) if not bits_equal(a[k], b[k]))


def same_state(a: dict, b: dict) -> bool:
    """Two ``{key: tensor}`` states with the same keys and bit-identical tensors."""
    return not bit_diffs(a, b)


def flip_byte(path, offset: int, mask: int = 0x01) -> bytes:
    """XOR the byte at ``offset`` of the file ``path`` (negative: from its end) with ``mask``, in
    place: one corrupted byte. Returns the file's bytes before."""
    data = Path(path).read_bytes()
    changed = bytearray(data)
    changed[offset] ^= mask
    Path(path).write_bytes(bytes(changed))
    return data


# -- a tiny model in one process ---------------------------------------------------------------


def tiny_model(seed: int = 0, sizes: tuple[int, ...] = (32, 200, 3), relu: bool = False, lr: float = 0.01):
    """Linear layers of ``sizes`` (a ReLU between them if ``relu``) initialized from ``seed``, and
    their AdamW."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        if i and relu:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    m = nn.Sequential(*layers)
    return m, torch.optim.AdamW(m.parameters(), lr=lr)


def train_step(model, opt, s: int, batch: int = 4, width: int | None = None) -> float:
    """Step ``s``: the loss ``mean(model(x)**2)`` on a batch drawn from seed ``s`` (the same batch for
    the same ``s``), backward, an optimizer step. ``width`` defaults to the first Linear's input."""
    if width is None:
        width = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    x = torch.randn(batch, width, generator=torch.Generator().manual_seed(s))
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def state_of(model, opt) -> dict:
    """Copies of every parameter, buffer and optimizer state tensor, by ucp-like keys."""
    out = {f"model/{k}": v.clone() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    out.update({f"optim/{names[id(p)]}/{k}": v.clone() for p, st in opt.state.items() for k, v in st.items()})
    return out


# -- the small MLP of the multi-process tests --------------------------------------------------

D, H = 6, 10  # odd sizes: FSDP2 over 4 ranks gets uneven and empty shards


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc1 = nn.Linear(D, H)
        self.fc2 = nn.Linear(H, D)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.norm(x))))


def mlp_optimizer(model):
    """The MLP's AdamW."""
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def build_mlp(kind: str, seed: int):
    """The MLP parallelized as ``kind`` ('tp', 'fsdp', 'fsdp_tp') over the current process group,
    initialized from ``seed``, and its AdamW."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    world = dist.get_world_size()
    torch.manual_seed(seed)
    model = MLP()
    if kind == "tp":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp")) if world > 2 else \
            init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
        tp = mesh["tp"] if world > 2 else mesh
        parallelize_module(model, tp, {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    elif kind == "fsdp":
        fully_shard(model, mesh=init_device_mesh("cpu", (world,), mesh_dim_names=("dp",)))
    elif kind == "fsdp_tp":
        mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model, mesh["tp"], {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
        fully_shard(model, mesh=mesh["dp"])
    else:
        raise ValueError(kind)
    return model, mlp_optimizer(model)


def mlp_step(model, opt, step: int) -> float:
    """Step ``step`` of the MLP (batch 8, seeded by ``1000 + step``; the same on every rank)."""
    return train_step(model, opt, 1000 + step, batch=8, width=D)


def full_state(model, opt) -> dict:
    """Every parameter and optimizer state as full tensors (DTensors gathered), and this rank's flat
    partitions of an optimizer with ``ucp_flat_state`` (as ``flat/<fqn>/<state>@<start>``)."""
    from torch.distributed.tensor import DTensor

    out = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        out[f"model/{n}"] = (p.full_tensor() if isinstance(p, DTensor) else p.detach()).clone()
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim/{names[id(p)]}/{k}"] = (v.full_tensor() if isinstance(v, DTensor) else v).clone()
    for fqn, states in (opt.ucp_flat_state() if hasattr(opt, "ucp_flat_state") else {}).items():
        for k, (t, start) in states.items():  # this rank's flat partitions
            out[f"flat/{fqn}/{k}@{start}"] = t.clone()
    return out


def one_rank_snapshot():
    """A snapshot of one rank holding ``model/w`` (4 float32): its bytes and its slot header."""
    from ucp.codecs.checksum import crc32c
    from ucp.format.layout import Layout

    raw = memoryview(torch.arange(4, dtype=torch.float32).numpy()).cast("B")
    header = {"step": 5, "rank": 0, "world_size": 1, "layout": Layout.single().to_dict(),
              "tensors": {"model/w": {"shape": [4], "dtype": "float32"}}, "state": {}, "created_by": "test",
              "fragments": [{"key": "model/w", "offsets": [0], "sizes": [4], "flat": None, "dtype": "float32",
                             "length": 16, "file": "seg", "offset": 0, "crc32c": crc32c(raw), "blocks": []}]}
    return raw, header


def binomial_fold(values: list, combine):
    """``values`` (one per rank) folded as ``Collective.reduce_phase`` folds them: pairwise up a
    binomial tree, each subtree's fold combined into its parent's (the lower ranks' on the left)."""
    values, step = list(values), 1
    while step < len(values):
        for r in range(0, len(values), 2 * step):
            if r + step < len(values):
                values[r] = combine(values[r], values[r + step])
        step *= 2
    return values[0]
