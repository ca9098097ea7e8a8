"""Snapshots streamed to the durable tier by the agent (issue 6, stage c): every ``persist_every``-th
snapshot becomes an ordinary durable checkpoint written by the agents, not the trainers; a slot is
not overwritten while it is written; failures reach the trainer at its next call; SIGTERM flushes
the newest snapshot before the agent exits."""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest
import torch

import ucp
from tests.snapshot.conftest import preempt_agent
from ucp.snapshot import agent as agent_mod
from ucp.snapshot import client, persist, shm
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest
from ucp.storage.safetensors_file import read_header
from ucp.storage.verify import verify_checkpoint
from tests.helpers import MLP, bit_diffs, one_rank_snapshot, full_state, mlp_optimizer, same_state, state_of, tiny_model, train_step

pytestmark = pytest.mark.timeout(180)


def _load_durable(root, step=None):
    m, opt = tiny_model(seed=7)
    res = ucp.Checkpointer(root, model=m, optimizer=opt).load(step)
    return res, state_of(m, opt)


def test_every_persist_every_th_snapshot_is_written_durably_by_the_agent(tmp_path, job):
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, keep=1,
                          snapshot=ucp.SnapshotOptions(every=2, persist_every=2, job=job))
    tiers, states = {}, {}
    for s in range(1, 9):
        train_step(m, opt, s)
        r = ck.save(s)
        tiers[s] = r.tier if r is not None else None
        states[s] = state_of(m, opt)
    ck.wait()  # returns once the agent's durable writes are done too
    assert tiers == {1: None, 2: "memory", 3: None, 4: "memory", 5: None, 6: "memory", 7: None, 8: "memory"}
    # steps 4 and 8 were written (multiples of every * persist_every); keep=1 retained the newest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000008"]
    directory = store.step_dir(tmp_path, 8)
    header, _ = read_header(directory / "rank_00000.safetensors")
    meta = json.loads(header["__metadata__"][persist.META])  # written by the agent, from its memory
    assert meta["step"] == 8 and meta["rank"] == 0 and meta["token"] > 0
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert verify_checkpoint(directory, read_manifest(directory)).ok
    res, got = _load_durable(tmp_path)
    assert res.source == "durable" and res.step == 8 and same_state(got, states[8])
    assert client.connect(job).status()["persisted"] == {"0": 8}
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, "-m", "ucp.cli.main", "agent", "status", "--job", job],
                           capture_output=True, text=True, timeout=60).stdout
    assert "written to the durable tier: rank 0: step 8; 0 write(s) in flight" in shown, shown


def test_a_failed_durable_write_is_reported_at_the_next_call_and_snapshots_go_on(tmp_path, job):
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(persist_every=2, job=job))
    train_step(m, opt, 1)
    ck.save(1)
    ck.wait()
    store.step_dir(tmp_path, 2).write_text("in the way")  # a file where step 2's directory goes
    train_step(m, opt, 2)
    ck.save(2)
    with pytest.raises(persist.PersistError, match="step 2 of rank 0 to the durable tier failed"):
        ck.wait()
    ck.wait()  # reported once
    train_step(m, opt, 3)
    assert ck.save(3).tier == "memory"  # the memory tier goes on
    ck.wait()
    want = state_of(m, opt)
    m2, opt2 = tiny_model(seed=3)
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "memory" and res.step == 3 and same_state(state_of(m2, opt2), want)


