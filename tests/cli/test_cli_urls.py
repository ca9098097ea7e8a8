"""The CLI on a URL it does not serve: one line, a non-zero exit, no traceback, and never the local
directory the URL would name as a path (``./s3:/bucket/run``), even when one exists there."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.synthetic import write_checkpoint
from ucp.format import Layout, Pattern

URL = "s3://bucket/run"


@pytest.fixture
def decoy(tmp_path):
    tensors = {"model/w": (np.arange(6, dtype=np.float32).reshape(2, 3), "float32", Pattern())}
    write_checkpoint(tmp_path / "s3:/bucket/run", 3, tensors, Layout.from_sizes(dp=1))
    return tmp_path


def _ucp(cwd: Path, *args: str):
    return subprocess.run([sys.executable, "-m", "ucp.cli.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("args", [("verify", URL), ("inspect", URL), ("verify", URL, "--step", "3"),
                                  ("convert", URL, "out", "--quiet"), ("export", URL, "hf", "--quiet")])
def test_a_url_is_refused_in_one_line(decoy, args):
    ok = _ucp(decoy, args[0], str(decoy / "s3:/bucket/run"), *args[2:]) if args[0] in ("verify", "inspect") else None
    assert ok is None or ok.returncode == 0  # (the decoy is a good checkpoint, as a local path)
    r = _ucp(decoy, *args)
    assert r.returncode == 1, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ucp: error: {URL}: ") and "local path" in lines[0], r.stderr
    assert "OK" not in r.stdout and not (decoy / "out").exists() and not (decoy / "hf").exists()


def test_export_to_a_url_is_refused(decoy):
    assert _ucp(decoy, "convert", str(decoy / "s3:/bucket/run"), "u", "--quiet").returncode == 0
    r = _ucp(decoy, "export", "u", "s3://bucket/hf", "--quiet")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "local path" in r.stderr, r
    assert not (decoy / "s3:" / "bucket" / "hf").exists()
