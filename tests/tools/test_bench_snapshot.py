"""tools/bench_snapshot.py runs end to end on a tiny state (2 ranks): it prints one JSON line with every
figure, restores from memory after killing its trainers, and leaves no agent or shared memory behind."""

from __future__ import annotations

import os

import pytest

from tests.tools.bench import run_bench


def _bench_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"ucp.{os.getuid()}.benchsnap-")}


@pytest.mark.slow
def test_bench_snapshot_smoke(tmp_path):
    before = _bench_segments()
    doc = run_bench("bench_snapshot.py", "--size-mb", "20", "--steps", "2", "--rounds", "1", "--repeats", "1",
                    "--work", tmp_path, timeout=300)

    assert doc["nproc"] == 2 and doc["layout"] == {"dp": 2, "zero": 3}
    assert 0.015 < doc["state_gb"] < 0.03
    assert doc["snapshot_gb"] == pytest.approx(doc["state_gb"], rel=0.05)
    assert len(doc["step_ms_without_all"]) == len(doc["step_ms_with_all"]) == 2
    for key in ("step_ms_without", "step_ms_with", "save_call_ms", "snapshot_s", "snapshot_gbps", "memcpy_s",
                "memcpy_gbps", "memcpy_shm_gbps", "dcp_async_block_ms", "dcp_async_done_s", "durable_save_s",
                "restore_memory_first_s", "restore_memory_s", "restore_durable_cold_s", "restore_durable_warm_s"):
        assert doc[key] > 0, key
    assert doc["hook_wait_ms"] >= 0
    # the breakdown of the background write wraps a ucp internal: null when it could not be taken
    for key in ("snapshot_write_s", "snapshot_checksum_s", "snapshot_write_in_loop_ms"):
        assert doc[key] is None or doc[key] >= 0, key
    assert doc["stall_ms"] == pytest.approx(doc["step_ms_with"] - doc["step_ms_without"], abs=0.05)
    assert doc["snapshot_gbps"] == pytest.approx(doc["snapshot_gb"] / doc["snapshot_s"], rel=0.02)
    for name in ("memory", "durable_cold", "durable_warm"):
        assert doc[f"restore_{name}_gbps"] == pytest.approx(doc["state_gb"] / doc[f"restore_{name}_s"], rel=0.02)
        assert doc[f"restore_{name}_phases"], name
    assert "memory" in doc["restore_memory_phases"] and "find" in doc["restore_durable_cold_phases"]
    assert doc["speedup_memory_vs_durable_cold"] == pytest.approx(
        doc["restore_durable_cold_s"] / doc["restore_memory_s"], rel=0.02)

    # the restart restored from the agent's memory, the plain checkpointer from storage, both exactly
    assert doc["restore_source_memory"] == "memory" and doc["restore_source_durable"] == "durable"
    assert doc["trainers_killed"] == 2 and doc["agent_survived_kill"] is True
    assert doc["bit_exact"] is True and "mismatch" not in doc
    for target in ("target_stall_met", "target_throughput_met", "target_restore_met"):
        assert isinstance(doc[target], bool), target

    # the agent was stopped and its memory removed; the work directory was cleaned up
    assert doc["shm_left"] == 0
    assert _bench_segments() <= before
    assert list(tmp_path.iterdir()) == []
