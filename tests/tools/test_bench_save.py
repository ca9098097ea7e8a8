"""tools/bench_save.py runs end to end on a tiny state and prints one JSON line with every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_save_smoke(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_save.py"), "--gb", "0.02", "--repeats", "1",
                        "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    doc = json.loads(lines[0])
    assert doc["verified"] is True
    for fig in ("save", "load_warm", "load_cold"):
        assert doc[f"ucp_{fig}_s"] > 0 and doc[f"dcp_{fig}_s"] > 0
        assert doc[f"speedup_{fig}"] == pytest.approx(doc[f"dcp_{fig}_s"] / doc[f"ucp_{fig}_s"], rel=0.02)
    assert abs(doc["ucp_gb"] - doc["state_gb"]) / doc["state_gb"] < 0.01  # replicated bytes written once
    assert list(tmp_path.iterdir()) == []  # cleaned up