def test_a_relaunched_job_never_gets_the_previous_jobs_persist_failure(tmp_path, job):
    import subprocess
    import sys
    import textwrap

    store.step_dir(tmp_path, 1).write_text("in the way")  # job 1's durable write of step 1 fails
    job1 = textwrap.dedent("""
        import os, sys, time
        import ucp
        from tests.helpers import tiny_model, train_step
        from ucp.snapshot import client
        m, opt = tiny_model()
        ck = ucp.Checkpointer(sys.argv[1], model=m, optimizer=opt,
                              snapshot=ucp.SnapshotOptions(persist_every=1, job=sys.argv[2]))
        train_step(m, opt, 1)
        ck.save(1)
        agent = client.connect(sys.argv[2])
        deadline = time.monotonic() + 60
        while (agent.status()["persisting"] or not agent.status()["snapshots"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        print(agent.status()["persisting"], flush=True)
        os._exit(0)  # ... and it ends before any wait() or save() could report that
        """)
    p = subprocess.run([sys.executable, "-c", job1, str(tmp_path), job], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert p.returncode == 0 and p.stdout.strip() == "0", p.stderr[-3000:]
    store.step_dir(tmp_path, 1).unlink()

    m, opt = tiny_model()  # job 2: the same job name, root and agent
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(persist_every=1, job=job))
    for s in (2, 3):
        train_step(m, opt, s)
        ck.save(s)
    ck.wait()  # clean: step 1's failure was job 1's
    assert [s for s, _ in store.list_steps(tmp_path)] == [2, 3]
    store.step_dir(tmp_path, 4).write_text("in the way")  # job 2's own failures still reach it
    train_step(m, opt, 4)
    ck.save(4)
    with pytest.raises(persist.PersistError, match="step 4 of rank 0") as e:
        ck.wait()
    assert "step 1" not in str(e.value)


def test_a_failure_seen_by_a_later_snapshot_is_raised_by_the_next_save(tmp_path, job):
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(persist_every=1, job=job))
    store.step_dir(tmp_path, 1).write_text("in the way")
    train_step(m, opt, 1)
    ck.save(1)
    deadline = time.monotonic() + 30
    while client.connect(job).status()["persisting"] and time.monotonic() < deadline:
        time.sleep(0.02)
    for s in (2, 3):  # step 2's begin hands the failure over; step 3's save raises it
        train_step(m, opt, s)
        try:
            ck.save(s)
        except persist.PersistError as e:
            assert s == 3 and "step 1 of rank 0" in str(e)
            break
    else:
        pytest.fail("the failure to write step 1 was never raised")


def test_sigterm_flushes_the_newest_snapshot_before_the_agent_exits(tmp_path, job):
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))  # memory only
    for s in (1, 2, 3):
        train_step(m, opt, s)
        ck.save(s)
    ck.wait()
    want = state_of(m, opt)
    assert not list(tmp_path.iterdir())
    preempt_agent(job, 30)  # its memory is gone ...
    res, got = _load_durable(tmp_path)  # ... and the newest snapshot is on the durable tier
    assert res.step == 3 and same_state(got, want)


def test_begin_of_a_slot_being_written_durably_waits_for_the_write():
    a = agent_mod.Agent("u" + uuid.uuid4().hex[:12])
    try:
        a.busy.add((0, 1))
        deferred = a.handle({"op": "begin", "args": {"rank": 0, "slot": 1, "step": 5}})
        assert isinstance(deferred, agent_mod.Deferred) and not deferred.ready()
        assert a.handle({"op": "begin", "args": {"rank": 0, "slot": 0, "step": 5}})["slot"] == 0  # the other slot
        a.busy.discard((0, 1))
        assert deferred.ready() and deferred.answer() == {"slot": 1, "step": 5, "errors": []}
    finally:
        a.cleanup()


@pytest.mark.parametrize("where", ["disk", "object store"])
def test_the_committer_takes_only_rank_files_of_its_own_cut(tmp_path, where):
    from ucp.storage.objstore import as_location

    root = tmp_path if where == "disk" else as_location(f"memory://persist-{uuid.uuid4().hex[:12]}/run")
    raw, header = one_rank_snapshot()
    directory = store.step_dir(root, 5)
    assert persist.prepare(directory)
    persist.write_rank(directory, header, raw, [0], token=111)
    with pytest.raises(persist.PersistError, match=r"rank\(s\) \[0\] did not arrive"):
        persist.commit_when_written(directory, root, 5, 1, token=222, keep=None, timeout=0.3)
    with pytest.raises(persist.PersistError, match=r"agent was stopped while it waited for the files of rank\(s\) \[1\]"):
        persist.commit_when_written(directory, root, 5, 2, token=111, keep=None, timeout=60, abandon=lambda: True)
    assert not store.is_complete(directory)
    assert not [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]
    assert persist.commit_when_written(directory, root, 5, 1, token=111, keep=None, timeout=5)
    res_manifest = read_manifest(directory)
    assert res_manifest.step == 5 and [f.key for f in res_manifest.fragments] == ["model/w"]
    assert not persist.prepare(directory)  # complete already: nothing more is written


