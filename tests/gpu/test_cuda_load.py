"""Loads onto a GPU go through page-locked staging buffers (ucp.state.staging): the bytes of every
fragment on the device, from a snapshot in memory and from a durable checkpoint, read and verified
on the host into pinned buffers and copied asynchronously. Marker ``gpu`` (see test_cuda_snapshot)."""

from __future__ import annotations

import pytest
import torch

import ucp
from ucp.errors import CorruptCheckpointError
from ucp.state import staging as staging_mod
from tests.gpu.test_cuda_snapshot import gpu_model, gpu_step
from tests.helpers import bit_diffs, same_state, state_of
from tests.snapshot.conftest import job  # noqa: F401 - the fixture: a fresh job, its agent stopped after

pytestmark = pytest.mark.gpu


@pytest.fixture
def staged(monkeypatch):
    """(pinned, bytes) of every DeviceStaging closed."""
    seen = []
    close = staging_mod.DeviceStaging.close

    def recorded(self):
        close(self)
        seen.append((self.pinned, self.staged))

    monkeypatch.setattr(staging_mod.DeviceStaging, "close", recorded)
    return seen


def _gpu_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor) and v.is_cuda)


@pytest.mark.parametrize("tier", ["memory", "durable"])
def test_a_load_onto_the_gpu_goes_through_pinned_staging_bit_exactly(tmp_path, job, tier, staged,  # noqa: F811
                                                                      monkeypatch):
    from ucp.checkpoint import readers

    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    monkeypatch.setattr(readers, "STAGE_BYTES", 2 << 20)  # 16 MiB tensors: chunks of whole blocks, buffers reused
    m, opt = gpu_model(sizes=(1024, 4096, 1024))
    snap = ucp.SnapshotOptions(job=job) if tier == "memory" else None
    with ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=snap) as ck:
        gpu_step(m, opt, 1)
        assert ck.save(1).tier == tier
        ck.wait()
        want = state_of(m, opt)
    m2, opt2 = gpu_model(seed=1, sizes=(1024, 4096, 1024))
    gpu_step(m2, opt2, 0)
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=snap).load()
    got = state_of(m2, opt2)
    assert res.source == tier and same_state(got, want), bit_diffs(got, want)
    assert staged and all(pinned for pinned, _ in staged)
    assert sum(n for _, n in staged) == _gpu_bytes(got)  # every byte on the GPU came through staging


def test_the_copies_follow_what_the_current_stream_had_queued_and_have_landed_on_return(tmp_path, job):  # noqa: F811
    """A load starts its copies after the kernels queued on the loading thread's stream (which may
    still write the destinations) and returns once they have landed: another stream reads them at once."""
    from tests.gpu.test_cuda_snapshot import SLEEP_CYCLES

    m, opt = gpu_model(sizes=(1024, 4096, 1024))
    with ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)) as ck:
        gpu_step(m, opt, 1)
        ck.save(1)
        ck.wait()
        want = state_of(m, opt)
    m2, opt2 = gpu_model(seed=1, sizes=(1024, 4096, 1024))
    gpu_step(m2, opt2, 0)
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)  # the current stream is a second behind...
    with torch.no_grad():
        for p in m2.parameters():
            p.fill_(float("nan"))  # ...and then overwrites the destinations
    ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    other = torch.cuda.Stream()
    with torch.cuda.stream(other):  # (no wait on the loading stream)
        got = {k: v.clone() for k, v in state_of(m2, opt2).items()}
    other.synchronize()
    assert same_state(got, want), bit_diffs(got, want)


def test_a_corrupted_durable_fragment_loaded_onto_the_gpu_is_named(tmp_path, staged):
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    m, opt = gpu_model(sizes=(1024, 4096, 1024))
    gpu_step(m, opt, 1)
    res = ucp.Checkpointer(tmp_path, model=m, optimizer=opt).save(1)
    data = sorted(res.path.glob("rank_*.safetensors"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    m2, opt2 = gpu_model(seed=1, sizes=(1024, 4096, 1024))
    with pytest.raises(CorruptCheckpointError, match="fails its checksum"):
        ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2).load()
    assert staged and all(pinned for pinned, _ in staged)  # (found on the staged path)
