"""The membership protocol of in-process recovery (ucp.checkpoint.inprocess.Membership), two members
in one process over a real TCPStore: a member whose process is gone (its liveness port closed) is
lost at once although its heartbeat is fresh; without the probe it is waited for; a stopped member
(port open) is waited for either way until it registers."""

from __future__ import annotations

import datetime
import threading
import time

import pytest
import torch.distributed as dist

from ucp.checkpoint.inprocess import Membership
from ucp.comm.liveness import LivenessPort

DEAD_AFTER = 20.0  # seconds of silence: far longer than any of these tests waits for an answer
TIMEOUT = 15.0  # the leader gives up at twice this


@pytest.fixture
def store():
    s = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False,
                      timeout=datetime.timedelta(seconds=60))
    yield s


def members(store, probe: bool) -> tuple[Membership, Membership]:
    made = [Membership(store, "ucp/inprocess/test", m, 2, TIMEOUT, 0.05, DEAD_AFTER, probe) for m in (0, 1)]
    for m in made:
        m.start()
    return made[0], made[1]


def decide_in_thread(member: Membership) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        start = time.monotonic()
        out["members"] = member.next_generation()[0]
        out["s"] = time.monotonic() - start

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_member_whose_port_closed_is_lost_at_once_though_its_heartbeat_is_fresh(store):
    leader, gone = members(store, probe=True)
    try:
        gone._port.close()  # its process exited: the kernel closed the port (its heartbeat thread beats on here)
        leader.register(transport=True)
        start = time.monotonic()
        assert leader.next_generation() == ((0,), True)
        assert time.monotonic() - start < DEAD_AFTER / 2
    finally:
        leader.stop()
        gone.stop()


@pytest.mark.parametrize("probe", [True, False], ids=["port-open", "no-probe-port-refuses"])
def test_a_member_is_waited_for_until_it_registers_while_alive_to_a_probe_or_without_probes(store, probe):
    leader, late = members(store, probe=probe)
    try:
        if not probe:  # a refusing address where a probe would look: only silence may lose a member now
            assert late._port is None and leader._port is None
            closed = LivenessPort(("127.0.0.1", store.port))
            closed.close()
            dist.PrefixStore("ucp/inprocess/test", store).set("port/1", closed.record)
        leader.register(transport=True)
        t, out = decide_in_thread(leader)
        time.sleep(1.0)
        assert "members" not in out, out  # neither gone nor silent: still waited for
        late.register(transport=True)
        t.join(10)
        assert out["members"] == (0, 1), out
    finally:
        leader.stop()
        late.stop()


def test_a_member_that_stopped_is_gone_to_the_next_leader(store):
    leader, left = members(store, probe=True)
    try:
        left.stop()  # (left the job: its port closes with it)
        leader.register(transport=False)
        start = time.monotonic()
        assert leader.next_generation()[0] == (0,)
        assert time.monotonic() - start < DEAD_AFTER / 2  # (by its port, not its silence)
    finally:
        leader.stop()


def test_a_member_without_a_liveness_port_is_told_by_its_silence_and_never_blocks_the_leader(store, monkeypatch):
    import ucp.checkpoint.inprocess as inprocess

    def no_route(toward):
        raise OSError(101, "Network is unreachable")

    leader = Membership(store, "ucp/inprocess/test", 0, 2, TIMEOUT, 0.05, 0.5, True)
    leader.start()
    monkeypatch.setattr(inprocess, "LivenessPort", no_route)
    portless = Membership(store, "ucp/inprocess/test", 1, 2, TIMEOUT, 0.05, 0.5, True)
    with pytest.warns(RuntimeWarning, match="member 1 has no liveness port .*Network is unreachable"):
        portless.start()
    try:
        assert portless._port is None
        portless.stop()  # (its heartbeat stops: silent from now on)
        leader.register(transport=True)
        start = time.monotonic()
        assert leader.next_generation()[0] == (0,)  # lost by its silence (0.5 s), the probe skipping it
        assert time.monotonic() - start < TIMEOUT
    finally:
        leader.stop()
        portless.stop()


def test_the_leader_probes_few_members_a_round_the_oldest_heartbeats_first(store, monkeypatch):
    """At scale, a probe round opens a bounded number of connections: the missing members with the
    oldest heartbeats (a dead member's stops), and a member that answered not again for a heartbeat."""
    import ucp.checkpoint.inprocess as inprocess

    monkeypatch.setattr(inprocess, "MAX_PROBES", 2)
    rounds: list[list[int]] = []
    real = inprocess.refused
    monkeypatch.setattr(inprocess, "refused", lambda addresses, timeout: (rounds.append(sorted(addresses)),
                                                                          real(addresses, timeout))[1])
    made = [Membership(store, "ucp/inprocess/wide", m, 6, TIMEOUT, 0.5, DEAD_AFTER, True) for m in range(6)]
    for m in made:
        m.start()
    try:
        made[4]._stop.set()  # member 4 stops beating (its process "dies" below)
        time.sleep(1.2)  # (its heartbeat is now the oldest)
        made[4]._port.close()
        made[0].register(transport=True)
        t, out = decide_in_thread(made[0])
        time.sleep(0.5)
        for m in (1, 2, 3, 5):
            made[m].register(transport=True)
        t.join(10)
        assert out["members"] == (0, 1, 2, 3, 5), out
        assert rounds and all(len(r) <= 2 for r in rounds), rounds
        assert 4 in rounds[0], rounds  # the oldest heartbeat first
    finally:
        for m in made:
            m.stop()


class CountingStore:
    """A store that counts the requests made through it and the bytes of the values it returns."""

    def __init__(self, store):
        self._store, self.requests, self.read = store, [], 0

    def __getattr__(self, name):
        call = getattr(self._store, name)

        def counted(*args):
            self.requests.append(name)
            got = call(*args)
            if isinstance(got, bytes):
                self.read += len(got)
            elif isinstance(got, list):
                self.read += sum(len(v) for v in got)
            return got
        return counted


def test_what_the_store_serves_a_recovery_grows_with_the_failure_not_the_job(store):
    """2,000 members, 3 lost: the leader reads the registrations in one request, not one per member;
    each survivor reads the list of the lost, not of the 1,997 survivors."""
    world, lost = 2000, {7, 1000, 1999}
    prefix = "ucp/inprocess/big"
    shared = dist.PrefixStore(prefix, store)
    for m in range(world):  # (every member's heartbeat, old: the lost ones are silent)
        shared.set(f"hb/{m}", repr(time.time() - (100.0 if m in lost else 0.0)))
    made = {m: Membership(store, prefix, m, world, TIMEOUT, 0.5, 5.0, probe=False) for m in range(world)
            if m not in lost}
    for m, member in made.items():
        if m:
            member.register(transport=True)
    leader = made[0]
    leader.store = counting = CountingStore(leader.store)
    leader.register(transport=True)
    assert leader.next_generation()[0] == tuple(m for m in range(world) if m not in lost)
    assert len(counting.requests) <= 12 and counting.requests.count("get") <= 2, counting.requests
    follower = made[1]
    follower.store = counting = CountingStore(follower.store)
    members, _ = follower.next_generation()
    assert len(members) == world - 3 and 1 in members
    assert counting.read < 200, counting.read  # (the lost: a few bytes; the members would be ~10 KB)