def test_on_an_object_store_a_rank_file_rewritten_by_the_right_cut_is_read_again():
    """The committer on an object store reads a rank file once per version (one listing a look): a
    file of another cut, replaced by its own cut's file, is taken once it is there."""
    import threading

    from ucp.storage.objstore import as_location

    root = as_location(f"memory://persist-{uuid.uuid4().hex[:12]}/run")
    raw, header = one_rank_snapshot()
    directory = store.step_dir(root, 5)
    persist.write_rank(directory, header, raw, [0], token=111)
    later = threading.Timer(0.6, lambda: persist.write_rank(directory, header, raw, [0], token=222))
    later.start()
    try:
        assert persist.commit_when_written(directory, root, 5, 1, token=222, keep=None, timeout=10)
    finally:
        later.join()
    assert read_manifest(directory).step == 5


def test_the_committer_reads_the_rank_files_that_arrived_together(monkeypatch):
    """New rank files are read READERS at a time, not one after another (a committer of 16,384 ranks
    reads every header): four reads that each wait for the other three all return."""
    import threading

    from ucp.storage.objstore import as_location

    directory = store.step_dir(as_location(f"memory://persist-{uuid.uuid4().hex[:12]}/run"), 5)
    for r in range(4):
        (directory / store.rank_file(r)).write_bytes(b"x")
    together, read = threading.Barrier(4), []

    def reading(path):
        together.wait(timeout=10)  # (read one after another, the first would wait here in vain)
        read.append(path.name)

    monkeypatch.setattr(persist, "_read_rank", reading)
    persist._arrived(directory, 4, {}, {}, 111, {})
    assert sorted(read) == [store.rank_file(r) for r in range(4)]


@pytest.mark.dist
def test_two_ranks_persist_one_checkpoint_with_each_region_written_once(world2, tmp_path, job):
    from tests.snapshot import memory_workloads as mw

    want = world2.run(mw.persist_steps, "tp", str(tmp_path), job)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]  # keep=2
    directory = store.step_dir(tmp_path, 3)
    manifest = read_manifest(directory)
    regions = [f.region for f in manifest.fragments]
    assert len(regions) == len(set(regions))  # replicated (tp-replicated) regions written once
    assert {f.file for f in manifest.fragments} == {"rank_00000.safetensors", "rank_00001.safetensors"}
    assert verify_checkpoint(directory, manifest).ok
    model = MLP()
    opt = mlp_optimizer(model)
    res = ucp.Checkpointer(tmp_path, model=model, optimizer=opt).load()
    assert res.source == "durable" and res.step == 3
    assert bit_diffs(want, full_state(model, opt)) == []


def test_a_commit_waiting_for_a_lost_nodes_files_gives_up_when_a_smaller_job_takes_over(tmp_path):
    """After nodes are lost, rank 0's agent may wait for the old job's files of the lost ranks; the
    survivors' job (another size) configures it: the wait ends at once and its error is not the new
    job's."""
    a = agent_mod.Agent("u" + uuid.uuid4().hex[:12])
    try:
        (tmp_path / "step_00000005").mkdir()
        a.handle({"op": "configure", "args": {"rank": 0, "root": str(tmp_path), "write": [], "world_size": 4,
                                              "timeout": 60}})
        with a.lock:
            a.inflight[0] = 1
            a.commits.append(({"step": 5, "token": 7}, dict(a.config[0])))
            a.lock.notify_all()
        time.sleep(0.3)
        assert a.inflight[0] == 1  # waiting for ranks 0-3's files
        a.handle({"op": "configure", "args": {"rank": 0, "root": str(tmp_path), "write": [], "world_size": 3,
                                              "timeout": 60}})
        deadline = time.monotonic() + 5
        while a.inflight[0]:
            assert time.monotonic() < deadline, "the old job's commit still waits"
            time.sleep(0.02)
        assert a.errors.get(0, []) == []
    finally:
        a.cleanup()


