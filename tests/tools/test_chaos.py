"""tools/chaos.py kills simulated nodes of a training job, the job recovers on the survivors bit-exactly,
and nothing of the run (processes, shared memory) is left behind, whether the run passes or fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tools.bench import TOOLS

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

# Where a recovery after losing at most `parity` nodes of each group comes from: the survivors'
# memory, the lost ranks rebuilt from parity (docs/erasure.md section 8).
RECOVERED_FROM = ("memory",)


def chaos(*args, expect: int = 0, timeout: float = 240) -> dict:
    """Run ``tools/chaos.py`` with ``args``: it must exit ``expect`` and print exactly one JSON line;
    nothing of its run may be left (see :func:`assert_nothing_left`)."""
    p = subprocess.run([sys.executable, str(TOOLS / "chaos.py"), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == expect, p.stdout + p.stderr[-4000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    doc = json.loads(lines[0])
    assert_nothing_left(doc["run_id"])
    return doc


def assert_nothing_left(run_id: str) -> None:
    """No file of the run in /dev/shm and no process of it (its agents name the run in their command line)."""
    shm = [n for n in os.listdir("/dev/shm") if run_id in n]
    assert not shm, f"left in /dev/shm: {shm}"
    procs = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if run_id in cmd and state != "Z":
            procs.append((pid, cmd))
    assert not procs, f"still running: {procs}"


def check_counts(doc: dict) -> None:
    """The totals agree with the recoveries."""
    recs = doc["recoveries"]
    assert doc["failures_injected"] == sum(len(r["nodes"]) for r in recs) == len(doc["kills"])
    assert doc["recoveries_from_memory"] == sum(r["source"] == "memory" for r in recs)
    assert doc["fallbacks_to_disk"] == sum(r["source"] == "durable" for r in recs)
    assert doc["restarts_from_scratch"] == sum(r["source"] == "none" for r in recs)
    assert doc["steps_lost"] == sum(r["steps_lost"] for r in recs)
    assert doc["time_to_resume_s"] == [r["time_to_resume_s"] for r in recs]
    assert all(t > 0 for t in doc["time_to_resume_s"])
    assert doc["all_bit_exact"] == all(r["bit_exact"] for r in recs if r["source"] != "none")
    assert 0 < doc["useful_step_s"] < doc["wall_s"]
    assert doc["effective_training_time"] == pytest.approx(doc["useful_step_s"] / doc["wall_s"])
    assert doc["final_step"] == doc["steps"] and doc["shm_left"] == 0 and doc["ok"] is True


def check_recovery(rec: dict, nodes: list[int], killed_at: int, persist_every: int) -> None:
    assert rec["nodes"] == nodes and rec["killed_at_step"] == killed_at
    assert rec["source"] in RECOVERED_FROM, rec
    assert rec["bit_exact"] is True, rec
    if rec["source"] == "memory":  # the harness kills once the step's snapshot is complete: nothing lost
        assert rec["restored_step"] == killed_at, rec
    # at worst back to the last durable checkpoint: fewer steps lost than between two of them
    assert rec["steps_lost"] == killed_at - rec["restored_step"] and 0 <= rec["steps_lost"] < persist_every, rec


def test_a_node_killed_mid_run_is_recovered_on_the_survivors_bit_exactly():
    doc = chaos("--nodes", 4, "--ranks-per-node", 1, "--group", 4, "--parity", 1, "--steps", 8, "--kill", "1@5")
    assert (doc["tool"], doc["nodes"], doc["ranks_per_node"], doc["group"], doc["parity"], doc["persist_every"]) == \
        ("ucp_chaos", 4, 1, 4, 1, 4)
    assert doc["kills"] == [{"node": 1, "step": 5, "kind": "kill"}] and doc["path"] == "relaunch"
    # the agents' memory: snapshots and parity, g / (g - m) of the snapshots (as `ucp agent status` says)
    assert doc["snapshot_bytes"] > 0 and doc["memory_overhead"] == pytest.approx(4 / 3, rel=0.02), doc
    check_counts(doc)
    [rec] = doc["recoveries"]
    check_recovery(rec, [1], 5, 4)
    if rec["source"] == "durable":
        assert rec["restored_step"] == 4  # the newest checkpoint the agents wrote (persist every 4)


def test_node_0_killed_is_recovered(tmp_path):
    """Node 0 holds rank 0 and, until the kill, the job's durable commits; 2 ranks per node."""
    doc = chaos("--nodes", 2, "--ranks-per-node", 2, "--group", 2, "--parity", 1, "--steps", 6, "--persist-every", 2,
                "--kill", "0@3", "--workdir", tmp_path)
    check_counts(doc)
    [rec] = doc["recoveries"]
    check_recovery(rec, [0], 3, 2)
    assert not any(tmp_path.iterdir())  # the run's checkpoints and logs went with it


