#!/usr/bin/env python
"""Importing a DeepSpeed ZeRO-1 checkpoint: ``ucp convert --from deepspeed`` next to DeepSpeed's own
``ds_to_universal``, on the same input, in the same run.

The input: a real DeepSpeed save (DeepSpeed on CPU, ``DS_ACCELERATOR=cpu``, gloo, ZeRO stage 1,
fp32, DeepSpeed's AdamW, dp=2), trained one step and saved once, before the timings:
- ``--tp 1`` (default): an MLP of ``--layers`` square layers of ``--width`` on 2 ranks (the default,
  5 x 4096, is 84 M parameters: about 1 GB of fp32 masters and Adam moments, plus 0.34 GB of module
  weights);
- ``--tp 2``: a Megatron-style GPT (``tools/megatron_save.py``) of ``--layers`` layers of hidden size
  ``--width`` with tensor parallelism through a model-parallel unit, on tp x dp = 4 ranks (the
  default, 6 x 1024, is 75 M parameters, 1.2 GB); ucp reads it with ``--spec megatron-gpt``, and
  ``ds_to_universal`` with the pattern lists the save carries.

Each converter runs as its own process, ``--repeats`` times, alternating, with the page cache warm
(the save was just written and read) and clean (``sync`` before each run, untimed: ``ds_to_universal``
leaves its output and temporary files to be written back, which would otherwise slow the next run;
ucp's output is durable when it returns, fsynced). For each: wall time, peak RSS (``wait4``'s ``ru_maxrss`` of
that process), the files it writes, and the temporary files it makes (``ds_to_universal`` writes
per-slice files under its output's ``tmp/`` and removes them; the peak is sampled every 50 ms).
``ucp_files_per_key``: the most files under one tensor key's array (its shard and its metadata;
the group adds its own ``zarr.json`` and fragment table). Every tensor of ucp's output
is compared with ``ds_to_universal``'s, bit for bit (``agree``).

Targets (issue 8): ucp at least 3x faster, no temporary files, at most two files per tensor key.
Output: one JSON line on stdout, progress on stderr; a failure prints nothing on stdout.

    python tools/bench_import.py [--tp 1|2] [--width W] [--layers L] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import benchlib
from benchlib import ROOT, free_port

TARGET_SPEEDUP = 3.0
log = benchlib.logger("bench_import")


def make_checkpoint(width: int, layers: int, out: str) -> None:
    """(Run under torchrun.) Train the MLP one step with DeepSpeed ZeRO-1 and save it to ``out``."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    cfg = {"train_batch_size": 2 * dist.get_world_size(), "train_micro_batch_size_per_gpu": 2,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
           "zero_optimization": {"stage": 1}, "steps_per_print": 10**6}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(2, width, generator=torch.Generator().manual_seed(dist.get_rank()))
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    engine.save_checkpoint(out)
    dist.barrier()


