"""Running a ``tools/bench_*.py`` script as a user would, for the smoke tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def run_bench(script: str, *args: str, timeout: float = 600) -> dict:
    """Run ``tools/<script>`` with ``args``; it must exit 0 and print exactly one JSON line: its document."""
    p = subprocess.run([sys.executable, str(TOOLS / script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout
    return json.loads(lines[0])
