"""The universal group's metadata: ucp writes zarr.json itself; it must be what zarr-python writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import require
from ucp.format.universal import ArrayMeta, array_path, chunk_shape
from ucp.storage.universal_io import ZARR_JSON, array_document, create_groups, put_array, shard_path
from ucp.storage.zarr_shard import ZSTD_LEVEL, write_shard

CASES = [
    ("model/a.weight", (37, 53), "float32", "none"),
    ("model/b", (), "int64", "zstd"),
    ("optim/c.weight/exp_avg", (9, 7, 5), "bfloat16", "none"),
    ("model/mask", (6,), "bool", "zstd"),
    ("model/q8", (4, 4), "float8_e4m3fn", "none"),
    ("model/empty", (0, 4), "float16", "none"),
    ("extra/z", (3,), "complex64", "none"),
    ("model/i8", (3, 2), "int8", "zstd"),
]


def _meta(key, shape, dtype, compressor):
    from ucp.format.dtypes import itemsize

    return ArrayMeta(array_path(key), shape, dtype, chunk_shape(shape, itemsize(dtype), 64), compressor=compressor)


@pytest.mark.parametrize("key, shape, dtype, compressor", CASES)
def test_array_metadata_is_what_zarr_writes(tmp_path, key, shape, dtype, compressor):
    zarr = require("zarr")
    from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

    from ucp.format.universal import shard_shape

    a = _meta(key, shape, dtype, compressor)
    compressors = ([ZstdCodec(level=ZSTD_LEVEL)] if compressor == "zstd" else []) + [Crc32cCodec()]
    zarr.create_array(str(tmp_path), shape=a.shape, dtype=a.stored_dtype, chunks=a.chunks,
                      shards=shard_shape(a.shape, a.chunks), compressors=compressors,
                      serializer=BytesCodec(endian="little"), fill_value=0,
                      chunk_key_encoding={"name": "default", "separator": "."},
                      attributes={"ucp": {"key": key, "dtype": dtype, "chunk_crc32c": [7, 2**32 - 1]}}, zarr_format=3)
    assert array_document(key, a, [7, 2**32 - 1]) == json.loads((tmp_path / ZARR_JSON).read_text())


def test_created_group_is_walked_and_read_by_zarr(tmp_path):
    zarr = require("zarr")
    rng = np.random.default_rng(0)
    metas = {k: _meta(k, s, d, c) for k, s, d, c in CASES if d not in ("float8_e4m3fn",)}
    create_groups(tmp_path, metas.values())
    data, crcs = {}, {}
    for key, a in metas.items():
        x = (rng.random(a.shape) * 100).astype(np.dtype(a.stored_dtype))
        data[key] = x
        crcs[key] = write_shard(shard_path(tmp_path, a), x, a.chunks, a.compressor, fsync=False).chunk_crc32c
        put_array(tmp_path, key, a, crcs[key])
        assert not (tmp_path / a.path / "c").is_dir()  # '.' chunk keys: no chunk directories
    group = zarr.open_group(str(tmp_path), mode="r")
    found = {name for name, _ in group.arrays()} | {f"{g}/{n}" for g, sub in group.groups() for n, _ in sub.arrays()}
    assert {"model", "optim", "extra"} <= {name for name, _ in group.groups()}
    for key, a in metas.items():
        np.testing.assert_array_equal(group[a.path][...], data[key])
        assert group[a.path].attrs["ucp"] == {"key": key, "dtype": a.dtype, "chunk_crc32c": list(crcs[key])}
    assert found  # zarr lists what create_groups and put_array made


def test_verify_catches_a_header_that_disagrees_with_the_array_metadata(tmp_path):
    import dataclasses

    from tests.synthetic import write_checkpoint
    from ucp.convert import convert
    from ucp.format import Layout, Pattern
    from ucp.storage.universal_io import header_document, read_header, verify_universal

    write_checkpoint(tmp_path / "ck", 1, {"model/w": (np.arange(8, dtype=np.float32), "float32", Pattern())},
                     Layout.single())
    convert(tmp_path / "ck", tmp_path / "u", fsync=False)
    h = read_header(tmp_path / "u")
    assert verify_universal(tmp_path / "u", h).ok
    lied = dataclasses.replace(h, tensors={"model/w": dataclasses.replace(h.tensors["model/w"], dtype="int32")})
    (tmp_path / "u" / ZARR_JSON).write_bytes(header_document(lied))  # re-signed: only the cross-check can tell
    report = verify_universal(tmp_path / "u", read_header(tmp_path / "u"))
    assert len(report.problems) == 1 and "disagrees with the checkpoint header" in report.problems[0]
