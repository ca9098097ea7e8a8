"""The snapshot agent's lifecycle (issue 6, stage a): one agent per node and job, found again by
restarted trainers, in a session of its own, surviving SIGKILLed trainers and killed process groups,
removing its memory on shutdown, and reclaimed when it died. Every test uses its own job and leaves
nothing in /dev/shm, passing or failing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ucp.errors import FormatError
from ucp.snapshot import agent as agent_mod
from ucp.snapshot import client, shm
from ucp.errors import AgentError

pytestmark = pytest.mark.timeout(120)


def _leftovers(job: str) -> dict:
    return shm.listing(shm.prefix(job))


def _run(code: str, *args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=60, **kw)


def test_one_agent_per_job_found_again_by_a_restarted_trainer(job):
    first = client.ensure_agent(job)
    info = json.loads(agent_mod.discovery_path(job).read_bytes())
    assert info["format"] == "ucp.agent" and info["format_version"] == "1.1" and info["pid"] == first.info.pid
    # another process (a restarted trainer) finds the same agent, and does not start a second one
    p = _run("""
        import sys
        from ucp.snapshot import client
        print(client.ensure_agent(sys.argv[1]).hello(rank=3)["pid"])
    """, job)
    assert p.returncode == 0, p.stderr
    assert int(p.stdout.split()[-1]) == first.info.pid
    assert first.status()["clients"] == 1  # the other process said hello


def test_local_ranks_starting_at_once_share_one_agent(job):
    code = """
        import sys
        from ucp.snapshot import client
        print(client.ensure_agent(sys.argv[1]).info.pid)
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), job], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    pids = {int(p.communicate(timeout=60)[0].split()[-1]) for p in procs}
    assert len(pids) == 1 and agent_mod.is_alive(agent_mod.read_info(job))


def test_two_jobs_on_a_node_never_collide(job):
    other = job + "b"
    try:
        a, b = client.ensure_agent(job), client.ensure_agent(other)
        assert a.info.pid != b.info.pid
        a.alloc("r0", 4096)
        b.alloc("r0", 8192)
        assert a.status()["segments"] == {f"{shm.prefix(job)}r0": 4096}
        assert b.status()["segments"] == {f"{shm.prefix(other)}r0": 8192}
    finally:
        client.stop(other)
    assert _leftovers(other) == {}


def test_memory_survives_a_sigkilled_trainer(job):
    c = client.ensure_agent(job)
    name = c.alloc("rank0.slot0", 1 << 20)
    p = _run("""
        import os, signal, sys
        from ucp.snapshot import shm
        seg = shm.attach(sys.argv[1])
        seg.buf[:11] = b"snapshot-ok"
        seg.buf[-3:] = b"end"
        os.kill(os.getpid(), signal.SIGKILL)
    """, name)
    assert p.returncode == -signal.SIGKILL
    seg = shm.attach(name)
    try:
        assert bytes(seg.buf[:11]) == b"snapshot-ok" and bytes(seg.buf[-3:]) == b"end"
    finally:
        seg.close()
    assert c.status()["segments"] == {name: 1 << 20}


