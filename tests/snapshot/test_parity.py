"""The parity exchange and the rebuild of lost members, on a gloo world of 4."""

from __future__ import annotations

import itertools

import pytest

from tests.snapshot import parity_workloads as w

pytestmark = pytest.mark.dist

SIZES = [5 * w.STRIPE + 100, 3 * w.STRIPE, 64, 7 * w.STRIPE + 1]  # uneven, one shorter than a stripe


@pytest.mark.parametrize("m", [1, 2])
def test_every_loss_pattern_up_to_m_is_rebuilt_bit_exactly(world4, m):
    pytest.importorskip("pyeclib") if m > 1 else None
    for seed, lost in enumerate(itertools.combinations(range(4), m)):
        rebuilder = next(r for r in range(4) if r not in lost)
        got = world4.run(w.encode_then_rebuild, SIZES, m, list(lost), rebuilder, seed)
        assert got[rebuilder]["exact"] == {i: True for i in lost}, (lost, got[rebuilder])
        assert all(r["chunk_sums_exact"] for r in got)


def test_a_long_exchange_in_many_pipeline_steps_is_rebuilt_bit_exactly(world4):
    # ~40 stripe sets: several steps of the pipeline, each posted while the one before is encoded
    sizes = [40 * w.STRIPE + 5, 30 * w.STRIPE, 64, 41 * w.STRIPE]
    for lost in ([1], [3]):
        got = world4.run(w.encode_then_rebuild, sizes, 1, lost, 0, 11)
        assert got[0]["exact"] == {lost[0]: True} and all(r["chunk_sums_exact"] for r in got)


def test_a_rate_bounds_the_bytes_each_member_sends_per_second(world4):
    sizes = [16 * w.STRIPE] * 4  # each member sends 16 stripes of 4 KiB: 64 KiB at 256 KiB/s, ~0.25 s
    got = world4.run(w.encode_then_rebuild, sizes, 1, [2], 0, 5, None, 256 * 1024)
    assert got[0]["exact"] == {2: True}
    # paced before the last step's parity is computed: at least the bytes of all steps but the last
    assert min(r["encode_s"] for r in got) >= 0.15


def test_parity_memory_is_about_g_over_k(world4):
    sizes = [12 * w.STRIPE] * 4
    got = world4.run(w.encode_then_rebuild, sizes, 1, [0], 1, 0)
    # 4 members, 1 parity: (data + parity) / data = g / k = 4/3, each member 1/3 of its data in parity
    assert [r["parity_bytes"] for r in got] == [4 * w.STRIPE] * 4
    assert (sum(sizes) + sum(r["parity_bytes"] for r in got)) / sum(sizes) == pytest.approx(4 / 3)


@pytest.mark.parametrize("kind", ["data", "parity"])
def test_a_corrupted_stripe_is_detected_and_never_decoded_from(world4, kind):
    # member 0 lost; member 2 corrupts a stored stripe: with m = 1 nothing is left to rebuild from
    got = world4.run(w.encode_then_rebuild, [4 * w.STRIPE] * 4, 1, [0], 1, 7, (2, kind))
    err = got[1].get("error", "")
    assert "exact" not in got[1], got[1]
    assert "failing its checksum" in err and "member 2 (rank 2)" in err
    assert ("data chunk" if kind == "data" else "parity stripe") in err


def test_a_corrupted_stripe_is_rebuilt_around_when_parity_allows(world4):
    pytest.importorskip("pyeclib")
    # m = 2, one member lost, one stripe corrupt: the other parity stripe still rebuilds it
    got = world4.run(w.encode_then_rebuild, [4 * w.STRIPE] * 4, 2, [0], 1, 3, (3, "data"))
    assert got[1].get("exact") == {0: True}, got[1]


# -- end to end: Checkpointer(redundancy=...) on 4 simulated nodes ---------------------------------


@pytest.fixture
def nodes():
    """A base job name; each rank's node is ``<base>-<rank>`` (or a fresh ``...x``); every agent of
    them is stopped afterwards and nothing may be left in shared memory."""
    import os
    import signal
    import uuid

    from ucp.errors import FormatError
    from ucp.snapshot import agent as agent_mod
    from ucp.snapshot import client, shm

    base = "p" + uuid.uuid4().hex[:10]
    yield base
    left = {}
    for suffix in [f"-{r}{x}" for r in range(4) for x in ("", "x")]:
        name = base + suffix
        try:
            info = agent_mod.read_info(name)
        except FormatError:
            info = None
        if info is not None and agent_mod.is_alive(info):
            try:
                client.stop(name, timeout=10)
            except Exception:
                os.kill(info.pid, signal.SIGKILL)
        for n in shm.listing(shm.prefix(name)):
            if not n.endswith(".agent.lock"):
                left[n] = True
            shm.unlink(n)
    assert not left, f"left behind: {sorted(left)}"