def test_a_smaller_jobs_first_complete_snapshot_frees_the_old_jobs_snapshots():
    """After a recovery on fewer ranks, the old job's slots on a surviving node (ranks the new job
    does not have there) are freed once the new job holds a complete snapshot."""
    a = agent_mod.Agent("u" + uuid.uuid4().hex[:12])
    try:
        def commit(rank, slot, step, world):
            a.handle({"op": "alloc", "args": {"name": f"r{rank}.s{slot}", "nbytes": 64}})
            a.handle({"op": "begin", "args": {"rank": rank, "slot": slot, "step": step}})
            a.handle({"op": "commit", "args": {"rank": rank, "slot": slot, "step": step,
                                               "header": {"world_size": world, "rank": rank}}})

        for slot, step in ((0, 5), (1, 6)):  # the old job: ranks 2 and 3 of 4 on this node
            for rank in (2, 3):
                commit(rank, slot, step, 4)
                a.handle({"op": "complete", "args": {"rank": rank, "slot": slot, "step": step, "token": 9}})
        a.handle({"op": "alloc", "args": {"name": "r3.p1", "nbytes": 64}})
        a.handle({"op": "configure", "args": {"rank": 1, "root": "/nowhere", "write": [], "world_size": 3}})
        commit(1, 0, 7, 3)  # the new job: rank 1 of 3
        assert len(a.slots) == 5  # nothing dropped before the new job's snapshot is complete
        a.handle({"op": "complete", "args": {"rank": 1, "slot": 0, "step": 7, "token": 11}})
        assert list(a.slots) == [(1, 0)]
        left = sorted(n.removeprefix(shm.prefix(a.job)) for n in shm.listing(shm.prefix(a.job)))
        assert [n.removeprefix(shm.prefix(a.job)) for n in a.segments] == ["r1.s0"]
        assert left == ["r1.s0", "r1.s0.json"]
    finally:
        a.cleanup()


def test_configure_refuses_a_root_the_agent_cannot_serve_in_one_line():
    """A root travels to the agent as a string; one that is a URL made into a path is refused at
    ``configure``, never written to as a local directory named ``s3:``."""
    a = agent_mod.Agent("u" + uuid.uuid4().hex[:12])
    try:
        with pytest.raises(ucp.UcpError) as e:
            a.handle({"op": "configure", "args": {"rank": 0, "root": "s3:/bucket/run", "write": [], "world_size": 1}})
        assert "\n" not in str(e.value) and "s3:/bucket/run" in str(e.value)
        assert 0 not in a.config
        a.handle({"op": "configure", "args": {"rank": 0, "root": "memory://bucket/run", "write": [], "world_size": 1}})
        assert a.config[0]["root"] == "memory://bucket/run"  # (a URL stays a URL)
    finally:
        a.cleanup()


def test_a_commit_returns_what_retention_cleared(tmp_path):
    raw, header = one_rank_snapshot()
    for step in (4, 5):
        directory = store.step_dir(tmp_path, step)
        assert persist.prepare(directory)
        persist.write_rank(directory, dict(header, step=step), raw, [0], token=111)
        cleared = persist.commit_when_written(directory, tmp_path, step, 1, token=111, keep=1, timeout=5)
    assert cleared.error is None and [p.name for p in cleared.pruned] == [store.step_dir(tmp_path, 4).name]
    assert persist.commit_when_written(directory, tmp_path, 5, 1, token=111, keep=1, timeout=5) is None  # (done)


def test_a_commit_whose_retention_fails_stands_and_the_agent_says_why(tmp_path, monkeypatch, capsys):
    """Retention failing after the commit is no failure of the save (nothing is reported to the
    job), but the agent's log says it in one line (format rule 33: retried by the next commit)."""
    from ucp.snapshot.agent_state import Agent
    from ucp.storage.rank_files import Cleared

    agent = Agent("retention-fails")
    agent.inflight[0] = 1
    monkeypatch.setattr(persist, "commit_when_written",
                        lambda *a, **k: Cleared(error=PermissionError(13, "Permission denied", "step_00000003")))
    agent._commit({"step": 5, "token": 1}, {"world_size": 1, "root": str(tmp_path), "keep": 1, "timeout": 5})
    err = capsys.readouterr().err
    assert "step 5 is committed" in err and "pruning old checkpoints failed" in err and "step_00000003" in err, err
    assert agent.errors == {} and agent.inflight[0] == 0
