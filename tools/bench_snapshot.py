#!/usr/bin/env python
"""The memory tier of ucp against PyTorch DCP and the memory's floors: per-step stall, snapshot throughput
and restore after a crash, each figure a median with its spread, taken side by side in one run.

The state: the reference GPT (``ucp.trainer``) widened so that parameters + AdamW ``exp_avg`` +
``exp_avg_sq`` come to about ``--size-mb`` MB (10^6 bytes) of fp32 (``tools/bench_convert.py``'s
sizing), on 2 local ranks (gloo, torch's elastic launcher) as ``TrainLayout(dp=2, zero=3)`` (FSDP2:
each rank holds half of the state). Each rank uses ``cpu_count // 2`` intra-op threads.

Run 1 (the trainers; every per-step time is the slower rank's):

* **the training loop.** The reference trainer's step (``ucp.trainer.train.train_steps``: forward,
  backward, ``optimizer.step()``, the loss all-reduce) followed by one of four kinds of checkpoint:
  ``none``; ``ucp``: ``Checkpointer(snapshot=SnapshotOptions(every=1, persist_every=None)).save(step)``;
  ``dcp_default`` and ``dcp_best``: ``dcp.async_save`` at DCP's defaults and at its best documented
  settings (a reused ``DefaultStager`` with async staging into shared memory, the upload in a process;
  ``benchlib.DcpSaver`` says exactly what), writing to ``--dcp-dir`` (by default a directory in
  /dev/shm: memory, DCP's most favourable target). First ``--warmup`` untimed steps of each kind; then
  ``--rounds`` rounds of ``--steps / --rounds`` steps of every kind, the kinds' order rotated from
  round to round (a slow phase of the machine falls on every kind). Each series starts with an untimed
  lead-in step, so every timed step overlaps exactly one background save (the previous step's) and
  makes one; after it, its saves are waited for (untimed). A step's time runs from its start to the
  return of its save. For each kind K: ``K_step_ms`` (median), ``K_stall_ms`` = median step of K -
  median step of ``none``, ``K_stall_ms_rounds`` each round's difference of medians,
  ``K_stall_ms_paired`` their median, ``K_stall_ms_spread`` their quantiles (ucp's keys are unprefixed:
  ``stall_ms``, ...). ``hook_wait_ms``: the wait of ucp's pre-step hook for the previous copy;
  ``dcp_best_staging_wait_ms``: DCP's for its staging; ``dcp_*_upload_wait_ms``: DCP's wait for the
  previous upload before the next call.
* **snapshot throughput**, trainers idle: ``--repeats`` rounds of (kinds in rotated order) barrier,
  ``save(step)``, ``wait()`` (the copy, checksums and the cut: a complete snapshot) on both ranks;
  ``memcpy_2thread`` (both ranks at once, each copying its snapshot's bytes, one thread each: the same
  bytes as the snapshot, two threads); ``memcpy_1thread`` (rank 0 alone, one thread);
  ``memcpy_shm_2thread`` (as 2thread, into a mapping of a tmpfs file as the agent's slots are);
  ``memcpy_4k_2thread`` (as 2thread, between buffers in 4 KiB pages: numpy's large buffers get
  transparent huge pages, a model's tensors and tmpfs segments do not);
  ``verified_copy_shm_2thread`` (from 4 KiB-page buffers into the tmpfs mapping, each 1 MiB chunk
  checksummed right after its copy: the least a checksummed copy costs, since a whole-buffer memcpy
  this large streams with non-temporal stores that a checksum of the copy cannot use);
  ``crc32c_2thread`` (both ranks at once, the ``crc32c`` library over their bytes; these floors are
  ``benchlib.Floors``: numpy's copy, one thread, into touched buffers). Throughputs are
  both ranks' bytes over the slower rank's median time (``memcpy_1thread``: one rank's bytes), with
  ``*_spread`` the quantiles of the per-round figures. ``MemoryTier.write`` (the one pass of copy and
  CRC-32C, and the agent's begin/commit) is also timed alone (null when it could not be taken).
* the state after the last snapshot is checksummed (a few full tensors, the embedding's AdamW moments,
  AdamW's step count), and saved durably with a plain ``Checkpointer`` to another root (fsynced).

Then the trainers are SIGKILLed from outside (the launcher's workers; the agent, in a session of its
own, survives) and run 2 starts 2 new ranks that build the same config from another seed, overwrite
their state with a constant before each load, and time (barrier, load, barrier):
``restore_memory_first_s`` (the first load: it connects to the agent), then ``--repeats`` rounds (kinds
in rotated order) of: a restore from memory; a cold durable restore (rank 0 drops the page cache of the
checkpoint's files: fsync + ``posix_fadvise(DONTNEED)``, which needs no privilege); a warm durable
restore; and the floors of the same bytes per rank: memcpy (1 and 2 threads, and 2 threads in 4 KiB
pages), the verified copy (from a tmpfs mapping, as a restore from memory reads), CRC-32C, a write + fsync
of a file and its cold read (its pages dropped the same way; ``cold_read_disk_gb`` says how much came
from the device). After every load the checksums must equal the saved ones (``bit_exact``).
``restore_*_phases`` break the median load down by ucp's collective phases (``tools/bench_save.py``'s
``PhaseTimer``).

``floors_gbps`` and ``restore_floors_gbps`` hold the floors; ``ucp_over_floor`` ucp's figures over
them (the same bytes, the same run). Targets (issue 19): snapshot throughput >= 0.6x ``memcpy_2thread``;
restore from memory >= 0.5x memcpy of the same bytes and >= 2x a warm durable restore; ucp's stall <=
``dcp_best``'s. ``load_avg`` records the load average (1, 5, 15 min) as the run goes.

The agent is stopped (its shared memory removed) at the end, also on failure; a leftover segment
of the bench's job fails the run. Output: exactly one JSON line on stdout; progress goes to stderr;
a failure prints nothing on stdout and exits non-zero.

    python tools/bench_snapshot.py [--size-mb 1000] [--steps 8] [--rounds 4] [--warmup 2] [--repeats 5]
                                   [--batch 8] [--work DIR] [--dcp-dir DIR] [--keep] [--quick]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import benchlib
from benchlib import median, ms, rotated, summary

LAYOUT = {"dp": 2, "zero": 3}
NPROC = 2
SRC_SEED = 1234
DST_SEED = 99
BYTES_PER_PARAM = 12  # fp32 parameter + AdamW exp_avg + exp_avg_sq
KILL_WAIT_S = 300  # how long a trainer that has reported waits to be killed
KINDS = ("none", "ucp", "dcp_default", "dcp_best")
QUICK = {"size_mb": 20.0, "steps": 2, "rounds": 2, "warmup": 2, "repeats": 2}
log = benchlib.logger("bench_snapshot")


def model_config(size_mb: float, batch: int) -> dict:
    """``GPTConfig`` fields of a reference GPT whose fp32 params + AdamW state are ~``size_mb`` MB."""
    from bench_convert import model_config as sized

    return sized(size_mb, BYTES_PER_PARAM, global_batch=batch)


def taken_ms(x):
    """Milliseconds of a figure ``WriteTimer`` may have failed to take (negative: None)."""
    return None if x is None or x < 0 else ms(x)


def gbps(nbytes: float, seconds) -> float | None:
    return None if seconds is None or seconds <= 0 else round(nbytes / 1e9 / seconds, 3)


def ratio(a, b) -> float | None:
    return None if a is None or not b else round(a / b, 4)


# -- helpers run inside the ranks -------------------------------------------------------------------


def rank_log(*args) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        log(*args)


def checksums(model, opt) -> dict | None:
    """``tools/bench_reshard.py``'s checksums (a few full tensors and wte's AdamW moments) and AdamW's
    step count of wte (collective; rank 0 returns)."""
    from bench_reshard import checksums as sums

    out = sums(model, opt)
    step = opt.state.get(dict(model.named_parameters())["wte.weight"], {}).get("step")
    if out is not None:
        out["wte.weight.step"] = None if step is None else float(step)
    return out


def rank_max(values: list[float]) -> list[float]:
    """Element-wise maximum over the ranks of each rank's list (collective; all lists equally long)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def rank_sum(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def timed(fn, alone: bool = False) -> float:
    """Seconds ``fn()`` takes on this rank, between barriers (``alone``: on rank 0 only, the others wait;
    they report 0)."""
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    if not alone or dist.get_rank() == 0:
        fn()
    s = time.perf_counter() - t0
    dist.barrier()
    return s


