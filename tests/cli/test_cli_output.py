"""What the CLI prints (issue 17 items 8d, 8e, 11): a sharding label that says what is sharded, tensors in
sorted order, export's file count without the index, one-line errors whatever a path or a size holds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.synthetic import write_checkpoint
from ucp.cli.main import main, one_line
from ucp.format import Layout, Pattern, Shard

RNG = np.random.default_rng(3)
# inserted out of order on purpose
TENSORS = {
    "optim/w/exp_avg": (RNG.standard_normal((4, 6)).astype(np.float32), "float32", Pattern((Shard("mesh0", 0),))),
    "model/w": (RNG.standard_normal((4, 6)).astype(np.float32), "float32", Pattern((Shard("mesh0", 0),))),
    "model/b": (RNG.standard_normal((6,)).astype(np.float32), "float32", Pattern((Shard("mesh0", 0),))),
    "model/a": (RNG.standard_normal((8, 2)).astype(np.float32), "float32", Pattern((Shard("mesh0", 0),))),
}


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fsdp2(tmp_path):
    """An FSDP2 save on a default mesh: one unnamed axis (mesh0), zero=0, every tensor split along dim 0."""
    write_checkpoint(tmp_path / "ck", 3, TENSORS, Layout.from_sizes(mesh0=2))
    return tmp_path / "ck"


def test_inspect_says_what_an_unnamed_fsdp2_mesh_shards(fsdp2, capsys):
    code, out, err = run(capsys, "inspect", fsdp2)
    assert code == 0, err
    lines = out.splitlines()
    assert "layout      mesh0=2 zero=0  (2 ranks)" in lines
    assert "sharding    mesh0=2: 4 of 4 tensor(s) sharded (4 split along a dim)" in lines


def test_inspect_lists_tensors_sorted(fsdp2, tmp_path, capsys):
    code, out, err = run(capsys, "inspect", fsdp2)
    assert code == 0, err
    keys = [line.split()[0] for line in out.splitlines() if line.startswith(("model/", "optim/"))]
    assert keys == sorted(TENSORS) and len(keys) == 4
    assert run(capsys, "convert", fsdp2, tmp_path / "u", "--quiet")[0] == 0
    code, out, err = run(capsys, "inspect", tmp_path / "u")
    assert code == 0, err
    keys = [line.split()[0] for line in out.splitlines() if line.startswith(("model/", "optim/"))]
    assert keys == sorted(TENSORS)
    assert "sharding    mesh0=2: 4 of 4 tensor(s) sharded (4 split along a dim)  (in the source; the arrays are whole)" \
        in out.splitlines()


def test_export_counts_safetensors_files_and_names_the_index_apart(fsdp2, tmp_path, capsys):
    assert run(capsys, "convert", fsdp2, tmp_path / "u", "--quiet")[0] == 0
    code, out, err = run(capsys, "export", tmp_path / "u", tmp_path / "hf", "--quiet", "--max-shard-size", "64B")
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "hf").iterdir())
    shards = [n for n in written if n.endswith(".safetensors")]
    assert written == sorted(shards + ["model.safetensors.index.json"]) and len(shards) == 3
    assert f"in 3 safetensors file(s): {', '.join(shards)}, listed by model.safetensors.index.json" in out
    code, out, err = run(capsys, "export", tmp_path / "u", tmp_path / "hf2", "--quiet", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["files"] == ["model.safetensors"] and doc["indexes"] == []


@pytest.mark.parametrize("size", ["99999999999999999999999GB", "9" * 5000, "1e400", "inf", "-5GB", "0", "5 XB"])
def test_export_max_shard_size_out_of_range_is_one_line(fsdp2, tmp_path, capsys, size):
    assert run(capsys, "convert", fsdp2, tmp_path / "u", "--quiet")[0] == 0
    code, out, err = run(capsys, "export", tmp_path / "u", tmp_path / "hf", "--quiet", f"--max-shard-size={size}")
    lines = err.strip().splitlines()
    assert code in (1, 2) and len(lines) == 1 and lines[0].startswith("ucp: error: ") and "size" in lines[0], err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name", ["new\nline", "tab\there", "esc\x1b[2Jape", "sep\u2028arator", "cr\rreturn"])
def test_a_path_with_control_characters_is_printed_escaped_on_one_line(tmp_path, capsys, name):
    for args in (["inspect", tmp_path / name], ["verify", tmp_path / name], ["convert", tmp_path / name, tmp_path / "u"],
                 ["convert", "--from", "hf", tmp_path / name, tmp_path / "u"], ["export", tmp_path / name, tmp_path / "o"]):
        code, out, err = run(capsys, *args)
        lines = err.strip("\n").split("\n")
        assert code != 0 and len(lines) == 1 and lines[0].startswith("ucp: error: "), err
        assert not any(c in err.strip("\n") for c in "\r\t\x1b\u2028"), repr(err)
        assert one_line(str(tmp_path / name)) in err, repr(err)
