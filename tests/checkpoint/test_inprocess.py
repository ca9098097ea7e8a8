"""ucp.run_in_process in a job of one rank (the membership protocol over a real TCPStore, the load
from memory, the retry and the refusals), and Checkpointer.load(memory_only=True). The multi-node
recoveries (kills, hangs, parity rebuilds, fallbacks) are in tests/tools/test_chaos_inprocess.py."""

from __future__ import annotations

import datetime
import gc

import pytest
import torch.distributed as dist

import ucp
from ucp.checkpoint.inprocess import transport_failure
from ucp.errors import NotInMemoryError, OptionsError, PeerLostError, UcpError
from tests.snapshot.conftest import job  # noqa: F401 - the fixture: a fresh job, its agent stopped after
from tests.helpers import same_state, state_of, tiny_model, train_step


@pytest.fixture
def store():
    s = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False,
                      timeout=datetime.timedelta(seconds=30))
    yield s
    assert not dist.is_initialized()  # run_in_process destroys what it made, whatever happened


def run(store, build, train, **kw):
    return ucp.run_in_process(build, train, store=store, member=0, world_size=1, timeout=5, heartbeat=0.05, **kw)


def test_a_transport_failure_with_nobody_lost_is_retried_from_memory(tmp_path, store, job):  # noqa: F811
    """A collective that failed while every member is still there (a timeout, say) re-forms the
    group and restores the snapshot from memory, not from disk: the retry trains on bit-exactly."""
    seen, made = [], {}

    def build(world):
        made["model"], made["opt"] = tiny_model(seed=world.generation)  # a different start: the load must fix it
        return ucp.Checkpointer(tmp_path, model=made["model"], optimizer=made["opt"],
                                snapshot=ucp.SnapshotOptions(job=job, persist_every=None))

    def train(ckpt, restored, world):
        seen.append((world.generation, world.rank, world.world_size, world.members, world.lost,
                     None if restored is None else (restored.step, restored.source), sorted(world.phases)))
        if world.generation == 0:
            for s in (1, 2):
                train_step(made["model"], made["opt"], s)
                ckpt.save(s)
            ckpt.wait()
            made["at2"] = state_of(made["model"], made["opt"])
            raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
        assert same_state(state_of(made["model"], made["opt"]), made["at2"])
        return "done"

    assert run(store, build, train) == "done"
    assert seen == [(0, 0, 1, (0,), (), None, []),
                    (1, 0, 1, (0,), (), (2, "memory"), ["built", "failed", "loaded", "reformed"])]
    assert not list(tmp_path.glob("step_*")), "the durable tier was written"


def test_a_failure_of_the_program_itself_is_raised_not_retried(tmp_path, store, job):  # noqa: F811
    calls = []

    def build(world):
        model, opt = tiny_model()
        return ucp.Checkpointer(tmp_path, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))

    def train(ckpt, restored, world):
        calls.append(world.generation)
        raise ValueError("a bug in the training loop")

    with pytest.raises(ValueError, match="a bug in the training loop") as e:
        run(store, build, train)
    assert calls == [0]
    # its frames were freed (they held the model); the traceback is kept as a note, the bug's line in it
    assert any("raise ValueError" in note and "as text" in note for note in e.value.__notes__)


def test_the_objects_made_before_the_job_are_frozen_during_it_only(tmp_path, store, job):  # noqa: F811
    """The recovery's collection scans what the job made, not the whole heap: the objects that
    existed at the call are frozen over the job, and so is what survived a recovery's collection;
    all are unfrozen after the job (also after a failure)."""
    made_before = [object()]
    seen, kept = [], {}

    def build(world):
        model, opt = tiny_model()
        return ucp.Checkpointer(tmp_path, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))

    def frozen(obj) -> bool:
        return not any(o is obj for o in gc.get_objects())

    def train(ckpt, restored, world):
        if world.generation == 0:
            kept["gen0"] = [world.generation]  # made in the job, alive after its recovery
            seen.append((gc.get_freeze_count() > 0, frozen(made_before), frozen(kept["gen0"])))
            train_step(ckpt.model, ckpt.optimizer, 1)
            ckpt.save(1)
            ckpt.wait()
            raise PeerLostError("rank 0: the collective all_reduce failed: another rank of the job died")
        seen.append((gc.get_freeze_count() > 0, frozen(made_before), frozen(kept["gen0"])))
        raise ValueError("stop")

    assert gc.get_freeze_count() == 0
    with pytest.raises(ValueError, match="stop"):
        run(store, build, train)
    # generation 0: only what was made before the call is frozen; generation 1: what survived too
    assert seen == [(True, True, False), (True, True, True)]
    assert gc.get_freeze_count() == 0


