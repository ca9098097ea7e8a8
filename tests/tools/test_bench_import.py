"""tools/bench_import.py runs end to end on a tiny DeepSpeed save and prints one JSON line."""

from __future__ import annotations

import pytest

from tests.tools.bench import run_bench


@pytest.mark.deepspeed
def test_bench_import_smoke():
    pytest.importorskip("deepspeed")
    doc = run_bench("bench_import.py", "--width", "64", "--layers", "2", "--repeats", "1", timeout=600)
    assert doc["bench"] == "ucp_import_deepspeed" and doc["agree"] is True
    assert doc["tensors_compared"] == 4 * 4  # 4 parameters x (fp32, exp_avg, exp_avg_sq, step)
    assert doc["ucp_s"] > 0 and doc["ds_to_universal_s"] > 0
    assert doc["speedup"] == pytest.approx(doc["ds_to_universal_s"] / doc["ucp_s"], rel=0.01)
    assert doc["ucp_temp_files"] == 0 and doc["ucp_files_per_key"] <= 2 and doc["target_files_met"] is True
    assert doc["ucp_tensor_keys"] == 4 * 5  # model weight, master, exp_avg, exp_avg_sq, step


@pytest.mark.deepspeed
def test_bench_import_tp2_smoke():
    pytest.importorskip("deepspeed")
    doc = run_bench("bench_import.py", "--tp", "2", "--width", "16", "--layers", "1", "--repeats", "1", timeout=600)
    assert doc["tp"] == 2 and doc["model"] == "megatron-gpt" and doc["agree"] is True
    # 1 layer: 12 parameters + 2 embeddings + 2 final norm, each fp32, exp_avg, exp_avg_sq, step
    assert doc["tensors_compared"] == 16 * 4 and doc["ucp_tensor_keys"] == 16 * 5
    assert doc["ucp_temp_files"] == 0 and doc["ucp_files_per_key"] <= 2
