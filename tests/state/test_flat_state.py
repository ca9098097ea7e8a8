"""Optimizers that keep flat partitions of their parameters (``ucp_flat_state``), in one process."""

from __future__ import annotations

import pytest
import torch

import ucp
from ucp.errors import CaptureError, FormatError
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest


class Flat(torch.optim.SGD):
    """Keeps a 'shadow' of each parameter's elements ``[start, numel)`` as flat state (dp=1 ZeRO)."""

    def __init__(self, model, start=0, start_shift=0, name=None):
        super().__init__(model.parameters(), lr=0.1)
        self.shadow = {}
        for n, p in model.named_parameters():
            self.shadow[name or n] = (p.detach().reshape(-1)[start:].clone() * 3, start + start_shift)

    def ucp_flat_state(self):
        return {n: {"shadow": (t, start)} for n, (t, start) in self.shadow.items()}


def model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 3)


def test_flat_state_round_trips_in_place(tmp_path):
    m = model()
    opt = Flat(m)
    ucp.Checkpointer(tmp_path, model=m, optimizer=opt).save(1)
    saved = {n: t.clone() for n, (t, _) in opt.shadow.items()}
    man = read_manifest(store.resolve(tmp_path))
    (frag,) = man.fragments_of("optim/weight/shadow")
    assert (frag.flat.start, frag.flat.numel, frag.box.sizes) == (0, 12, (3, 4))
    assert man.tensors["optim/weight/shadow"].pattern.flat == "dp"
    m2 = model()
    opt2 = Flat(m2)
    targets = {n: t for n, (t, _) in opt2.shadow.items()}
    for t in targets.values():
        t.zero_()
    ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2).load()
    for n, t in opt2.shadow.items():
        assert t[0].data_ptr() == targets[n].data_ptr()  # filled in place
        assert torch.equal(t[0], saved[n])


def test_flat_state_covering_part_of_a_tensor_is_refused(tmp_path):
    # one rank reporting only the second half: nobody holds the first, so no checkpoint is committed
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 3, bias=False)
    with pytest.raises(FormatError, match="optim/weight/shadow: fragments hold 6 elements, the tensor has 12"):
        ucp.Checkpointer(tmp_path, model=m, optimizer=Flat(m, start=6)).save(1)
    assert store.list_steps(tmp_path) == []


def test_flat_range_past_the_box_is_refused(tmp_path):
    m = model()
    with pytest.raises(CaptureError, match="exceeds the parameter's box"):
        ucp.Checkpointer(tmp_path, model=m, optimizer=Flat(m, start_shift=5)).save(1)


def test_flat_state_of_unknown_parameter_is_refused(tmp_path):
    m = model()
    with pytest.raises(CaptureError, match="does not have"):
        ucp.Checkpointer(tmp_path, model=m, optimizer=Flat(m, name="nope")).save(1)
