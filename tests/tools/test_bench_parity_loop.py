"""tools/bench_parity_loop.py runs end to end on a tiny model and prints one JSON line with every figure."""

from __future__ import annotations

import pytest

from tests.tools.bench import run_bench


@pytest.mark.slow
def test_bench_parity_loop_smoke():
    doc = run_bench("bench_parity_loop.py", "--nodes", "3", "--mb", "0.6", "--layers", "2", "--batch", "2",
                    "--every", "2", "--rounds", "3", "--snapshots", "2", timeout=300)
    assert doc["bench"] == "ucp_parity_loop" and (doc["nodes"], doc["parity"], doc["rounds"]) == (3, 1, 3)
    assert doc["shm_left"] == 0 and doc["parity_bytes"] > 0
    for kind in ("none", "plain", "parity"):
        assert doc[f"step_{kind}_s"] > 0 and doc[f"cpu_{kind}_s"] > 0 and doc[f"step_{kind}_spread"] >= 0
    assert doc["slowdown_parity_min"] <= doc["slowdown_parity"] <= doc["slowdown_parity_max"]
    assert doc["snapshot_ratio"] > 0 and len(doc["load_average_before"]) == 3