class WriteTimer:
    """Times ``MemoryTier.write`` (the snapshot's background copy and checksums, fused, and the agent
    requests) per step, by wrapping the method (ucp itself is untouched). A figure it could not take
    reads -1 (reported as null)."""

    def __init__(self):
        from ucp.snapshot.memory import MemoryTier

        self.by_step: dict = {}
        orig = MemoryTier.write
        timer = self

        def write(self_, step, *args, **kwargs):
            rec = timer.by_step[step] = {"write_s": -1.0}
            t0 = time.perf_counter()
            try:
                return orig(self_, step, *args, **kwargs)
            finally:
                rec["write_s"] = time.perf_counter() - t0

        MemoryTier.write = write

    def get(self, step: int, what: str) -> float:
        return self.by_step.get(step, {}).get(what, -1.0)


def shm_buffer(nbytes: int):
    """A uint8 array over a fresh mapping of a tmpfs file, as the agent's slots are; the file is
    unlinked at once, so nothing is left behind whatever happens (the pages go with the last view)."""
    import mmap

    import numpy as np

    from ucp.snapshot.shm import SHM_DIR

    path = SHM_DIR / f"ucp-bench-snapshot.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return np.frombuffer(buf, dtype=np.uint8)


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


# -- run 1: train with each kind of checkpoint, measure, then wait to be killed ----------------------


