"""In-process recovery (ucp.run_in_process) under tools/chaos.py --inprocess: the survivors of a
SIGKILLed or SIGSTOPped node keep their processes, re-form the process group, rebuild the model and
restore from the agents' memory (the lost shares rebuilt from parity), bit-exactly against the state
recorded at that step before the failure; more losses than parity fall back to the relaunch."""

from __future__ import annotations

import pytest

from tests.tools.test_chaos import check_counts, chaos

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

PHASES = {"detect", "reform", "build", "load", "first_step"}
DETECT_TIMEOUT = 2.0


def inprocess(*args) -> dict:
    doc = chaos("--inprocess", "--detect-timeout", DETECT_TIMEOUT, "--steps", 7, *args)
    check_counts(doc)
    assert doc["path"] == "in-process"
    return doc


def check_inprocess(rec: dict, nodes: list[int], at: int, kind: str = "kill") -> None:
    """Recovered in this process, from memory, nothing lost, bit-exactly, with every phase timed."""
    assert (rec["path"], rec["kind"], rec["nodes"], rec["source"]) == ("in-process", [kind], nodes, "memory"), rec
    assert rec["restored_step"] == rec["killed_at_step"] == at and rec["steps_lost"] == 0, rec
    assert rec["bit_exact"] is True, rec
    assert set(rec["phases"]) == PHASES and all(v is not None and v >= 0 for v in rec["phases"].values()), rec
    # the whole recovery is its phases (the kill to the first step after it)
    assert sum(rec["phases"].values()) == pytest.approx(rec["time_to_resume_s"], abs=1e-6)


@pytest.mark.parametrize("node", [1, 0], ids=["node-1", "node-0"])
def test_a_killed_node_is_recovered_in_process_from_memory(node):
    doc = inprocess("--nodes", 4, "--group", 4, "--parity", 1, "--kill", f"{node}@4")
    (rec,) = doc["recoveries"]
    check_inprocess(rec, [node], 4)
    # a dead peer is seen at once by a rank in a collective with it (gloo), and a rank blocked on a
    # connection to a survivor is released by the survivor's shut of its connections; the re-forming
    # waits for the dead member's heartbeat to be --dead-after old, well under the group's timeout
    assert rec["phases"]["detect"] < 1.0
    assert rec["phases"]["detect"] + rec["phases"]["reform"] < DETECT_TIMEOUT + 2.0


def test_a_killed_node_is_lost_at_once_by_its_closed_liveness_port_not_after_its_silence():
    # --dead-after far beyond the leader's own bound (twice the timeout): only the probe can lose it sooner
    doc = inprocess("--nodes", 4, "--group", 4, "--parity", 1, "--kill", "2@4", "--dead-after", 60)
    assert (doc["probe"], doc["dead_after"]) == (True, 60.0)
    (rec,) = doc["recoveries"]
    check_inprocess(rec, [2], 4)
    assert rec["phases"]["reform"] < DETECT_TIMEOUT, rec


def test_a_hung_node_is_detected_at_the_timeout_and_left_behind():
    doc = inprocess("--nodes", 4, "--group", 4, "--parity", 1, "--hang", "2@4")
    (rec,) = doc["recoveries"]
    check_inprocess(rec, [2], 4, kind="hang")
    assert DETECT_TIMEOUT * 0.9 < rec["phases"]["detect"] < DETECT_TIMEOUT + 2.0, rec


def test_two_nodes_of_a_group_with_parity_two_are_recovered_in_process():
    doc = inprocess("--nodes", 4, "--group", 4, "--parity", 2, "--kill", "1@4,3@4")
    (rec,) = doc["recoveries"]
    check_inprocess(rec, [1, 3], 4)


def test_more_losses_than_parity_fall_back_to_a_relaunch_from_the_durable_tier():
    doc = inprocess("--nodes", 4, "--group", 4, "--parity", 1, "--persist-every", 2, "--kill", "1@5,2@5")
    (rec,) = doc["recoveries"]
    assert (rec["path"], rec["source"], rec["restored_step"], rec["steps_lost"]) == \
        ("relaunch (fallback)", "durable", 4, 1), rec
    assert rec["bit_exact"] is True, rec
    assert "more than its 1 parity stripe" in rec["fallback"], rec


def test_hang_needs_inprocess():
    import subprocess
    import sys

    from tests.tools.bench import TOOLS

    p = subprocess.run([sys.executable, str(TOOLS / "chaos.py"), "--hang", "1@3"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2 and "--hang needs --inprocess" in p.stderr and "Traceback" not in p.stderr
