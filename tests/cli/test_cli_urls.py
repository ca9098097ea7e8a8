"""The CLI on a URL: served from its store (inspect, verify, convert's ucp source, export's source) or
refused in one line (convert's foreign sources, export's output), with a non-zero exit and no traceback, and never read from the local directory the URL would
name as a path (``./memory:/bucket/run``), even when one exists there. (fsspec's memory:// is empty in
a new process: the s3 tier serves real checkpoints, tests/checkpoint/test_object_store.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import write_checkpoint
from ucp.format import Layout, Pattern

URL = "memory://bucket/run"


@pytest.fixture
def decoy(tmp_path):
    tensors = {"model/w": (np.arange(6, dtype=np.float32).reshape(2, 3), "float32", Pattern())}
    write_checkpoint(tmp_path / "memory:/bucket/run", 3, tensors, Layout.from_sizes(dp=1))
    return tmp_path


def _ucp(cwd: Path, *args: str):
    return subprocess.run([sys.executable, "-m", "ucp.cli.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [("verify", URL), ("inspect", URL), ("verify", URL, "--step", "3")])
def test_a_url_is_read_from_its_store(decoy, args):
    assert _ucp(decoy, args[0], str(decoy / "memory:/bucket/run"), *args[2:]).returncode == 0  # (the decoy is good)
    r = _ucp(decoy, *args)
    assert r.returncode == 2, r  # (not found: the store is empty)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ucp: error: memory://") and "no " in lines[0], r.stderr
    assert "OK" not in r.stdout


@pytest.mark.parametrize("args", [("convert", URL, "out", "--from", "hf", "--quiet")])
def test_a_url_not_served_is_refused_in_one_line(decoy, args):
    r = _ucp(decoy, *args)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ucp: error: {URL}: ") and "local path" in lines[0], r.stderr
    assert not (decoy / "out").exists() and not (decoy / "hf").exists()


def test_convert_reads_a_url_source_from_its_store(decoy):
    r = _ucp(decoy, "convert", URL, "out", "--quiet")
    assert r.returncode == 2 and r.stderr.startswith(f"ucp: error: memory://") and "no " in r.stderr, r
    assert not (decoy / "out").exists()


def test_export_reads_a_url_source_from_its_store(decoy):
    r = _ucp(decoy, "export", URL, "hf", "--quiet")
    assert r.returncode == 2 and r.stderr.startswith("ucp: error: memory://") and "no such directory" in r.stderr, r
    assert not (decoy / "hf").exists()


def test_export_to_a_url_is_refused(decoy):
    assert _ucp(decoy, "convert", str(decoy / "memory:/bucket/run"), "u", "--quiet").returncode == 0
    r = _ucp(decoy, "export", "u", "memory://bucket/hf", "--quiet")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "local path" in r.stderr, r
    assert not (decoy / "memory:" / "bucket" / "hf").exists()