def train_and_snapshot(cfg_fields: dict, paths: dict, job: str, steps: int, rounds: int, warmup: int,
                       repeats: int, threads: int) -> None:
    benchlib.init_rank(threads)
    import numpy as np
    import torch.distributed as dist

    import ucp
    from bench_reshard import state_bytes
    from ucp.trainer.layouts import TrainLayout
    from ucp.trainer.model import GPTConfig
    from ucp.trainer.train import build, train_steps

    cfg = GPTConfig(**cfg_fields)
    lay = TrainLayout(**LAYOUT)
    rank = dist.get_rank()
    t_build = time.perf_counter()
    par, opt = build(cfg, lay, SRC_SEED)
    rank_log(f"  built {sum(p.numel() for p in par.model.parameters()) / 1e6:.1f}M params "
             f"in {time.perf_counter() - t_build:.1f} s")
    res: dict = {"rank": rank, "pid": os.getpid(), "load_avg": {"start": benchlib.load_average()}}
    writes = WriteTimer()
    dcp_group = dist.new_group(backend="gloo")
    dcps = {k: benchlib.DcpSaver(k, par.model, opt, Path(paths["dcp"]), dcp_group) for k in ("dcp_default", "dcp_best")}
    ck = ucp.Checkpointer(paths["snap"], model=par.model, optimizer=opt, options=lay.checkpoint_options(cfg),
                          snapshot=ucp.SnapshotOptions(every=1, persist_every=None, job=job))
    marks = {"before": 0.0, "after": 0.0}
    opt.register_step_pre_hook(lambda *a, **k: marks.__setitem__("before", time.perf_counter()))
    after_hook = [None]
    step_no = [0]

    def one_step(kind: str) -> dict:
        step_no[0] += 1
        i = step_no[0]
        marks["before"] = marks["after"] = 0.0
        for d in dcps.values():
            d.last["staging_wait"] = 0.0
        t0 = time.perf_counter()
        train_steps(cfg, lay, par, opt, SRC_SEED, [i])
        t1 = time.perf_counter()
        rec = {"step": i, "hook_wait": 0.0}
        if kind == "ucp":
            saved = ck.save(i)
            if saved is None or saved.tier != "memory":  # the memory tier was lost: ucp warned
                raise RuntimeError(f"save({i}) returned {saved!r}, not a snapshot in memory")
            if after_hook[0] is None:  # ucp's pre-step hook exists from the first snapshot on: time its wait
                after_hook[0] = opt.register_step_pre_hook(
                    lambda *a, **k: marks.__setitem__("after", time.perf_counter()))
            rec["hook_wait"] = marks["after"] - marks["before"] if marks["after"] else 0.0
        elif kind in dcps:
            d = dcps[kind]
            rec["hook_wait"] = d.last["staging_wait"]  # this step's wait for the previous staging
            d.save(i)
            rec.update({k: d.last[k] for k in ("state_dict", "upload_wait", "async_save")})
        t2 = time.perf_counter()
        rec.update(total=t2 - t0, save=t2 - t1)
        return rec

    def drain(kind: str) -> None:
        if kind == "ucp":
            ck.wait()
        elif kind in dcps:
            dcps[kind].drain()

    def series(kind: str, n: int, timed_: bool = True) -> list[dict]:
        out = []
        for _ in range(n):
            rec = one_step(kind)
            out.append(rec)
            rank_log(f"  {kind:<11} step {rec['step']:3d} {rec['total'] * 1e3:9.1f} ms"
                     f"  save {rec['save'] * 1e3:7.1f} ms"
                     f"  hook wait {rec['hook_wait'] * 1e3:7.1f} ms" + ("" if timed_ else "  (untimed)"))
        return out if timed_ else []

    rank_log(f"warm-up: {warmup} untimed steps of each kind {KINDS}")
    for kind in KINDS:
        series(kind, warmup, timed_=False)
        drain(kind)
    per = steps // rounds
    loop: dict = {k: [] for k in KINDS}
    for r in range(rounds):
        order = rotated(KINDS, r)
        rank_log(f"round {r + 1}/{rounds}: {per} steps of each kind, in the order {order}")
        for kind in order:
            series(kind, 1, timed_=False)  # the lead-in: each timed step overlaps one earlier save
            loop[kind] += series(kind, per)
            drain(kind)
    res["load_avg"]["after_loop"] = benchlib.load_average()
    res["state_bytes"] = state_bytes(par.model, opt)
    for kind, recs in loop.items():
        for f in ("total", "save", "hook_wait", *(("state_dict", "upload_wait", "async_save") if kind in dcps else ())):
            res[f"{kind}_{f}"] = rank_max([x[f] for x in recs])
    res["write_in_loop"] = rank_max([writes.get(x["step"], "write_s") for x in loop["ucp"]])
    for d in dcps.values():
        d.close()
    res["dcp_configs"] = {k: d.describe() for k, d in dcps.items()}
    dist.barrier()
    if rank == 0:  # DCP's checkpoints are not needed any more: their memory back
        for k in dcps:
            shutil.rmtree(Path(paths["dcp"]) / k)

    # -- snapshot throughput, trainers idle, side by side with the floors of the same bytes --
    rank_log("snapshots and floors, trainers idle")
    step_no[0] += 1
    nbytes = ck.save(step_no[0]).nbytes
    ck.wait()
    floors = benchlib.Floors(nbytes)
    shm_dst = shm_buffer(nbytes)
    shm_dst[:] = 0  # touched, like the agent's reused slots

    def snapshot() -> None:
        step_no[0] += 1
        saved = ck.save(step_no[0])
        if saved is None or saved.tier != "memory":
            raise RuntimeError(f"save({step_no[0]}) returned {saved!r}, not a snapshot in memory")
        ck.wait()

    ops = {"snapshot": (snapshot, False), "memcpy_2thread": (floors.memcpy, False),
           "memcpy_1thread": (floors.memcpy, True),
           "memcpy_shm_2thread": (lambda: np.copyto(shm_dst, floors.src), False),
           "memcpy_4k_2thread": (floors.memcpy_4k, False),
           "verified_copy_shm_2thread": (lambda: floors.verified_copy(shm_dst), False),
           "crc32c_2thread": (floors.crc32c, False)}
    idle: dict = {k: [] for k in ops}
    write = []
    for r in range(repeats):
        for name in rotated(list(ops), r):
            fn, alone = ops[name]
            idle[name].append(timed(fn, alone))
            if name == "snapshot":
                write.append(writes.get(step_no[0], "write_s"))
        rank_log(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms" for k, v in idle.items()))
    del shm_dst
    last = step_no[0]
    res["snapshot_rank_bytes"] = nbytes
    res["snapshot_bytes"] = rank_sum(nbytes)
    for name, samples in idle.items():
        res[f"idle_{name}"] = rank_max(samples)
    res["snapshot_write_s"] = rank_max(write)
    res["load_avg"]["after_idle"] = benchlib.load_average()

    # -- what a restore must give back; the same state durably --
    res["checksums"] = checksums(par.model, opt)
    res["step"] = last
    durable = ucp.Checkpointer(paths["durable"], model=par.model, optimizer=opt, options=lay.checkpoint_options(cfg))
    dist.barrier()
    t0 = time.perf_counter()
    saved = durable.save(last)
    dist.barrier()
    res["durable_save_s"] = time.perf_counter() - t0
    res["durable_path"] = str(saved.path)
    durable.close()
    rank_log(f"  durable save of step {last}: {res['durable_save_s']:.2f} s")
    dist.barrier()
    # Everything is measured: report, then wait to be SIGKILLed by the bench (a crash: no cleanup).
    # Should the bench itself die first, leave instead of lingering.
    parent = os.getppid()
    write_json(Path(paths["results"]) / f"rank{rank}.json", res)
    deadline = time.monotonic() + KILL_WAIT_S
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.2)
    os._exit(3)


