#!/usr/bin/env python
"""Fault injection for ucp, run as a new user would: crash, corrupt, fill and confuse checkpoints, then
judge what ``ucp`` and ``Checkpointer`` say and return.

Every trial runs real processes: ``ucp`` CLI commands and the small training script
``tools/fault_job.py`` (a tiny MLP + AdamW saved with ``ucp.Checkpointer`` on 1 or 2 gloo ranks on
127.0.0.1). A trial is judged by what a user would see:

* ``wrong_data``: a command or load reported success but returned tensors not bit-identical to those
  saved (sha256 over every model and optimizer tensor), resumed the wrong step, or accepted an input
  it must refuse (``ucp verify`` passing a flipped bit, say);
* ``unclear_errors``: a traceback on stderr, an exit by signal (rc < 0 or >= 128), a message of more
  than one line, one that names no path (or line) when the input had one, or a healthy checkpoint
  refused;
* ``survived``: neither (a trial with both counts in both).

Families (``--families``): kill_during_save, bit_flip, truncation, chunk_swap, rollback, disk_full,
two_writers, retention_race, hostile_pickle, hostile_sizes, deep_json, cli_garbage, ucl_fuzz,
memory_tier (``docs/faults.md`` says what each does). Output: ONE JSON line on stdout,
``{"families": {NAME: {"trials", "survived", "wrong_data", "unclear_errors", "harness_errors",
"examples"}}, "seconds", "loadavg"}``; progress on stderr. Every process started, tmpfs mounted and
temporary directory made is ended, unmounted and removed at the end, also on failure.

    python tools/faults.py --trials 30
    python tools/faults.py --families bit_flip --family-trials bit_flip=200 --seed 1
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import benchlib
from fault_families import FAMILIES, FAMILY_FUNCTIONS
from fault_harness import Context, HarnessError, LoadCheck, Tally, judge_load, log

# -- the run ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="faults.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5, help="trials per family; default 5")
    p.add_argument("--families", default=",".join(FAMILIES),
                   help="comma-separated families to run; default all: " + ",".join(FAMILIES))
    p.add_argument("--family-trials", action="append", default=[], metavar="NAME=N",
                   help="trials for one family (e.g. bit_flip=200); repeatable")
    p.add_argument("--seed", type=int, default=0, help="what the random choices start from; default 0")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds a single command may take; default 90")
    p.add_argument("--verbose", action="store_true", help="log every finding of every trial to stderr")
    p.add_argument("--keep", action="store_true", help="keep the work directory (its path is logged)")
    args = p.parse_args(argv)
    fams = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        p.error(f"--families: unknown {bad[0]!r}; choose from {', '.join(FAMILIES)}")
    args.counts = {f: args.trials for f in fams}
    for item in args.family_trials:
        name, eq, n = item.partition("=")
        if not eq or name not in FAMILIES or not n.isdigit():
            p.error(f"--family-trials {item!r}: write NAME=N with NAME one of the families")
        args.counts[name] = int(n)
    if args.trials < 0:
        p.error("--trials: use an integer >= 0")
    return args


def run_family(ctx: Context, name: str, n: int, seed: int, verbose: bool = False) -> Tally:
    tally = Tally()
    fn = FAMILY_FUNCTIONS[name]
    home = ctx.work / name
    home.mkdir()
    findings: dict[int, list] = {}
    harness: dict[int, str] = {}
    checks: list[LoadCheck] = []
    for i in range(n):
        rng = random.Random(f"{seed}:{name}:{i}")
        tdir = home / f"t{i}"
        tdir.mkdir()
        try:
            found, more = fn(ctx, rng, i, tdir)
            findings[i] = list(found)
            checks += more
        except HarnessError as e:
            harness[i] = str(e)
        except Exception as e:  # noqa: BLE001 - a bug of the harness: counted apart, never as a finding
            harness[i] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    if checks:
        try:
            for c, ev in zip(checks, ctx.load_all(checks)):
                findings.setdefault(c.trial, []).extend(judge_load(c, ev))
        except HarnessError as e:
            for c in checks:
                harness.setdefault(c.trial, str(e))
    for i in range(n):
        tally.add(findings.get(i, []), harness.get(i))
        if verbose:
            for kind, what in findings.get(i, []):
                log(f"{name} trial {i}: {kind}: {what}")
    shutil.rmtree(home, ignore_errors=True)
    return tally


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below still cleans up
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ucp-faults-"))
    ctx = Context(work, args.timeout)
    doc: dict = {"families": {}}
    try:
        for name, n in args.counts.items():
            t = time.monotonic()
            tally = run_family(ctx, name, n, args.seed, args.verbose)
            doc["families"][name] = tally.doc()
            log(f"{name}: {n} trial(s) in {time.monotonic() - t:.0f} s: {json.dumps(tally.doc())}")
            ctx.procs.end_all()
    finally:
        ctx.cleanup()
        if args.keep:
            log(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc["seconds"] = round(time.monotonic() - t0, 1)
    doc["loadavg"] = benchlib.load_average()
    benchlib.emit(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
