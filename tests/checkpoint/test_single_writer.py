"""One writer per checkpoint root (issue 17, item 4): a second job's save fails with one line naming
the root and the holder, nothing is torn, and a dead holder's lease is taken over."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import ucp
from tests.checkpoint.common import FAST, make, train_step
from ucp.checkpoint import save as save_module
from ucp.errors import LeaseError
from ucp.storage import directory as store
from ucp.storage.lease import LEASE, Lease, read_holder
from ucp.storage.manifest_io import read_manifest
from ucp.storage.verify import verify_checkpoint

OTHER_JOB = textwrap.dedent("""
    import sys
    from torch import nn
    import ucp
    ck = ucp.Checkpointer(sys.argv[1], model=nn.Linear(3, 3), options=ucp.CheckpointOptions(fsync=False))
    ck.save(int(sys.argv[2]))
    print("saved", flush=True)
    if sys.stdin.readline().strip() == "close":
        ck.close()
    print("done", flush=True)
""")


def _other_job(root, step):
    p = subprocess.Popen([sys.executable, "-c", OTHER_JOB, str(root), str(step)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "saved"
    return p


def _verified(root) -> list[int]:
    steps = store.list_steps(root)
    for _, path in steps:
        assert verify_checkpoint(path, read_manifest(path)).ok, path
    return [s for s, _ in steps]


def test_a_second_job_on_the_same_root_is_refused_until_the_first_closes(ckpt_root):
    other = _other_job(ckpt_root, 1)
    try:
        model, opt, sched = make()
        ck = ucp.Checkpointer(ckpt_root, model=model, optimizer=opt, scheduler=sched, options=FAST)
        with pytest.raises(LeaseError) as e:
            ck.save(2)
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"{ckpt_root}: another job saves into this checkpoint root")
        assert f"pid {other.pid} since " in msg and "if that job is dead, delete" in msg
        assert not store.step_dir(ckpt_root, 2).exists()  # refused before anything was written
        assert _verified(ckpt_root) == [1]

        other.stdin.write("close\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "done"
        assert other.wait(timeout=60) == 0
        assert not (ckpt_root / LEASE).exists()
        train_step(model, opt, sched)
        assert ck.save(2).step == 2
        assert _verified(ckpt_root) == [1, 2]
    finally:
        other.kill()
        other.wait()


def test_the_lease_of_a_job_that_died_is_taken_over(ckpt_root):
    other = _other_job(ckpt_root, 1)
    other.kill()  # no close(), no exit handler: the lease stays, naming a dead pid
    other.wait()
    assert read_holder(ckpt_root / LEASE).pid == other.pid
    ck = ucp.Checkpointer(ckpt_root, model=make(opt=None)[0], options=FAST)
    with pytest.warns(UserWarning, match=rf"took over the writer lease of host .* pid {other.pid} .*: process "
                                         rf"{other.pid} is not running on this host"):
        ck.save(2)
    assert _verified(ckpt_root) == [1, 2]
    assert read_holder(ckpt_root / LEASE).pid != other.pid


def test_a_job_that_loses_its_lease_mid_save_publishes_nothing_and_leaves_the_new_holders_files(ckpt_root, monkeypatch):
    model = make(opt=None)[0]
    ck = ucp.Checkpointer(ckpt_root, model=model, options=FAST)
    ck.save(1)
    real = save_module.write_rank_file
    thief = Lease(ckpt_root, token="thief", host="elsewhere", pid=1, stale_after=0.0)

    def write_then_lose_the_lease(*a, **k):
        out = real(*a, **k)
        ours = read_holder(ckpt_root / LEASE)
        assert thief._replace(ours, thief._content())  # another job took it over (judging ours stale)
        return out

    monkeypatch.setattr(save_module, "write_rank_file", write_then_lose_the_lease)
    with pytest.raises(LeaseError, match=r"this job lost the checkpoint root's writer lease .*host elsewhere pid 1"):
        ck.save(2)
    assert not store.is_complete(store.step_dir(ckpt_root, 2))
    assert store.step_dir(ckpt_root, 2).is_dir()  # the root is the other job's now: its files are not ours to clear
    monkeypatch.undo()
    with pytest.raises(LeaseError, match="another job saves into this checkpoint root"):
        ck.save(3)
    assert _verified(ckpt_root) == [1]


def test_checkpointers_of_one_process_share_the_lease(ckpt_root):
    model = make(opt=None)[0]
    a = ucp.Checkpointer(ckpt_root, model=model, options=FAST)
    b = ucp.Checkpointer(ckpt_root, model=model, options=FAST)
    a.save(1)
    b.save(2)  # one job: no refusal
    a.close()
    assert (ckpt_root / LEASE).exists()  # b still uses it
    b.save(3)
    b.close()
    assert not (ckpt_root / LEASE).exists()
    assert _verified(ckpt_root) == [1, 2, 3]


def test_saving_the_same_step_twice_in_one_job_stays_an_error(ckpt_root):
    ck = ucp.Checkpointer(ckpt_root, model=make(opt=None)[0], options=FAST)
    ck.save(1)
    with pytest.raises(ucp.errors.UcpError, match="exists already .this job saved it."):
        ck.save(1)


@pytest.mark.dist
@pytest.mark.fault
def test_two_real_jobs_on_one_root_one_writes_the_other_is_refused_nothing_torn(tmp_path):
    import threading

    from tests.checkpoint import writer_workloads as workloads
    from tests.world import World

    root = tmp_path / "ck"
    steps = list(range(1, 7))
    jobs = [World(2), World(2)]
    results: dict[int, object] = {}
    try:
        def run(j):
            try:
                results[j] = jobs[j].run(workloads.save_steps, str(root), j, steps, 0.05, timeout=240)
            except BaseException as e:  # noqa: BLE001 - reported below
                results[j] = e

        threads = [threading.Thread(target=run, args=(j,)) for j in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for j in range(2):
            assert not isinstance(results[j], BaseException), results[j]
            jobs[j].run(workloads.close_all)
    finally:
        for w in jobs:
            w.close()
    outcomes = {j: results[j] for j in range(2)}
    for j, ranks in outcomes.items():
        assert ranks[0] == ranks[1], f"job {j}: the ranks of one job disagree: {ranks}"
    writer = [j for j, ranks in outcomes.items() if ranks[0] == ["ok"] * len(steps)]
    assert len(writer) == 1, outcomes  # neither job closed while the other saved: one held the root throughout
    loser = outcomes[1 - writer[0]][0]
    for msg in loser:
        assert "LeaseError" in msg and "\n" not in msg, msg
        assert f"{root}: another job saves into this checkpoint root" in msg, msg
    assert _verified(root) == steps
    assert not (root / LEASE).exists()  # released when the writer closed
