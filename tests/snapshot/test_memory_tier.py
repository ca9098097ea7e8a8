"""The memory tier (issue 6, stage b, first part): snapshots written into the node agent's shared
memory and loaded back from it; two slots reused in the steady state; a torn slot never taken for a
snapshot; the consistent cut across ranks; resharding from memory onto another number of ranks."""

from __future__ import annotations


import pytest
import torch

import ucp
from ucp.snapshot import agent as agent_mod
from ucp.snapshot import client, shm
from ucp.snapshot.header import restorable
from ucp.snapshot.memory import cpu_threads, place
from tests.helpers import MLP, bit_diffs, full_state, mlp_optimizer, same_state, state_of, tiny_model, train_step

pytestmark = pytest.mark.timeout(180)


def test_place_coalesces_pieces_per_dtype_aligned():
    placements, size = place([("float32", 10), ("bfloat16", 6), ("float32", 64), ("bfloat16", 2)])
    assert [(p.offset, p.nbytes) for p in placements] == [(0, 10), (128, 6), (64, 64), (192, 2)]
    assert size == 256


def test_cpu_threads_is_the_ranks_share_of_its_cpus(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert [cpu_threads(n) for n in (1, 4, 16)] == [1, 4, 8]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks on the node's 8 CPUs: 2 each
    assert [cpu_threads(n) for n in (1, 4)] == [1, 2]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # more ranks than CPUs: still one thread
    assert cpu_threads(4) == 1


def test_restorable_needs_every_saving_rank_committed_and_one_complete():
    def c(rank, step, done, world=2):
        return {"rank": rank, "step": step, "complete": done, "world_size": world}

    assert restorable([c(0, 4, True), c(0, 5, False), c(1, 4, True), c(1, 5, True)]) == (5, 2)
    assert restorable([c(0, 4, True), c(0, 5, False), c(1, 4, True), c(1, 5, False)]) == (4, 2)  # cut unfinished
    assert restorable([c(0, 4, True), c(1, 5, True)]) is None
    assert restorable([c(0, 1, True)]) is None  # rank 1 of that snapshot is missing
    assert restorable([c(0, 7, True, world=1), c(0, 6, True), c(1, 6, True)]) == (7, 1)  # saved on another world size
    assert restorable([c(0, 3, True), c(0, 3, True), c(1, 3, False)]) == (3, 2)  # repeats are fine
    # the same step saved by two jobs (before and after a recovery on fewer ranks): each judged alone
    assert restorable([c(0, 3, True, world=3), c(1, 3, True, world=3), c(0, 3, True), c(1, 3, True)]) == (3, 2)


def test_snapshots_load_back_from_memory_bit_exactly(tmp_path, job):
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    for s in range(1, 4):
        train_step(m, opt, s)
        res = ck.save(s)
        assert res.tier == "memory" and res.step == s and res.nbytes > 0
    ck.wait()
    want = state_of(m, opt)
    assert not any(tmp_path.iterdir())  # memory only: nothing on storage
    m2, opt2 = tiny_model()
    train_step(m2, opt2, 99)
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "memory" and res.step == 3
    assert same_state(state_of(m2, opt2), want)


def test_two_slots_are_reused_without_new_memory(tmp_path, job):
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    train_step(m, opt, 0)
    ck.save(1)
    ck.save(2)
    ck.wait()
    before = shm.listing(shm.prefix(job))
    for s in range(3, 30):
        train_step(m, opt, s)
        ck.save(s)
    ck.wait()
    assert shm.listing(shm.prefix(job)).keys() == before.keys()  # the same segments, none added
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "ucp.cli.main", "agent", "status", "--job", job],
                           capture_output=True, text=True, timeout=60).stdout
    assert "rank 0 slot 0: step 29, complete" in shown and "rank 0 slot 1: step 28, complete" in shown, shown
    status = client.connect(job).status()
    assert len(status["segments"]) == 2 and status["snapshots"] == {"0.0": {"step": 29, "complete": True},
                                                                    "0.1": {"step": 28, "complete": True}}


