"""The liveness port (ucp.comm.liveness): a probe reports a process as gone only once it exited;
a live, a stopped (SIGSTOP) and an unreachable one are not reported."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ucp.comm import liveness
from ucp.comm.liveness import LivenessPort, refused

TOWARD = ("127.0.0.1", 29500)  # (a route only: nothing is sent there)

HOLDER = """
import sys, time
from ucp.comm.liveness import LivenessPort
port = LivenessPort(("127.0.0.1", 29500))
print(port.address, flush=True)
while True:
    time.sleep(0.05)
    port.drain()
"""


@pytest.fixture
def holder():
    """A process holding a liveness port; killed at the end whatever happened."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        yield proc, proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_an_open_port_is_not_refused_and_a_closed_one_is():
    port = LivenessPort(TOWARD)
    try:
        assert port.address.startswith("127.0.0.1:")
        assert refused({"a": port.address}, 1.0) == set()
        port.drain()
    finally:
        port.close()
    assert refused({"a": port.address}, 1.0) == {"a"}


def test_a_killed_process_is_refused_a_stopped_one_is_not(holder):
    proc, address = holder
    assert refused({7: address}, 1.0) == set()
    os.kill(proc.pid, signal.SIGSTOP)  # a hung process: its kernel still accepts
    try:
        assert refused({7: address}, 1.0) == set()
        assert refused({7: address}, 1.0) == set()  # (again: the queue of a stopped process holds)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    proc.kill()
    proc.wait(timeout=10)
    assert refused({7: address}, 1.0) == {7}


def test_only_the_gone_are_reported_among_many_in_batches(monkeypatch):
    monkeypatch.setattr(liveness, "MAX_PROBES", 4)
    ports = [LivenessPort(TOWARD) for _ in range(10)]
    try:
        for p in ports[::3]:
            p.close()
        addresses = {i: p.address for i, p in enumerate(ports)}
        assert refused(addresses, 2.0) == {0, 3, 6, 9}
    finally:
        for p in ports:
            p.close()


def test_bad_and_unanswered_addresses_are_not_reported_and_the_wait_is_bounded():
    # "unanswered": a listener whose accept queue is full drops new handshakes, as a lost host does
    deaf = socket.socket()
    deaf.bind(("127.0.0.1", 0))
    deaf.listen(0)
    fill = [socket.socket() for _ in range(3)]
    try:
        for s in fill:
            s.setblocking(False)
            s.connect_ex(deaf.getsockname())
        time.sleep(0.2)
        start = time.monotonic()
        got = refused({"bad": "no-port", "range": "127.0.0.1:99999", "deaf": f"127.0.0.1:{deaf.getsockname()[1]}"},
                      0.3)
        assert got == set()
        assert 0.25 < time.monotonic() - start < 3.0  # (waited for the deaf one, up to the timeout only)
    finally:
        for s in fill:
            s.close()
        deaf.close()


FORKER = """
import os, sys, time
from ucp.comm.liveness import LivenessPort
port = LivenessPort(("127.0.0.1", 29500))
child = os.fork()
if child == 0:  # a data loader's worker, say: it outlives its parent here
    time.sleep(60)
    os._exit(0)
print(port.address, child, flush=True)
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_a_dead_parents_port_open():
    proc = subprocess.Popen([sys.executable, "-c", FORKER], stdout=subprocess.PIPE, text=True)
    child = None
    try:
        address, child = proc.stdout.readline().split()
        child = int(child)
        assert refused({1: address}, 1.0) == set()
        proc.kill()
        proc.wait(timeout=10)
        os.kill(child, 0)  # (the child lives on)
        assert refused({1: address}, 1.0) == {1}
    finally:
        proc.kill()
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_loopback_address_is_probed_only_from_its_own_host_and_namespace():
    port = LivenessPort(TOWARD)
    try:
        assert port.record == f"{port.address} {liveness.identity()}"
        assert liveness.probe_address(port.record) == port.address
        elsewhere = f"{port.address} another-boot/4026531840"
        assert liveness.probe_address(elsewhere) is None  # (its loopback is not ours)
        assert liveness.probe_address("10.1.2.3:4567 another-boot/1") == "10.1.2.3:4567"  # routable: anywhere
        assert liveness.probe_address("no-address") is None
    finally:
        port.close()
