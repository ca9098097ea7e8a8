"""A URL is served or refused, never reinterpreted as a local path (``Path("s3://b/run")`` is the
local ``s3:/b/run``): every entry taking a checkpoint path refuses one it does not serve, in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.synthetic import write_checkpoint
from ucp import Checkpointer
from ucp.convert import convert
from ucp.convert.export import export
from ucp.errors import LocationError, OptionsError, UcpError
from ucp.format import Layout, Pattern
from ucp.storage import directory as store
from ucp.storage.location import is_url, local_path
from ucp.storage.universal_io import is_universal, read_header

URL = "s3://bucket/run"


@pytest.fixture
def decoy(tmp_path, monkeypatch):
    """A complete local checkpoint at ``./s3:/bucket/run``: where a URL reinterpreted as a path lands."""
    monkeypatch.chdir(tmp_path)
    tensors = {"model/w": (np.arange(6, dtype=np.float32).reshape(2, 3), "float32", Pattern())}
    write_checkpoint(Path("s3:/bucket/run"), 3, tensors, Layout.from_sizes(dp=1))
    return tmp_path


def test_is_url():
    assert is_url("s3://b/x") and is_url("memory://x") and is_url("gs://b") and is_url("abfs://c/x")
    assert not is_url("file:///tmp/x") and not is_url("/tmp/x") and not is_url("rel/a://b") and not is_url(Path("/x"))


def test_local_path_keeps_paths_and_file_urls():
    assert local_path("/tmp/x", "t") == Path("/tmp/x")
    assert local_path("file:///tmp/x", "t") == Path("/tmp/x")
    assert local_path(Path("rel/dir"), "t") == Path("rel/dir")
    assert local_path("/abs/s3:/b", "t") == Path("/abs/s3:/b")  # (an absolute path is what it says)


@pytest.mark.parametrize("location", [URL, "gs://b/x", Path(URL), "s3:/bucket/run"])
def test_local_path_refuses_urls_and_paths_made_of_them(location):
    with pytest.raises(LocationError, match="takes a local path") as e:
        local_path(location, "the thing")
    assert isinstance(e.value, OptionsError) and "\n" not in str(e.value) and "the thing" in str(e.value)


def test_checkpointer_refuses_a_url_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(2, 2)
    for root in (URL, Path(URL)):
        with pytest.raises(LocationError, match="Checkpointer takes a local path"):
            Checkpointer(root, model)
    assert list(tmp_path.iterdir()) == []


def test_readers_refuse_a_url_even_when_its_path_twin_exists(decoy):
    assert store.resolve(Path("/") / decoy / "s3:/bucket/run").name == "step_00000003"  # (the decoy is complete)
    for read in (lambda: store.resolve(URL), lambda: is_universal(URL), lambda: read_header(URL)):
        with pytest.raises(LocationError):
            read()


def test_convert_and_export_refuse_url_sources(decoy):
    with pytest.raises(LocationError, match="convert's source"):
        convert(URL, decoy / "u", fsync=False)
    assert not (decoy / "u").exists()
    convert(decoy / "s3:/bucket/run", decoy / "u", fsync=False)
    with pytest.raises(LocationError, match="export"):
        export(URL, decoy / "hf")
    with pytest.raises(LocationError, match="export"):
        export(decoy / "u", "s3://bucket/hf")
    assert not (decoy / "hf").exists() and not Path("s3:/bucket/hf").exists()


def test_location_error_is_a_ucp_error():
    assert issubclass(LocationError, UcpError)
