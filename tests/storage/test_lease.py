"""The writer lease on a checkpoint root: one job at a time, stale holders taken over atomically."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time

import pytest

from ucp.errors import LeaseError
from ucp.storage import lease as lease_module
from ucp.storage.lease import LEASE, Lease, read_holder


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _age(path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_second_job_is_refused_with_one_line_naming_root_and_holder(tmp_path):
    a = Lease(tmp_path, token="a", host="node-a", pid=4242, job="17")
    b = Lease(tmp_path, token="b")
    assert a.acquire() is None and a.held
    with pytest.raises(LeaseError) as e:
        b.acquire()
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path) in msg and "host node-a pid 4242 (job 17) since " in msg
    assert f"if that job is dead, delete {tmp_path / LEASE}" in msg
    assert not b.held and read_holder(tmp_path / LEASE).token == "a"


def test_acquire_again_refreshes_the_heartbeat(tmp_path):
    a = Lease(tmp_path, token="a")
    a.acquire()
    _age(a.path, 100)
    a.acquire()
    assert time.time() - read_holder(a.path).heartbeat < 10


def test_a_lease_whose_process_is_dead_on_this_host_is_taken_over(tmp_path):
    dead = Lease(tmp_path, token="dead", pid=_dead_pid())
    dead.acquire()
    b = Lease(tmp_path, token="b")
    note = b.acquire()
    assert note is not None and "is not running on this host" in note and "\n" not in note
    assert b.held and read_holder(b.path).token == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE]  # no claim or temporary file left


def test_a_live_holder_on_another_host_is_taken_over_only_once_its_heartbeat_is_stale(tmp_path):
    a = Lease(tmp_path, token="a", host="elsewhere", pid=1)
    a.acquire()
    b = Lease(tmp_path, token="b", stale_after=60)
    _age(a.path, 30)
    with pytest.raises(LeaseError, match="host elsewhere pid 1"):
        b.acquire()
    _age(a.path, 120)
    assert "heartbeat is 120 s old" in b.acquire()
    # the old holder learns it before it publishes anything
    with pytest.raises(LeaseError, match="lost the checkpoint root's writer lease .*host .* pid"):
        a.check()
    assert not a.held


def test_release_removes_only_its_own_lease(tmp_path):
    a = Lease(tmp_path, token="a", host="elsewhere", pid=1)
    a.acquire()
    _age(a.path, 10**6)
    b = Lease(tmp_path, token="b")
    b.acquire()
    a.held = True  # (a does not know yet)
    a.release()
    assert read_holder(b.path).token == "b"
    b.release()
    assert not b.path.exists()


def test_a_malformed_lease_file_is_refused_while_fresh_and_taken_over_when_old(tmp_path):
    (tmp_path / LEASE).write_text("{not json")
    b = Lease(tmp_path, token="b")
    with pytest.raises(LeaseError, match="an unreadable lease file"):
        b.acquire()
    _age(tmp_path / LEASE, 60)
    assert "not a lease file" in b.acquire()
    assert json.loads((tmp_path / LEASE).read_text())["token"] == "b"


def test_contenders_for_a_stale_lease_end_with_exactly_one_holder(tmp_path):
    Lease(tmp_path, token="dead", pid=_dead_pid()).acquire()
    leases = [Lease(tmp_path, token=f"c{i}") for i in range(12)]
    outcomes: dict[str, str] = {}
    start = threading.Barrier(len(leases))

    def contend(lease):
        start.wait()
        try:
            lease.acquire()
            outcomes[lease.token] = "held"
        except LeaseError:
            outcomes[lease.token] = "refused"

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [t for t, o in outcomes.items() if o == "held"]
    assert len(winners) == 1, outcomes
    assert read_holder(tmp_path / LEASE).token == winners[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEASE]


def test_the_lease_file_is_whole_from_its_creation(tmp_path, monkeypatch):
    # created by a hard link of a fully written file: a reader never sees an empty lease
    seen = []
    real_link = os.link

    def link(src, dst, *a, **k):
        seen.append(json.loads(open(src).read()))
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link)
    Lease(tmp_path, token="a", pid=7, host="h").acquire()
    assert seen and seen[0]["token"] == "a" and seen[0]["pid"] == 7


def test_without_hard_links_the_lease_is_created_exclusively(tmp_path, monkeypatch):
    def no_links(*a, **k):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    a, b = Lease(tmp_path, token="a"), Lease(tmp_path, token="b", pid=1)
    a.acquire()
    with pytest.raises(LeaseError):
        b.acquire()
    assert read_holder(a.path).token == "a"


def test_a_held_lease_keeps_its_heartbeat_fresh_between_saves(tmp_path, monkeypatch):
    """A job that saves rarely must not look dead: its heartbeat thread refreshes the lease."""
    monkeypatch.setattr(lease_module, "HEARTBEAT_EVERY", 0.05)
    a = Lease(tmp_path, token="a")
    a.acquire()
    _age(a.path, 1000)
    deadline = time.time() + 5
    while time.time() - read_holder(a.path).heartbeat > 100 and time.time() < deadline:
        time.sleep(0.02)
    assert time.time() - read_holder(a.path).heartbeat < 100
    a.release()  # the thread stops with the lease: an aged file stays aged
    assert read_holder(a.path) is None
