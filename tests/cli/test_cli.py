"""The ``ucp`` command line, run as a user would: a subprocess, its output and exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import ucp
from tests.helpers import flip_byte
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest


def run(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "ucp.cli.main", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    ck = ucp.Checkpointer(tmp_path / "ck", model=model, optimizer=opt)
    ck.save(5)
    ck.save(7)
    return tmp_path / "ck"


def _no_traceback(p):
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr


def test_version_and_help():
    p = run("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"ucp {ucp.__version__}"
    for cmd in ([], ["inspect"], ["verify"], ["demo"]):
        h = run(*cmd, "--help")
        assert h.returncode == 0 and "usage: ucp" in h.stdout
    assert "CKPT" in run("verify", "--help").stdout


def test_inspect_table_and_json(saved):
    p = run("inspect", saved)
    assert p.returncode == 0, p.stderr
    assert "step        7" in p.stdout and "optim/0.weight/exp_avg" in p.stdout and "dp=1 zero=0" in p.stdout
    p = run("inspect", saved, "--step", "5", "--json")
    doc = json.loads(p.stdout)
    assert doc["step"] == 5 and doc["format_version"] == "1.3" and set(doc["files"]) == set(doc["file_headers"])
    assert {f["key"] for f in doc["fragments"]} == set(doc["tensors"])


def test_verify_ok(saved):
    p = run("verify", saved, "--quiet")
    assert p.returncode == 0 and p.stdout.startswith("OK"), p.stderr


def _first_fragment(path):
    m = read_manifest(path)
    return max(m.fragments, key=lambda f: f.length)


def test_verify_names_bit_flipped_fragment(saved):
    path = store.resolve(saved)
    f = _first_fragment(path)
    flip_byte(path / f.file, f.offset + f.length // 2, 0x01)
    p = run("verify", saved, "--quiet")
    assert p.returncode == 3
    assert f.file in p.stderr and f.key in p.stderr and "checksum" in p.stderr
    _no_traceback(p)


def test_verify_names_truncated_fragment(saved):
    path = store.resolve(saved)
    f = _first_fragment(path)
    with open(path / f.file, "r+b") as fh:
        fh.truncate(f.offset + 1)
    p = run("verify", saved, "--quiet")
    assert p.returncode == 3 and f.file in p.stderr and f.key in p.stderr and "truncated" in p.stderr
    _no_traceback(p)


@pytest.mark.parametrize("args, code, words", [
    (["inspect", "/definitely/not/here"], 2, "no such file"),
    (["verify", "{tmp}"], 2, "no complete checkpoint"),
    (["inspect", "{saved}", "--step", "6"], 2, "step 6"),
    (["demo", "--steps", "1"], 1, "--steps"),
])
def test_bad_input_is_one_line_without_traceback(saved, tmp_path, args, code, words):
    args = [a.format(tmp=tmp_path, saved=saved) for a in args]
    p = run(*args)
    assert p.returncode == code, (p.returncode, p.stderr)
    assert words in p.stderr and p.stderr.startswith("ucp: error:") and len(p.stderr.strip().splitlines()) == 1
    _no_traceback(p)


def test_corrupt_manifest_is_named(saved):
    path = store.resolve(saved)
    (path / "manifest.json").write_text("{not json")
    p = run("inspect", path)
    assert p.returncode == 1 and "manifest.json" in p.stderr
    _no_traceback(p)


@pytest.mark.dist
def test_demo_runs_and_resumes_exactly(tmp_path):
    p = run("demo", "--nproc", "2", "--steps", "6", "--save-every", "2", "--dir", tmp_path / "demo", timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed losses equal" in p.stdout
    assert [s for s, _ in store.list_steps(tmp_path / "demo")] == [4, 6]
