#!/usr/bin/env python
"""Before/after of a refactor: ``bench_save``, ``bench_reshard`` and ``bench_snapshot`` of two checkouts,
measured in one sitting, alternating.

Each bench runs on the old checkout (``--old``, default ``/work/base``: its ``tools/bench_*.py`` with
``PYTHONPATH`` set to it, so that ``import ucp`` is its package) and on the new one (``--new``, default
this checkout), with the same interpreter (``--python``, default this checkout's ``.venv``). Benches run
one after the other, never two at once; of each pair the side that goes first alternates from pair to
pair and from bench to bench, so that a drift of the machine does not fall on one side only.

For each run it prints a header line (``== BENCH SIDE``, the load average before the run, its wall
time, its exit status) and the bench's own JSON line, as it came; at the end, per bench, the main
figures of both sides (medians over ``--pairs``) and new / old (for seconds: < 1 means the new code is
faster). A run's stderr goes to ``--out`` (``BENCH.SIDE.N.log``), with every JSON line in
``results.jsonl``; a failed run's last lines are printed.

Settings: ``--size small`` (default) keeps each state small enough to be quick but large enough that
per-call overheads do not dominate: 0.5 GB for bench_save, 200 MB for bench_reshard and bench_snapshot
(one side of all three took about 4.5 minutes on 2 busy cores, so one pair about 9); ``--size tiny``
is the smoke tests' settings (a check that everything starts, not a measurement: its figures are
mostly fixed costs). ``--benches`` picks some of them; ``--pairs 2`` doubles the time.

    python tools/compare_refactor.py [--old /work/base] [--new .] [--pairs 1] [--size small|tiny]
                                     [--benches save,reshard,snapshot] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchlib

log = benchlib.logger("compare")

BENCHES = ("save", "reshard", "snapshot")
SETTINGS = {
    "small": {
        "save": ["--gb", "0.5", "--repeats", "3"],
        "reshard": ["--size-mb", "200", "--repeats", "2"],
        "snapshot": ["--size-mb", "200", "--steps", "6", "--rounds", "3", "--repeats", "3"],
    },
    "tiny": {
        "save": ["--gb", "0.02", "--repeats", "1"],
        "reshard": ["--size-mb", "20", "--repeats", "1"],
        "snapshot": ["--size-mb", "20", "--steps", "2", "--rounds", "1", "--repeats", "1"],
    },
}
#: where a bench writes its scratch files
WORK_FLAG = {"save": "--dir", "reshard": "--work", "snapshot": "--work"}
#: the figures compared, per bench (seconds or milliseconds: lower is better; speedup_*: higher is better)
FIGURES = {
    "save": ["ucp_save_s", "ucp_load_warm_s", "ucp_load_cold_s", "dcp_save_s", "dcp_load_warm_s", "dcp_load_cold_s",
             "raw_save_s", "raw_load_cold_s", "speedup_save", "speedup_load_warm", "speedup_load_cold"],
    "reshard": ["ucp_save_s", "dcp_save_s", "convert_s",
                *(f"w{w}_{form}_{temp}_s" for w in (2, 3) for form in ("ucp_dist", "ucp_univ", "dcp")
                  for temp in ("warm", "cold"))],
    "snapshot": ["step_ms_without", "step_ms_with", "stall_ms", "save_call_ms", "snapshot_s", "memcpy_s",
                 "dcp_async_block_ms", "durable_save_s", "restore_memory_first_s", "restore_memory_s",
                 "restore_durable_cold_s", "restore_durable_warm_s"],
}


def run_one(python: str, root: Path, bench: str, args: list[str], log_path: Path, timeout: float) -> dict:
    """``python ROOT/tools/bench_BENCH.py ARGS`` with ``PYTHONPATH=ROOT``: its JSON document (None on failure)
    and what the run was like."""
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [python, str(root / "tools" / f"bench_{bench}.py"), *args]
    load = benchlib.load_average()
    t0 = time.perf_counter()
    with open(log_path, "w") as err:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
                                start_new_session=True)  # its ranks and agents are one process group
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # (bench_snapshot stops its agent on SIGTERM)
            try:
                out, _ = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
            log(f"bench_{bench} in {root} took over {timeout:g} s: stopped")
    lines = out.strip().splitlines()
    doc = None
    if proc.returncode == 0 and len(lines) == 1:
        doc = json.loads(lines[0])
    return {"doc": doc, "line": lines[0] if len(lines) == 1 else None, "rc": proc.returncode, "load": load,
            "wall_s": round(time.perf_counter() - t0, 1), "log": str(log_path)}


def tail(path: str, n: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def summary(bench: str, runs: dict) -> list[str]:
    """Lines: each figure's median on both sides (and its spread over the pairs) and new / old."""
    rows = [f"-- bench_{bench}: median of {max(len(runs['old']), len(runs['new']))} run(s) a side; "
            f"spread = (max - min) / median over the runs",
            f"   {'figure':<26} {'old':>10} {'new':>10} {'new/old':>8} {'spread old':>11} {'spread new':>11}"]
    for key in FIGURES[bench]:
        vals = {side: [r["doc"][key] for r in runs[side] if r["doc"] and r["doc"].get(key) is not None]
                for side in ("old", "new")}
        med = {side: benchlib.median(v) for side, v in vals.items()}
        ratio = med["new"] / med["old"] if med["old"] and med["new"] is not None else None
        sp = {side: benchlib.spread(v) for side, v in vals.items()}
        rows.append(f"   {key:<26} {fmt(med['old']):>10} {fmt(med['new']):>10} {fmt(ratio):>8} "
                    f"{fmt(sp['old']):>11} {fmt(sp['new']):>11}")
    return rows


