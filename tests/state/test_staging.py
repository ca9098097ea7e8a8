"""ucp.state.staging: the buffers a load's chunks go through on their way to a GPU (here on the CPU,
where each copy is made at once: the same bookkeeping without a device)."""

from __future__ import annotations

import threading

import pytest
import torch

from ucp.state.staging import DeviceStaging


def _fill(value: int):
    def fill(view):
        view[:] = bytes([value]) * len(view)
    return fill


def test_chunks_land_in_their_destinations_through_reused_buffers():
    dest = torch.zeros(10 * 7, dtype=torch.uint8)
    with DeviceStaging("cpu", buffers=2, nbytes=8) as staging:
        assert not staging.pinned
        for i in range(10):  # ten chunks through two buffers
            staging.put(dest[i * 7:(i + 1) * 7], _fill(i + 1))
    assert dest.tolist() == [i + 1 for i in range(10) for _ in range(7)]
    assert staging.staged == 70


def test_a_chunk_larger_than_a_buffer_is_refused():
    with DeviceStaging("cpu", buffers=1, nbytes=8) as staging, pytest.raises(ValueError, match="9 bytes"):
        staging.put(torch.zeros(9, dtype=torch.uint8), _fill(1))
    with pytest.raises(ValueError, match="at least one buffer"):
        DeviceStaging("cpu", buffers=0)
    with DeviceStaging("cpu", buffers=1, nbytes=8) as staging, pytest.raises(ValueError, match="meta"):
        staging.put(torch.zeros(4, dtype=torch.uint8, device="meta"), _fill(1))  # another device's chunk


def test_a_failed_read_copies_nothing_and_gives_its_buffer_back():
    dest = torch.zeros(4, dtype=torch.uint8)
    staging = DeviceStaging("cpu", buffers=1, nbytes=4)

    def broken(view):
        view[:] = b"\x09" * 4
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        staging.put(dest, broken)
    assert dest.tolist() == [0] * 4 and staging.staged == 0
    done = threading.Thread(target=staging.put, args=(dest, _fill(3)), daemon=True)
    done.start()
    done.join(10)  # (with the buffer lost, the one buffer would never be free again)
    assert not done.is_alive() and dest.tolist() == [3] * 4


def test_threads_stage_at_once_each_into_its_own_buffer():
    dest = torch.zeros(64 * 100, dtype=torch.uint8)
    staging = DeviceStaging("cpu", buffers=3, nbytes=100)
    inside, most, lock = [0], [0], threading.Lock()

    def fill(value):
        def run(view):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            view[:] = bytes([value]) * len(view)
            threading.Event().wait(0.002)
            with lock:
                inside[0] -= 1
        return run

    threads = [threading.Thread(target=lambda k=k: [staging.put(dest[i * 100:(i + 1) * 100], fill(i))
                                                    for i in range(k, 64, 4)]) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert dest.reshape(64, 100).tolist() == [[i] * 100 for i in range(64)]
    assert 1 < most[0] <= 3  # several reads at once, never more than the buffers
