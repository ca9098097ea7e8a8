"""tools/bench_parity.py runs end to end on tiny states and prints one JSON line with every figure, the
step-time slowdown of the training loop with parity against without included."""

from __future__ import annotations

import pytest

from tests.tools.bench import run_bench


@pytest.mark.slow
def test_bench_parity_smoke():
    doc = run_bench("bench_parity.py", "--nodes", "3", "--mb", "0.6", "--snapshots", "1", "--steps", "2",
                    "--rounds", "2", timeout=300)
    assert doc["bench"] == "ucp_parity_exchange" and (doc["nodes"], doc["group"], doc["parity"]) == (3, 3, 1)
    assert doc["rebuilt_bit_exact"] is True and doc["shm_left"] == 0
    assert doc["snapshot_plain_s"] > 0 and doc["snapshot_parity_s"] > 0 and doc["memcpy_gbps"] > 0
    assert doc["parity_extra_s"] == pytest.approx(doc["snapshot_parity_s"] - doc["snapshot_plain_s"], abs=2e-4)
    # 3 nodes, parity 1: the agents keep 3/2 of the snapshots' bytes (stripes rounded to 64 bytes)
    assert doc["memory_overhead_ideal"] == 1.5 and doc["memory_overhead"] == pytest.approx(1.5, rel=0.01)
    assert doc["snapshot_bytes"] >= 3 * 0.6e6 * 0.99

    # the training loop: each kind's steps, paired by round
    for kind in ("none", "plain", "parity"):
        assert doc[f"step_ms_{kind}"] > 0 and len(doc[f"step_ms_{kind}_all"]) == 2, kind
    assert doc["step_slowdown_parity"] == pytest.approx(doc["step_ms_parity"] / doc["step_ms_plain"] - 1, abs=2e-3)
    assert doc["step_slowdown_plain"] == pytest.approx(doc["step_ms_plain"] / doc["step_ms_none"] - 1, abs=2e-3)
    assert len(doc["step_slowdown_parity_rounds"]) == 2
    spread = doc["step_slowdown_parity_spread"]
    assert spread["n"] == 2 and spread["min"] <= spread["median"] <= spread["max"]
    assert spread["median"] == pytest.approx(doc["step_slowdown_parity_paired"], abs=2e-4)
    assert doc["snapshot_parity_over_plain"] == pytest.approx(doc["snapshot_parity_s"] / doc["snapshot_plain_s"],
                                                              rel=0.01)
    assert {"start", "after_loop", "end"} <= set(doc["load_avg"])
