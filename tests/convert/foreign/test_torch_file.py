"""ucp.convert.foreign.torch_file reads torch.save files without torch's unpickler: tensors become byte ranges of
the file (equal to what torch.load gives, bit for bit), and any global outside the allowed set is
refused by name."""

from __future__ import annotations

import collections
import os
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch

from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError
from ucp.convert.foreign.torch_file import StoredTensor, load


def _bytes(t: StoredTensor) -> bytes:
    start, length = t.byte_range(0, t.numel())
    with open(t.path, "rb") as f:
        f.seek(start)
        return f.read(length)


def test_tensors_are_described_in_place_and_equal_torch_load(tmp_path):
    base = torch.arange(24, dtype=torch.float32)
    tagged = torch.randn(3)
    tagged.ds_id = 7  # (a Python attribute: pickled through torch._tensor._rebuild_from_type_v2)
    state = collections.OrderedDict(p=torch.nn.Parameter(torch.randn(2)), tagged=tagged,
        w=torch.randn(3, 5), b=torch.randn(7).to(torch.bfloat16), i=torch.tensor([1, -2], dtype=torch.int64),
        view=base[4:16].view(3, 4),  # a view: an offset into a shared storage
        t=torch.randn(4, 6).t(),  # non-contiguous
        shape=torch.Size([2, 3]), step=torch.tensor(7.0), n=3, s="x", dt=torch.bfloat16)
    module = torch.nn.Linear(2, 3).state_dict()  # (an OrderedDict with a _metadata attribute)
    torch.save({"state": state, "args": Namespace(hidden=16), "module": module}, tmp_path / "a.pt")
    got = load(tmp_path / "a.pt", {"argparse.Namespace": Namespace})
    want = torch.load(tmp_path / "a.pt", weights_only=False)
    s = got["state"]
    assert isinstance(s, collections.OrderedDict) and s["shape"] == (2, 3) and s["n"] == 3 and s["dt"] == "bfloat16"
    assert got["args"].hidden == 16 and list(got["module"]) == ["weight", "bias"]
    assert got["module"]._metadata == module._metadata
    for name in ("p", "tagged", "w", "b", "i", "view", "step"):
        t = s[name]
        assert isinstance(t, StoredTensor) and t.contiguous and t.shape == tuple(want["state"][name].shape)
        assert t.dtype == str(want["state"][name].dtype).removeprefix("torch.")
        assert _bytes(t) == want["state"][name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes(), name
    assert s["view"].offset == 4
    t = s["t"]
    assert not t.contiguous and t.array().tobytes() == want["state"]["t"].contiguous().numpy().tobytes()
    assert s["b"].array().view(np.uint16).tobytes() == want["state"]["b"].view(torch.uint16).numpy().tobytes()
    with pytest.raises(CorruptCheckpointError, match="run past a tensor of 15 elements"):
        s["w"].byte_range(10, 6)


class Gadget:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_globals_outside_the_allowed_set_are_refused_by_name(tmp_path):
    torch.save({"x": torch.ones(2), "bad": Gadget()}, tmp_path / "bad.pt")
    with pytest.raises(CorruptCheckpointError, match=r"bad\.pt: it pickles posix\.system, which ucp does not load"):
        load(tmp_path / "bad.pt")
    torch.save({"args": Namespace(a=1)}, tmp_path / "ns.pt")
    with pytest.raises(CorruptCheckpointError, match="it pickles argparse.Namespace"):
        load(tmp_path / "ns.pt")  # (only where the caller allows it)


def test_malformed_files_give_one_clear_error(tmp_path):
    with pytest.raises(CheckpointNotFoundError):
        load(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(CorruptCheckpointError, match="junk.pt: not a readable torch.save file"):
        load(tmp_path / "junk.pt")
    torch.save({"w": torch.randn(1000)}, tmp_path / "cut.pt")
    data = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="cut.pt"):
        load(tmp_path / "cut.pt")


def test_reading_a_deepspeed_file_imports_no_torch(tmp_path):
    torch.save({"w": torch.randn(3)}, tmp_path / "a.pt")
    code = ("import sys; from pathlib import Path; from ucp.convert.foreign.deepspeed import load_pt; "
            f"t = load_pt(Path({str(tmp_path / 'a.pt')!r}))['w']; "
            "assert t.shape == (3,) and 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def _crafted(tmp_path, body: bytes, name: str = "evil.pt"):
    """A torch.save-shaped zip whose data.pkl is ``body`` (protocol-2 opcodes) and whose storage 0 holds 4
    float32 elements."""
    import zipfile

    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02" + body + b".")
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
    return path


def _u(text: str) -> bytes:
    raw = text.encode()
    return b"X" + len(raw).to_bytes(4, "little") + raw


def _int(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little", signed=True)


STORAGE = b"(" + _u("storage") + b"ctorch\nFloatStorage\n" + _u("0") + _u("cpu") + _int(4) + b"tQ"


def _tensor(offset: bytes, size: bytes, stride: bytes) -> bytes:
    return b"ctorch._utils\n_rebuild_tensor_v2\n(" + STORAGE + offset + size + stride + b"\x89}tR"


@pytest.mark.parametrize("body, words", [
    (_tensor(_int(-1), b"(" + _int(2) + b"t", b"(" + _int(1) + b"t"), "storage offset is int -1"),
    (_tensor(_int(0), b"(" + _int(2) + _int(2) + b"t", b"(" + _int(3) + _int(-2) + b"t"), "stride is int -2"),
    (_tensor(_int(0), b"(" + _int(5) + b"t", b"(" + _int(1) + b"t"), "runs past its storage of 16 bytes"),
    (_tensor(_int(0), b"(G\x7f\xf0\x00\x00\x00\x00\x00\x00t", b"(" + _int(1) + b"t"), "size is float inf"),
    # a tensor's descriptor rewritten to point at another file
    (_tensor(_int(0), b"(" + _int(2) + b"t", b"(" + _int(1) + b"t") + b"}" + _u("path") + _u("/etc/passwd") + b"sb",
     "sets the state of a StoredTensor"),
    # a class's attributes rewritten (slot state on the class object)
    (b"cargparse\nNamespace\n(N}" + _u("__repr__") + b"ctorch\nSize\nstb", "sets the state of a type"),
    (b"(" + b"(" * 3000 + b"t" * 3000 + b"Q", "an unexpected persistent id"),
    (b"ctorch._utils\n_rebuild_tensor_v2\n(tR", "not a readable torch.save file (TypeError"),
])
def test_crafted_pickles_are_refused_in_one_line(tmp_path, body, words):
    path = _crafted(tmp_path, body)
    with pytest.raises(CorruptCheckpointError, match="evil.pt") as e:
        load(path, {"argparse.Namespace": Namespace})
    assert words in str(e.value), str(e.value)
    assert repr(Namespace(a=1)) == "Namespace(a=1)"  # (nothing of the process changed)


def test_a_crafted_but_valid_tensor_is_read_in_bounds(tmp_path):
    t = load(_crafted(tmp_path, _tensor(_int(1), b"(" + _int(3) + b"t", b"(" + _int(1) + b"t")))
    assert t.shape == (3,) and t.array().tolist() == [1.0, 2.0, 3.0]
