"""tools/bench_objstore.py runs end to end on a tiny state against the test's S3 server and prints one
JSON line with every figure."""

from __future__ import annotations

import pytest

from tests.tools.bench import run_bench


@pytest.mark.s3
def test_bench_objstore_quick(s3, tmp_path):
    doc = run_bench("bench_objstore.py", "--quick", "--endpoint", s3.endpoint, "--dir", tmp_path, timeout=300)
    assert doc["verified"] is True and doc["repeats"] == 1
    for kind in ("ucp_s3", "ucp_local", "dcp_s3"):
        for fig in ("save", "load"):
            assert doc[f"{kind}_{fig}_s"] > 0 and doc[f"{kind}_{fig}_spread_s"]["n"] == 1
    for fig in ("save", "load"):
        assert doc[f"speedup_{fig}"] == pytest.approx(doc[f"dcp_s3_{fig}_s"] / doc[f"ucp_s3_{fig}_s"], rel=0.02)
    assert 1.0 <= doc["ucp_s3_read_amplification"] <= 1.1
    for name, sides in doc["cpu_s"].items():  # (the ranks' CPU is counted; a remote server's is not seen)
        assert sides["client"] > 0 and sides["server"] == 0, name
    assert "server_floor_s" not in doc
    assert abs(doc["gb"]["ucp_s3"] - doc["state_gb"]) / doc["state_gb"] < 0.01
    assert list(tmp_path.iterdir()) == []  # (the local checkpoints removed)
    fs = s3.filesystem()
    left = [k for d in fs.ls("ucp", detail=False) if "bench-objstore" in d
            for k, info in fs.find(d, detail=True).items() if info["type"] != "directory"]
    assert left == []  # (and its objects on the server)


@pytest.mark.s3
def test_bench_objstore_quick_over_https(tmp_path):
    """``--tls``: the bench starts its own server speaking HTTPS (a self-signed certificate) and both
    clients save and load through it; no signed-upload floor is reported (no client signs bodies there)."""
    from tests.s3server import require_weed

    require_weed()
    doc = run_bench("bench_objstore.py", "--quick", "--tls", "--dir", tmp_path, timeout=300)
    assert doc["verified"] is True and doc["tls"] is True and doc["server"].endswith("over https")
    assert doc["cpu_s"]["ucp_s3_save"]["server"] > 0 and doc["server_floor_s"]["ucp_s3_save"] > 0
    assert not [k for k in doc if "signed_floor" in k]
    assert list(tmp_path.iterdir()) == []


def test_bench_objstore_refuses_tls_with_an_endpoint():
    import subprocess
    import sys

    from tests.tools.bench import TOOLS

    p = subprocess.run([sys.executable, str(TOOLS / "bench_objstore.py"), "--tls", "--endpoint", "http://x:1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--tls" in p.stderr and "Traceback" not in p.stderr