def test_the_agent_outlives_the_process_group_of_the_trainer_that_started_it(job):
    """torchrun kills a worker's whole process group on restart: the agent has a session of its own."""
    trainer = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from ucp.snapshot import client
        c = client.ensure_agent(sys.argv[1])
        c.alloc("r0", 4096)
        print(c.info.pid, flush=True)
        time.sleep(60)
    """), job], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pid = int(trainer.stdout.readline())
        assert os.getsid(pid) != os.getsid(trainer.pid) and os.getpgid(pid) != os.getpgid(trainer.pid)
    finally:
        os.killpg(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=30)
    c = client.connect(job)
    assert c is not None and c.info.pid == pid
    assert c.status()["segments"] == {f"{shm.prefix(job)}r0": 4096}


def test_shutdown_removes_the_memory_and_the_discovery_file(job):
    c = client.ensure_agent(job)
    for i in range(3):
        c.alloc(f"r{i}", 4096 * (i + 1))
    assert len(_leftovers(job)) >= 4
    assert client.stop(job) == f"stopped the agent of job {job!r} (pid {c.info.pid})"
    assert not agent_mod.is_alive(c.info) and _leftovers(job) == {}
    assert client.connect(job) is None


def test_sigterm_stops_the_agent_cleanly(job):
    c = client.ensure_agent(job)
    c.alloc("r0", 4096)
    os.kill(c.info.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while agent_mod.is_alive(c.info) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not agent_mod.is_alive(c.info)
    assert _leftovers(job) == {}


def test_a_dead_agents_memory_is_reclaimed_by_the_next_start(job):
    c = client.ensure_agent(job)
    old = c.alloc("r0", 4096)
    os.kill(c.info.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while agent_mod.is_alive(c.info) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert old in _leftovers(job) and client.connect(job) is None  # stale: detected, not connected to
    fresh = client.ensure_agent(job)
    assert fresh.info.pid != c.info.pid
    assert old not in _leftovers(job) and fresh.status()["segments"] == {}


def test_reclaim_refuses_while_the_agent_runs(job):
    client.ensure_agent(job)
    with pytest.raises(AgentError, match="is running; stop it instead"):
        agent_mod.reclaim(job)


def test_a_recycled_pid_is_not_taken_for_the_agent(job):
    me = agent_mod.process_start_time(os.getpid())
    info = agent_mod.AgentInfo(job=job, pid=os.getpid(), start_time=me + 1, host="127.0.0.1", port=1, started=0.0)
    agent_mod.discovery_path(job).write_bytes(info.to_json())
    assert not agent_mod.is_alive(info) and client.connect(job) is None
    assert agent_mod.is_alive(agent_mod.AgentInfo(job, os.getpid(), me, "127.0.0.1", 1, 0.0))
    agent_mod.discovery_path(job).unlink()


@pytest.mark.parametrize("content, words", [
    (b"not json", "not JSON"),
    (b'{"format": "other"}', "format is 'other'"),
    (b'{"format": "ucp.agent", "format_version": "2.0"}', "format_version 2.0 is not supported"),
    (b'{"format": "ucp.agent", "format_version": "1.0", "pid": 1}', "malformed agent discovery file"),
])
def test_a_malformed_discovery_file_is_named(job, content, words):
    path = agent_mod.discovery_path(job)
    path.write_bytes(content)
    with pytest.raises(FormatError, match=str(path).replace(".", r"\.")) as e:
        agent_mod.read_info(job)
    assert words in str(e.value)
    p = subprocess.run([sys.executable, "-m", "ucp.cli.main", "agent", "status", "--job", job],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and p.stderr.startswith("ucp: error: ") and words in p.stderr
    assert "Traceback" not in p.stderr
    path.unlink()


def test_bad_requests_get_one_clear_answer_and_the_agent_goes_on(job):
    c = client.ensure_agent(job)
    c.alloc("r0", 4096)
    with pytest.raises(AgentError, match="exists with 4096 bytes, not 8192"):
        c.alloc("r0", 8192)
    with pytest.raises(AgentError, match="unknown request 'explode'"):
        c.request("explode")
    with pytest.raises(AgentError, match="segment name '../x' must be"):
        c.alloc("../x", 10)
    with pytest.raises(AgentError, match="positive size"):
        c.alloc("r1", 0)
    assert c.status()["segments"] == {f"{shm.prefix(job)}r0": 4096}


def test_the_cli_starts_shows_and_stops_an_agent(job):
    def ucp(*args):
        return subprocess.run([sys.executable, "-m", "ucp.cli.main", "agent", *args], capture_output=True,
                              text=True, timeout=60)

    p = ucp("status", "--job", job)
    assert p.returncode == 2 and f"job {job}: no agent running" in p.stdout
    p = ucp("start", "--job", job)
    assert p.returncode == 0 and f"agent of job {job!r}: pid" in p.stdout, p.stderr
    client.connect(job).alloc("rank0.slot1", 3 << 20)
    p = ucp("status", "--job", job)
    assert p.returncode == 0 and "1 segment(s), 3.0 MiB" in p.stdout and "rank0.slot1" in p.stdout, p.stdout
    doc = json.loads(ucp("status", "--job", job, "--json").stdout)
    assert doc["running"] and doc["nbytes"] == 3 << 20
    p = ucp("stop", "--job", job)
    assert p.returncode == 0 and "stopped the agent" in p.stdout
    assert _leftovers(job) == {}


def test_bad_job_names_are_refused():
    for bad in ("", "a/b", "x" * 65, "../etc", "a b"):
        with pytest.raises(Exception, match="job name"):
            client.ensure_agent(bad)


def test_an_agent_killed_during_a_request_is_one_line_at_once_without_cpp_frames(job):
    # an agent whose handler of 'status' hangs (as 'begin' waits while a slot is written durably);
    # its store still answers, from c10d's own thread
    agent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from ucp.snapshot import agent, agent_state
        agent_state.Agent.op_status = lambda self: time.sleep(600)
        agent.main(["--job", sys.argv[1]])
        """), job], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        agent.stdout.readline()  # it serves
        code = """
            import sys, time
            from ucp.snapshot import client
            c = client.connect(sys.argv[1])
            print("connected", flush=True)
            t = time.monotonic()
            try:
                c.request("status", wait=600)
            except client.AgentError as e:
                print(f"{time.monotonic() - t:.2f}", file=sys.stdout)
                print(str(e), file=sys.stdout, flush=True)
            """
        trainer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), job], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True,
                                   env=dict(os.environ, TORCH_SHOW_CPP_STACKTRACES="1"))
        assert trainer.stdout.readline() == "connected\n"
        time.sleep(2)  # the request is waiting
        agent.kill()
        out, err = trainer.communicate(timeout=60)
    finally:
        agent.kill()
        agent.wait()
        client.stop(job)  # (reclaims what the killed agent left)
    lines = out.splitlines()
    assert len(lines) == 2, (out, err)
    seconds, message = float(lines[0]), lines[1]
    assert seconds < 10, seconds  # at once, not after the 600 s the request could wait
    assert message.startswith(f"snapshot agent on {os.uname().nodename} (pid {agent.pid}) closed the connection "
                              "during 'status'; it died or was killed"), message
    assert "Exception raised from" not in err and "frame #" not in err and "CapturedTraceback" not in err, err


