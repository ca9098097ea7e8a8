"""Fault tests of the memory tier (issue 6): a trainer SIGKILLed at random points of ``save`` (seeded
trials) restarts from the newest complete snapshot, bit-exactly, never from a torn one; the agent
survives."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

import ucp
from tests.helpers import bit_diffs, state_of, tiny_model, train_step
from ucp.snapshot import agent as agent_mod
from ucp.snapshot import client, shm

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

TRAINER = textwrap.dedent("""
    import json, os, random, signal, sys, threading
    import torch
    import ucp

    root, job, seed, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    ck = ucp.Checkpointer(root, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    rng = random.Random(seed)
    victim = rng.randint(3, 6)         # the snapshot whose copy dies
    after = rng.randint(1, 24)         # ... after this many tensor copies (or right after it completed)
    copies = [0]
    real = torch.Tensor.copy_

    def copy_(self, src, *a, **k):
        out = real(self, src, *a, **k)
        if threading.current_thread().name == f"ucp-snapshot-{victim}":
            copies[0] += 1
            if copies[0] == after:
                os.kill(os.getpid(), signal.SIGKILL)
        return out

    torch.Tensor.copy_ = copy_

    def note(step):  # snapshot ``step`` is complete: the optimizer step after it waited for its copy
        with open(log, "a") as f:
            f.write(json.dumps({"step": step}) + "\\n")

    for step in range(1, 9):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step))
        m(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        if step > 1:
            if step - 1 == victim:  # the kill point lay after the snapshot's last copy
                os.kill(os.getpid(), signal.SIGKILL)
            note(step - 1)
        ck.save(step)
""")


def _stop_and_check_clean(job: str) -> None:
    """Stop the job's agent; fail if any of its shared memory was left behind (removing it)."""
    client.stop(job)
    left = shm.listing(shm.prefix(job))
    for n in left:
        shm.unlink(n)
    assert not left, left


SIZES = (64, 256, 64)  # TRAINER's model: Linear(64, 256), Linear(256, 64)


def _trained(steps: int):
    """The trainer's model and optimizer after ``steps`` steps (CPU training is deterministic)."""
    m, opt = tiny_model(0, SIZES)
    for step in range(1, steps + 1):
        train_step(m, opt, step, batch=8)  # TRAINER's batch of each step
    return m, opt


@pytest.mark.parametrize("seed", range(8))
def test_a_trainer_killed_in_save_restarts_from_the_newest_complete_snapshot(tmp_path, seed):
    job = "f" + uuid.uuid4().hex[:12]
    log = tmp_path / "log.jsonl"
    try:
        p = subprocess.run([sys.executable, "-c", TRAINER, str(tmp_path / "ck"), job, str(seed), str(log)],
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == -9, p.stderr[-2000:]
        done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        info = agent_mod.read_info(job)
        assert info is not None and agent_mod.is_alive(info)  # the agent survived its trainer
        m, opt = tiny_model(1, SIZES)
        res = ucp.Checkpointer(tmp_path / "ck", model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)).load()
        assert res is not None and res.source == "memory"
        # every snapshot known complete is restorable; the killed one is, if its copy finished
        assert done and done[-1]["step"] <= res.step <= done[-1]["step"] + 1, (res.step, done)
        diffs = bit_diffs(state_of(*_trained(res.step)), state_of(m, opt))
        assert diffs == [], f"seed {seed}: the restored step {res.step} is not what the trainer saved: {diffs}"
    finally:
        _stop_and_check_clean(job)


KILL_TRAINER = Path(__file__).with_name("kill_trainer.py")


def _torchrun(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONPATH=str(KILL_TRAINER.parents[2]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", str(KILL_TRAINER), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _why(p: subprocess.CompletedProcess) -> str:
    """The launcher's stderr without C++ stack frames."""
    return "\n".join(line for line in p.stderr.splitlines() if not line.startswith(("frame #", "Exception raised")))[-6000:]


def _log(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def uninterrupted_losses(tmp_path_factory):
    """Step -> loss of the 2-rank run without a kill."""
    tmp = tmp_path_factory.mktemp("reference")
    job = "f" + uuid.uuid4().hex[:12]
    try:
        p = _torchrun(str(tmp / "ck"), job, "0", str(tmp / "log"), "--no-kill")
        assert p.returncode == 0, _why(p)
    finally:
        client.stop(job)
    return {e["step"]: e["loss"] for e in _log(tmp / "log") if "loss" in e and e["rank"] == 0}


@pytest.mark.parametrize("seed", range(4))
def test_a_rank_killed_in_save_under_torchrun_restarts_both_from_memory_with_the_same_losses(
        tmp_path, seed, uninterrupted_losses):
    """Two ranks under torchrun; one is SIGKILLed in the middle of a snapshot's copy (torchrun then
    stops the other). The agent survives; the relaunched job restores the newest complete snapshot
    from memory and trains on with exactly the losses of the run that was never interrupted."""
    job = "f" + uuid.uuid4().hex[:12]
    root, log = tmp_path / "ck", tmp_path / "log"
    try:
        p = _torchrun(str(root), job, str(seed), str(log))
        assert p.returncode != 0, "no rank was killed"
        complete = max(e["complete"] for e in _log(log) if "complete" in e)
        info = agent_mod.read_info(job)
        assert info is not None and agent_mod.is_alive(info)  # the agent survived both trainers
        log.unlink()
        p = _torchrun(str(root), job, str(seed), str(log), "--restore")
        assert p.returncode == 0, _why(p)
        entries = _log(log)
        restored = {(e["restored"], e["source"]) for e in entries if "restored" in e}
        # the killed snapshot was never committed by its rank: the one before it is the newest complete
        assert restored == {(complete, "memory")}, (restored, complete)
        losses = {e["step"]: e["loss"] for e in entries if "loss" in e and e["rank"] == 0}
        assert losses and losses == {s: uninterrupted_losses[s] for s in losses}
        assert min(losses) == complete + 1 and max(losses) == 8
    finally:
        _stop_and_check_clean(job)


def _kill_agent(job: str) -> None:
    import os
    import signal
    import time

    info = agent_mod.read_info(job)
    os.kill(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while agent_mod.is_alive(info):
        assert time.monotonic() < deadline, "the agent did not die"
        time.sleep(0.02)


WIDE = (1024, 1024, 3)  # a 4 MiB weight: several of a snapshot's 1 MiB checksum blocks


def _snapshots(tmp_path, job: str, steps, sizes=(32, 200, 3), **options):
    """A trainer's snapshots of ``steps`` (a model of Linear layers of ``sizes``); the state after each."""
    m, opt = tiny_model(sizes=sizes)
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job, **options))
    states = {}
    for s in steps:
        train_step(m, opt, s)
        ck.save(s)
        states[s] = state_of(m, opt)
    ck.wait()
    return states


def _restart_and_load(tmp_path, job: str, sizes=(32, 200, 3)):
    """A relaunched trainer's load (its agent started afresh): the result, the state, the warnings."""
    import warnings

    m, opt = tiny_model(seed=5, sizes=sizes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)).load()
    return res, state_of(m, opt), [str(w.message) for w in caught if "ucp:" in str(w.message)]


def _corrupt(job: str, step: int) -> str:
    """Flip one byte of the first fragment of the slot holding ``step``; that slot's name."""
    for slot in (0, 1):
        path = shm.SHM_DIR / f"{shm.prefix(job)}r0.s{slot}.json"
        header = json.loads(path.read_text()) if path.exists() else {}
        if header.get("step") == step:
            f = header["fragments"][0]
            with open(shm.SHM_DIR / f["file"], "r+b") as data:
                data.seek(f["offset"] + f["length"] // 2)
                byte = data.read(1)
                data.seek(-1, 1)
                data.write(bytes([byte[0] ^ 0x10]))
            return f"r0.s{slot}"
    raise AssertionError(f"no slot holds step {step}")


@pytest.mark.parametrize("sizes", [(32, 200, 3), WIDE], ids=["small", "blocks"])
def test_a_killed_agents_intact_snapshots_are_taken_over_and_load_bit_exactly(tmp_path, job, sizes):
    """The new agent checks each slot's checksums, block checksums at the header's block size."""
    states = _snapshots(tmp_path, job, (1, 2, 3), sizes)
    _kill_agent(job)  # SIGKILL: its snapshots stay in /dev/shm
    res, got, said = _restart_and_load(tmp_path, job, sizes)
    assert res.source == "memory" and res.step == 3, res
    assert bit_diffs(states[3], got) == []
    assert said == []
    status = client.connect(job).status()
    assert sorted(status["adopted"].values()) == [2, 3] and status["discarded"] == {}
    _stop_and_check_clean(job)


def test_a_damaged_snapshot_of_a_killed_agent_is_discarded_and_named_and_the_load_falls_back(tmp_path, job):
    states = _snapshots(tmp_path, job, (1, 2, 3), persist_every=2)  # step 2 durable too
    _kill_agent(job)
    newest = _corrupt(job, 3)
    res, got, said = _restart_and_load(tmp_path, job)  # step 2, in memory and intact
    assert res.source == "memory" and res.step == 2 and bit_diffs(states[2], got) == []
    assert len(said) == 1 and f"{newest} (step 3: fragment" in said[0] and "fails its checksum" in said[0], said
    assert said[0].endswith("resuming from step 2 in memory") and "\n" not in said[0], said

    _kill_agent(job)  # the other one damaged too: the durable tier, said in one line
    _corrupt(job, 2)
    res, got, said = _restart_and_load(tmp_path, job)
    assert res.source == "durable" and res.step == 2 and bit_diffs(states[2], got) == []
    assert len(said) == 1 and "(step 2: fragment" in said[0] and "fails its checksum" in said[0], said
    assert said[0].endswith("resuming from durable step 2") and "\n" not in said[0], said
    _stop_and_check_clean(job)


def test_a_snapshot_taken_over_is_not_loaded_when_the_job_went_on_durably(tmp_path, job):
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job, timeout=10))
    train_step(m, opt, 1)
    ck.save(1)
    ck.wait()
    _kill_agent(job)  # the trainer goes on with durable saves
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in (2, 3):
            train_step(m, opt, s)
            ck.save(s)
    want = state_of(m, opt)
    res, got, said = _restart_and_load(tmp_path, job)
    assert res.source == "durable" and res.step == 3 and bit_diffs(want, got) == []
    assert len(said) == 1 and "step 1, taken over from a dead agent) is older than durable step 3" in said[0], said
    _stop_and_check_clean(job)
