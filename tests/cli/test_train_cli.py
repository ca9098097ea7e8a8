"""``ucp train``: the reference trainer on N local ranks through torch's elastic launcher."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import _no_traceback, run
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest


@pytest.mark.dist
def test_train_prints_one_json_line_per_step_and_resumes(tmp_path):
    ck = tmp_path / "ck"
    p = run("train", "--nproc", "2", "--zero", "3", "--steps", "4", "--save-every", "2", "--ckpt", ck, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert [d["step"] for d in lines] == [1, 2, 3, 4] and all(set(d) == {"step", "loss"} for d in lines)
    assert [s for s, _ in store.list_steps(ck)] == [2, 4]
    assert read_manifest(store.resolve(ck)).layout.sizes == {"dp": 2}

    r = run("train", "--nproc", "2", "--zero", "3", "--steps", "4", "--resume", store.step_dir(ck, 2), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [json.loads(line) for line in r.stdout.splitlines()]
    assert resumed == lines[2:]  # steps 3 and 4, bit-identical losses
    assert r.stderr.count("resumed from step 2") == 1, r.stderr  # once, not once per rank


@pytest.mark.parametrize("args, words", [
    (["--nproc", "4", "--tp", "3"], "not a multiple of tp x pp"),
    (["--nproc", "3", "--tp", "3"], "does not divide the model's 4 attention heads"),
    (["--nproc", "3", "--pp", "3"], "does not divide the model's 4 layers"),
    (["--nproc", "3", "--tp", "3", "--resume", "no/such/checkpoint"], "does not divide the model's 4 attention heads"),
    (["--nproc", "4", "--pp", "2", "--tp", "2"], "--pp with DTensor --tp is not supported"),
    (["--nproc", "2", "--save-every", "2"], "--save-every needs --ckpt"),
    (["--nproc", "5"], "does not divide the global batch"),
    (["--nproc", "3", "--moe", "8", "--ep", "3"], "--ep 3 cannot hold 8 experts in equal shares; use an --ep dividing"),
    # resuming at an ep that does not divide the experts: refused before any rank starts
    (["--nproc", "3", "--moe", "8", "--ep", "3", "--resume", "no/such/checkpoint"], "--ep 3 cannot hold 8 experts"),
    (["--nproc", "2", "--moe", "8", "--ep", "4"], "--ep 4 must divide the data-parallel size 2"),
    (["--nproc", "2", "--ep", "2"], "--ep 2 places experts: add --moe E"),
    (["--nproc", "2", "--moe", "8", "--ep", "0"], "--ep 0: use an integer >= 1"),
    (["--nproc", "2", "--moe", "-1"], "--moe -1: use the number of experts"),
    (["--nproc", "2", "--moe", "8", "--tp", "2"], "--moe with tensor or pipeline parallelism is not supported yet"),
    (["--nproc", "2", "--moe", "8", "--ep", "2", "--zero", "1"], "--moe with --zero 1 (the flat ZeRO-1 optimizer) is not"),
])
def test_train_refuses_impossible_layouts_in_one_line(args, words):
    p = run("train", *args)
    assert p.returncode == 1 and words in p.stderr and p.stderr.startswith("ucp: error:"), p.stderr
    assert p.stdout == ""
    _no_traceback(p)


@pytest.mark.dist
def test_zero1_checkpoint_holds_flat_ranges(tmp_path):
    ck = tmp_path / "ck"
    p = run("train", "--nproc", "2", "--zero", "1", "--steps", "2", "--save-every", "2", "--ckpt", ck, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(run("inspect", ck, "--json").stdout)
    assert doc["layout"] == {"axes": [["dp", 2]], "zero": 1}
    flat = [f for f in doc["fragments"] if f["key"] == "optim/wte.weight/exp_avg"]
    # wte.weight leads the flat fp32 buffer: rank 0's share starts inside it, at element 0
    assert flat and all(f["flat_start"] is not None for f in flat)
    assert doc["tensors"]["optim/wte.weight/exp_avg"]["pattern"] == {"flat": "dp"}
    assert sum(f["flat_numel"] for f in flat) == 250 * 64
    params = [f for f in doc["fragments"] if f["key"].startswith("model/")]
    assert params and all(f["flat_start"] is None for f in params)  # ZeRO-1: parameters whole


@pytest.mark.dist
def test_manual_tp_checkpoint_holds_fused_qkv_and_padded_vocab(tmp_path):
    ck = tmp_path / "ck"
    p = run("train", "--nproc", "2", "--tp", "2", "--manual-tp", "--zero", "1", "--steps", "2", "--save-every", "2",
            "--ckpt", ck, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(run("inspect", ck, "--json").stdout)
    wte = doc["tensors"]["model/wte.weight"]
    assert wte["shape"] == [256, 64] and wte["dtype"] == "bfloat16"
    assert wte["pattern"] == {"shards": [["tp", 0]], "pad": {"dim": 0, "to": 256, "keep": 250}}
    rows = sorted((f["offsets"][0], f["sizes"][0], f["rank"]) for f in doc["fragments"] if f["key"] == "model/wte.weight")
    assert rows == [(0, 128, 0), (128, 128, 1)]  # rank 1's shard holds the 6 padding rows 250..255
    qkv = doc["tensors"]["model/blocks.0.attn.qkv.weight"]
    assert qkv["shape"] == [192, 64]
    assert qkv["pattern"]["fused"] == {"dim": 0, "parts": [["q", 64], ["k", 64], ["v", 64]]}
    # fp32 masters of the bf16 parameters, as flat partitions
    assert doc["tensors"]["optim/blocks.0.attn.qkv.weight/master"]["dtype"] == "float32"
    assert doc["tensors"]["optim/blocks.0.attn.qkv.weight/master"]["pattern"]["flat"] == "dp"


def test_manual_tp_needs_zero1():
    p = run("train", "--nproc", "2", "--tp", "2", "--manual-tp")
    assert p.returncode == 1 and "add --zero 1" in p.stderr
    _no_traceback(p)


@pytest.mark.dist
def test_pipeline_checkpoint_has_the_whole_models_keys(tmp_path):
    ck = tmp_path / "ck"
    p = run("train", "--nproc", "4", "--pp", "2", "--zero", "3", "--steps", "2", "--save-every", "2", "--ckpt", ck,
            timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    assert [d["step"] for d in lines] == [1, 2]
    doc = json.loads(run("inspect", ck, "--json").stdout)
    assert doc["layout"] == {"axes": [["pp", 2], ["dp", 2]], "zero": 3}
    assert "model/blocks.3.attn.q.weight" in doc["tensors"] and "model/head.weight" not in doc["tensors"]
    # the tied embedding lives on both stages but is stored once (FSDP: one fragment per dp shard)
    wte = [f for f in doc["fragments"] if f["key"] == "model/wte.weight"]
    assert sum(f["sizes"][0] for f in wte) == 250


@pytest.mark.dist
def test_moe_checkpoint_at_ep2_resumes_at_ep4_and_ep1(tmp_path):
    """Issue 20's acceptance: ``--moe 8 --ep 2`` (world 2) saves at step 2; resumed with ``--ep 4``
    (world 4) and ``--ep 1`` (world 1), the loss of step 3 is the uninterrupted run's within 1e-5; and
    so under FSDP2 on 2 ranks at ``--ep 1`` (each expert sharded over its 2 replicas)."""
    ck = tmp_path / "ck"
    p = run("train", "--nproc", "2", "--moe", "8", "--ep", "2", "--steps", "3", "--save-every", "2", "--ckpt", ck,
            timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    uninterrupted = {d["step"]: d["loss"] for d in map(json.loads, p.stdout.splitlines())}
    assert sorted(uninterrupted) == [1, 2, 3]
    doc = json.loads(run("inspect", store.step_dir(ck, 2), "--json").stdout)
    assert doc["layout"] == {"axes": [["dp", 1], ["ep", 2]], "zero": 0}
    # local experts.0-3 of each rank saved under their global names 0-7
    assert {k for k in doc["tensors"] if k.startswith("model/blocks.0.mlp.experts.") and k.endswith("fc1.weight")} \
        == {f"model/blocks.0.mlp.experts.{g}.fc1.weight" for g in range(8)}
    for nproc, ep, zero in (("4", "4", "0"), ("1", "1", "0"), ("2", "1", "3")):
        r = run("train", "--nproc", nproc, "--moe", "8", "--ep", ep, "--zero", zero, "--steps", "3", "--resume",
                store.step_dir(ck, 2), timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        resumed = [json.loads(line) for line in r.stdout.splitlines()]
        assert [d["step"] for d in resumed] == [3], resumed
        assert resumed[0]["loss"] == pytest.approx(uninterrupted[3], rel=1e-5), (nproc, ep, zero, resumed, uninterrupted)
        assert "resumed from step 2" in r.stderr