# -- run 2: restart, restore from memory and from the durable checkpoint, next to the floors ---------


def restore(cfg_fields: dict, paths: dict, job: str, repeats: int, saved: dict, nbytes: int, threads: int) -> dict:
    import torch.distributed as dist

    import ucp
    from bench_reshard import build_target, check_sums, drop_cache, scramble
    from bench_save import PhaseTimer

    with benchlib.elastic_rank(threads):
        opts, model, opt = build_target(cfg_fields, LAYOUT, DST_SEED)
        rank = dist.get_rank()
        memory = ucp.Checkpointer(paths["snap"], model=model, optimizer=opt, options=opts,
                                  snapshot=ucp.SnapshotOptions(every=1, persist_every=None, job=job))
        durable = ucp.Checkpointer(paths["durable"], model=model, optimizer=opt, options=opts)
        out = {"rank": rank, "samples": {}, "sources": {}, "exact": True, "mismatch": [], "disk": {}, "phases": {},
               "floors": {}, "load_avg": {"start": benchlib.load_average()}}
        phases = PhaseTimer()

        def load(name: str, ck, want: str) -> None:
            scramble(model, opt)
            if name == "durable_cold":
                drop_cache(Path(paths["durable_path"]))
            io0 = benchlib.io_read_bytes()
            dist.barrier()
            phases.take()
            t = time.perf_counter()
            res = ck.load()
            dist.barrier()
            s = time.perf_counter() - t
            ph = phases.take()
            if res is None or res.step != saved["step"] or res.source != want:
                raise RuntimeError(f"{name}: load returned {res!r}; expected step {saved['step']} from {want!r}")
            out["samples"].setdefault(name, []).append(s)
            out["phases"].setdefault(name, []).append(ph)
            out["sources"][name] = res.source
            out["disk"][name] = max(out["disk"].get(name, 0), benchlib.io_read_bytes() - io0)
            check_sums(checksums(model, opt), saved["checksums"], name, out)
            if rank == 0:
                log(f"  {name:<14} {s:8.3f} s  source {res.source}  step {res.step}  "
                    f"rank0 read {res.nbytes / 1e6:.1f} MB  phases {ph}")

        floors = benchlib.Floors(nbytes)
        slot = shm_buffer(nbytes)  # what a restore from memory reads: a mapping of a tmpfs file
        slot[:] = 7
        scratch = Path(paths["floors"]) / f"rank{rank}.bin"

        def write_and_cold_read() -> None:
            out["floors"].setdefault("write_fsync_2thread", []).append(timed(lambda: floors.write_fsync(scratch)))
            floors.drop(scratch)
            out["floors"].setdefault("cold_read_2thread", []).append(timed(lambda: floors.cold_read(scratch)))
            out["disk"]["cold_read"] = max(out["disk"].get("cold_read", 0), floors.disk_read_bytes)

        def floor(name: str, fn, alone: bool = False) -> None:
            out["floors"].setdefault(name, []).append(timed(fn, alone))

        load("memory_first", memory, "memory")
        kinds = {"memory": lambda: load("memory", memory, "memory"),
                 "durable_cold": lambda: load("durable_cold", durable, "durable"),
                 "durable_warm": lambda: load("durable_warm", durable, "durable"),
                 "memcpy_2thread": lambda: floor("memcpy_2thread", floors.memcpy),
                 "memcpy_1thread": lambda: floor("memcpy_1thread", floors.memcpy, alone=True),
                 "crc32c_2thread": lambda: floor("crc32c_2thread", floors.crc32c),
                 "memcpy_4k_2thread": lambda: floor("memcpy_4k_2thread", floors.memcpy_4k),
                 "verified_copy_shm_2thread": lambda: floor("verified_copy_shm_2thread",
                                                            lambda: floors.verified_copy(src=slot)),
                 "write_fsync_cold_read": write_and_cold_read}
        for r in range(repeats):
            for name in rotated(list(kinds), r):
                kinds[name]()
        scratch.unlink()
        del slot
        out["load_avg"]["end"] = benchlib.load_average()
        memory.close()
        durable.close()
        dist.barrier()
        return out


