"""tools/benchlib.py's figures: quantiles and spreads of repeated measurements, and the floors' passes."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from tests.tools.bench import TOOLS


@pytest.fixture(scope="module")
def benchlib():
    spec = importlib.util.spec_from_file_location("benchlib", TOOLS / "benchlib.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quantile_interpolates_between_ranks(benchlib):
    assert benchlib.quantile([4, 1, 3, 2], 0.5) == 2.5
    assert benchlib.quantile([4, 1, 3, 2], 0.25) == 1.75
    assert benchlib.quantile([5], 0.75) == 5
    assert benchlib.quantile([], 0.5) is None


def test_summary_scales_and_orders(benchlib):
    s = benchlib.summary([0.003, 0.001, 0.002, 0.010], scale=1e3, digits=2)
    assert s == {"min": 1.0, "p25": 1.75, "median": 2.5, "p75": 4.75, "max": 10.0, "n": 4}
    assert benchlib.summary([]) is None


def test_median_of_sets_median_throughput_and_spread(benchlib):
    out: dict = {}
    assert benchlib.median_of(out, "x", [2.0, 1.0, 4.0], 8e9) == 2.0
    assert (out["x_s"], out["x_gbps"], out["x_all_s"]) == (2.0, 4.0, [2.0, 1.0, 4.0])
    assert out["x_spread_s"]["min"] == 1.0 and out["x_spread_s"]["max"] == 4.0


def test_floors_copy_checksum_write_and_read_back(benchlib, tmp_path):
    import crc32c

    f = benchlib.Floors(1 << 20)
    f.memcpy()
    assert np.array_equal(f.dst, f.src)
    assert f.crc32c() == crc32c.crc32c(bytes(f.src))
    f.memcpy_4k()
    assert (f.tdst == 7).all()
    f.tdst[:] = 0
    f.tsrc[5] = 9  # the verified copy's checksum is of what it copied, over every chunk
    assert f.verified_copy(chunk=1000) == crc32c.crc32c(bytes(f.tsrc)) and np.array_equal(f.tdst, f.tsrc)
    path = tmp_path / "floor.bin"
    f.write_fsync(path)
    assert os.path.getsize(path) == 1 << 20
    f.src[:] = 3  # the read must bring back what was written, not what the buffer holds now
    f.dst[:] = 0
    f.drop(path)
    f.cold_read(path)
    assert (f.dst == 7).all() and f.disk_read_bytes >= 0


def test_a_reused_dcp_stager_copies_a_class_after_its_table_was_emptied(benchlib):
    """torch 2.11's StateDictStager empties its copy table when closed, after every staging, and the
    next staging of a state holding a class (AdamW's does) fails on it: the bench gives it back."""
    import torch
    from torch.distributed.checkpoint._state_dict_stager import StateDictStager

    benchlib._stagers_keep_their_copy_table()
    stager = StateDictStager(pin_memory=False, share_memory=False)
    state = {"w": torch.arange(4.0), "kind": torch.optim.AdamW}
    stager.stage(state)
    stager._deepcopy_dispatch.clear()  # what torch 2.11's close() does
    again = stager.stage(state)
    assert again["kind"] is torch.optim.AdamW and torch.equal(again["w"], state["w"])


_LAUNCHER = """
import sys, time
sys.path.insert(0, {tools!r})
import benchlib

def sleeper(rank, out):
    import os
    open(f"{{out}}/rank{{rank}}.pid", "w").write(str(os.getpid()))
    time.sleep(120)

if __name__ == "__main__":
    benchlib.spawn_world(sleeper, 2, {out!r})
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.timeout(120)
def test_a_launcher_killed_outright_takes_its_ranks_with_it(tmp_path):
    """A SIGTERM runs no ``finally``: the ranks die with their launcher all the same (PR_SET_PDEATHSIG),
    never left running alone."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "launch.py"
    script.write_text(_LAUNCHER.format(tools=str(TOOLS), out=str(tmp_path)))
    launcher = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while len(list(tmp_path.glob("rank*.pid"))) < 2:
            assert time.monotonic() < deadline and launcher.poll() is None, "the ranks did not start"
            time.sleep(0.2)
        pids = [int(p.read_text()) for p in tmp_path.glob("rank*.pid")]
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(30)
        deadline = time.monotonic() + 20
        while any(_running(pid) for pid in pids):
            assert time.monotonic() < deadline, "a rank outlived its launcher"
            time.sleep(0.2)
    finally:
        launcher.kill()
        for p in tmp_path.glob("rank*.pid"):
            try:
                os.kill(int(p.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
