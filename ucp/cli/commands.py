"""The CLI's commands: each takes parsed arguments, prints, and returns an exit code."""

from __future__ import annotations

import json
import sys

from ucp.errors import CorruptCheckpointError, OptionsError
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def inspect(args) -> int:
    path = store.resolve(args.path, args.step)
    m = read_manifest(path)
    if args.json:
        from ucp.spec.fragment import fragments_to_table

        doc = m.header({"rows": len(m.fragments)})
        doc["fragments"] = fragments_to_table(m.fragments).to_pylist()
        json.dump(doc, sys.stdout, indent=1)
        print()
        return 0
    count: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for f in m.fragments:
        count[f.key] = count.get(f.key, 0) + 1
        nbytes[f.key] = nbytes.get(f.key, 0) + f.length
    print(f"checkpoint  {path}")
    print(f"step        {m.step}")
    print(f"layout      {m.layout}  ({m.layout.world_size} ranks)")
    print(f"format      ucp.checkpoint {m.format_version}  ({m.created_by})")
    print(f"size        {_human(m.nbytes)} in {len(m.files)} file(s), {len(m.fragments)} fragment(s), {len(m.tensors)} tensor(s)")
    state = sorted(set(m.state.get("shared", {})) | {k for r in m.state.get("ranks", {}).values() for k in r})
    print(f"state       {', '.join(state) or 'none'}")
    rows = [("tensor", "shape", "dtype", "pattern", "frags", "bytes")]
    for key, meta in m.tensors.items():
        rows.append((key, "x".join(map(str, meta.shape)) or "scalar", meta.dtype, str(meta.pattern),
                     str(count.get(key, 0)), _human(nbytes.get(key, 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def verify(args) -> int:
    from tqdm import tqdm

    from ucp.storage.verify import verify_checkpoint

    path = store.resolve(args.path, args.step)
    m = read_manifest(path)
    with tqdm(total=m.nbytes, unit="B", unit_scale=True, desc="verify", disable=args.quiet or None,
              file=sys.stderr, leave=False) as bar:
        report = verify_checkpoint(path, m, bar.update)
    if not report.ok:
        for line in report.problems:
            print(f"BAD  {line}", file=sys.stderr)
        raise CorruptCheckpointError(f"{path}: {len(report.problems)} problem(s) found; the first: {report.problems[0]}")
    print(f"OK   {path}: step {m.step}, {report.fragments} fragment(s), {_human(report.nbytes)} verified")
    return 0


def demo(args) -> int:
    if args.nproc < 1 or args.steps < 2 or args.save_every < 1 or args.save_every >= args.steps:
        raise OptionsError("demo needs --nproc >= 1, --steps >= 2 and 1 <= --save-every < --steps")
    from ucp.demo import run_demo

    return run_demo(args.nproc, args.steps, args.save_every, args.dir)


def train(args) -> int:
    from ucp.trainer.launch import launch_training

    return launch_training(args)