# -- launcher ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = benchlib.parser(__doc__)
    benchlib.add_size_mb(ap, 1000.0, "both ranks")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps of each kind")
    ap.add_argument("--rounds", type=int, default=4,
                    help="the timed steps of the kinds alternate in this many rounds (must divide --steps)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first (>= 2: the slots)")
    benchlib.add_repeats(ap, 5, "rounds of idle snapshots, restores of each kind and floors")
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences of 32 tokens) of a training step")
    benchlib.add_work(ap)
    ap.add_argument("--dcp-dir", default=None,
                    help="where DCP writes (a fresh directory inside it, removed after; default /dev/shm: memory)")
    benchlib.add_keep(ap, "the work directory: the durable checkpoint, the ranks' reports")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: " + " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in QUICK.items())
                    + " unless given")
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    if args.size_mb <= 0 or args.steps < 1 or args.warmup < 2 or args.repeats < 1 or args.rounds < 1:
        ap.error("--size-mb must be > 0, --steps, --rounds and --repeats >= 1, --warmup >= 2")
    if args.steps % args.rounds:
        ap.error(f"--rounds {args.rounds} must divide --steps {args.steps}")
    if args.batch < NPROC or args.batch % NPROC:
        ap.error(f"--batch must be a positive multiple of {NPROC}")
    return args


