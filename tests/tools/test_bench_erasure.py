"""tools/bench_erasure.py runs end to end on tiny buffers and prints one JSON line with every figure."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.tools.bench import TOOLS, run_bench


@pytest.mark.slow
def test_bench_erasure_smoke():
    pytest.importorskip("pyeclib")
    doc = run_bench("bench_erasure.py", "--stripe-kb", "64", "--total-mb", "2", "--repeats", "1", timeout=120)

    assert doc["verified"] is True and doc["pyeclib_parity_matches"] is True
    assert doc["stripe_bytes"] == 64 * 1024 and doc["threads"] == 1
    assert (doc["xor_code"], doc["rs42_code"], doc["rs82_code"]) == ("xor(4+1)", "rs_cauchy(4+2)", "rs_cauchy(8+2)")
    # whole stripe sets only: 2 MB holds 7 sets of 4 x 64 KiB and 3 of 8 x 64 KiB
    assert doc["xor_bytes"] == doc["rs42_bytes"] == 7 * 4 * 65536 and doc["rs82_bytes"] == 3 * 8 * 65536
    for key in ("memcpy", "xor_encode", "xor_decode", "rs42_encode", "rs42_decode", "rs82_encode", "rs82_decode",
                "pyeclib_api_rs82_encode"):
        assert doc[f"{key}_gbps"] > 0, key
    for key in ("xor_encode", "xor_decode", "rs82_encode"):
        assert doc[f"{key}_over_memcpy"] == pytest.approx(doc[f"{key}_gbps"] / doc["memcpy_gbps"], rel=0.01, abs=0.002)
    assert doc["target_xor_met"] == (min(doc["xor_encode_over_memcpy"], doc["xor_decode_over_memcpy"]) >= 0.5)
    assert doc["target_rs82_encode_met"] == (doc["rs82_encode_gbps"] >= 4.0)
    assert "isal" in doc["isal"] and doc["isal_version"] and doc["numpy"] and isinstance(doc["malloc_env"], dict)


def test_bench_erasure_rejects_sizes_without_a_stripe_set():
    p = subprocess.run([sys.executable, str(TOOLS / "bench_erasure.py"), "--stripe-kb", "1024", "--total-mb", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and p.stdout == ""
    assert "holds no RS(8+2) stripe set" in p.stderr