def test_a_torn_snapshot_is_never_loaded(tmp_path, job, monkeypatch):
    """A snapshot whose cut never finished, and a slot torn by a rank dying while it copies, are not
    taken for snapshots: the previous complete one is loaded."""
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    train_step(m, opt, 1)
    ck.save(1)
    ck.wait()
    want = state_of(m, opt)
    train_step(m, opt, 2)
    from ucp.snapshot import memory

    def crash(*a, **k):
        raise KeyboardInterrupt("killed before the cut")

    monkeypatch.setattr(memory.MemoryTier, "complete", crash)  # step 2: committed, the cut never finished
    ck.save(2)
    with pytest.warns(RuntimeWarning, match="memory tier failed .*killed before the cut"):
        ck.wait()
    monkeypatch.undo()
    tier = ck._snapshots._memory()
    real = memory.copy_block_crc32c

    def copy_then_die(regions, *a, **k):
        real(regions[:1], *a, **k)  # the first piece copied, then the rank dies
        raise KeyboardInterrupt("killed while copying")

    monkeypatch.setattr(memory, "copy_block_crc32c", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        tier.write(3, [("float32", torch.ones(10)), ("float32", torch.ones(10))], {"fragments": [{}, {}]})
    monkeypatch.undo()
    m2, opt2 = tiny_model()
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "memory" and res.step == 1
    assert same_state(state_of(m2, opt2), want)


def test_the_copy_overlaps_and_the_optimizer_step_waits_for_it(tmp_path, job, monkeypatch):
    """save() returns while the copy runs; optimizer.step() waits for it, so the snapshot holds the
    state of its step, not a later one."""
    import threading

    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    train_step(m, opt, 1)
    ck.save(1)
    ck.wait()
    gate = threading.Event()
    from ucp.snapshot import memory

    real_write = memory.MemoryTier.write

    def slow_write(self, *a, **k):
        gate.wait(10)
        return real_write(self, *a, **k)

    monkeypatch.setattr(memory.MemoryTier, "write", slow_write)
    train_step(m, opt, 2)
    want = state_of(m, opt)
    ck.save(2)  # returns at once: the copy waits on the gate
    assert ck._snapshots._pending is not None and ck._snapshots._pending["thread"].is_alive()
    threading.Timer(0.3, gate.set).start()
    train_step(m, opt, 3)  # its optimizer step waits for the copy of step 2
    monkeypatch.undo()
    ck.wait()
    m2, opt2 = tiny_model()
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.step == 2 and same_state(state_of(m2, opt2), want)


def test_without_a_snapshot_in_memory_load_reads_the_durable_tier(tmp_path, job):
    m, opt = tiny_model()
    train_step(m, opt, 1)
    ucp.Checkpointer(tmp_path, model=m, optimizer=opt).save(1)
    res = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "durable" and res.step == 1


def test_snapshot_options_are_validated():
    for kw, words in [(dict(every=0), "every=0"), (dict(persist_every=0), "persist_every=0"),
                      (dict(job="a/b"), "job name"), (dict(timeout=0), "timeout=0")]:
        with pytest.raises(ucp.UcpError, match=words):
            ucp.SnapshotOptions(**kw)
    assert ucp.SnapshotOptions(job="j").job_name("/x") == "j"
    assert ucp.SnapshotOptions().job_name("/x") == ucp.SnapshotOptions().job_name("/x/")


def test_a_root_on_an_object_store_names_its_job_by_its_url(monkeypatch):
    from ucp.storage.objstore import as_location

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    options = ucp.SnapshotOptions()
    name = options.job_name(as_location("memory://bucket/run"))  # (an ObjectPath: no path to resolve)
    assert name.startswith("ckpt-") and name == options.job_name(as_location("memory://bucket/run"))
    assert name != options.job_name(as_location("memory://bucket/other"))


@pytest.mark.dist
def test_a_job_resuming_in_place_reads_only_its_own_snapshot_header(tmp_path, job, monkeypatch):
    from ucp.checkpoint.memory import Snapshots

    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    for s in (1, 2):
        train_step(m, opt, s)
        ck.save(s)
    ck.wait()
    want = state_of(m, opt)

    def every_header(self, step, memory_only, choice):
        raise AssertionError("a job resuming in place gathered every rank's snapshot header")

    monkeypatch.setattr(Snapshots, "_source_all", every_header)
    m2, opt2 = tiny_model(seed=3)
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "memory" and res.step == 2 and same_state(state_of(m2, opt2), want)


def test_a_two_rank_snapshot_loads_from_memory_and_onto_one_rank(world2, tmp_path, job, monkeypatch):
    from tests.snapshot import memory_workloads as mw
    from ucp.checkpoint.memory import Snapshots

    want = world2.run(mw.snapshot_steps, "fsdp", str(tmp_path), job)[0]
    out = world2.run(mw.load_from_memory, "fsdp", str(tmp_path), job, want)
    for r in out:
        assert r["source"] == "memory" and r["step"] == 3 and r["diffs"] == []
    # the same snapshot, resharded in memory onto one process holding the whole model: every header read
    model = MLP()
    opt = mlp_optimizer(model)
    full = []
    real = Snapshots._source_all
    monkeypatch.setattr(Snapshots, "_source_all",
                        lambda self, step, *rest: full.append(step) or real(self, step, *rest))
    res = ucp.Checkpointer(tmp_path, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "memory" and res.step == 3 and full == [None]
    assert bit_diffs(want, full_state(model, opt)) == []


def test_when_the_agent_dies_the_trainer_warns_once_and_saves_durably(tmp_path, job):
    import os
    import signal
    import time
    import warnings

    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job, timeout=10))
    train_step(m, opt, 1)
    assert ck.save(1).tier == "memory"
    info = agent_mod.read_info(job)
    os.kill(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while agent_mod.is_alive(info) and time.monotonic() < deadline:
        time.sleep(0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiers = []
        for s in (2, 3, 4):
            train_step(m, opt, s)
            tiers.append(ck.save(s).tier)
        ck.wait()
    # the failure surfaces at the latest one call later (the copy runs in the background)
    assert tiers[-1] == "durable" and tiers[1:] == ["durable", "durable"] or tiers == ["durable"] * 3, tiers
    gone = [w for w in caught if "memory tier failed" in str(w.message)]
    assert len(gone) == 1, [str(w.message) for w in caught]
    want = state_of(m, opt)
    m2, opt2 = tiny_model()
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "durable" and res.step == 4 and same_state(state_of(m2, opt2), want)


@pytest.mark.dist
def test_when_the_agent_of_two_ranks_dies_both_warn_once_and_load_from_the_durable_tier(world2, tmp_path, job):
    from tests.snapshot import memory_workloads as mw

    for r in world2.run(mw.agent_killed, str(tmp_path), job):
        assert r["tiers"][0] == "memory" and r["tiers"][-1] == "durable", r["tiers"]
        assert len([w for w in r["warnings"] if "memory tier failed" in w]) == 1, r["warnings"]
        assert r["source"] == "durable" and r["step"] == 4 and r["diffs"] == []


@pytest.mark.dist
def test_a_rank_failing_its_copy_fails_the_cut_on_every_rank(world2, tmp_path, job):
    from tests.snapshot import memory_workloads as mw

    out = world2.run(mw.one_rank_fails_its_copy, str(tmp_path), job)
    assert "no space left" in out[1]["lost"] and "another rank failed its snapshot of step 2" in out[0]["lost"]
    for rank, r in enumerate(out):
        assert len([w for w in r["warnings"] if "memory tier failed" in w]) == 1, r["warnings"]
        # step 1 stays the newest complete snapshot; step 2 is complete nowhere
        assert {"step": 1, "complete": True} in r["snapshots"].values()
        assert all(not (v["step"] == 2 and v["complete"]) for v in r["snapshots"].values())


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_memory_stays_flat_over_200_snapshots(tmp_path, job):
    """No growth of shared-memory segments, and none of this process's RSS beyond noise, over 200
    snapshots of an unchanged state."""
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    train_step(m, opt, 0)
    for s in range(1, 21):  # warm up: both slots exist, allocator pools settle
        ck.save(s)
    ck.wait()
    segments, rss = shm.listing(shm.prefix(job)), _rss_kib()
    for s in range(21, 221):
        ck.save(s)
    ck.wait()
    after = shm.listing(shm.prefix(job))
    assert after.keys() == segments.keys()  # the same files: two data segments, two headers, the agent's
    assert {k: v for k, v in after.items() if not k.endswith(".json")} == \
        {k: v for k, v in segments.items() if not k.endswith(".json")}
    grown = _rss_kib() - rss
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB over 200 snapshots"
    assert client.connect(job).status()["snapshots"]["0.0"] == {"step": 220, "complete": True} or \
        client.connect(job).status()["snapshots"]["0.1"] == {"step": 220, "complete": True}


def test_redundancy_on_a_single_node_warns_once_and_snapshots_go_on(tmp_path, job):
    import warnings

    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job),
                          redundancy=ucp.RedundancyOptions(group=3, parity=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for s in (1, 2, 3):
            train_step(m, opt, s)
            assert ck.save(s).tier == "memory"
        ck.wait()
    lines = [str(w.message) for w in caught if "without parity" in str(w.message)]
    assert len(lines) == 1 and "1 node(s) cannot hold 1 parity stripe(s)" in lines[0], lines
    want = state_of(m, opt)
    ck.close()
    m2, opt2 = tiny_model(seed=5)
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "memory" and res.step == 3 and res.rebuilt == () and same_state(state_of(m2, opt2), want)


def test_redundancy_needs_snapshots():
    m, opt = tiny_model()
    with pytest.raises(ucp.UcpError, match="pass snapshot=ucp.SnapshotOptions"):
        ucp.Checkpointer("/tmp/x", model=m, optimizer=opt, redundancy=ucp.RedundancyOptions())


def test_a_snapshot_header_holds_the_checksums_of_the_bytes_in_its_slot(job):
    """Copied and checksummed in one pass over two threads, the header's checksums are those of the
    bytes: CRC-32C and block checksums of the block size the header names (1 MiB, format 1.1; summed
    here by the crc32c package directly), for pieces around block and span sizes, of several dtypes."""
    import crc32c

    from ucp.codecs.checksum import SPAN_BYTES
    from ucp.snapshot.header import SNAPSHOT_BLOCK_BYTES as BLOCK
    from ucp.snapshot.memory import MemoryTier

    g = torch.Generator().manual_seed(0)
    floats = [1, BLOCK // 4 - 1, BLOCK // 4, BLOCK // 4 + 1, (2 * SPAN_BYTES + 12) // 4]
    items = [("float32", torch.randn(n, generator=g)) for n in floats]
    items += [("bfloat16", torch.randn(3 * BLOCK // 2 + 5, generator=g).bfloat16()),
              ("uint8", torch.randint(0, 256, (7,), generator=g, dtype=torch.uint8))]
    tier = MemoryTier(job, 0, threads=2)
    try:
        full, errors = tier.write(1, items, {"fragments": [{"key": f"k{i}"} for i in range(len(items))]})
        data = tier.data_segment(full["slot"]).buf
        assert errors == [] and len(full["fragments"]) == len(items)
        assert full["format_version"] == "1.1" and full["block_bytes"] == BLOCK == 1 << 20
        for f, (_, t) in zip(full["fragments"], items):
            raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
            assert bytes(data[f["offset"]:f["offset"] + len(raw)]) == raw
            blocks = [crc32c.crc32c(raw[i:i + BLOCK]) for i in range(0, len(raw), BLOCK)]
            want = (crc32c.crc32c(raw), blocks if len(raw) > BLOCK else [])
            assert (f["crc32c"], f["blocks"]) == want
    finally:
        tier.close()


def _flip_in_place(path, offset: int) -> None:
    """Flip one bit of the byte at ``offset`` of a shared-memory segment, in place (the segment stays
    mapped by the agent and the trainer: it is never truncated)."""
    with open(path, "r+b") as data:
        data.seek(offset)
        byte = data.read(1)
        data.seek(-1, 1)
        data.write(bytes([byte[0] ^ 0x01]))


def _wide_model():
    """A model with a weight of several of a snapshot's 1 MiB blocks (4 MiB), and its AdamW."""
    return tiny_model(sizes=(1024, 1024, 3))


def _wide_snapshot(tmp_path, job):
    """A :func:`_wide_model` snapshotted after its step 1: the Checkpointer, that state, rank 0's header
    of the snapshot and its fragment of ``model/0.weight``."""
    import json

    m, opt = _wide_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    train_step(m, opt, 1)
    ck.save(1)
    ck.wait()
    [path] = [p for p in shm.SHM_DIR.glob(f"{shm.prefix(job)}r0.s*.json") if json.loads(p.read_text())["step"] == 1]
    head = json.loads(path.read_text())
    return ck, state_of(m, opt), head, next(f for f in head["fragments"] if f["key"] == "model/0.weight")


def test_a_load_from_memory_copies_from_the_mapped_segments(tmp_path, job, monkeypatch):
    """A load from memory copies out of the agent's segments mapped (no file reads), bit-exactly,
    again from the same mappings on a second load."""
    from ucp.storage import fragment_files

    m, opt = _wide_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    train_step(m, opt, 1)
    ck.save(1)
    ck.wait()
    want = state_of(m, opt)

    def refused(*a):
        raise AssertionError("a segment was read with preadv")

    monkeypatch.setattr(fragment_files.os, "preadv", refused)
    m2, opt2 = _wide_model()
    train_step(m2, opt2, 7)
    ck2 = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job))
    for _ in range(2):
        res = ck2.load()
        assert res.source == "memory" and res.step == 1 and bit_diffs(state_of(m2, opt2), want) == []
        with torch.no_grad():
            m2[0].weight.zero_()
    ck2.close()
    ck.close()


def test_a_corrupted_byte_in_memory_fails_the_load_naming_segment_key_and_block(tmp_path, job):
    from ucp.errors import CorruptCheckpointError
    from ucp.snapshot.header import SNAPSHOT_BLOCK_BYTES as BLOCK_BYTES

    ck, _, _, f = _wide_snapshot(tmp_path, job)
    assert len(f["blocks"]) == 4
    _flip_in_place(shm.SHM_DIR / f["file"], f["offset"] + 2 * BLOCK_BYTES + 9)
    m2, opt2 = _wide_model()
    with pytest.raises(CorruptCheckpointError) as e:
        ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    said = str(e.value)
    assert str(shm.SHM_DIR / f["file"]) in said and "model/0.weight" in said and "block 2 at bytes" in said, said
    assert "fails its checksum" in said and "\n" not in said
    ck.close()


def test_loading_the_same_snapshot_again_reuses_its_manifest_and_a_new_snapshot_is_read_anew(tmp_path, job,
                                                                                            monkeypatch):
    from ucp.snapshot.memory import MemoryTier

    fetched = []
    headers = MemoryTier.headers

    def counted(self, step=None, summary=False):
        if not summary:
            fetched.append(step)
        return headers(self, step, summary)

    monkeypatch.setattr(MemoryTier, "headers", counted)
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    for s in (1, 2):
        train_step(m, opt, s)
        ck.save(s, extras={"data": {"epoch": s}})
    ck.wait()
    want = state_of(m, opt)
    for i in range(3):  # a job rolling back to its snapshot again and again: its header fetched once
        train_step(m, opt, 10 + i)
        res = ck.load()
        assert res.source == "memory" and res.step == 2 and same_state(state_of(m, opt), want)
        assert res.extras == {"data": {"epoch": 2}}, res.extras
        res.extras["data"]["epoch"] = -1  # (what the caller does with it is not the next load's)
    assert fetched == [2], fetched
    for s in (3, 4):  # both slots written again, with the same steps' numbers reused below
        train_step(m, opt, s)
        ck.save(s, extras={"data": {"epoch": s}})
    ck.wait()
    want4 = state_of(m, opt)
    train_step(m, opt, 20)
    res = ck.load()
    assert res.step == 4 and same_state(state_of(m, opt), want4) and res.extras == {"data": {"epoch": 4}}
    assert fetched == [2, 4], fetched
    ck.save(2, extras={"data": {"epoch": 22}})  # step 2 again, into the slot step 4's header was not in
    ck.wait()
    train_step(m, opt, 21)
    ck.save(4, extras={"data": {"epoch": 44}})  # and step 4 again, over the manifest cached just now
    ck.wait()
    want44 = state_of(m, opt)
    train_step(m, opt, 22)
    res = ck.load()
    assert res.step == 4 and same_state(state_of(m, opt), want44) and res.extras == {"data": {"epoch": 44}}
    assert fetched == [2, 4, 4], fetched


@pytest.mark.parametrize("written_as", ["1.1", "1.0"])
def test_a_load_from_memory_checks_blocks_of_the_size_its_headers_name(tmp_path, job, monkeypatch, written_as):
    """Headers written with 64 KiB blocks load, their blocks checked at that size (a corrupted byte is
    named by its 64 KiB block): a 1.1 header saying so, and a 1.0 header, which has no ``block_bytes``."""
    from ucp.errors import CorruptCheckpointError, FormatError
    from ucp.snapshot import header as header_mod
    from ucp.snapshot import memory as memory_mod
    from ucp.snapshot.client import AgentClient

    assert header_mod.block_bytes_of({"rank": 0}) == 64 << 10  # format 1.0: no block_bytes
    with pytest.raises(FormatError, match="block_bytes 1000 must be a positive multiple of 4096"):
        header_mod.block_bytes_of({"rank": 3, "block_bytes": 1000})
    with pytest.raises(FormatError, match=r"disagree about their block size: \[65536, 1048576\]"):
        header_mod.common_block_bytes([{"rank": 0}, {"rank": 1, "block_bytes": 1 << 20}])
    monkeypatch.setattr(memory_mod, "SNAPSHOT_BLOCK_BYTES", 64 << 10)
    if written_as == "1.0":  # the header as a 1.0 writer committed it
        request = AgentClient.request

        def as_10(self, op, wait=None, **args):
            if op == "commit":
                args["header"] = {k: v for k, v in args["header"].items() if k != "block_bytes"}
                args["header"]["format_version"] = "1.0"
            return request(self, op, wait, **args)

        monkeypatch.setattr(AgentClient, "request", as_10)
    ck, want, head, f = _wide_snapshot(tmp_path, job)
    assert head.get("block_bytes", "absent") == (64 << 10 if written_as == "1.1" else "absent")
    assert head["format_version"] == written_as and len(f["blocks"]) == 64
    m2, opt2 = _wide_model()
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "memory" and same_state(state_of(m2, opt2), want)
    _flip_in_place(shm.SHM_DIR / f["file"], f["offset"] + 5 * (64 << 10) + 9)
    with pytest.raises(CorruptCheckpointError, match="block 5 at bytes"):
        ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    ck.close()
