"""tools/bench_convert.py runs end to end on a tiny trainer checkpoint (8 ranks, tp=2 pp=2 dp=2 zero=1)
and prints one JSON line with every figure; the universal output it keeps verifies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools.bench import run_bench

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_convert.py"


@pytest.mark.slow
def test_bench_convert_smoke(tmp_path):
    from ucp.storage.universal_io import read_header, verify_universal

    doc = run_bench("bench_convert.py", "--size-mb", "2", "--workers", "2", "--repeats", "1", "--work", tmp_path,
                    "--keep", "--verify")

    assert doc["layout"] == {"dp": 2, "tp": 2, "pp": 2, "zero": 1, "manual_tp": True}
    assert doc["config"]["n_layers"] % 2 == 0 and doc["config"]["n_heads"] % 2 == 0
    assert doc["data_files"] == 8
    assert 0 < doc["source_bytes"] <= doc["size_bytes"] < 10e6
    assert doc["tensors"] > 0 and 0 < doc["largest_tensor_bytes"] <= doc["universal_bytes"]
    for key in ("raw_read_gbps_cold", "raw_read_gbps_warm", "raw_write_gbps", "convert_gbps_cold",
                "convert_gbps_warm", "convert_seconds_cold", "convert_seconds_warm", "ratio_to_raw_cold"):
        assert doc[key] > 0, key
    ratio = (doc["source_bytes"] / doc["convert_seconds_cold"]) / (doc["size_bytes"] / min(doc["raw_read_cold_all_s"]))
    assert doc["ratio_to_raw_cold"] == pytest.approx(ratio, rel=0.05, abs=2e-3)  # figures are rounded
    assert doc["source_resident_after_drop"] in (None, 0) or doc["source_resident_after_drop"] < 0.5
    assert doc["rss_baseline_bytes"] > 0
    assert 0 < doc["peak_rss_above_baseline_bytes"] < 2e9
    assert doc["peak_rss_over_largest"] == pytest.approx(doc["peak_rss_above_baseline_bytes"] / doc["largest_tensor_bytes"],
                                                         rel=0.01)
    assert doc["max_files_per_key"] == 2  # an array's zarr.json and its one shard
    assert doc["files_total"] >= 2 * doc["tensors"]
    assert set(doc["targets"]) == {"convert_ge_half_raw", "rss_le_3x_largest", "files_le_2_per_key"}
    assert all(isinstance(v, bool) for v in doc["targets"].values())
    assert doc["targets"]["files_le_2_per_key"] is True
    assert doc["verified"] is True

    # the cached source and the kept output; the output verifies independently of the tool
    (src,) = [p for p in tmp_path.iterdir() if p.name.startswith("src-")]
    dst = tmp_path / "universal"
    header = read_header(dst)
    assert len(header.tensors) == doc["tensors"]
    assert verify_universal(dst, header).ok
    assert not (tmp_path / "raw_write").exists()

    # a second run reuses the cached source (no 8-rank launch) and, without --keep, removes its output
    p = subprocess.run([sys.executable, str(TOOL), "--size-mb", "2", "--workers", "1", "--repeats", "1",
                        "--work", str(tmp_path), "--no-warm"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "reusing the source checkpoint" in p.stderr
    doc2 = json.loads(p.stdout.strip())
    assert doc2["convert_gbps_warm"] is None and doc2["size_bytes"] == doc["size_bytes"]
    assert not dst.exists() and src.exists()
