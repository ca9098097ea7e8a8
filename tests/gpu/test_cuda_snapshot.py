"""The memory tier with the training state on a GPU: the device-to-host copies on ucp's side stream
into page-locked slots, the events that order them against the training stream, and restores back
onto the GPU. Marker ``gpu``: CI has no GPU, so these run only where one is (``pytest -m gpu``, the
script ``tools/device_check.sh``); without one they fail rather than pass on nothing."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

import ucp
from ucp.errors import UcpError
from ucp.snapshot.memory import cuda_device
from tests.helpers import bit_diffs, same_state, state_of, tiny_model
from tests.snapshot.conftest import job  # noqa: F401 - the fixture: a fresh job, its agent stopped after
from tests.snapshot.test_parity import kill_node, nodes  # noqa: F401 - simulated nodes, each its own agent

pytestmark = pytest.mark.gpu

# about a second of GPU time (torch.cuda._sleep spins for this many cycles; ~2 GHz)
SLEEP_CYCLES = 2_000_000_000


@pytest.fixture(autouse=True)
def gpu():
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    yield torch.device("cuda", torch.cuda.current_device())
    torch.cuda.synchronize()


def gpu_model(seed: int = 0, sizes=(256, 1024, 512)):
    m, _ = tiny_model(seed, sizes)
    m = m.cuda()
    return m, torch.optim.AdamW(m.parameters(), lr=0.01)


def gpu_step(model, opt, s: int) -> None:
    """A training step that never waits for the GPU on the host (its batch drawn on the GPU)."""
    gen = torch.Generator(device="cuda").manual_seed(s)
    x = torch.randn(8, model[0].in_features, generator=gen, device="cuda")
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def test_a_snapshot_of_gpu_state_restores_bit_exactly_onto_the_gpu(tmp_path, job):  # noqa: F811
    m, opt = gpu_model()
    with ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)) as ck:
        for s in range(1, 4):
            gpu_step(m, opt, s)
            assert ck.save(s).tier == "memory"
        ck.wait()
        want = state_of(m, opt)
        tier = ck._snapshots._memory_tier
        assert tier._pinned and all(p is not None for p in tier._pinned.values())  # slots page-locked
        assert len(tier._pinned) <= 2  # once per slot, not per snapshot
    m2, opt2 = gpu_model(seed=1)
    gpu_step(m2, opt2, 0)  # (AdamW's state exists, to be overwritten)
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    got = state_of(m2, opt2)
    assert res.source == "memory" and res.step == 3
    assert all(v.is_cuda for k, v in got.items() if k.startswith("model/"))
    assert same_state(got, want), bit_diffs(got, want)


def test_save_returns_before_the_gpu_catches_up_and_the_step_waits_for_the_copy_on_the_gpu(tmp_path, job):  # noqa: F811
    """The snapshot copies run on the side stream after what the training stream had queued; the
    optimizer's next step is queued behind them on the GPU, never waited for on the host."""
    m, opt = gpu_model(sizes=(1024, 4096, 1024))
    with ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)) as ck:
        for s in (1, 2):  # both slots used (and page-locked) once
            gpu_step(m, opt, s)
            ck.save(s)
            ck.wait()
        stream = torch.cuda.current_stream()
        torch.cuda._sleep(SLEEP_CYCLES)  # the harness: a step alone does not wait for the GPU
        gpu_step(m, opt, 3)
        assert not stream.query(), "the test's training step itself waits for the GPU"
        torch.cuda.synchronize()
        want = state_of(m, opt)  # the state at step 3, as the snapshot must hold it
        torch.cuda._sleep(SLEEP_CYCLES)  # the GPU is a second behind the host
        t0 = time.perf_counter()
        ck.save(3)
        t1 = time.perf_counter()
        saved_behind = not stream.query()
        gpu_step(m, opt, 4)  # its forward, backward and AdamW's in-place step (after ucp's pre-step hook)
        t2 = time.perf_counter()
        stepped_behind = not stream.query()
        ck.wait()
        assert saved_behind and stepped_behind, f"the host waited for the GPU: save {t1 - t0:.3f} s, " \
                                                f"step {t2 - t1:.3f} s"
        after = state_of(m, opt)
    assert not same_state(after, want)  # step 4 changed the parameters...
    m2, opt2 = gpu_model(seed=1, sizes=(1024, 4096, 1024))
    gpu_step(m2, opt2, 0)
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    got = state_of(m2, opt2)
    assert res.step == 3 and same_state(got, want), bit_diffs(got, want)  # ...after the snapshot had copied them


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.norm = nn.BatchNorm1d(64)

    def forward(self, x):
        return self.norm(self.fc(x))