def run_measured(cmd: list[str], watch: Path | None = None, env=None) -> dict:
    """Run ``cmd``; its wall time, peak RSS and (with ``watch``) the peak of temporary files under it."""
    peak = {"files": 0, "bytes": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            if watch is not None and watch.exists():
                files = [p for p in watch.rglob("*") if p.is_file()]
                size = 0
                for p in files:
                    try:
                        size += p.stat().st_size
                    except OSError:
                        pass
                peak["files"] = max(peak["files"], len(files))
                peak["bytes"] = max(peak["bytes"], size)
            time.sleep(0.05)

    os.sync()  # (untimed: no run pays for writing back what the previous one left dirty)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {err[-2000:]}")
    return {"s": wall, "rss_mb": usage.ru_maxrss / 1024, "tmp_files": peak["files"], "tmp_bytes": peak["bytes"]}


def compare(ucp_dir: Path, ds_dir: Path) -> tuple[bool, int]:
    """Whether every optimizer tensor of ucp's output equals ds_to_universal's, bit for bit; how many."""
    import numpy as np
    import torch

    from ucp.storage.universal_io import array_reader, read_header

    header = read_header(ucp_dir)
    names = {"fp32": "master", "exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "step": "step"}
    n = 0
    for d in sorted(p for p in (ds_dir / "zero").iterdir() if p.is_dir()):
        for theirs_name, ours in names.items():
            theirs = torch.load(d / f"{theirs_name}.pt", weights_only=True)
            theirs = (theirs["param"] if isinstance(theirs, dict) else theirs).detach().numpy()
            key = f"optim/{d.name}/{ours}"
            with array_reader(ucp_dir, key, header.tensors[key]) as r:
                mine = np.asarray(r.read())
            if mine.shape != theirs.shape or mine.tobytes() != theirs.tobytes():
                return False, n
            n += 1
    return True, n


def count_files(path: Path) -> int:
    return sum(1 for p in path.rglob("*") if p.is_file())


def main() -> int:
    p = benchlib.parser(__doc__)
    p.add_argument("--tp", type=int, default=1, choices=(1, 2), help="tensor parallelism of the save (default 1)")
    p.add_argument("--width", type=int, help="the MLP's layer width (default 4096); with --tp 2 the GPT's hidden "
                                             "size (default 1024)")
    p.add_argument("--layers", type=int, help="layers (default 5; with --tp 2, 6)")
    benchlib.add_repeats(p, 3, "timed runs of each converter (default 3)")
    p.add_argument("--make", metavar="OUT", help=argparse.SUPPRESS)  # (internal: the save, under torchrun)
    args = p.parse_args()
    if args.width is None:
        args.width = 4096 if args.tp == 1 else 1024
    if args.layers is None:
        args.layers = 5 if args.tp == 1 else 6
    if args.make:
        make_checkpoint(args.width, args.layers, args.make)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # (saved and closed; skip C++ static destructors, which a DeepSpeed thread can abort)
    if args.width < 8 or args.layers < 1 or args.repeats < 1:
        p.error("use --width >= 8, --layers >= 1, --repeats >= 1")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        p.error("DeepSpeed is not installed: pip install -c <(echo torch==2.13.0) deepspeed")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    before = set(os.listdir("/dev/shm"))
    work = Path(tempfile.mkdtemp(prefix="ucp-bench-import-"))
    try:
        ckpt = work / "ckpt"
        if args.tp == 1:
            log(f"saving a ZeRO-1 checkpoint of {args.layers} x {args.width}^2 with DeepSpeed (2 ranks)")
            make = [__file__, "--width", str(args.width), "--layers", str(args.layers), "--make", str(ckpt)]
        else:
            log(f"saving a ZeRO-1 checkpoint of a {args.layers}-layer GPT of hidden size {args.width} with DeepSpeed "
                f"(tp=2 x dp=2)")
            make = [str(ROOT / "tools" / "megatron_save.py"), "gpt", "2", "1", "1", str(ckpt), "--hidden",
                    str(args.width), "--layers", str(args.layers), "--steps", "1", "--no-expected"]
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(2 * args.tp),
                        "--master-port", str(free_port()), *make], check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
        tag = (ckpt / "latest").read_text().strip()
        src_bytes = sum(f.stat().st_size for f in (ckpt / tag).iterdir() if f.suffix == ".pt")
        runs = {"ucp": [], "ds": []}
        for i in range(args.repeats):
            for kind in ("ds", "ucp"):
                out = work / f"{kind}{i}"
                if kind == "ucp":
                    cmd = [sys.executable, "-m", "ucp.cli.main", "convert", "--from", "deepspeed", str(ckpt), str(out),
                           "--quiet", *(["--spec", "megatron-gpt"] if args.tp == 2 else [])]
                    res = run_measured(cmd, env=env)
                    res["tmp_files"] = res["tmp_bytes"] = 0  # (checked below: nothing but the output)
                else:
                    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(ckpt / tag), "--output_folder", str(out),
                           *(["--inject_missing_state"] if args.tp == 1 else [])]
                    res = run_measured(cmd, watch=out / "tmp", env=env)
                res["files"] = count_files(out)
                runs[kind].append(res)
                log(f"{kind} run {i}: {res['s']:.2f} s, peak RSS {res['rss_mb']:.0f} MB, {res['files']} files")
                if i < args.repeats - 1:
                    shutil.rmtree(out)
        last = args.repeats - 1
        agree, compared = compare(work / f"ucp{last}", work / f"ds{last}")
        from ucp.storage.universal_io import read_header

        header = read_header(work / f"ucp{last}")
        keys = len(header.tensors)
        ucp_files = count_files(work / f"ucp{last}")
        per_key = max(count_files(work / f"ucp{last}" / m.path) for m in header.tensors.values())
        best = {k: min(runs[k], key=lambda r: r["s"]) for k in runs}
        import torch

        params = sum(math.prod(m.shape) for k, m in header.tensors.items() if k.startswith("model/"))
        doc = {"bench": "ucp_import_deepspeed", "zero_stage": 1, "dp": 2, "tp": args.tp,
               "model": "mlp" if args.tp == 1 else "megatron-gpt", "width": args.width, "layers": args.layers,
               "params_m": round(params / 1e6, 2),
               "source_gb": round(src_bytes / 1e9, 3), "repeats": args.repeats,
               "ucp_s": round(best["ucp"]["s"], 3), "ds_to_universal_s": round(best["ds"]["s"], 3),
               "ucp_all_s": [round(r["s"], 3) for r in runs["ucp"]],
               "ds_to_universal_all_s": [round(r["s"], 3) for r in runs["ds"]],
               "speedup": round(best["ds"]["s"] / best["ucp"]["s"], 2),
               "ucp_peak_rss_mb": round(max(r["rss_mb"] for r in runs["ucp"])),
               "ds_to_universal_peak_rss_mb": round(max(r["rss_mb"] for r in runs["ds"])),
               "ucp_temp_files": 0, "ds_to_universal_temp_files_peak": max(r["tmp_files"] for r in runs["ds"]),
               "ds_to_universal_temp_gb_peak": round(max(r["tmp_bytes"] for r in runs["ds"]) / 1e9, 3),
               "ucp_files": ucp_files, "ucp_tensor_keys": keys, "ucp_files_per_key": per_key,
               "ds_to_universal_files": runs["ds"][-1]["files"],
               "agree": agree, "tensors_compared": compared,
               "torch": torch.__version__, "deepspeed": version("deepspeed"), "cpus": os.cpu_count()}
        doc["target_speedup_met"] = doc["speedup"] >= TARGET_SPEEDUP
        doc["target_files_met"] = doc["ucp_files_per_key"] <= 2
        if not agree:
            log(f"FAILED: ucp and ds_to_universal disagree after {compared} tensors")
            return 1
        return benchlib.finish(doc, compact=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for name in set(os.listdir("/dev/shm")) - before:  # DeepSpeed's CPU all-reduce buffers
            if not name.startswith("ucp."):
                try:
                    os.unlink(f"/dev/shm/{name}")
                except OSError:
                    pass


if __name__ == "__main__":
    sys.exit(main())