def test_max_recoveries_bounds_the_retries(tmp_path, store, job):  # noqa: F811
    def build(world):
        model, opt = tiny_model()
        return ucp.Checkpointer(tmp_path, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))

    def train(ckpt, restored, world):
        train_step(ckpt.model, ckpt.optimizer, 1)
        ckpt.save(1)
        ckpt.wait()
        raise PeerLostError("rank 0: the collective all_reduce failed: another rank of the job died")

    with pytest.raises(ucp.errors.RecoveryFallbackError, match="max_recoveries=1"):
        run(store, build, train, max_recoveries=1)


def test_memory_only_loads_refuse_to_read_the_durable_tier(tmp_path, job):  # noqa: F811
    model, opt = tiny_model()
    with ucp.Checkpointer(tmp_path, model=model, optimizer=opt) as ck:
        ck.save(1)  # a durable checkpoint that a memory-only load must not use
        with pytest.raises(OptionsError, match="memory_only=True.*snapshot="):
            ck.load(memory_only=True)
    before = state_of(model, opt)
    with ucp.Checkpointer(tmp_path, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)) as ck:
        with pytest.raises(NotInMemoryError, match="the durable tier was not read"):
            ck.load(memory_only=True)
        assert same_state(state_of(model, opt), before)
        assert ck.load().source == "durable"  # (without memory_only, as before)


@pytest.mark.parametrize("kw, match", [({"heartbeat": 0}, "positive"), ({"timeout": -1}, "positive"),
                                       ({"heartbeat": 1.0, "dead_after": 0.5}, "longer than heartbeat")])
def test_bad_options_are_refused(store, kw, match):
    with pytest.raises(OptionsError, match=match):
        ucp.run_in_process(lambda w: None, lambda *a: None, store=store, member=0, world_size=1, **kw)


def test_it_refuses_an_initialized_process_group(store):
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(OptionsError, match="before init_process_group"):
            ucp.run_in_process(lambda w: None, lambda *a: None, store=store, member=0, world_size=1)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:9350: Connection reset by peer"), True),
    (RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 10000ms for send"), True),
    (PeerLostError("rank 1: the collective all_gather failed"), True),
    (ValueError("a bug"), False),
    (RuntimeError("CUDA out of memory"), False),
    (UcpError("snapshot of step 3 failed"), False),
])
def test_transport_failures_are_told_from_the_programs_own(error, expected):
    assert transport_failure(error) is expected
    try:  # and through a wrapping error's cause
        raise UcpError("the cut failed") from error
    except UcpError as wrapped:
        assert transport_failure(wrapped) is expected


def test_dist_error_is_a_transport_failure():
    assert transport_failure(dist.DistNetworkError("store gone"))
    assert not transport_failure(KeyError("x"))


def test_an_abandoned_checkpointer_refuses_work_and_its_complete_snapshots_stay(tmp_path, job):  # noqa: F811
    model, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=model, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job, persist_every=None))
    train_step(model, opt, 1)
    ck.save(1)
    ck.wait()
    at1 = state_of(model, opt)
    train_step(model, opt, 2)
    ck.save(2)  # in flight when abandoned: no collective, no wait
    ck.abandon()
    with pytest.raises(UcpError, match="closed"):
        ck.save(3)
    ck.abandon()  # (twice is fine)
    model2, opt2 = tiny_model(seed=1)
    res = ucp.Checkpointer(tmp_path, model=model2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load(step=1)
    assert res.source == "memory" and same_state(state_of(model2, opt2), at1)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_under_torchrun_it_finds_the_agent_store_by_itself(tmp_path, job):  # noqa: F811
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("inprocess_job.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script), str(tmp_path), job], capture_output=True, text=True, timeout=150, env=env)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    said = sorted(f.read_text() for f in tmp_path.glob("said-*"))
    assert said == ["rank 0/2 generation 0 agent-store True", "rank 1/2 generation 0 agent-store True"], p.stdout


def test_a_store_other_than_a_tcpstore_is_refused(tmp_path):
    with pytest.raises(OptionsError, match="TCPStore"):
        ucp.run_in_process(lambda w: None, lambda *a: None, store=dist.FileStore(str(tmp_path / "f"), 1), member=0,
                           world_size=1)