def test_module_buffers_on_the_gpu_are_taken_at_the_save_not_after_the_next_forward(tmp_path, job):  # noqa: F811
    torch.manual_seed(0)
    m = Normed().cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    x = torch.randn(16, 64, device="cuda")
    with ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)) as ck:
        m(x).sum().backward()
        opt.step()
        want = m.norm.running_mean.clone()
        torch.cuda._sleep(SLEEP_CYCLES)
        ck.save(1)
        m(x * 3 + 1)  # a forward pass: the running statistics change in place, before the copy ran
        ck.wait()
        assert not torch.equal(m.norm.running_mean, want)
    torch.manual_seed(5)
    m2 = Normed().cuda()
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.01)
    ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert torch.equal(m2.norm.running_mean, want)


def test_state_on_two_gpus_in_one_rank_is_refused_by_name():
    if torch.cuda.device_count() < 2:
        a = torch.zeros(2, device="cuda")
        assert cuda_device([a, torch.zeros(1)]) == a.device  # one GPU and the CPU: that GPU
        assert cuda_device([torch.zeros(1)]) is None
        pytest.skip("one GPU: the refusal of two is checked with a second")
    with pytest.raises(UcpError, match="cuda:0, cuda:1"):
        cuda_device([torch.zeros(1, device="cuda:0"), torch.zeros(1, device="cuda:1")])


def test_a_tier_on_another_device_than_the_threads_current_one_copies_on_that_device(tmp_path, job):  # noqa: F811
    """The copying thread's current device is the process's first; the side stream and the events
    must be the tensors' device's (with one GPU this checks the stream's device is taken from them)."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.manual_seed(0)
    m = nn.Linear(128, 128).to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=0.01)
    with torch.cuda.device(dev):
        with ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)) as ck:
            m(torch.randn(4, 128, device=dev)).sum().backward()
            opt.step()
            want = state_of(m, opt)
            ck.save(1)
            ck.wait()
            streams = ck._snapshots._memory_tier._streams
            assert list(streams) == [dev] and streams[dev].device == dev
    torch.manual_seed(1)
    m2 = nn.Linear(128, 128).to(dev)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.01)
    ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert torch.equal(m2.weight, want["model/weight"])


def test_ranks_sharing_a_gpu_snapshot_with_parity_and_a_lost_node_is_rebuilt_onto_the_gpu(tmp_path, worlds,
                                                                                         nodes):  # noqa: F811
    """Four ranks, each its own node (agent), their state on the GPU; node 2 is lost and replaced:
    the survivors' parity rebuilds its snapshot, which loads onto the GPU bit-exactly."""
    from tests.gpu import workloads as w

    world4 = worlds(4)
    saved = world4.run(w.snapshots_with_parity, str(tmp_path), nodes)
    assert all(s["tiers"] == ["memory"] * 3 for s in saved)
    kill_node(w.node_job(nodes, 2))
    got = world4.run(w.recover, str(tmp_path), nodes, [2], saved[0]["state"])
    for r in got:
        assert r["source"] == "memory" and r["step"] == 3 and r["rebuilt"] == [2] and r["on_gpu"], r
        assert not r["diffs"], r["diffs"]
