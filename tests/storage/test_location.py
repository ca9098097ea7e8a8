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
from ucp.errors import CheckpointNotFoundError, FormatError, LocationError, OptionsError, UcpError
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
    write_checkpoint(tmp_path / "s3:/bucket/run", 3, tensors, Layout.from_sizes(dp=1))
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


def test_checkpointer_refuses_a_path_made_of_a_url_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(2, 2)
    for root in (Path(URL), "s3:/bucket/run"):
        with pytest.raises(LocationError, match="looks like a URL made into a path"):
            Checkpointer(root, model)
    assert list(tmp_path.iterdir()) == []


def test_a_url_is_served_on_its_store_never_from_its_path_twin(decoy):
    """``memory://bucket/run`` is fsspec's memory, empty: not the complete ./memory:/bucket/run."""
    write_checkpoint(decoy / "memory:/bucket/run", 3, {"model/w": (np.ones(2, np.float32), "float32", Pattern())},
                     Layout.from_sizes(dp=1))
    url = f"memory://ucp-test-{decoy.name}/run"
    with pytest.raises(CheckpointNotFoundError):
        store.resolve(url)
    assert not is_universal(url) and store.list_steps(url) == []
    with pytest.raises(FormatError, match="no zarr.json"):
        read_header(url)  # (read there: nothing)


def test_convert_and_export_read_a_url_source_from_its_store_and_export_refuses_a_url_output(decoy):
    url = f"memory://ucp-test-{decoy.name}/run"
    with pytest.raises(CheckpointNotFoundError):
        convert(url, decoy / "u", fsync=False)  # (empty there: never the decoy at ./memory:/...)
    with pytest.raises(LocationError, match="convert --from hf"):
        convert(url, decoy / "u", fsync=False, source="hf")
    assert not (decoy / "u").exists()
    convert(decoy / "s3:/bucket/run", decoy / "u", fsync=False)
    with pytest.raises(CheckpointNotFoundError, match="no such directory"):
        export(url, decoy / "hf")  # (empty there: never the decoy)
    with pytest.raises(LocationError, match="export"):
        export(decoy / "u", "s3://bucket/hf")
    assert not (decoy / "hf").exists() and not Path("s3:/bucket/hf").exists()


def test_location_error_is_a_ucp_error():
    assert issubclass(LocationError, UcpError)


def test_an_s3_url_without_s3fs_says_what_to_install(monkeypatch):
    import sys

    import fsspec

    monkeypatch.setitem(sys.modules, "s3fs", None)  # (import s3fs fails, as where it is not installed)
    monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "s3", raising=False)
    with pytest.raises(LocationError, match=r"s3://bucket/run: .*pip install 'ucp\[s3\]'") as e:
        Checkpointer(URL, torch.nn.Linear(2, 2))
    assert "\n" not in str(e.value)


def test_a_checkpointer_saves_and_loads_on_a_url(tmp_path, monkeypatch):
    """fsspec's memory store here (the s3 tier runs the same on a real S3 server: test_object_store)."""
    monkeypatch.chdir(tmp_path)
    url = f"memory://ucp-test-{tmp_path.name}/run"
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    with Checkpointer(url, model, opt, keep=1) as ck:
        ck.save(1)
        assert str(ck.save(2).path) == f"memory:///ucp-test-{tmp_path.name}/run/step_00000002"
    assert [s for s, _ in store.list_steps(url)] == [2] and list(tmp_path.iterdir()) == []
    model2 = torch.nn.Linear(3, 4)
    opt2 = torch.optim.Adam(model2.parameters())
    with Checkpointer(url, model2, opt2) as ck:
        assert ck.load().step == 2
    assert torch.equal(model.weight, model2.weight) and torch.equal(model.bias, model2.bias)
    assert torch.equal(opt.state[model.weight]["exp_avg"], opt2.state[model2.weight]["exp_avg"])
