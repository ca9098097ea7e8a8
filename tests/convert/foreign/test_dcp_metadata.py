"""A DCP ``.metadata`` built from DCP's own classes but with fields of the wrong type or size is refused in
one FormatError line naming the file, before anything it declares is allocated (issue 17 items 7, 8c)."""

from __future__ import annotations

import io
import pickle
import tracemalloc

import pytest
import torch

from tests.convert.foreign.test_dcp import single_process_save
from ucp.convert.foreign.dcp import MetadataUnpickler, dcp_source, read_metadata
from ucp.errors import CorruptCheckpointError, FormatError, UcpError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("dcp") / "ck"
    single_process_save(root)
    return root, (root / ".metadata").read_bytes()


def _tensor(md, fqn="model.fc1.weight"):
    return md.state_dict_metadata[fqn]


def _info(md, fqn):
    (info,) = [s for i, s in md.storage_data.items() if i.fqn == fqn]
    return info


def _set(obj, name, value):
    object.__setattr__(obj, name, value)  # (some of DCP's dataclasses are frozen)


BREAKS = {
    "size is a string": (lambda md: _set(_tensor(md), "size", "22"), "the size of model.fc1.weight is str '22'"),
    "chunks is a dict": (lambda md: _set(_tensor(md), "chunks", {"a": 1}), "the chunks of model.fc1.weight is dict"),
    "a chunk's sizes hold a float": (lambda md: _set(_tensor(md).chunks[0], "sizes", (10, 6.0)),
                                     "a chunk's sizes of model.fc1.weight is float 6.0"),
    "a chunk of another rank": (lambda md: _set(_tensor(md).chunks[0], "offsets", torch.Size([0])),
                                "a chunk's offsets of model.fc1.weight is Size"),
    "properties missing": (lambda md: _set(_tensor(md), "properties", None), "has no 'dtype'"),
    "offset negative": (lambda md: _set(_info(md, "optim.param_groups.0.lr"), "offset", -5),
                        "the byte offset of optim.param_groups.0.lr is int -5"),
    "path escapes": (lambda md: _set(_info(md, "model.fc1.weight"), "relative_path", "../../etc/passwd"),
                     "is not a file name in the checkpoint's directory"),
    "state dict is a list": (lambda md: _set(md, "state_dict_metadata", [1, 2]), "state_dict_metadata is list"),
    "planner data is a string": (lambda md: _set(md, "planner_data", "model"), "planner_data is str"),
    "a path of floats": (lambda md: md.planner_data.__setitem__("step", (1.5,)), "the state-dict path of step"),
    "a huge chunk": (lambda md: _set(_tensor(md), "size", torch.Size([1 << 33, 6])) or
                     _set(_tensor(md).chunks[0], "sizes", torch.Size([1 << 33, 6])),
                     "(206158430208 bytes) but its blob in __0_0.distcp has"),
}


def _with_metadata(root, md, tmp_path):
    """A copy of the DCP save ``root`` whose ``.metadata`` is ``md``."""
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in root.iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    (ck / ".metadata").write_bytes(pickle.dumps(md))
    return ck


def _refused(error, ck, match=None):
    """The ``error`` importing ``ck`` raises, and the peak of memory traced until then."""
    tracemalloc.start()
    try:
        with pytest.raises(error, match=match) as e:
            dcp_source(ck)
        return e, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", list(BREAKS))
def test_wrong_types_and_sizes_in_the_metadata_give_one_format_error_line(saved, name, tmp_path):
    root, original = saved
    md = pickle.loads(original)
    breaks, words = BREAKS[name]
    breaks(md)
    ck = _with_metadata(root, md, tmp_path)
    e, peak = _refused(UcpError, ck)
    msg = str(e.value)
    assert isinstance(e.value, FormatError) and msg.startswith(f"{ck / '.metadata'}: ") and "\n" not in msg, msg
    assert words in msg, msg
    assert peak < 64 << 20


def test_a_value_blob_declared_past_its_file_is_refused_before_it_is_allocated(saved, tmp_path):
    root, original = saved
    md = pickle.loads(original)
    _set(_info(md, "optim.param_groups.0.lr"), "length", 1 << 40)
    ck = _with_metadata(root, md, tmp_path)
    e, peak = _refused(CorruptCheckpointError, ck, match="lies past the end of the file")
    assert str(ck / "__0_0.distcp") in str(e.value) and peak < 64 << 20


def test_the_metadata_pickle_cannot_declare_more_bytes_than_it_has(tmp_path):
    body = b"\x80\x05\x96" + (8 << 30).to_bytes(8, "little") + b"."  # BYTEARRAY8 of 8 GiB in 12 bytes
    with pytest.raises(CorruptCheckpointError, match="declares a bytearray of 8589934592 bytes"):
        MetadataUnpickler(io.BytesIO(body), "x/.metadata").load()


def test_the_metadata_pickle_cannot_set_the_state_of_a_class(tmp_path):
    # BUILD on pathlib.PosixPath (an allowed global) would rewrite the class for the whole process
    body = b"\x80\x02cpathlib\nPosixPath\nN}X\x08\x00\x00\x00__repr__Ns\x86b."
    (tmp_path / ".metadata").write_bytes(body)
    with pytest.raises(CorruptCheckpointError, match="sets the state of a type"):
        read_metadata(tmp_path)
    assert "PosixPath(" in repr(tmp_path)
