"""tools/bench_reshard.py runs end to end on a tiny state and prints one JSON line with every figure."""

from __future__ import annotations

import pytest

from tests.tools.bench import run_bench


@pytest.mark.slow
def test_bench_reshard_smoke(tmp_path):
    doc = run_bench("bench_reshard.py", "--size-mb", "20", "--repeats", "1", "--work", tmp_path)
    assert doc["bit_exact"] is True
    for world in (2, 3):
        share = doc[f"w{world}_share_gb"]
        assert share == pytest.approx(doc["state_gb"] / world, rel=0.01, abs=1e-4)
        for form in ("ucp_dist", "ucp_univ", "dcp"):
            read = doc[f"w{world}_{form}_read_gb_per_rank"]
            assert len(read) == world and all(b > 0 for b in read)
            assert doc[f"w{world}_{form}_read_ratio_max"] == pytest.approx(max(read) / share, rel=0.02)
            for temp in ("warm", "cold"):
                assert doc[f"w{world}_{form}_{temp}_s"] > 0 and doc[f"w{world}_{form}_{temp}_gbps"] > 0
        # the universal form reads only the chunks each region overlaps: about the share
        assert doc[f"w{world}_ucp_univ_read_ratio_max"] < 1.5
        for form in ("ucp_dist", "ucp_univ"):
            for temp in ("warm", "cold"):
                assert doc[f"w{world}_speedup_{form}_{temp}"] == pytest.approx(
                    doc[f"w{world}_dcp_{temp}_s"] / doc[f"w{world}_{form}_{temp}_s"], rel=0.02)
    for target in ("target_read_met", "target_speed_met"):
        assert set(doc[target]) == {"ucp_dist", "ucp_univ"} and all(isinstance(v, bool) for v in doc[target].values())
    assert doc["target_read_met"]["ucp_univ"] == all(doc[f"w{w}_ucp_univ_read_ratio_max"] <= 1.1 for w in (2, 3))
    assert list(tmp_path.iterdir()) == []  # cleaned up
