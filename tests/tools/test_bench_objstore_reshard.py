"""tools/bench_objstore_reshard.py runs end to end on a tiny state against the test's S3 server (2 ranks
save, 3 load, ucp and DCP, with an added round trip) and prints one JSON line with every figure."""

from __future__ import annotations

import pytest

from tests.tools.bench import run_bench


@pytest.mark.s3
def test_bench_objstore_reshard_quick(s3, tmp_path):
    doc = run_bench("bench_objstore_reshard.py", "--quick", "--latency-ms", "5", "--endpoint", s3.endpoint,
                    "--dir", tmp_path, timeout=300)
    assert doc["bit_exact"] is True and doc["repeats"] == 1 and doc["latency_ms"] == 5
    assert (doc["save_nproc"], doc["load_nproc"]) == (2, 3)
    for kind in ("ucp", "dcp"):
        assert doc[f"{kind}_load_s"] > 0.005 and doc[f"{kind}_load_spread_s"]["n"] == 1  # (a round trip at least)
    assert doc["speedup"] == pytest.approx(doc["dcp_load_s"] / doc["ucp_load_s"], rel=0.02)
    assert len(doc["ucp_gets_per_rank"]) == 3 and min(doc["ucp_gets_per_rank"]) >= 1
    fs = s3.filesystem()
    left = [k for d in fs.ls("ucp", detail=False) if "bench-reshard" in d
            for k, info in fs.find(d, detail=True).items() if info["type"] != "directory"]
    assert left == []  # (its objects removed from the server)
