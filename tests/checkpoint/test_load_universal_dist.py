"""Loading a universal checkpoint onto another layout and another number of ranks (issue 5, stage b):
DTensor tensor parallelism and FSDP2, 4 ranks onto 2 and 3 and back; every parameter and optimizer
state bit-exact against the gathered source, and training continues."""

from __future__ import annotations

import pytest
import torch

from tests.checkpoint import universal_workloads as w
from ucp.convert import convert

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def saved(worlds, tmp_path_factory):
    """A tp2 x dp2 FSDP2 state trained on 4 ranks, its distributed checkpoint and universal form."""
    root = tmp_path_factory.mktemp("fsdp_tp")
    expected = worlds(4).run(w.train_and_save, "fsdp_tp", str(root / "ckpt"))[0]
    convert(root / "ckpt", root / "universal", fsync=False, workers=2)
    return root, expected


@pytest.mark.parametrize("size, kind", [(2, "fsdp"), (3, "fsdp"), (2, "tp"), (4, "tp"), (4, "fsdp_tp")])
def test_a_universal_checkpoint_loads_onto_any_layout(worlds, saved, size, kind):
    root, expected = saved
    out = worlds(size).run(w.load_and_compare, kind, str(root / "universal"), expected)
    for rank, r in enumerate(out):
        assert r["source"] == "universal" and r["step"] == 3
        assert r["diffs"] == [], f"rank {rank}: differs from the source after load: {r['diffs']}"
        assert r["read"] > 0
    assert len({tuple(r["losses"]) for r in out}) == 1  # every rank agrees on the next losses


def test_training_goes_on_as_from_the_distributed_checkpoint(worlds, saved):
    root, expected = saved
    ref = worlds(4).run(w.resume_reference, "fsdp_tp", str(root / "ckpt"))[0]
    got = worlds(2).run(w.load_and_compare, "fsdp", str(root / "universal"), expected)[0]["losses"]
    assert got == pytest.approx(ref, rel=1e-5)  # other layout, other reduction order: not bit-exact
    assert all(torch.isfinite(torch.tensor(got)))
