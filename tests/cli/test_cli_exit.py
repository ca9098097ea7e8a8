"""A failing command exits with its one error line and its exit code, never by a signal.

A run that read a Parquet fragment table and then failed used to abort at interpreter exit
("terminate called without an active exception", exit 134) in about a third of runs: the table's
reader was released on one of arrow's threads while the interpreter was finalizing.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.synthetic import write_checkpoint
from ucp.format import Layout, Pattern, Shard

RUNS = 16  # (without the fix, 5 to 8 of 16 aborted)


def _checkpoint(root):
    rng = np.random.default_rng(0)
    tensors = {f"model/w{i}": (rng.standard_normal((8, 4)).astype(np.float32), "float32", Pattern((Shard("tp", 0),)))
               for i in range(3)}
    write_checkpoint(root, 5, tensors, Layout.from_sizes(tp=2))
    return root


def test_convert_failing_after_the_fragment_table_exits_1_every_time(tmp_path):
    ckpt = _checkpoint(tmp_path / "ck")
    taken = tmp_path / "taken"
    taken.mkdir()
    # one after another: runs in parallel change the timing enough to hide it
    runs = [subprocess.run([sys.executable, "-m", "ucp.cli.main", "convert", str(ckpt), str(taken), "--quiet"],
                           capture_output=True, text=True, timeout=300) for _ in range(RUNS)]
    codes, errs = [r.returncode for r in runs], [r.stderr for r in runs]
    assert codes == [1] * RUNS, (codes, [e for c, e in zip(codes, errs) if c != 1][:1])
    for err in errs:
        assert err.strip().splitlines() == [f"ucp: error: {taken}: already exists; give a new path (ucp never "
                                            "overwrites it)"], err
