"""tools/bench_parity.py runs end to end on tiny states and prints one JSON line with every figure."""

from __future__ import annotations

import pytest

from tests.tools.bench import run_bench


@pytest.mark.slow
def test_bench_parity_smoke():
    doc = run_bench("bench_parity.py", "--nodes", "3", "--mb", "0.6", "--snapshots", "1", timeout=300)
    assert doc["bench"] == "ucp_parity_exchange" and (doc["nodes"], doc["group"], doc["parity"]) == (3, 3, 1)
    assert doc["rebuilt_bit_exact"] is True and doc["shm_left"] == 0
    assert doc["snapshot_plain_s"] > 0 and doc["snapshot_parity_s"] > 0 and doc["memcpy_gbps"] > 0
    assert doc["parity_extra_s"] == pytest.approx(doc["snapshot_parity_s"] - doc["snapshot_plain_s"], abs=2e-4)
    # 3 nodes, parity 1: the agents keep 3/2 of the snapshots' bytes (stripes rounded to 64 bytes)
    assert doc["memory_overhead_ideal"] == 1.5 and doc["memory_overhead"] == pytest.approx(1.5, rel=0.01)
    assert doc["snapshot_bytes"] >= 3 * 0.6e6 * 0.99
