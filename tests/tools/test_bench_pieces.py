"""tools/bench_pieces.py runs end to end on a small model and prints one JSON line with every figure."""

from __future__ import annotations

import pytest

from tests.tools.bench import run_bench


@pytest.mark.slow
def test_bench_pieces_smoke():
    doc = run_bench("bench_pieces.py", "--layers", "3", "--width", "16", "--repeats", "2", "--saves", "2", timeout=300)
    assert doc["bench"] == "ucp_load_pieces" and doc["bit_exact"] and doc["pieces_per_rank"] > 3 * 3
    assert doc["agents_left"] == 0 and doc["shm_left"] == 0
    for kind in ("paused", "collector_on"):
        assert doc[f"{kind}_load_s"] > 0 and doc[f"{kind}_cpu_s"] > 0 and len(doc[f"{kind}_collections"]) == 2
        assert doc[f"{kind}_per_piece_us"]["wall"] > 0 and "read" in doc[f"{kind}_phases"]
    for young, middle, heap in doc["paused_collections"]:  # (paused: at most the young one as it resumes)
        assert young <= 1 and middle == heap == 0
    assert doc["save_call_s"] > 0 and doc["speedup_paused"] > 0 and len(doc["load_avg"]["start"]) == 3
