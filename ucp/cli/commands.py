"""The CLI's commands: each takes parsed arguments, prints, and returns an exit code."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ucp.convert import convert as run_convert
from ucp.convert.export import export as run_export
from ucp.errors import CorruptCheckpointError, OptionsError
from ucp.snapshot import agent as agent_mod
from ucp.snapshot import client, discovery, shm
from ucp.storage import directory as store
from ucp.storage.objstore import as_location
from ucp.storage.manifest_io import read_manifest
from ucp.storage.universal_io import is_universal, read_header, verify_universal
from ucp.storage.verify import verify_checkpoint


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(rows) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) if j < 4 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _state_names(state: dict) -> str:
    names = sorted(set(state.get("shared", {})) | {k for r in state.get("ranks", {}).values() for k in r})
    return ", ".join(names) or "none"


def _sharding(layout, tensors: dict) -> str:
    """What each mesh axis of more than one rank does to the tensors (``tensors``: key -> an object with a
    ``pattern``): an axis a tensor is sharded over (dims split, FSDP2 or tensor parallelism, or flat
    ZeRO partitions) versus one over which every rank holds the same whole tensor. ``zero`` alone
    cannot say it: FSDP2 on a default (unnamed) mesh saves ``mesh0=2 zero=0``, every tensor sharded."""
    parts = []
    for axis, size in layout.axes:
        if size == 1:
            continue
        split = sum(1 for t in tensors.values() if any(s.axis == axis for s in t.pattern.shards))
        flat = sum(1 for t in tensors.values() if t.pattern.flat == axis)
        whole = len(tensors) - sum(1 for t in tensors.values()
                                   if t.pattern.flat == axis or any(s.axis == axis for s in t.pattern.shards))
        what = [f"{n} {how}" for n, how in ((split, "split along a dim"), (flat, "partitioned flat (ZeRO)"),
                                            (whole, "replicated")) if n]
        parts.append(f"{axis}={size}: {len(tensors) - whole} of {len(tensors)} tensor(s) sharded ({', '.join(what)})")
    return "; ".join(parts) or "none (one rank)"


def _universal_path(args):
    """The universal checkpoint ``args.path`` names, or None when it is a distributed one (``args.path``
    made a location: a local path, or an object store's for a URL)."""
    args.path = as_location(args.path)
    if is_universal(args.path):
        if args.step is not None:
            raise OptionsError(f"{args.path} is a universal checkpoint (one step); --step applies to roots of "
                               "distributed checkpoints")
        return args.path
    return None


def inspect(args) -> int:
    if _universal_path(args):
        return _inspect_universal(args)
    path = store.resolve(args.path, args.step)
    m = read_manifest(path)
    if args.json:
        json.dump(m.document(), sys.stdout, indent=1)
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
    print(f"sharding    {_sharding(m.layout, m.tensors)}")
    print(f"format      ucp.checkpoint {m.format_version}  ({m.created_by})")
    print(f"size        {_human(m.nbytes)} in {len(m.files)} file(s), {len(m.fragments)} fragment(s), {len(m.tensors)} tensor(s)")
    print(f"state       {_state_names(m.state)}")
    rows = [("tensor", "shape", "dtype", "pattern", "frags", "bytes")]
    for key, meta in sorted(m.tensors.items()):
        rows.append((key, "x".join(map(str, meta.shape)) or "scalar", meta.dtype, str(meta.pattern),
                     str(count.get(key, 0)), _human(nbytes.get(key, 0))))
    _table(rows)
    return 0


def _inspect_universal(args) -> int:
    h = read_header(args.path)
    if args.json:
        json.dump(h.to_dict(), sys.stdout, indent=1)
        print()
        return 0
    print(f"universal   {args.path}")
    print(f"step        {h.step}")
    print(f"source      {h.source_layout}  ({h.source_layout.world_size} ranks)  {h.source.get('path', '')}")
    print(f"sharding    {_sharding(h.source_layout, h.tensors)}  (in the source; the arrays are whole)")
    print(f"format      ucp.universal {h.format_version}  ({h.created_by})")
    print(f"size        {_human(h.nbytes)} in {len(h.tensors)} array(s)")
    print(f"state       {_state_names(h.state)}")
    print(f"spec        {'yes (ucp inspect --json shows it)' if h.spec else 'none'}")
    rows = [("tensor", "shape", "dtype", "source pattern", "chunks", "bytes")]
    for key, a in sorted(h.tensors.items()):
        rows.append((key, "x".join(map(str, a.shape)) or "scalar", a.dtype, str(a.pattern),
                     "x".join(map(str, a.chunks)) or "1", _human(a.nbytes)))
    _table(rows)
    return 0


def verify(args) -> int:
    if _universal_path(args):
        h = read_header(args.path)
        with tqdm(total=h.nbytes, unit="B", unit_scale=True, desc="verify", disable=args.quiet or None,
                  file=sys.stderr, leave=False) as bar:
            report = verify_universal(args.path, h, bar.update)
        _raise_problems(args.path, report.problems)
        print(f"OK   {args.path}: universal, step {h.step}, {report.arrays} array(s), {_human(report.nbytes)} verified")
        return 0

    path = store.resolve(args.path, args.step)
    m = read_manifest(path)
    with tqdm(total=m.nbytes, unit="B", unit_scale=True, desc="verify", disable=args.quiet or None,
              file=sys.stderr, leave=False) as bar:
        report = verify_checkpoint(path, m, bar.update)
    _raise_problems(path, report.problems)
    print(f"OK   {path}: step {m.step}, {report.fragments} fragment(s), {_human(report.nbytes)} verified")
    for note in report.notes:  # (what could not be checked: not a failure)
        print(f"NOTE {path}: {note}")
    return 0


def _raise_problems(path, problems: list[str]) -> None:
    if problems:
        for line in problems:
            print(f"BAD  {line}", file=sys.stderr)
        raise CorruptCheckpointError(f"{path}: {len(problems)} problem(s) found; the first: {problems[0]}")


def convert(args) -> int:
    if args.chunk_kib < 1:
        raise OptionsError(f"--chunk-kib {args.chunk_kib}: use at least 1 (KiB); 1024 suits most tensors")
    if args.memory_mib is not None and args.memory_mib < 1:
        raise OptionsError(f"--memory-mib {args.memory_mib}: use a positive number of MiB, or leave it out")
    if not 1 <= args.workers <= 64:
        raise OptionsError(f"--workers {args.workers}: use 1 to 64")
    settings = {}
    for item in args.set or ():
        name, eq, value = item.partition("=")
        value = value.strip()
        digits = value.lstrip("0") or "0"
        if (not eq or not name.isidentifier() or not name.isascii() or not (value.isascii() and value.isdigit())
                or len(digits) > 19 or int(digits) >= 1 << 63):
            raise OptionsError(f"--set {_brief(item)}: use NAME=N with an integer 0 <= N < 2^63, e.g. --set vocab=50257")
        settings[name] = int(digits)
    if settings and args.spec is None:
        raise OptionsError("--set gives model settings to a spec; pass one with --spec")
    result = _with_progress("convert", args.quiet, lambda progress, total: run_convert(
        args.src, args.dst, args.spec, step=args.step, workers=args.workers, compressor=args.compress,
        chunk_bytes=args.chunk_kib * 1024, memory_limit=None if args.memory_mib is None else args.memory_mib << 20,
        progress=progress, total=total, source=args.source, settings=settings or None))
    return _summary(args, result, f"OK   {result.dst}: step {result.step}, {result.tensors} array(s), "
                                  f"{_human(result.nbytes)} from {_human(result.source_bytes)} in {result.seconds:.2f} s "
                                  f"({result.gbps:.2f} GB/s)")


def _with_progress(desc: str, quiet: bool, run):
    """``run(progress, total)`` under a byte progress bar on stderr (none with ``quiet``)."""
    bar = tqdm(unit="B", unit_scale=True, desc=desc, disable=quiet or None, file=sys.stderr, leave=False)
    try:
        return run(bar.update, lambda n: setattr(bar, "total", n))
    finally:
        bar.close()


def _summary(args, result, line: str) -> int:
    """Print ``result`` as one JSON line with ``--json``, else ``line``."""
    print(json.dumps(result.to_dict()) if args.json else line)
    return 0


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


_MAX_SIZE = 1 << 63


def _brief(text: str) -> str:
    return repr(text) if len(text) <= 40 else f"{text[:37]!r}... ({len(text)} characters)"


def parse_size(text: str) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"2GiB"`` -> 2 * 2**30, ``"1000"`` -> 1000 (exact decimal arithmetic: no
    float rounding, no overflow; at most 2^63 - 1 bytes)."""
    m = re.fullmatch(r"\s*([0-9]+)(?:\.([0-9]+))?\s*([A-Za-z]*)\s*", text, flags=re.ASCII)
    if not m or m.group(3).lower() not in _UNITS:
        raise OptionsError(f"size {_brief(text)}: use a positive number with an optional unit (B, KB, MB, GB, KiB, MiB, "
                           "GiB)")
    whole, frac = m.group(1).lstrip("0"), (m.group(2) or "").rstrip("0")
    # (digits bounded before int(): a few thousand would hit Python's int-string limit)
    n = int(whole + frac or "0") * _UNITS[m.group(3).lower()] // 10 ** len(frac) if len(whole) + len(frac) <= 40 else -1
    if not 0 < n < _MAX_SIZE:
        raise OptionsError(f"size {_brief(text)}: use a positive size below 2^63 bytes (8 EiB), e.g. 5GB")
    return n


def export(args) -> int:
    max_shard_bytes = parse_size(args.max_shard_size)
    result = _with_progress("export", args.quiet, lambda progress, total: run_export(
        args.universal, args.out, args.spec, optimizer=args.optimizer, max_shard_bytes=max_shard_bytes,
        dtype=args.dtype, config=args.config, progress=progress, total=total))
    index = f", listed by {', '.join(result.indexes)}" if result.indexes else ""
    configs = f", with {', '.join(result.configs)}" if result.configs else ""
    return _summary(args, result, f"OK   {result.out}: {result.tensors} tensor(s), {_human(result.nbytes)} in "
                                  f"{len(result.files)} safetensors file(s): {', '.join(result.files[:4])}"
                                  f"{' ...' if len(result.files) > 4 else ''}{index}{configs}")


def demo(args) -> int:
    if args.nproc < 1 or args.steps < 2 or args.save_every < 1 or args.save_every >= args.steps:
        raise OptionsError("demo needs --nproc >= 1, --steps >= 2 and 1 <= --save-every < --steps")
    from ucp.trainer.demo import run_demo  # (torch: imported by the commands that run it only)

    return run_demo(args.nproc, args.steps, args.save_every, args.dir)


def train(args) -> int:
    from ucp.trainer.launch import launch_training  # (torch: imported by the commands that run it only)

    return launch_training(args)


def agent(args) -> int:
    """``ucp agent start|status|stop``."""
    if args.action == "start":
        if args.foreground:
            return agent_mod.main(["--job", args.job])
        c = client.ensure_agent(args.job, log=Path(args.log).resolve() if args.log else None)
        print(f"agent of job {args.job!r}: pid {c.info.pid}, port {c.info.port}")
        return 0
    if args.action == "stop":
        print(client.stop(args.job))
        return 0
    jobs = [shm.check_job(args.job)] if args.job is not None else client.discovered_jobs()
    report = []
    for job in jobs:
        info = discovery.read_info(job)
        entry = {"job": job, "running": bool(info and discovery.is_alive(info))}
        if entry["running"]:
            entry.update(client.AgentClient(info, timeout=10).status())
            entry["port"] = info.port
        else:
            entry["leftovers"] = sorted(n for n in shm.listing(shm.prefix(job)) if not n.endswith(".agent.lock"))
        report.append(entry)
    if args.json:
        print(json.dumps(report if args.job is None else report[0], indent=2))
        return 0 if all(e["running"] for e in report) else 2
    if not report:
        print("no ucp agent on this node")
        return 2
    for e in report:
        if not e["running"]:
            left = f"; {len(e['leftovers'])} leftover file(s): run 'ucp agent stop --job {e['job']}'" if e["leftovers"] else ""
            print(f"job {e['job']}: no agent running{left}")
            continue
        print(f"job {e['job']}: agent pid {e['pid']}, port {e['port']}, up {time.time() - e['started']:.0f} s, "
              f"{e['clients']} client(s), {len(e['segments'])} segment(s), {_human(e['nbytes'])}")
        for name, n in e["segments"].items():
            print(f"  {name}  {_human(n)}")
        for where, snap in e.get("snapshots", {}).items():
            rank, slot = where.split(".")
            print(f"  rank {rank} slot {slot}: step {snap['step']}, {'complete' if snap['complete'] else 'not complete'}")
        for where, par in e.get("parity", {}).items():
            rank, slot = where.split(".")
            print(f"  rank {rank} slot {slot}: parity of step {par['step']} (redundancy group of ranks "
                  f"{par['members']}, {par['m']} parity stripe(s) per set)")
        if e.get("parity_bytes"):
            data, parity = e["data_bytes"], e["parity_bytes"]
            print(f"  redundancy: {_human(parity)} of parity for {_human(data)} of snapshots: memory "
                  f"{(data + parity) / data:.2f}x the data")
        if e.get("persisted") or e.get("persisting"):
            written = ", ".join(f"rank {r}: step {s}" for r, s in e.get("persisted", {}).items()) or "nothing yet"
            print(f"  written to the durable tier: {written}; {e.get('persisting', 0)} write(s) in flight")
    return 0 if all(e["running"] for e in report) else 2
