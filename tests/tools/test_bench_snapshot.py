"""tools/bench_snapshot.py runs end to end on a tiny state (2 ranks): it prints one JSON line with every
figure (ucp, DCP at its defaults and at its best settings in the same training loop, the floors),
restores from memory after killing its trainers, and leaves no agent, shared memory or DCP checkpoint
behind."""

from __future__ import annotations

import os

import pytest

from tests.tools.bench import run_bench

QUANTILES = ("min", "p25", "median", "p75", "max")


def _bench_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm")
            if n.startswith(f"ucp.{os.getuid()}.benchsnap-") or n.startswith("ucp-bench-snapshot")}


def _check_spread(spread: dict, n: int, median: float | None = None) -> None:
    values = [spread[q] for q in QUANTILES]
    assert values == sorted(values) and spread["n"] == n, spread
    if median is not None:
        assert spread["median"] == pytest.approx(median, rel=0.01, abs=0.02)


@pytest.mark.slow
def test_bench_snapshot_quick(tmp_path):
    before = _bench_segments()
    doc = run_bench("bench_snapshot.py", "--quick", "--work", tmp_path, timeout=400)

    assert doc["nproc"] == 2 and doc["layout"] == {"dp": 2, "zero": 3}
    assert (doc["steps"], doc["rounds"], doc["repeats"]) == (2, 2, 2)
    assert 0.015 < doc["state_gb"] < 0.03
    assert doc["snapshot_gb"] == pytest.approx(doc["state_gb"], rel=0.05)

    # the training loop: every kind measured, paired by round; stall = median with - median without
    assert len(doc["step_ms_without_all"]) == len(doc["step_ms_with_all"]) == 2
    for pre in ("", "dcp_default_", "dcp_best_"):
        step = doc[f"{pre}step_ms" if pre else "step_ms_with"]
        assert step > 0 and len(doc[f"{pre}step_ms_all" if pre else "step_ms_with_all"]) == 2
        assert doc[f"{pre}stall_ms"] == pytest.approx(step - doc["step_ms_without"], abs=0.05)
        assert len(doc[f"{pre}stall_ms_rounds"]) == 2
        _check_spread(doc[f"{pre}stall_ms_spread"], 2, doc[f"{pre}stall_ms_paired"])
        assert doc[f"{pre}save_call_ms"] > 0
    assert doc["hook_wait_ms"] >= 0 and doc["dcp_best_staging_wait_ms"] >= 0
    for kind in ("dcp_default", "dcp_best"):
        assert doc[f"{kind}_async_save_ms"] > 0 and doc[f"{kind}_state_dict_ms"] > 0
        assert doc[f"{kind}_upload_wait_ms"] >= 0
    best = doc["dcp_configs"]["dcp_best"]
    assert best["async_stager"] == "DefaultStager, reused" and best["async_checkpointer_type"] == "process"
    assert best["staging_options"]["use_async_staging"] and best["staging_options"]["use_shared_memory"]
    assert doc["dcp_configs"]["dcp_default"]["async_stager"] is None
    # the breakdown of the background write wraps a ucp internal: null when it could not be taken
    for key in ("snapshot_write_s", "snapshot_write_in_loop_ms"):
        assert doc[key] is None or doc[key] >= 0, key

    # throughput next to the floors of the same bytes, medians with their spread
    assert doc["snapshot_gbps"] == pytest.approx(doc["snapshot_gb"] / doc["snapshot_s"], rel=0.02, abs=1e-3)
    _check_spread(doc["snapshot_gbps_spread"], 2)
    floors = doc["floors_gbps"]
    for name in ("memcpy_1thread", "memcpy_2thread", "memcpy_shm_2thread", "memcpy_4k_2thread",
                 "verified_copy_shm_2thread", "crc32c_2thread", "crc32c_per_core"):
        assert floors[name] > 0, name
    for name in ("memcpy_1thread", "memcpy_2thread", "memcpy_shm_2thread", "memcpy_4k_2thread",
                 "verified_copy_shm_2thread", "crc32c_2thread"):
        _check_spread(doc[f"{name}_gbps_spread"], 2)
    assert doc["memcpy_gbps"] == floors["memcpy_2thread"]
    assert doc["snapshot_over_memcpy"] == pytest.approx(doc["snapshot_gbps"] / floors["memcpy_2thread"], rel=0.01,
                                                        abs=1e-4)

    # restores: medians with spread, next to memcpy, CRC-32C, write + fsync and a cold read
    for name in ("memory", "durable_cold", "durable_warm"):
        assert doc[f"restore_{name}_gbps"] == pytest.approx(doc["state_gb"] / doc[f"restore_{name}_s"], rel=0.02,
                                                            abs=1e-3)
        assert len(doc[f"restore_{name}_all_s"]) == 2 and doc[f"restore_{name}_phases"], name
        _check_spread(doc[f"restore_{name}_spread_s"], 2, doc[f"restore_{name}_s"])
    assert "memory" in doc["restore_memory_phases"] and "find" in doc["restore_durable_cold_phases"]
    rfloors = doc["restore_floors_gbps"]
    for name in ("memcpy_1thread", "memcpy_2thread", "crc32c_2thread", "crc32c_per_core", "write_fsync_2thread",
                 "cold_read_2thread", "memcpy_4k_2thread", "verified_copy_shm_2thread"):
        assert rfloors[name] > 0, name
    assert doc["restore_memory_first_s"] > 0 and doc["durable_save_s"] > 0
    assert doc["speedup_memory_vs_durable_warm"] == pytest.approx(
        doc["restore_durable_warm_s"] / doc["restore_memory_s"], rel=0.02)
    ratios = doc["ucp_over_floor"]
    assert ratios["restore_memory_vs_memcpy_2thread"] == pytest.approx(
        doc["restore_memory_gbps"] / rfloors["memcpy_2thread"], rel=0.02, abs=1e-4)
    assert ratios["snapshot_vs_memcpy_2thread"] == pytest.approx(doc["snapshot_over_memcpy"], rel=0.01, abs=1e-4)
    assert all(v is None or v >= 0 for v in ratios.values()), ratios

    # the restart restored from the agent's memory, the plain checkpointer from storage, both exactly
    assert doc["restore_source_memory"] == "memory" and doc["restore_source_durable"] == "durable"
    assert doc["trainers_killed"] == 2 and doc["agent_survived_kill"] is True
    assert doc["bit_exact"] is True and "mismatch" not in doc
    for target in ("target_stall_met", "target_throughput_met", "target_restore_met"):
        assert isinstance(doc[target], bool), target
    assert doc["target_stall_met"] == (doc["stall_ms"] <= doc["dcp_best_stall_ms"])
    assert {"start", "run1_after_loop", "run2_end", "end"} <= set(doc["load_avg"])
    assert all(len(v) == 3 for v in doc["load_avg"].values() if v is not None)

    # the agent was stopped and its memory removed; DCP's and the work directory were cleaned up
    assert doc["shm_left"] == 0
    assert _bench_segments() <= before
    assert list(tmp_path.iterdir()) == []
