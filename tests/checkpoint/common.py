"""What the Checkpointer tests in one process share: a small model with BatchNorm and its
optimizer and scheduler, a stand-in data loader, a training step on the global RNG, and checkpoints
saved for the corruption tests."""

from __future__ import annotations

import copy
import json
import random

import numpy as np
import torch
from torch import nn

import ucp
from ucp import CheckpointOptions
from ucp.storage import directory as store

FAST = CheckpointOptions(fsync=False)


class Net(nn.Module):
    def __init__(self, extra_layer: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 3)
        if extra_layer:
            self.fc3 = nn.Linear(3, 3)

    def forward(self, x):
        x = self.fc2(torch.relu(self.bn(self.fc1(x))))
        return self.fc3(x) if hasattr(self, "fc3") else x


class Loader:
    """A resumable data loader stand-in whose state holds tuples, ints and int-keyed dicts."""

    def __init__(self):
        self.pos = 0
        self.epoch = 0
        self.order = (0, 1, 2)
        self.seen = {}

    def state_dict(self):
        return {"pos": self.pos, "epoch": self.epoch, "order": self.order, "seen": dict(self.seen),
                "window": [(1, "a"), (2, "b")]}

    def load_state_dict(self, sd):
        self.pos, self.epoch, self.order, self.seen = sd["pos"], sd["epoch"], sd["order"], dict(sd["seen"])
        self.window = sd["window"]


def make(opt: str = "adamw", seed: int = 0, lr: float = 1e-2, extra_layer: bool = False):
    torch.manual_seed(seed)
    model = Net(extra_layer)
    if opt == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    elif opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    else:
        optimizer = None
    sched = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5) if optimizer is not None else None
    return model, optimizer, sched


def train_step(model, optimizer, sched) -> float:
    x = torch.randn(8, 6)
    y = torch.randn(8, 3)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    sched.step()
    return loss.item()


def snapshot(model, optimizer, sched, loader=None):
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optim": copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None,
        "sched": copy.deepcopy(sched.state_dict()) if sched is not None else None,
        "loader": copy.deepcopy(loader.state_dict()) if loader is not None else None,
    }


def draw():
    return random.random(), np.random.rand(3).tolist(), torch.rand(4)


def write_signed(mpath, header: dict) -> None:
    """Write an edited manifest header with a valid checksum (a writer that means it)."""
    from ucp.codecs.checksum import crc32c
    from ucp.format.manifest import canonical_json
    from ucp.storage.manifest_io import HEADER_CRC

    header = {k: v for k, v in header.items() if k != HEADER_CRC}
    header[HEADER_CRC] = crc32c(canonical_json(header))
    mpath.write_text(json.dumps(header))


def as_format_1_2(path) -> None:
    """Rewrite the checkpoint in ``path`` as format 1.2 wrote it (a Parquet fragment table; every file,
    its header checksum and every rank's state in the header), which readers still read."""
    import dataclasses

    from ucp.codecs.checksum import crc32c
    from ucp.format.fragment import fragments_to_parquet
    from ucp.storage import directory as store
    from ucp.storage.manifest_io import read_manifest

    m = dataclasses.replace(read_manifest(path), format_version="1.2")
    table = fragments_to_parquet(m.fragments)
    (path / store.FRAGMENT_TABLE).write_bytes(table)
    for name in (store.FRAGMENT_PAGES, store.STATE_PAGES):
        (path / name).unlink()
    write_signed(path / store.MANIFEST, m.header({"file": store.FRAGMENT_TABLE, "crc32c": crc32c(table),
                                                  "rows": len(m.fragments)}))


def saved_checkpoint(root, **save_kwargs):
    """A trained model saved at step 5 under ``root``: (checkpoint dir, model, optimizer, scheduler)."""
    model, opt, sched = make()
    for _ in range(3):
        train_step(model, opt, sched)
    ucp.Checkpointer(root, model=model, optimizer=opt, scheduler=sched, options=FAST).save(5, **save_kwargs)
    return store.step_dir(root, 5), model, opt, sched


def fresh_checkpointer(root, **kw):
    model, opt, sched = make(seed=123)
    return ucp.Checkpointer(root, model=model, optimizer=opt, scheduler=sched, options=FAST, **kw), model