def main(argv=None) -> int:
    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, default=Path("/work/base"), help="the checkout before (default /work/base)")
    ap.add_argument("--new", type=Path, default=here, help=f"the checkout after (default {here})")
    ap.add_argument("--python", default=str(here / ".venv" / "bin" / "python"),
                    help="the interpreter for both sides (default this checkout's .venv)")
    ap.add_argument("--pairs", type=int, default=1, help="runs of each side per bench (default 1)")
    ap.add_argument("--size", choices=tuple(SETTINGS), default="small", help="the benches' settings (default small)")
    ap.add_argument("--benches", default=",".join(BENCHES), help=f"which, comma-separated (default {','.join(BENCHES)})")
    ap.add_argument("--work", default=None, help="where the benches write (default: the system's temporary folder)")
    ap.add_argument("--out", type=Path, default=None, help="logs and results.jsonl (default: a new temporary folder)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds one bench run may take (default 900)")
    args = ap.parse_args(argv)
    benches = [b.strip().removeprefix("bench_") for b in args.benches.split(",") if b.strip()]
    bad = [b for b in benches if b not in BENCHES]
    if bad or args.pairs < 1:
        ap.error(f"--benches: choose from {', '.join(BENCHES)}; --pairs >= 1")
    sides = {"old": args.old.resolve(), "new": args.new.resolve()}
    for side, root in sides.items():
        if not (root / "tools").is_dir():
            ap.error(f"--{side} {root}: no tools/ folder there")
    out = args.out or Path(tempfile.mkdtemp(prefix="ucp-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    log(f"old {sides['old']}, new {sides['new']}, python {args.python}, settings {args.size}, {args.pairs} pair(s); "
        f"logs in {out}")
    t_all = time.perf_counter()
    results = {b: {"old": [], "new": []} for b in benches}
    failed = 0
    with open(out / "results.jsonl", "a") as jsonl:
        for i in range(args.pairs):
            for j, bench in enumerate(benches):
                order = ("old", "new") if (i + j) % 2 == 0 else ("new", "old")
                for side in order:
                    bench_args = list(SETTINGS[args.size][bench])
                    if args.work:
                        bench_args += [WORK_FLAG[bench], args.work]
                    log(f"bench_{bench} {side} (pair {i + 1}/{args.pairs}) {' '.join(bench_args)}")
                    r = run_one(args.python, sides[side], bench, bench_args, out / f"{bench}.{side}.{i}.log",
                                args.timeout)
                    results[bench][side].append(r)
                    print(f"== bench_{bench} {side} pair {i + 1}: load {r['load']} before, {r['wall_s']} s, "
                          f"exit {r['rc']}", flush=True)
                    print(r["line"] if r["line"] is not None else "(no JSON line)", flush=True)
                    jsonl.write(json.dumps({"bench": bench, "side": side, "pair": i, "root": str(sides[side]),
                                            "args": bench_args, "load": r["load"], "wall_s": r["wall_s"],
                                            "rc": r["rc"], "doc": r["doc"]}) + "\n")
                    jsonl.flush()
                    if r["doc"] is None:
                        failed += 1
                        log(f"bench_{bench} {side} FAILED (exit {r['rc']}); the end of {r['log']}:\n{tail(r['log'])}")
    print(flush=True)
    for bench in benches:
        print("\n".join(summary(bench, results[bench])), flush=True)
    print(f"-- {sum(len(s) for r in results.values() for s in r.values())} runs in "
          f"{time.perf_counter() - t_all:.0f} s, {failed} failed; load now {benchlib.load_average()}; "
          f"logs and results.jsonl in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
