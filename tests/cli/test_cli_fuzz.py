"""Malformed command lines and inputs (issue 17 item 8f): bad flags, bad numbers, missing, empty, garbage and
directory-for-file paths for every ``--from`` source, garbage specs. Every run ends with exit code 1, 2 or 3 and
exactly one ``ucp: error:`` line on stderr, never a traceback, an internal error or a signal.

The cases are drawn with a fixed seed; most run in this process (fast), a sample as real subprocesses (where an
abort at interpreter exit would show).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import write_checkpoint
from ucp.cli.main import main
from ucp.format import Layout, Pattern, Shard

SEED = 17
N_INPROCESS = 160
N_SUBPROCESS = 12
NUMBERS = ["-1", "0", "x", "1.5", "", " ", "99999999999999999999999", "9" * 5000, "0x10", "1e3", "-0", "٣", "nan"]
NOT_INTEGERS = ["x", "", "1.5", "9" * 5000, "0x10", "nan", "1e3"]
SIZES = ["0", "-5GB", "99999999999999999999999GB", "9" * 5000, "1e400", "5XB", "GB", "", "1.5.5GB", "\n"]
SOURCES = ("ucp", "hf", "dcp", "deepspeed")


def _inputs(root: Path) -> dict[str, Path]:
    """Named malformed inputs under ``root`` (and one good checkpoint and universal to spoil)."""
    rng = np.random.default_rng(SEED)
    good = root / "good"
    write_checkpoint(good, 5, {"model/w": (rng.standard_normal((4, 6)).astype(np.float32), "float32",
                                           Pattern((Shard("tp", 0),)))}, Layout.from_sizes(tp=2))
    step = good / "step_00000005"
    p = {"missing": root / "missing", "good": good, "step": step}
    (root / "empty_dir").mkdir()
    p["empty_dir"] = root / "empty_dir"
    p["empty_file"] = root / "empty_file"
    p["empty_file"].write_bytes(b"")
    p["garbage_file"] = root / "garbage_file"
    p["garbage_file"].write_bytes(bytes(rng.integers(0, 256, 3000, dtype=np.uint8)))
    p["newline_path"] = root / "new\nline"
    for name, content in {"bad_manifest": b"{not json", "deep_manifest": b"[" * 50_000,
                          "null_manifest": b"null", "list_manifest": b"[1, 2]"}.items():
        d = root / name / "step_00000005"
        d.mkdir(parents=True)
        for f in step.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        (d / "manifest.json").write_bytes(content)
        p[name] = d
    d = root / "bad_table" / "step_00000005"
    d.mkdir(parents=True)
    for f in step.iterdir():
        (d / f.name).write_bytes(f.read_bytes() if f.name != "fragments.parquet" else b"PAR1garbagePAR1")
    p["bad_table"] = d
    d = root / "manifest_is_dir" / "step_00000005"
    (d / "manifest.json").mkdir(parents=True)
    p["manifest_is_dir"] = d
    # foreign sources, spoiled
    hf = root / "hf_garbage"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"\xff" * 8 + b"garbage")
    p["hf_garbage"] = hf
    hf = root / "hf_index"
    hf.mkdir()
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    p["hf_index"] = hf
    hf = root / "hf_header"
    hf.mkdir()
    header = json.dumps({"a": {"dtype": "F32", "shape": "22", "data_offsets": [0, 16]}}).encode()
    (hf / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    p["hf_header"] = hf
    for name, content in {"dcp_garbage": b"\x80\x04garbage", "dcp_empty": b"", "dcp_list": b"\x80\x02]."}.items():
        d = root / name
        d.mkdir()
        (d / ".metadata").write_bytes(content)
        p[name] = d
    d = root / "dcp_metadata_dir"
    (d / ".metadata").mkdir(parents=True)
    p["dcp_metadata_dir"] = d
    ds = root / "ds_garbage"
    ds.mkdir()
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04garbage")
    (ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    p["ds_garbage"] = ds
    ds = root / "ds_latest"
    ds.mkdir()
    (ds / "latest").write_text("../../etc\n")
    p["ds_latest"] = ds
    p["universal_garbage"] = root / "universal_garbage"
    p["universal_garbage"].mkdir()
    (p["universal_garbage"] / "zarr.json").write_bytes(b'{"zarr_format": 3, "node_type": "group", "attributes": ' + b"[" * 10_000)
    # a universal checkpoint, its header spoiled field by field
    from ucp.convert import convert

    convert(good, root / "universal")
    doc = json.loads((root / "universal" / "zarr.json").read_text())
    spoils = {"u_attrs_list": lambda d: d.update(attributes=[1]),
              "u_no_ucp": lambda d: d["attributes"].pop("ucp", None),
              "u_tensors_str": lambda d: d["attributes"]["ucp"].update(tensors="22"),
              "u_step_huge": lambda d: d["attributes"]["ucp"].update(step=10**30),
              "u_layout_nl": lambda d: d["attributes"]["ucp"].update(source_layout={"axes": [["dp\n", 2]], "zero": 0})}
    for name, spoil in spoils.items():
        d = root / name
        d.mkdir()
        for f in (root / "universal").rglob("*"):
            if f.is_file():
                (d / f.relative_to(root / "universal")).parent.mkdir(parents=True, exist_ok=True)
                (d / f.relative_to(root / "universal")).write_bytes(f.read_bytes())
        spoiled = json.loads(json.dumps(doc))
        try:
            spoil(spoiled)
        except (AttributeError, KeyError, TypeError):
            pass
        (d / "zarr.json").write_text(json.dumps(spoiled))
        p[name] = d
    # specs
    specs = {"spec_garbage": "garbage !!", "spec_int": "ucl 1\nmodel vocab=" + "9" * 4400 + "\n",
             "spec_axis": 'ucl 1\nsource layout dp\n=2\n', "spec_bytes": "\udcff\x00ucl"}
    for name, text in specs.items():
        p[name] = root / f"{name}.ucl"
        p[name].write_bytes(text.encode("utf-8", "surrogateescape"))
    return p


def _case(rng: random.Random, p: dict[str, Path], out: Path) -> list[str]:
    paths = [str(v) for k, v in p.items() if not k.startswith("spec_") and k != "good"]
    pick = rng.choice
    dst = str(out / f"dst{rng.randrange(10**6)}")
    kind = rng.randrange(9)
    if kind == 0:
        return [pick(["inspect", "verify"]), pick(paths)] + pick([[], ["--json"], ["--step", pick(NUMBERS)], ["--quiet"]])
    if kind == 1:
        return ["convert", "--from", pick(SOURCES), pick(paths), dst, "--quiet"]
    if kind == 2:
        flag = pick(["--workers", "--chunk-kib", "--memory-mib", "--step"])
        return ["convert", str(p["good"]), dst, "--quiet", f"{flag}={pick(NUMBERS)}"]
    if kind == 3:
        return ["convert", str(p["good"]), dst, "--quiet", "--spec",
                str(pick([p["spec_garbage"], p["spec_int"], p["spec_axis"], p["spec_bytes"], p["missing"],
                          p["empty_dir"], p["garbage_file"]]))]
    if kind == 4:
        return ["convert", str(p["good"]), dst, "--quiet", "--spec", "megatron-gpt", "--set",
                pick(["vocab", "vocab=", "=5", "vocab=x", "vocab=-1", "vocab=" + "9" * 5000, "1a=3", "v\n=2"])]
    if kind == 5:
        return ["export", pick(paths), dst, "--quiet"] + pick([[], ["--dtype", "float8"], ["--spec", str(p["spec_garbage"])]])
    if kind == 6:
        return ["export", pick(paths), dst, f"--max-shard-size={pick(SIZES)}"]
    if kind == 7:
        return pick([["inspect"], ["convert", "a"], ["bogus"], ["inspect", "a", "--bogus"], ["--bogus"],
                     ["verify", "a", "b"], ["convert", "a", "b", "--from", "orbax"], ["export"],
                     ["agent"], ["agent", "status", "--job", pick(["../x", "a b", "", "x" * 200, "j\nk"])],
                     # (never a valid number: those would really train)
                     ["demo", "--steps", pick(NOT_INTEGERS)], ["train", "--nproc", pick(NOT_INTEGERS)]])
    return ["convert", pick(paths), pick(paths + [dst]), "--quiet"]


def _check(argv, code: int, err: str) -> None:
    if code == 0:  # (some draws are valid: a huge --chunk-kib is capped by the tensor)
        assert err.strip() == "", (argv, err[-2000:])
        return
    lines = err.strip("\n").split("\n") if err.strip() else []
    assert code in (1, 2, 3), (argv, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("ucp: error: "), (argv, err[-2000:])
    assert "Traceback" not in err and "internal error" not in err, (argv, err[-2000:])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return _inputs(root), root


def _cases(inputs, n: int, seed: int):
    p, root = inputs
    rng = random.Random(seed)
    out = root / "out"
    out.mkdir(exist_ok=True)
    return [_case(rng, p, out) for _ in range(n)]


def test_malformed_cli_inputs_in_process(inputs, capsys):
    for argv in _cases(inputs, N_INPROCESS, SEED):
        try:
            code = main(argv)
        except SystemExit as e:  # (argparse's usage errors exit from inside)
            code = e.code
        _check(argv, code, capsys.readouterr().err)


def test_malformed_cli_inputs_as_subprocesses(inputs):
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    for argv in _cases(inputs, N_SUBPROCESS, SEED + 1):
        p = subprocess.run([sys.executable, "-m", "ucp.cli.main", *argv], capture_output=True, text=True,
                           timeout=120, env=env)
        _check(argv, p.returncode, p.stderr)