def test_six_nodes_in_groups_of_three_lose_one_node_in_each_group_and_recover_from_memory():
    doc = chaos("--nodes", 6, "--group", 3, "--parity", 1, "--steps", 6, "--kill", "1@3,4@3")
    check_counts(doc)
    [rec] = doc["recoveries"]  # both nodes at once: one recovery, on the 4 survivors (one group of 4)
    check_recovery(rec, [1, 4], 3, 4)


def test_parity_two_survives_two_nodes_of_one_group():
    pytest.importorskip("pyeclib")
    doc = chaos("--nodes", 4, "--group", 4, "--parity", 2, "--steps", 6, "--kill", "0@3,2@3")
    check_counts(doc)
    [rec] = doc["recoveries"]
    check_recovery(rec, [0, 2], 3, 4)


def test_two_failures_in_a_group_with_parity_one_fall_back_to_disk_and_say_so():
    doc = chaos("--nodes", 4, "--group", 4, "--parity", 1, "--steps", 6, "--persist-every", 2, "--kill", "1@3,2@3")
    check_counts(doc)
    [rec] = doc["recoveries"]
    assert rec["source"] == "durable" and rec["restored_step"] == 2 and rec["bit_exact"] is True, rec
    assert "cannot be rebuilt" in rec["warning"] and "resuming from durable step 2" in rec["warning"]
    assert "\n" not in rec["warning"]


def test_random_failures_kill_distinct_nodes_at_seeded_steps_and_the_job_finishes():
    args = ["--nodes", 3, "--group", 3, "--steps", 6, "--persist-every", 2, "--random-failures", 2, "--seed", 3]
    doc = chaos(*args)
    check_counts(doc)
    steps = [k["step"] for k in doc["kills"]]
    assert len({k["node"] for k in doc["kills"]}) == 2 and steps == sorted(steps) and all(1 <= s <= 5 for s in steps)
    assert sum(len(r["nodes"]) for r in doc["recoveries"]) == 2
    for rec in doc["recoveries"]:
        assert rec["source"] in ("memory", "durable", "none") and rec["bit_exact"] is not False, rec


def test_a_run_that_fails_still_prints_its_line_and_leaves_nothing_behind():
    doc = chaos("--nodes", 2, "--group", 2, "--steps", 4, "--kill", "1@2", "--attempt-timeout", 1, expect=1)
    assert doc["ok"] is False and "--attempt-timeout" in doc["error"] and doc["shm_left"] == 0


@pytest.mark.parametrize("args, says", [
    (["--kill", "4@5"], "node 4 does not exist"),
    (["--kill", "1@8"], "step 8 is out of 1..7"),
    (["--kill", "1@0"], "step 0 is out of 1..7"),
    (["--kill", "0@2,1@3,2@4,3@5"], "leave at least one alive"),
    (["--kill", "1@2,1@3"], "node 1 fails twice"),
    (["--kill", "1@2", "--hang", "1@3", "--inprocess"], "--hang: node 1 fails twice"),
    (["--hang", "1@3", "--random-failures", "1", "--inprocess"], "give the failures one way"),
    (["--inprocess", "--heartbeat", "1", "--dead-after", "0.5"], "must be longer than --heartbeat"),
    (["--step-seconds", "-1"], "use a number >= 0"),
    (["--kill", "one@5"], "must be integers"),
    (["--kill", "1-5"], "write NODE@STEP"),
    (["--random-failures", "4"], "would kill all 4 nodes"),
    (["--kill", "1@3", "--random-failures", "1"], "not allowed with"),
    (["--group", "1"], "group=1"),
    (["--nodes", "0"], "--nodes 0"),
    (["--steps", "many"], "invalid int value"),
])
def test_bad_flags_are_refused_in_one_line(args, says):
    p = subprocess.run([sys.executable, str(TOOLS / "chaos.py"), "--nodes", "4", "--steps", "8", *args],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and says in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_help_explains_every_flag():
    p = subprocess.run([sys.executable, str(TOOLS / "chaos.py"), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    for flag in ("--nodes", "--ranks-per-node", "--group", "--parity", "--steps", "--seed", "--kill",
                 "--random-failures", "--persist-every", "--kill-in-flight", "--rows-per-rank", "--attempt-timeout",
                 "--timeout", "--workdir", "--keep-workdir"):
        assert flag in p.stdout
