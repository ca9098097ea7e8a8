"""Sizes a foreign file declares are checked against what the file holds before anything of that size is
allocated (issue 17 item 7): a few megabytes of file never cost gigabytes of memory, and the refusal is
one line naming the file."""

from __future__ import annotations

import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from ucp.convert.foreign.deepspeed import deepspeed_source
from ucp.convert.foreign.torch_file import load
from ucp.errors import CorruptCheckpointError

GIB = 1 << 30


def _peak(fn) -> int:
    """Peak bytes traced while ``fn()`` runs (it must raise CorruptCheckpointError)."""
    tracemalloc.start()
    try:
        with pytest.raises(CorruptCheckpointError) as e:
            fn()
        return tracemalloc.get_traced_memory()[1], str(e.value)
    finally:
        tracemalloc.stop()


def _zip_with(path, pkl_info: zipfile.ZipInfo, write_pkl) -> None:
    with zipfile.ZipFile(path, "w") as z:
        with z.open(pkl_info, "w", force_zip64=True) as f:
            write_pkl(f)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())


def _deflated_bomb(path, declared: int = 4 * GIB, real: int = 512 << 20) -> None:
    """data.pkl deflated: a BINBYTES8 declaring ``declared`` bytes, followed by ``real`` zero bytes
    (about 1/1000 of that on disk)."""
    info = zipfile.ZipInfo("archive/data.pkl")
    info.compress_type = zipfile.ZIP_DEFLATED

    def write(f):
        f.write(b"\x80\x04\x8e" + struct.pack("<Q", declared))
        zeros = bytes(8 << 20)
        for _ in range(real // len(zeros)):
            f.write(zeros)
        f.write(b".")
    _zip_with(path, info, write)


def test_a_deflated_data_pkl_declaring_4_gib_is_refused_in_small_memory(tmp_path):
    path = tmp_path / "bomb.pt"
    _deflated_bomb(path)
    assert path.stat().st_size < 4 << 20
    peak, msg = _peak(lambda: load(path))
    assert str(path) in msg and "data.pkl is compressed" in msg and "\n" not in msg
    assert peak < 4 << 20, peak


def test_a_stored_binbytes8_longer_than_the_pickle_is_refused_before_reading(tmp_path):
    path = tmp_path / "long.pt"
    info = zipfile.ZipInfo("archive/data.pkl")
    _zip_with(path, info, lambda f: f.write(b"\x80\x04\x8e" + struct.pack("<Q", 4 * GIB) + bytes(1000) + b"."))
    peak, msg = _peak(lambda: load(path))
    assert msg.startswith(f"{path}: its pickle declares a value of {4 * GIB} bytes where 1001 bytes of it are left")
    assert peak < 1 << 20, peak


@pytest.mark.parametrize("opcode, words", [
    (b"\x96", "a bytearray of"),  # BYTEARRAY8: the stock unpickler allocates it before reading
    (b"\x8d", "a value of"),  # BINUNICODE8
])
def test_other_sized_opcodes_are_checked_too(tmp_path, opcode, words):
    path = tmp_path / "sized.pt"
    info = zipfile.ZipInfo("archive/data.pkl")
    _zip_with(path, info, lambda f: f.write(b"\x80\x05" + opcode + struct.pack("<Q", 8 * GIB) + b"."))
    peak, msg = _peak(lambda: load(path))
    assert str(path) in msg and words in msg and str(8 * GIB) in msg
    assert peak < 1 << 20, peak


def test_a_storage_record_declared_past_the_end_of_the_file_is_refused(tmp_path):
    path = tmp_path / "short.pt"
    info = zipfile.ZipInfo("archive/data.pkl")
    _zip_with(path, info, lambda f: f.write(b"\x80\x02N."))
    data = bytearray(path.read_bytes())
    # the central directory's uncompressed and compressed sizes of archive/data/0: 16 -> 2**31
    cd = data.index(b"archive/data/0", data.index(b"PK\x01\x02")) - 46
    data[cd + 20:cd + 28] = struct.pack("<LL", 1 << 31, 1 << 31)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="record archive/data/0 declares 2147483648 bytes") as e:
        load(path)
    assert str(path) in str(e.value)


def test_deepspeed_model_file_bomb_is_refused_naming_it(tmp_path):
    save = tmp_path / "global_step1"
    save.mkdir()
    (save / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    _deflated_bomb(save / "mp_rank_00_model_states.pt")
    peak, msg = _peak(lambda: deepspeed_source(save))
    assert msg.startswith(f"{save / 'mp_rank_00_model_states.pt'}: ") and "compressed" in msg
    assert peak < 4 << 20, peak
