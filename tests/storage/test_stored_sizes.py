"""A commit checks every rank file's size from one listing of the step (rank_files.stored_sizes): on an
object store a LIST per 1,000 objects, not two HEADs per file, so that rank 0's commit of 16,384 ranks'
files waits on a few round trips, not 32,768; a missing file or one of another size is still refused,
naming it."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from tests.synthetic import write_checkpoint
from ucp.errors import UcpError
from ucp.format import Layout, Pattern
from ucp.storage.manifest_io import read_manifest
from ucp.storage.objstore import ObjectPath
from ucp.storage.rank_files import commit_step, stored_sizes


def _checkpoint(tmp_path):
    return write_checkpoint(tmp_path, 3, {"model/w": (np.arange(6, dtype=np.float32), "float32", Pattern())},
                            Layout.single())


def test_stored_sizes_lists_the_files_of_a_directory_and_none_of_a_missing_one(tmp_path):
    directory = _checkpoint(tmp_path)
    (directory / "sub").mkdir()
    sizes = stored_sizes(directory)
    assert sizes == {p.name: p.stat().st_size for p in directory.iterdir() if p.is_file()} and "sub" not in sizes
    assert stored_sizes(tmp_path / "nowhere") == {}


@pytest.mark.parametrize("change", ["missing", "size"])
def test_a_commit_refuses_a_rank_file_missing_or_of_another_size_naming_it(tmp_path, change):
    directory = _checkpoint(tmp_path)
    manifest = read_manifest(directory)
    name, size = next(iter(manifest.files.items()))
    if change == "missing":
        os.replace(directory / name, tmp_path / name)
        found = "None"
    else:
        with open(directory / name, "ab") as f:
            f.write(b"x")
        found = str(size + 1)
    (directory / "manifest.json").unlink()
    with pytest.raises(UcpError, match=f"{directory / name}: {found} bytes on storage, the writing rank reported {size}"):
        commit_step(directory, dataclasses.replace(manifest))
    assert not (directory / "manifest.json").exists()


@pytest.mark.s3
def test_on_an_object_store_the_sizes_come_from_one_listing_not_a_head_each(s3, monkeypatch):
    import s3fs

    root = ObjectPath(s3.url("sizes"))
    sizes = {f"rank_{r:05d}.safetensors": 100 + r for r in range(25)}
    for name, n in sizes.items():
        (root / name).write_bytes(os.urandom(n))
    (root / "deeper" / "x").write_bytes(b"not listed")
    calls, real = [], s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls.append(method)
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", counted)
    assert stored_sizes(root) == sizes
    assert calls == ["list_objects_v2"]
    assert stored_sizes(ObjectPath(s3.url("nothing"))) == {}
