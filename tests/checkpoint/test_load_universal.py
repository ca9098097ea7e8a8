"""Loading a universal checkpoint in one process: the same bits come back, from chunks."""

from __future__ import annotations

import re

import pytest

import ucp
from tests.helpers import bit_diffs, state_of, tiny_model, train_step
from ucp import CheckpointOptions
from ucp.cli.main import main
from ucp.convert import convert
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError

SIZES = (7, 33, 5)  # Linear, ReLU, Linear


def test_a_universal_checkpoint_loads_back_bit_exactly(tmp_path):
    m, opt = tiny_model(0, SIZES, relu=True)
    for s in range(3):
        train_step(m, opt, s)
    ucp.Checkpointer(tmp_path / "ck", model=m, optimizer=opt, options=CheckpointOptions(fsync=False)).save(3)
    convert(tmp_path / "ck", tmp_path / "u", fsync=False, chunk_bytes=1024)
    m2, opt2 = tiny_model(1, SIZES, relu=True)
    res = ucp.Checkpointer(tmp_path / "u", model=m2, optimizer=opt2).load()
    assert res.source == "universal" and res.step == 3 and res.path == tmp_path / "u"
    assert bit_diffs(state_of(m, opt), state_of(m2, opt2)) == []  # every parameter and Adam state
    train_step(m, opt, 3)
    train_step(m2, opt2, 3)
    assert bit_diffs(state_of(m, opt), state_of(m2, opt2)) == []


def test_asking_a_universal_checkpoint_for_another_step_is_refused(tmp_path):
    m, opt = tiny_model(0, SIZES, relu=True)
    ucp.Checkpointer(tmp_path / "ck", model=m, options=CheckpointOptions(fsync=False)).save(2)
    convert(tmp_path / "ck", tmp_path / "u", fsync=False)
    with pytest.raises(CheckpointNotFoundError, match="of step 2, not 5"):
        ucp.Checkpointer(tmp_path / "u", model=m).load(step=5)



# --------------------------------------------------------------------------- every chunk bound to its array and place


def _converted(tmp_path, sizes=SIZES):
    """A trained model with AdamW saved and converted (1 KiB chunks); returns the universal path."""
    m, opt = tiny_model(0, sizes, relu=True)
    for s in range(3):
        train_step(m, opt, s)
    ucp.Checkpointer(tmp_path / "ck", model=m, optimizer=opt, options=CheckpointOptions(fsync=False)).save(3)
    convert(tmp_path / "ck", tmp_path / "u", fsync=False, chunk_bytes=1024)
    return tmp_path / "u"


def _verify_fails_naming(capsys, u, *names):
    """``ucp verify`` exits 3, one ``BAD`` line per problem and the ``ucp: error:`` line, naming ``names``."""
    capsys.readouterr()
    assert main(["verify", str(u), "--quiet"]) == CorruptCheckpointError.exit_code
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[-1].startswith("ucp: error: ") and all(x.startswith("BAD  ") for x in lines[:-1]), err
    for name in names:
        assert name in err, err
    return err


def _load_fails_naming(u, name, sizes=SIZES):
    m2, opt2 = tiny_model(1, sizes, relu=True)
    with pytest.raises(CorruptCheckpointError, match=re.escape(name)) as e:
        ucp.Checkpointer(u, model=m2, optimizer=opt2).load()
    assert "\n" not in str(e.value)
    return str(e.value)


SWAPS = {
    "exp_avg <-> exp_avg_sq": ("optim/exp_avg/0.weight", "optim/exp_avg_sq/0.weight"),
    "model <-> exp_avg": ("model/0.weight", "optim/exp_avg/0.weight"),
}


@pytest.mark.parametrize("a, b", SWAPS.values(), ids=SWAPS.keys())
def test_shard_files_swapped_between_arrays_are_named_by_verify_and_load(tmp_path, capsys, a, b):
    u = _converted(tmp_path)
    fa, fb = u / a / "c.0.0", u / b / "c.0.0"
    da, db = fa.read_bytes(), fb.read_bytes()
    assert len(da) == len(db) and da != db  # same shape, other bytes: each chunk's own checksum still holds
    fa.write_bytes(db)
    fb.write_bytes(da)
    _verify_fails_naming(capsys, u, str(fa), str(fb), "belong elsewhere")
    msg = _load_fails_naming(u, "belong elsewhere")
    assert str(fa) in msg or str(fb) in msg


def test_whole_array_directories_swapped_are_named_by_verify_and_load(tmp_path, capsys):
    u = _converted(tmp_path)
    a, b = u / "optim/exp_avg/0.weight", u / "optim/exp_avg_sq/0.weight"
    a.rename(tmp_path / "tmp")
    b.rename(a)
    (tmp_path / "tmp").rename(b)
    _verify_fails_naming(capsys, u, str(a / "zarr.json"), str(b / "zarr.json"), "metadata checksum mismatch")
    _load_fails_naming(u, "metadata checksum mismatch")


@pytest.mark.parametrize("how", ["index entries", "chunk bytes"])
def test_two_chunks_swapped_inside_a_shard_are_named_by_verify_and_load(tmp_path, capsys, how):
    import struct

    import numpy as np

    from ucp.codecs.checksum import crc32c

    u = _converted(tmp_path, sizes=(7, 100, 5))  # 0.weight is 100 x 7 float32: four 25 x 7 chunks
    shard = u / "model/0.weight/c.0.0"
    data = bytearray(shard.read_bytes())
    n = 4 * 16
    index = np.frombuffer(bytes(data[-n - 4:-4]), dtype="<u8").reshape(4, 2).copy()
    (o0, n0), (o1, n1) = index[0].tolist(), index[1].tolist()
    assert n0 == n1 == 25 * 7 * 4 + 4 and data[o0:o0 + n0] != data[o1:o1 + n1]
    if how == "index entries":  # under a valid index checksum
        index[[0, 1]] = index[[1, 0]]
        data[-n - 4:] = index.tobytes() + struct.pack("<I", crc32c(index.tobytes()))
    else:
        data[o0:o0 + n0], data[o1:o1 + n1] = data[o1:o1 + n1], data[o0:o0 + n0]
    shard.write_bytes(bytes(data))
    err = _verify_fails_naming(capsys, u, f"{shard}: chunk (0, 0) of model/0.weight holds bytes that belong elsewhere")
    assert "chunk (1, 0) of model/0.weight holds bytes that belong elsewhere" in err
    _load_fails_naming(u, f"{shard}: chunk (0, 0) of model/0.weight holds bytes that belong elsewhere", (7, 100, 5))


def test_a_flipped_byte_in_an_array_zarr_json_is_caught_by_verify_and_load(tmp_path, capsys):
    u = _converted(tmp_path)
    path = u / "optim/exp_avg/2.bias/zarr.json"
    text = path.read_text()
    path.write_text(text.replace('"fill_value": 0.0', '"fill_value": 1.0'))
    assert path.read_text() != text
    _verify_fails_naming(capsys, u, str(path), "metadata checksum mismatch for optim/2.bias/exp_avg")
    _load_fails_naming(u, f"{path}: metadata checksum mismatch for optim/2.bias/exp_avg")
