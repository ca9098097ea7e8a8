"""Converting onto an fsspec URL (object storage): no rename there, so the header is the commit marker,
written last; an interrupted conversion leaves a group that no reader takes as complete. Each test runs
on fsspec's memory file system and, in the s3 tier, on a real S3 server (tests/s3server.py)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from tests.conftest import require
from tests.helpers import flip_byte
from tests.synthetic import write_checkpoint
from ucp.convert import convert
from ucp.errors import CorruptCheckpointError, OptionsError
from ucp.format import Fused, Layout, Pad, Pattern, Shard

QKV = Fused(0, (("q", 8), ("k", 8), ("v", 8)))


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model/qkv.weight": (rng.standard_normal((24, 5)).astype(np.float32), "float32", Pattern((Shard("tp", 0),), fused=QKV)),
        "model/wte.weight": (rng.standard_normal((13, 5)).astype(np.float32), "float32",
                             Pattern((Shard("tp", 0),), pad=Pad(0, 16, 13))),
        "optim/qkv.weight/step": (np.array(4.0, np.float32), "float32", Pattern()),
    }
    return write_checkpoint(tmp_path / "ckpt", 9, tensors, Layout.from_sizes(tp=2)), tensors


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.s3)])
def url(request):
    """A fresh location in memory (fsspec's), and in the s3 tier one on a real S3 server."""
    fsspec = require("fsspec")
    if request.param == "s3":
        u = request.getfixturevalue("s3").url("universal")
    else:
        u = f"memory://ucp-test-{uuid.uuid4().hex}/universal"
    yield u
    fs, root = fsspec.core.url_to_fs(u)
    if fs.exists(root):
        fs.rm(root, recursive=True)


def _header(url):
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    return json.loads(fs.cat_file(f"{root}/zarr.json")).get("attributes", {}).get("ucp")


def test_converts_onto_a_url_that_zarr_reads(source, url):
    zarr = require("zarr")
    src, tensors = source
    result = convert(src, url, fsync=False)
    header = _header(url)
    assert header["format"] == "ucp.universal" and header["step"] == 9 and result.files >= 6
    group = zarr.open_group(url, mode="r")
    for key, (u, _, _) in tensors.items():
        np.testing.assert_array_equal(group[header["tensors"][key]["path"]][...], u)
    with pytest.raises(OptionsError, match="already holds a complete checkpoint"):
        convert(src, url, fsync=False)


def test_an_interrupted_conversion_leaves_no_commit_marker_and_is_redone(source, url):
    src, tensors = source
    data = src / "rank_00001.safetensors"
    good = flip_byte(data, -1, 0xFF)  # the last fragment fails its checksum
    with pytest.raises(CorruptCheckpointError):
        convert(src, url, fsync=False)
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    assert not fs.exists(f"{root}/zarr.json") or _header(url) is None  # nothing committed is visible
    data.write_bytes(good)
    convert(src, url, fsync=False)
    assert _header(url)["step"] == 9


def test_leftovers_of_a_killed_conversion_are_cleared(source, url):
    import fsspec

    src, _ = source
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/zarr.json", b'{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    fs.pipe_file(f"{root}/model/stale/c.0", b"junk")
    convert(src, url, fsync=False)
    assert _header(url)["step"] == 9 and not fs.exists(f"{root}/model/stale/c.0")  # (an empty directory may stay)


def test_a_location_holding_other_data_is_refused_and_left_alone(source, url):
    import fsspec

    src, _ = source
    fs, root = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{root}/precious.bin", b"keep me")
    with pytest.raises(OptionsError, match="not empty"):
        convert(src, url, fsync=False)
    assert fs.cat_file(f"{root}/precious.bin") == b"keep me"
