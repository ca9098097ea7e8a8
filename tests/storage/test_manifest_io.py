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
