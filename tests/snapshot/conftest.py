"""The memory-tier tests' fixture: a fresh job per test whose agent and shared memory are gone
afterwards."""

from __future__ import annotations

import os
import signal
import time
import uuid

import pytest

from ucp.errors import FormatError
from ucp.snapshot import agent as agent_mod
from ucp.snapshot import client, shm


@pytest.fixture
def job():
    """A fresh job name; afterwards its agent is stopped (killed if it does not answer) and its
    shared memory removed, and the test fails if anything was left behind."""
    name = "t" + uuid.uuid4().hex[:12]
    yield name
    info = None
    try:
        info = agent_mod.read_info(name)
    except FormatError:
        pass
    if info is not None and agent_mod.is_alive(info):
        try:
            client.stop(name, timeout=10)
        except Exception:
            os.kill(info.pid, signal.SIGKILL)
    left = shm.listing(shm.prefix(name))
    for n in left:
        shm.unlink(n)
    assert not left or left == {f"{shm.prefix(name)}agent.lock": 0}, f"left behind: {left}"


def preempt_agent(job: str, timeout: float) -> None:
    """SIGTERM job ``job``'s agent (a preemption: it flushes what it holds, then exits), wait
    ``timeout`` seconds at most for it to exit, and check its shared memory went with it."""
    info = agent_mod.read_info(job)
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while agent_mod.is_alive(info):
        assert time.monotonic() < deadline, "the agent did not exit after SIGTERM"
        time.sleep(0.02)
    assert not shm.listing(shm.prefix(job))  # its memory is gone with it
