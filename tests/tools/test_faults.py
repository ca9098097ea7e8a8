"""tools/faults.py injects every fault family of issue 17 as a user would meet it and prints one JSON
line; on a healthy ucp no family finds wrong data or an unclear error, and nothing of the run is
left behind (processes, tmpfs mounts, temporary directories)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.tools.bench import TOOLS

sys.path.insert(0, str(TOOLS))

import fault_families  # noqa: E402
from fault_harness import LoadCheck, judge_load, message_findings  # noqa: E402

pytestmark = pytest.mark.fault

FAMILIES = fault_families.FAMILIES


def faults(*args, timeout: float = 1200) -> tuple[dict, str]:
    """Run ``tools/faults.py`` with ``args``: it must exit 0 and print exactly one JSON line."""
    before = {p.name for p in Path(tempfile.gettempdir()).glob("ucp-faults-*")}
    p = subprocess.run([sys.executable, str(TOOLS / "faults.py"), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    after = {p.name for p in Path(tempfile.gettempdir()).glob("ucp-faults-*")}
    assert after <= before, f"left behind: {after - before}"
    with open("/proc/mounts") as f:
        assert "ucp-faults-" not in f.read()
    return json.loads(lines[0]), p.stderr


def check_shape(doc: dict, families) -> None:
    assert set(doc) >= {"families", "seconds", "loadavg"}
    assert list(doc["families"]) == list(families)
    for name, fam in doc["families"].items():
        assert set(fam) >= {"trials", "survived", "wrong_data", "unclear_errors", "examples"}, name
        assert fam["trials"] >= fam["survived"] >= 0
        assert fam["survived"] + max(fam["wrong_data"], fam["unclear_errors"]) <= fam["trials"]
        assert len(fam["examples"]) <= 3 and all(isinstance(e, str) and "\n" not in e for e in fam["examples"])
    assert doc["seconds"] > 0


# -- the judging rules, on outcomes made by hand ------------------------------------------------------

def test_a_traceback_a_signal_two_lines_or_an_unnamed_path_are_unclear():
    assert message_findings("x", "ucp: error: /a/b: bad\n", 1, ("/a/b",)) == []
    assert message_findings("x", "Traceback (most recent call last):\n  File ..\nKeyError: 1\n", 1)[0][0] == "unclear"
    assert "signal" in message_findings("x", "", -6)[0][1]
    assert "2-line" in message_findings("x", "ucp: error: one\ntwo\n", 1)[0][1]
    assert "names none" in message_findings("x", "ucp: error: no space left on device\n", 1, ("/mnt/x",))[0][1]
    # verify's report: one BAD line per damaged file, then its one error line
    assert message_findings("x", "BAD /a/b: checksum\nucp: error: /a: 1 problem\n", 3, ("/a/b",)) == []


def test_a_load_that_returns_other_tensors_or_another_step_is_wrong_data():
    check = LoadCheck(0, "root", "t", {2: {"d2"}, 4: {"d4"}})
    assert judge_load(check, {"ok": True, "step": 2, "digest": "d2"}) == []
    assert judge_load(check, {"ok": True, "step": 2, "digest": "other"})[0][0] == "wrong"
    assert judge_load(LoadCheck(0, "root", "t", {2: {"d2"}, 4: {"d4"}}, step=4),
                      {"ok": True, "step": 2, "digest": "d2"})[0][0] == "wrong"
    refused = {"ok": False, "kind": "ucp", "lines": 1, "error": "root/step_2/rank_0.safetensors: checksum mismatch"}
    assert judge_load(LoadCheck(0, "root", "t", {}, names=("rank_0.safetensors",)), refused) == []
    assert judge_load(LoadCheck(0, "root", "t", {}, must_load=True), refused)[0][0] == "unclear"
    assert judge_load(check, {"ok": False, "kind": "KeyError", "cls": "KeyError", "error": "x", "lines": 1})[0][0] \
        == "unclear"
    assert judge_load(check, None)[0][0] == "unclear"


def test_bad_flags_are_refused_in_one_line():
    p = subprocess.run([sys.executable, str(TOOLS / "faults.py"), "--families", "nope"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2 and p.stdout == "" and "unknown 'nope'" in p.stderr


# -- the whole harness ----------------------------------------------------------------------------------

@pytest.mark.timeout(1500)
def test_every_family_finds_no_wrong_data_and_no_unclear_error():
    if os.geteuid() != 0:
        pytest.fail("disk_full mounts a tmpfs: run the fault tier as root (as .ci/run does in its container)")
    doc, err = faults("--trials", 2, "--family-trials", "memory_tier=1", "--seed", 17)
    check_shape(doc, FAMILIES)
    bad = {name: fam for name, fam in doc["families"].items()
           if fam["wrong_data"] or fam["unclear_errors"] or fam["harness_errors"]}
    assert not bad, json.dumps(bad, indent=1)
    for name, fam in doc["families"].items():
        assert fam["trials"] == (1 if name == "memory_tier" else 2) and fam["survived"] == fam["trials"]