def run_and_kill(paths: dict, *launch_args) -> tuple[dict, list[int]]:
    """Launch run 1; once every rank has reported, SIGKILL the ranks; return the reports and the pids."""
    from ucp.errors import UcpError
    from ucp.trainer.launch import launch

    results = Path(paths["results"])
    done = threading.Event()
    killed: list[int] = []

    def killer():
        files = [results / f"rank{r}.json" for r in range(NPROC)]
        while not done.is_set():
            if all(f.exists() for f in files):
                for f in files:
                    pid = json.loads(f.read_text())["pid"]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, name="killer", daemon=True)
    thread.start()
    # the kill is expected: the launcher's per-worker failure report would read as an error
    quiet = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        launch(NPROC, train_and_snapshot, *launch_args, run_id="ucp-bench-snapshot")
    except UcpError as e:
        if len(killed) != NPROC:
            raise
        log(f"  trainers killed (pids {killed}): {e}")
    else:
        raise RuntimeError("the trainers exited by themselves; they should have been killed")
    finally:
        quiet.setLevel(level)
        done.set()
        thread.join()
    return {r: json.loads((results / f"rank{r}.json").read_text()) for r in range(NPROC)}, killed


def loop_figures(out: dict, r0: dict, steps: int, rounds: int) -> None:
    """The training loop's figures of each kind into ``out`` (module docstring)."""
    per = steps // rounds
    none = r0["none_total"]
    out["step_ms_without"] = ms(median(none))
    out["step_ms_without_all"] = [ms(x) for x in none]
    for kind in KINDS[1:]:
        pre = "" if kind == "ucp" else f"{kind}_"
        steps_k = r0[f"{kind}_total"]
        diffs = [median(steps_k[i:i + per]) - median(none[i:i + per]) for i in range(0, steps, per)]
        stall = median(steps_k) - median(none)
        out[f"{pre}step_ms" if pre else "step_ms_with"] = ms(median(steps_k))
        out[f"{pre}step_ms_all" if pre else "step_ms_with_all"] = [ms(x) for x in steps_k]
        out[f"{pre}stall_ms"] = ms(stall)
        out[f"{pre}stall_ms_paired"] = ms(median(diffs))
        out[f"{pre}stall_ms_rounds"] = [ms(x) for x in diffs]
        out[f"{pre}stall_ms_spread"] = summary(diffs, 1e3, 2)
        out[f"{pre}stall_fraction"] = round(stall / median(none), 4)
        out[f"{pre}save_call_ms"] = ms(median(r0[f"{kind}_save"]))
    out["hook_wait_ms"] = ms(median(r0["ucp_hook_wait"]))
    out["hook_wait_ms_all"] = [ms(x) for x in r0["ucp_hook_wait"]]
    out["snapshot_write_in_loop_ms"] = taken_ms(median(r0["write_in_loop"]))
    for kind in ("dcp_default", "dcp_best"):
        for f in ("state_dict", "upload_wait", "async_save"):
            out[f"{kind}_{f}_ms"] = ms(median(r0[f"{kind}_{f}"]))
    out["dcp_best_staging_wait_ms"] = ms(median(r0["dcp_best_hook_wait"]))
    out["dcp_configs"] = r0["dcp_configs"]


def idle_figures(out: dict, r0: dict) -> dict:
    """The idle snapshots' and the floors' figures into ``out``; returns the floors (GB/s)."""
    total, rank_bytes = r0["snapshot_bytes"], r0["snapshot_rank_bytes"]
    snap = r0["idle_snapshot"]
    out["snapshot_s"] = round(median(snap), 4)
    out["snapshot_gbps"] = gbps(total, median(snap))
    out["snapshot_gbps_spread"] = summary([total / 1e9 / s for s in snap], digits=3)
    out["snapshot_all_s"] = [round(x, 4) for x in snap]
    out["snapshot_write_s"] = None if median(r0["snapshot_write_s"]) < 0 else round(median(r0["snapshot_write_s"]), 4)
    out["snapshot_write_gbps"] = gbps(total, out["snapshot_write_s"])
    floors = {}
    for name in ("memcpy_1thread", "memcpy_2thread", "memcpy_shm_2thread", "memcpy_4k_2thread",
                 "verified_copy_shm_2thread", "crc32c_2thread"):
        nb = rank_bytes if name.endswith("1thread") else total
        xs = r0[f"idle_{name}"]
        floors[name] = gbps(nb, median(xs))
        out[f"{name}_gbps_spread"] = summary([nb / 1e9 / s for s in xs], digits=3)
    floors["crc32c_per_core"] = gbps(rank_bytes, median(r0["idle_crc32c_2thread"]))
    out["floors_gbps"] = floors
    out["memcpy_gbps"] = floors["memcpy_2thread"]  # the throughput target's reference
    out["memcpy_shm_gbps"] = floors["memcpy_shm_2thread"]
    out["snapshot_over_memcpy"] = ratio(out["snapshot_gbps"], floors["memcpy_2thread"])
    return floors


