"""tools/bench_save.py runs end to end on a tiny state and prints one JSON line with every figure."""

from __future__ import annotations

import pytest

from tests.tools.bench import run_bench


@pytest.mark.slow
def test_bench_save_smoke(tmp_path):
    doc = run_bench("bench_save.py", "--gb", "0.02", "--repeats", "1", "--dir", tmp_path, timeout=300)
    assert doc["verified"] is True
    for fig in ("save", "load_warm", "load_cold"):
        assert doc[f"ucp_{fig}_s"] > 0 and doc[f"dcp_{fig}_s"] > 0
        assert doc[f"speedup_{fig}"] == pytest.approx(doc[f"dcp_{fig}_s"] / doc[f"ucp_{fig}_s"], rel=0.02)
    assert abs(doc["ucp_gb"] - doc["state_gb"]) / doc["state_gb"] < 0.01  # replicated bytes written once
    assert list(tmp_path.iterdir()) == []  # cleaned up