def test_a_dead_agents_malformed_or_incomplete_slots_are_discarded_and_named(job):
    pre = shm.prefix(job)
    (shm.SHM_DIR / f"{pre}r0.s0.json").write_bytes(b"[[[[")  # not JSON
    header = {"format": "ucp.snapshot", "rank": 1, "slot": 1, "step": 7, "complete": True, "world_size": 2,
              "file_size": 128, "fragments": []}
    (shm.SHM_DIR / f"{pre}r1.s1.json").write_text(json.dumps(header))  # its data segment is gone
    (shm.SHM_DIR / f"{pre}r0.p0").write_bytes(b"\0" * 64)  # parity: its record died with the agent
    a = agent_mod.Agent(job)
    a.adopt()
    assert sorted(a.discarded) == ["r0.s0", "r1.s1"] and a.adopted == {} and a.slots == {}
    assert "not JSON" in a.discarded["r0.s0"] or "JSON" in a.discarded["r0.s0"], a.discarded
    assert a.discarded["r1.s1"] == f"step 7: its data segment {pre}r1.s1 is missing"
    assert _leftovers(job) == {}


def test_an_agent_of_another_snapshot_format_is_refused_with_a_safe_remedy(job):
    """An agent outlives its trainers, so it may run an older ucp: a trainer refuses an agent whose
    discovery file says it reads another snapshot format (1.0 when the field is absent), names it and
    the way out; the CLI's stop still reaches it."""
    from ucp.snapshot.discovery import discovery_path
    from ucp.snapshot.header import SNAPSHOT_FORMAT_VERSION

    first = client.ensure_agent(job)
    assert first.info.snapshot_format_version == SNAPSHOT_FORMAT_VERSION == "1.1"
    path = discovery_path(job)
    old = json.loads(path.read_text())
    del old["snapshot_format_version"]  # what an agent of format 1.0 wrote
    path.write_text(json.dumps(old))
    with pytest.raises(AgentError) as e:
        client.ensure_agent(job)
    said = str(e.value)
    assert f"pid {first.info.pid}" in said and "reads snapshot format 1.0, this ucp writes 1.1" in said, said
    assert f"`ucp agent stop --job {job}`" in said and "durable checkpoints stay" in said
    assert "stopped" in client.stop(job, timeout=10)
