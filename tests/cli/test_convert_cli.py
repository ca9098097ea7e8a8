"""``ucp convert`` and ``ucp inspect``/``ucp verify`` of universal checkpoints, through the CLI entry point."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

from tests.conftest import require
from tests.helpers import flip_byte
from tests.synthetic import write_checkpoint
from ucp.cli.main import main
from ucp.format import Fused, Layout, Pad, Pattern, Shard
from ucp.storage.manifest_io import read_manifest
from ucp.storage.universal_io import array_reader, read_header

LAYOUT = Layout.from_sizes(dp=2, tp=2, zero=1)
RNG = np.random.default_rng(0)
TENSORS = {
    "model/qkv.weight": (RNG.standard_normal((12, 8)).astype(np.float32), "float32",
                         Pattern((Shard("tp", 0),), fused=Fused(0, (("q", 4), ("k", 4), ("v", 4))))),
    "model/embed.weight": (RNG.integers(0, 2**16, (10, 8), dtype=np.uint16), "bfloat16",
                           Pattern((Shard("tp", 0),), pad=Pad(0, 12, 10))),
    "optim/qkv.weight/exp_avg": (RNG.standard_normal((12, 8)).astype(np.float32), "float32",
                                 Pattern((Shard("tp", 0),), flat="dp", fused=Fused(0, (("q", 4), ("k", 4), ("v", 4))))),
    "optim/qkv.weight/step": (np.array(7, dtype=np.int64), "int64", Pattern()),
}


@pytest.fixture
def ckpt(tmp_path):
    write_checkpoint(tmp_path / "ckpt", 5, TENSORS, LAYOUT, state={"shared": {"epoch": 2}, "ranks": {}})
    write_checkpoint(tmp_path / "ckpt", 9, TENSORS, LAYOUT, seed=1)
    return tmp_path / "ckpt"


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ucp: error: "), err
    assert "Traceback" not in err
    return lines[0]


def converted(capsys, ckpt, dst, *extra):
    code, out, err = run(capsys, "convert", ckpt, dst, "--quiet", *extra)
    assert code == 0, err
    return out


def test_convert_json_summary(ckpt, tmp_path, capsys):
    out = converted(capsys, ckpt, tmp_path / "u", "--json", "--step", "5", "--workers", "2")
    lines = out.strip().splitlines()
    assert len(lines) == 1
    doc = json.loads(lines[0])
    assert set(doc) == {"src", "dst", "step", "tensors", "nbytes", "source_bytes", "files", "seconds", "memory_bytes",
                        "gbps"}
    m = read_manifest(ckpt / "step_00000005")
    assert doc["src"] == str(ckpt / "step_00000005") and doc["dst"] == str(tmp_path / "u")
    assert doc["step"] == 5 and doc["tensors"] == 4
    assert doc["nbytes"] == sum(u.nbytes for u, _, _ in TENSORS.values())
    assert doc["source_bytes"] == m.nbytes
    assert doc["files"] == sum(1 for p in (tmp_path / "u").rglob("*") if p.is_file())
    assert doc["seconds"] > 0 and doc["memory_bytes"] > 0 and doc["gbps"] >= 0
    h = read_header(tmp_path / "u")
    assert h.step == 5 and h.state == {"shared": {"epoch": 2}, "ranks": {}}
    for key, (u, _, _) in TENSORS.items():
        with array_reader(tmp_path / "u", key, h.tensors[key]) as r:
            assert r.read().tobytes() == u.tobytes()


def test_convert_text_summary_and_options(ckpt, tmp_path, capsys):
    out = converted(capsys, ckpt, tmp_path / "u", "--compress", "zstd", "--chunk-kib", "1", "--memory-mib", "1")
    assert out.startswith(f"OK   {tmp_path / 'u'}: step 9, 4 array(s)")
    h = read_header(tmp_path / "u")
    assert h.step == 9 and {a.compressor for a in h.tensors.values()} == {"zstd"}


def test_convert_with_a_spec(ckpt, tmp_path, capsys):
    spec = tmp_path / "m.ucl"
    spec.write_text(textwrap.dedent("""\
        ucl 1
        source layout dp=2 tp=2 zero=1
        "qkv.weight" : shard(tp, dim=0) fused(dim=0, q=4, k=4, v=4)
        "embed.weight" : shard(tp, dim=0) pad(dim=0, to=12, keep=10)
    """))
    converted(capsys, ckpt, tmp_path / "u", "--spec", spec)
    assert read_header(tmp_path / "u").spec == spec.read_text()


def test_inspect_universal_text_and_json(ckpt, tmp_path, capsys):
    converted(capsys, ckpt, tmp_path / "u")
    code, out, err = run(capsys, "inspect", tmp_path / "u")
    assert code == 0, err
    assert f"universal   {tmp_path / 'u'}" in out and "step        9" in out
    assert "dp=2 tp=2 zero=1  (4 ranks)" in out and "ucp.universal 1.1" in out
    for key in TENSORS:
        assert key in out
    assert "bfloat16" in out and "10x8" in out and "scalar" in out
    assert "fused(dim=0, q=4, k=4, v=4)" in out and "pad(dim=0, to=12, keep=10)" in out
    code, out, err = run(capsys, "inspect", tmp_path / "u", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["format"] == "ucp.universal" and doc["step"] == 9
    assert doc["tensors"]["model/embed.weight"]["shape"] == [10, 8]
    assert doc["tensors"]["model/embed.weight"]["data_type"] == "uint16"
    assert doc["tensors"]["optim/qkv.weight/exp_avg"]["path"] == "optim/exp_avg/qkv.weight"


def test_verify_universal_ok_and_corrupted(ckpt, tmp_path, capsys):
    converted(capsys, ckpt, tmp_path / "u")
    code, out, err = run(capsys, "verify", tmp_path / "u", "--quiet")
    assert code == 0, err
    assert out.startswith(f"OK   {tmp_path / 'u'}: universal, step 9, 4 array(s)")
    h = read_header(tmp_path / "u")
    shard = array_reader(tmp_path / "u", "model/qkv.weight", h.tensors["model/qkv.weight"]).path
    flip_byte(shard, 5, 1)
    code, out, err = run(capsys, "verify", tmp_path / "u", "--quiet")
    assert code == 3 and out == ""
    bad = [line for line in err.splitlines() if line.startswith("BAD  ")]
    assert len(bad) == 1 and "chunk (0, 0) of model/qkv.weight" in bad[0]
    last = err.strip().splitlines()[-1]
    assert last.startswith("ucp: error: ") and "1 problem(s) found" in last and "Traceback" not in err


def test_step_does_not_apply_to_a_universal_checkpoint(ckpt, tmp_path, capsys):
    converted(capsys, ckpt, tmp_path / "u")
    for cmd in ("inspect", "verify"):
        code, _, err = run(capsys, cmd, tmp_path / "u", "--step", "3")
        assert code == 1 and "--step applies to roots of distributed checkpoints" in one_error_line(err)


def test_errors_are_one_line_with_exit_codes(ckpt, tmp_path, capsys):
    converted(capsys, ckpt, tmp_path / "u")
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "u", "--quiet")
    assert code == 1 and "already exists" in one_error_line(err)

    code, _, err = run(capsys, "convert", tmp_path / "nope", tmp_path / "v", "--quiet")
    assert code == 2 and "no such file or directory" in one_error_line(err)

    code, _, err = run(capsys, "convert", ckpt, tmp_path / "v", "--quiet", "--step", "6")
    assert code == 2 and "no complete checkpoint for step 6" in one_error_line(err)

    code, _, err = run(capsys, "convert", ckpt, tmp_path / "v", "--quiet", "--workers", "0")
    assert code == 1 and "--workers 0" in one_error_line(err)

    code, _, err = run(capsys, "convert", ckpt, tmp_path / "v", "--quiet", "--memory-mib", "0")
    assert code == 1 and "--memory-mib 0" in one_error_line(err)

    spec = tmp_path / "bad.ucl"
    spec.write_text('ucl 1\nsource layout dp=2 tp=2 zero=1\n'
                    '"qkv.weight" : shard(tp, dim=1)\n"embed.weight" : shard(tp, dim=0)\n')
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "v", "--quiet", "--spec", spec)
    assert code == 1 and f"{spec}:3:1: qkv.weight: the checkpoint records shards" in one_error_line(err)

    code, _, err = run(capsys, "convert", ckpt, tmp_path / "v", "--quiet", "--spec", tmp_path / "none.ucl")
    assert code == 1 and "no such spec file" in one_error_line(err)
    assert not (tmp_path / "v").exists()


def test_a_corrupted_source_exits_3_naming_file_and_key(ckpt, tmp_path, capsys):
    path = ckpt / "step_00000009"
    f = max((f for f in read_manifest(path).fragments if f.key == "model/embed.weight"), key=lambda f: f.length)
    flip_byte(path / f.file, f.offset, 0x80)
    code, _, err = run(capsys, "convert", ckpt, tmp_path / "u", "--quiet")
    line = one_error_line(err)
    assert code == 3 and str(path / f.file) in line and "model/embed.weight" in line and "fails its checksum" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_inspect_and_verify_of_a_partial_group_fail_cleanly(tmp_path, capsys):
    zarr = require("zarr")
    zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    for cmd in ("inspect", "verify"):
        code, _, err = run(capsys, cmd, tmp_path / "g")
        assert code == 1 and "not a complete universal checkpoint" in one_error_line(err)


def test_bad_compressor_is_a_usage_error(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(ckpt), str(tmp_path / "u"), "--compress", "lz4"])
    assert e.value.code == 2 and "invalid choice: 'lz4'" in capsys.readouterr().err


def test_help_mentions_universal(capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "universal" in out and "--spec" in out and "--compress" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "convert" in out and "universal" in out