def restore_figures(out: dict, ranks: dict, total: int, rank_bytes: int) -> dict:
    """The restores' and their floors' figures into ``out``; returns the floors (GB/s)."""
    rr = ranks[0]
    out["restore_source_memory"] = rr["sources"]["memory"]
    out["restore_source_durable"] = rr["sources"]["durable_cold"]
    out["restore_memory_first_s"] = round(rr["samples"]["memory_first"][0], 4)
    for name in ("memory", "durable_cold", "durable_warm"):
        samples = rr["samples"][name]
        benchlib.median_of(out, f"restore_{name}", samples, total)
        order = sorted(range(len(samples)), key=samples.__getitem__)
        out[f"restore_{name}_phases"] = rr["phases"][name][order[(len(order) - 1) // 2]]  # the median load's
    out["restore_durable_cold_disk_read_gb"] = round(max(r["disk"]["durable_cold"] for r in ranks.values()) / 1e9, 4)
    # every rank timed each floor between the same barriers: the slower rank's time is the floor's
    floor_s = {name: [max(r["floors"][name][i] for r in ranks.values()) for i in range(len(xs))]
               for name, xs in rr["floors"].items()}
    floors = {}
    for name, xs in sorted(floor_s.items()):
        nb = rank_bytes if name.endswith("1thread") else total
        floors[name] = gbps(nb, median(xs))
        out[f"restore_floor_{name}_gbps_spread"] = summary([nb / 1e9 / s for s in xs], digits=3)
    floors["crc32c_per_core"] = gbps(rank_bytes, median(floor_s["crc32c_2thread"]))
    out["restore_floors_gbps"] = floors
    out["cold_read_disk_gb"] = round(max(r["disk"]["cold_read"] for r in ranks.values()) / 1e9, 4)
    return floors


def bench(args, work: Path, dcp_dir: Path, job: str) -> dict:
    from ucp.snapshot import discovery
    from ucp.trainer.launch import launch

    t_all = time.perf_counter()
    load_avg = {"start": benchlib.load_average()}
    cfg = model_config(args.size_mb, args.batch)
    threads = max(1, (os.cpu_count() or 1) // NPROC)
    paths = {"snap": str(work / "snap"), "durable": str(work / "durable"), "dcp": str(dcp_dir),
             "results": str(work / "results"), "floors": str(work / "floors")}
    for p in ("results", "floors"):
        Path(paths[p]).mkdir()
    log(f"run 1: {NPROC} ranks, layout {LAYOUT}, config {cfg}, job {job}, DCP writes to {dcp_dir}")
    reports, killed = run_and_kill(paths, cfg, paths, job, args.steps, args.rounds, args.warmup, args.repeats,
                                   threads)
    r0 = reports[0]
    load_avg.update({f"run1_{k}": v for k, v in r0["load_avg"].items()})
    info = discovery.read_info(job)
    survived = info is not None and discovery.is_alive(info)
    if not survived:
        raise RuntimeError(f"the agent of job {job} did not survive the trainers' kill")
    log(f"  the agent (pid {info.pid}) survived; state {r0['state_bytes'] / 1e9:.3f} GB")

    log(f"run 2: restart on {NPROC} ranks from seed {DST_SEED}, restore")
    paths["durable_path"] = r0["durable_path"]
    saved = {"step": r0["step"], "checksums": r0["checksums"]}
    ranks = launch(NPROC, restore, cfg, paths, job, args.repeats, saved, r0["snapshot_rank_bytes"], threads,
                   run_id="ucp-bench-snapshot-restore")
    load_avg.update({f"run2_{k}": v for k, v in ranks[0]["load_avg"].items()})

    total = r0["state_bytes"]
    out = {
        "bench": "ucp_snapshot_memory_tier", "nproc": NPROC, "layout": LAYOUT, "config": cfg, "threads": threads,
        "cpus": os.cpu_count(), "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
        "repeats": args.repeats, "state_gb": round(total / 1e9, 4), "snapshot_gb": round(r0["snapshot_bytes"] / 1e9, 4),
    }
    loop_figures(out, r0, args.steps, args.rounds)
    floors = idle_figures(out, r0)
    out["durable_save_s"] = round(r0["durable_save_s"], 3)
    out["trainers_killed"] = len(killed)
    out["agent_survived_kill"] = survived
    out["restored_step"] = r0["step"]
    rfloors = restore_figures(out, ranks, total, r0["snapshot_rank_bytes"])
    mem, warm, cold = (out[f"restore_{k}_gbps"] for k in ("memory", "durable_warm", "durable_cold"))
    out["speedup_memory_vs_durable_cold"] = ratio(out["restore_durable_cold_s"], out["restore_memory_s"])
    out["speedup_memory_vs_durable_warm"] = ratio(out["restore_durable_warm_s"], out["restore_memory_s"])
    out["ucp_over_floor"] = {
        "snapshot_vs_memcpy_1thread": ratio(out["snapshot_gbps"], floors["memcpy_1thread"]),
        "snapshot_vs_memcpy_2thread": ratio(out["snapshot_gbps"], floors["memcpy_2thread"]),
        "snapshot_vs_memcpy_shm_2thread": ratio(out["snapshot_gbps"], floors["memcpy_shm_2thread"]),
        "snapshot_vs_crc32c_2thread": ratio(out["snapshot_gbps"], floors["crc32c_2thread"]),
        "snapshot_vs_memcpy_4k_2thread": ratio(out["snapshot_gbps"], floors["memcpy_4k_2thread"]),
        "snapshot_vs_verified_copy_shm_2thread": ratio(out["snapshot_gbps"], floors["verified_copy_shm_2thread"]),
        "restore_memory_vs_memcpy_1thread": ratio(mem, rfloors["memcpy_1thread"]),
        "restore_memory_vs_memcpy_2thread": ratio(mem, rfloors["memcpy_2thread"]),
        "restore_memory_vs_crc32c_2thread": ratio(mem, rfloors["crc32c_2thread"]),
        "restore_memory_vs_memcpy_4k_2thread": ratio(mem, rfloors["memcpy_4k_2thread"]),
        "restore_memory_vs_verified_copy_shm_2thread": ratio(mem, rfloors["verified_copy_shm_2thread"]),
        "restore_durable_warm_vs_memcpy_2thread": ratio(warm, rfloors["memcpy_2thread"]),
        "restore_durable_cold_vs_cold_read_2thread": ratio(cold, rfloors["cold_read_2thread"]),
        "durable_save_vs_write_fsync_2thread": ratio(gbps(total, r0["durable_save_s"]), rfloors["write_fsync_2thread"]),
    }
    out["stall_over_dcp_best"] = ratio(out["stall_ms"], out["dcp_best_stall_ms"]) \
        if (out["dcp_best_stall_ms"] or 0) > 0 else None
    out["bit_exact"] = all(r["exact"] for r in ranks.values())
    mismatch = [m for r in ranks.values() for m in r["mismatch"]]
    if mismatch:
        out["mismatch"] = mismatch
    out["target_throughput_met"] = out["snapshot_gbps"] >= 0.6 * floors["memcpy_2thread"]
    out["target_restore_met"] = mem >= 0.5 * rfloors["memcpy_2thread"] and mem >= 2 * warm
    out["target_stall_met"] = out["stall_ms"] <= out["dcp_best_stall_ms"]
    load_avg["end"] = benchlib.load_average()
    out["load_avg"] = load_avg
    return benchlib.versions(out, t_all)


def stop_agent(job: str) -> list[str]:
    """Stop the job's agent (removing its memory); returns the names of any segments still left (removed
    too)."""
    from ucp.snapshot import client, shm

    try:
        log(f"  {client.stop(job)}")
    except Exception as e:
        log(f"stopping the agent of job {job} failed: {type(e).__name__}: {e}")
    left = shm.listing(shm.prefix(job))
    for name in left:
        shm.unlink(name)
    return left


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a terminated bench still stops its agent
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    job = f"benchsnap-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    dcp_dir = Path(tempfile.mkdtemp(prefix="ucp-bench-snapshot-dcp.", dir=args.dcp_dir or "/dev/shm"))
    with benchlib.workdir(args.work, "ucp_bench_snapshot_", log, args.keep) as work:
        try:
            out = benchlib.attempt(bench, args, work, dcp_dir, job, log=log)
        finally:
            left = stop_agent(job)
            shutil.rmtree(dcp_dir, ignore_errors=True)
    if left:
        log(f"FAILED: the agent left {len(left)} segment(s) behind (removed now): {left}")
        if isinstance(out, dict):
            out = 1
    if isinstance(out, dict):
        out["shm_left"] = 0
    return benchlib.finish(out)


if __name__ == "__main__":
    sys.exit(main())