def kill_node(job: str) -> None:
    """SIGKILL a simulated node's agent and remove its shared memory (its trainers are already gone)."""
    import os
    import signal
    import time

    from ucp.snapshot import agent as agent_mod

    info = agent_mod.read_info(job)
    os.kill(info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while agent_mod.is_alive(info):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert agent_mod.reclaim(job)


@pytest.mark.parametrize("m,lost,rate", [(1, [1], None), (1, [0], 8 << 20), (2, [0, 3], None)])
def test_lost_nodes_are_rebuilt_from_parity_bit_exactly(world4, tmp_path, nodes, m, lost, rate):
    if m > 1:
        pytest.importorskip("pyeclib")
    saved = world4.run(w.redundant_snapshots, str(tmp_path), nodes, m, 3, None, rate)
    assert all(r["tiers"] == ["memory"] * 3 for r in saved)
    for r in saved:  # the agent keeps the parity of both slots; g / (g - m) of the data
        st = r["status"]
        assert {v["step"] for v in st["parity"].values()} == {2, 3} and all(v["m"] == m for v in st["parity"].values())
        assert st["parity_bytes"] > 0
    data = sum(r["status"]["data_bytes"] for r in saved)
    par = sum(r["status"]["parity_bytes"] for r in saved)
    assert (data + par) / data >= 4 / (4 - m)
    for r in lost:
        kill_node(w.node_job(nodes, r))
    got = world4.run(w.recover, str(tmp_path), nodes, lost, saved[0]["state"])
    for r in got:
        assert r["source"] == "memory" and r["step"] == 3 and r["rebuilt"] == lost, r
        assert r["diffs"] == [], r["diffs"]
        assert r["next"] == "memory"
    assert any("rebuilt from parity" in m for m in got[0]["warnings"]), got[0]["warnings"]


def test_more_lost_than_parity_falls_back_to_the_durable_tier_and_says_so(world4, tmp_path, nodes):
    saved = world4.run(w.redundant_snapshots, str(tmp_path), nodes, 1, 4, 2)  # durable at steps 2 and 4
    for r in (1, 2):
        kill_node(w.node_job(nodes, r))
    got = world4.run(w.recover, str(tmp_path), nodes, [1, 2], saved[0]["state"])
    for r in got:
        assert r["source"] == "durable" and r["step"] == 4 and r["diffs"] == [], r
    lines = [m for m in got[0]["warnings"] if "durable" in m]
    assert len(lines) == 1 and "more than its 1 parity stripe(s) can rebuild" in lines[0], got[0]["warnings"]
    assert "\n" not in lines[0]


def test_a_corrupted_parity_stripe_is_named_and_the_durable_tier_loaded(world4, tmp_path, nodes):
    saved = world4.run(w.redundant_snapshots, str(tmp_path), nodes, 1, 4, 2)
    kill_node(w.node_job(nodes, 2))
    w.corrupt_parity(nodes, 0)
    got = world4.run(w.recover, str(tmp_path), nodes, [2], saved[0]["state"])
    for r in got:  # never loaded from the bad stripe: the durable checkpoint of step 4 instead
        assert r["source"] == "durable" and r["step"] == 4 and r["diffs"] == [], r
    lines = [m for m in got[0]["warnings"] if "durable" in m]
    assert len(lines) == 1 and "parity stripe of member 0 (rank 0)" in lines[0] and "failing its checksum" in lines[0], lines


def test_agent_status_shows_parity_and_its_overhead(world4, tmp_path, nodes, capsys):
    from ucp.cli.main import main

    world4.run(w.redundant_snapshots, str(tmp_path), nodes, 1, 2)
    capsys.readouterr()
    assert main(["agent", "status", "--job", w.node_job(nodes, 1)]) == 0
    out = capsys.readouterr().out
    assert "parity of step 2 (redundancy group of ranks [0, 1, 2, 3], 1 parity stripe(s) per set)" in out
    assert "redundancy:" in out and "x the data" in out
