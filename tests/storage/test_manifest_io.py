"""Reading manifests: a tampered header is a ucp error naming the file, never another exception."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synthetic import write_checkpoint
from ucp.errors import CorruptCheckpointError, FormatError
from ucp.format import Layout, Pattern
from ucp.storage.manifest_io import read_manifest


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path, 3, {"model/w": (np.arange(6, dtype=np.float32), "float32", Pattern())},
                            Layout.single())


@pytest.mark.parametrize("value, error, words", [
    ("12", FormatError, "not an integer"), (True, FormatError, "not an integer"), (None, FormatError, "lacks"),
    (1, CorruptCheckpointError, "checksum mismatch"),
])
def test_a_tampered_header_checksum_is_named(ckpt, value, error, words):
    path = ckpt / "manifest.json"
    doc = json.loads(path.read_text())
    doc["header_crc32c"] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(error, match=words) as e:
        read_manifest(ckpt)
    assert "manifest.json" in str(e.value)


def test_an_intact_manifest_reads(ckpt):
    assert read_manifest(ckpt).step == 3


def test_a_rank_reads_the_pages_of_its_regions_and_its_own_state(tmp_path, monkeypatch):
    """Format 1.3: a query of one tensor's region reads a few pages, not the table; a rank's state
    row and its values, not every rank's."""
    from ucp.format import Box, FlatRange, Shard
    from ucp.format.fragment import RegionQuery
    from ucp.storage import paged
    from ucp.storage.manifest_io import open_manifest

    monkeypatch.setattr(paged, "LEAF_ROWS", 4)
    monkeypatch.setattr(paged, "FANOUT", 4)
    layout = Layout.from_sizes(dp=8, tp=2, zero=1)
    tensors = {f"optim/l{i}.w/exp_avg": (np.arange(64 * 8, dtype=np.float32).reshape(64, 8), "float32",
                                         Pattern((Shard("tp", 0),), flat="dp")) for i in range(12)}
    ranks = {str(r): {"rng": {"seed": r}, "optimizer": {"stage": r % 2}} for r in range(16)}
    ckpt = write_checkpoint(tmp_path, 3, tensors, layout, state={"shared": {"step": 3}, "ranks": ranks})
    whole = read_manifest(ckpt)
    assert len(whole.fragments) == 12 * 16 and whole.state["ranks"] == ranks
    key = "optim/l5.w/exp_avg"
    stored = open_manifest(ckpt)
    header_bytes = stored.nbytes_read
    part = stored.select(RegionQuery({key: [Box((0, 0), (4, 8))]}))  # rows 0-3: dp rank 0's range of tp box 0
    assert [(f.key, f.box, f.flat) for f in part.fragments] == [(key, Box((0, 0), (32, 8)), FlatRange(0, 32))]
    table = (ckpt / "fragments.pages").stat().st_size
    assert stored.nbytes_read - header_bytes < table / 5
    # a region whose pages hold rows of the key, none of them overlapping it: no fragment, no error
    assert stored.select(RegionQuery({key: [Box((64, 0), (0, 8))]})).fragments == ()
    assert set(part.files) == {part.fragments[0].file} and part.file_headers == {
        part.fragments[0].file: whole.file_headers[part.fragments[0].file]}
    before = stored.nbytes_read
    assert stored.rank_state(7) == {"step": 3, "rng": {"seed": 7}, "optimizer": {"stage": 1}}
    assert stored.nbytes_read - before < (ckpt / "states.pages").stat().st_size
    assert stored.states_of("optimizer")["ranks"] == {"0": {"optimizer": {"stage": 0}}, "1": {"optimizer": {"stage": 1}}}
