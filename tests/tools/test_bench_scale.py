"""tools/bench_scale.py runs ucp's save, load and restore metadata code for 64 and 512 simulated ranks
(a Llama-70B cut to a few layers, and an MoE) and prints one JSON line; the manifest its commit wrote
is one ucp's ``read_manifest`` accepts, with the sizes of the real job; what a rank other than the
committing one sends and reads is its share."""

from __future__ import annotations

from pathlib import Path

from tests.tools.bench import run_bench

SECONDS = ("save_metadata_s", "save_cached_metadata_s", "plan_s", "commit_first_s", "commit_build_s", "commit_write_s",
           "commit_s", "commit_root_recv_s", "load_metadata_s", "restore_root_s", "restore_own_s",
           "restore_metadata_s", "restore_resharded_metadata_s", "restore_resharded_owner_s",
           "restore_resharded_root_s", "restore_resharded_root_choice_s", "restore_resharded_root_state_s")
BYTES = ("save_capture_bytes", "save_plan_bytes", "save_write_bytes", "save_bytes_per_rank", "save_cached_bytes_per_rank",
         "save_capture_root_bytes", "save_write_root_bytes", "manifest_bytes", "manifest_json_bytes",
         "manifest_tables_bytes", "manifest_bytes_read_per_rank", "load_targets_exchange_bytes", "load_bytes_per_rank",
         "restore_summaries_bytes", "restore_own_header_bytes", "restore_bytes_per_rank",
         "restore_resharded_bytes_per_rank", "restore_resharded_common_bytes", "restore_resharded_root_choice_bytes",
         "restore_resharded_root_state_bytes", "save_states_bytes", "peak_rss_bytes")


def llama70b_bytes(layers: int) -> int:
    """Bytes of a Llama-70B checkpoint of ``layers`` layers: bf16 parameters + fp32 master, exp_avg, exp_avg_sq."""
    h, ffn, vocab = 8192, 28672, 128256
    per_layer = (h + 2 * 1024) * h + h * h + 2 * ffn * h + h * ffn + 2 * h
    params = layers * per_layer + 2 * vocab * h + h
    return params * (2 + 3 * 4)


def check(doc: dict, world: int) -> None:
    assert doc["world"] == world and doc["tp"] * doc["pp"] * doc["dp"] * doc["ep"] == world
    assert doc["target_world"] == world * 3 // 4
    assert doc["target_tp"] * doc["target_pp"] * doc["target_dp"] * doc["ep"] == doc["target_world"]
    assert doc["sampled_ranks"] == [1, world // 2, world - 1] and doc["committing_rank"] == 0
    assert doc["clock"] == "cpu"
    for key in SECONDS:
        assert isinstance(doc[key], float) and doc[key] >= 0, key
    for key in ("save_metadata_s", "commit_s", "load_metadata_s", "restore_metadata_s", "restore_resharded_metadata_s"):
        assert doc[key] > 0, key
    for key in BYTES:
        assert isinstance(doc[key], int) and doc[key] > 0, key
    assert 0 < doc["fragments"] <= doc["pieces_gathered"]
    assert doc["block_crcs"] > doc["fragments"]  # most fragments are far over one 64 KiB block
    assert 0 < doc["restore_fragments_per_rank"] < doc["fragments"]  # a rank resuming in place: its own
    # a rank other than 0 sends its own share and receives verdicts: the committing rank gets the rest
    assert doc["save_cached_bytes_per_rank"] <= doc["save_bytes_per_rank"]  # (no plan exchange)
    assert doc["save_write_root_bytes"] > world * doc["save_write_bytes"] // 4
    # the capture's fold: rank 0 gets every rank's digests but each distinct state value once
    assert world * 32 < doc["save_capture_root_bytes"] < doc["save_states_bytes"] // 4
    assert doc["save_cached_metadata_s"] <= doc["save_metadata_s"] + 1e-3
    assert doc["manifest_bytes"] == doc["manifest_json_bytes"] + doc["manifest_tables_bytes"]
    assert doc["manifest_bytes_read_per_rank"] < doc["manifest_bytes"] / 2  # the pages of its regions, not all
    assert doc["load_bytes_per_rank"] <= doc["manifest_bytes_read_per_rank"] + doc["load_targets_exchange_bytes"]
    assert doc["restore_bytes_per_rank"] < doc["restore_summaries_bytes"] + 2 * doc["restore_own_header_bytes"]
    # onto the smaller world, from memory: a rank's fragments come from their keys' owners, not every header
    assert 0 < doc["restore_resharded_fragments_per_rank"] < doc["fragments"]
    busiest = doc["restore_resharded_busiest_owner"]
    assert 0 < busiest["keys"] <= busiest["entries"] < doc["pieces_gathered"] and busiest["answer_s"] > 0
    assert set(doc["restore_resharded_metadata_s_by_rank"]) == {str(r) for r in doc["target_sampled_ranks"]}
    assert set(doc["load_pieces_by_rank"]) == {str(r) for r in doc["target_sampled_ranks"]}
    for counts in doc["load_pieces_by_rank"].values():
        assert counts["exact"] + counts["resharded"] > 0


def test_bench_scale_world_64(tmp_path):
    from ucp.storage.manifest_io import read_manifest

    doc = run_bench("bench_scale.py", "--world", "64", "--layers", "8", "--work", tmp_path, "--keep")
    check(doc, 64)
    assert (doc["layout"], doc["layers"], doc["tp"], doc["pp"], doc["dp"]) == ("llama70b", 8, 8, 8, 1)
    assert doc["checkpoint_bytes"] == llama70b_bytes(8)  # real sizes: bf16 2 B, fp32 4 B per element
    manifest = read_manifest(Path(doc["checkpoint_dir"]))  # (validates: every element held exactly once)
    assert len(manifest.fragments) == doc["fragments"] and manifest.nbytes == doc["checkpoint_bytes"]
    assert manifest.layout.sizes == {"pp": 8, "dp": 1, "tp": 8} and manifest.layout.zero == 1
    assert sum(len(f.blocks) for f in manifest.fragments) == doc["block_crcs"]
    assert set(manifest.state["ranks"]) == {str(r) for r in range(64)} and "rng" in manifest.state["ranks"]["5"]
    assert manifest.format_version == "1.3"
    assert set(manifest.state["shared"]) == {"model", "scheduler", "extras"}
    qkv = manifest.tensors["model/layers.0.attn.qkv.weight"]
    assert qkv.shape == (10240, 8192) and qkv.dtype == "bfloat16" and qkv.pattern.fused is not None
    master = manifest.tensors["optim/layers.0.attn.qkv.weight/master"]
    assert master.dtype == "float32" and master.pattern.flat == "dp"


def test_bench_scale_moe_resharded(tmp_path):
    """An MoE (experts placed by ep) at 512 ranks, loaded onto 384 (dp 8 -> 6): flat optimizer
    partitions are resharded."""
    doc = run_bench("bench_scale.py", "--world", "512", "--layout", "moe", "--layers", "4", "--work", tmp_path)
    check(doc, 512)
    assert (doc["layout"], doc["ep"], doc["dp"], doc["target_dp"]) == ("moe", 8, 8, 6)
    assert "checkpoint_dir" not in doc and list(tmp_path.iterdir()) == []  # cleaned up
    assert any(c["resharded"] and c["blocks"] for c in doc["load_pieces_by_rank"].values())
