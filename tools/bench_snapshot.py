#!/usr/bin/env python
"""The memory tier of ucp: per-step stall of snapshots, their throughput, and restore after a crash.

The state: the reference GPT (``ucp.trainer``) widened so that parameters + AdamW ``exp_avg`` +
``exp_avg_sq`` come to about ``--size-mb`` MB (10^6 bytes) of fp32 (``tools/bench_convert.py``'s
sizing), on 2 local ranks (gloo, torch's elastic launcher) as ``TrainLayout(dp=2, zero=3)`` (FSDP2:
each rank holds half of the state). Each rank uses ``cpu_count // 2`` intra-op threads.

Run 1 (the trainers; rank 0's figures, every per-step time the slower rank's):

* **step times.** The reference trainer's step (``ucp.trainer.train.train_steps``: forward,
  backward, ``optimizer.step()``, the loss all-reduce), without any checkpointing and with
  ``Checkpointer(snapshot=SnapshotOptions(every=1, persist_every=None)).save(step)`` after each
  step. First ``--warmup`` untimed steps of each kind (the first two snapshots allocate the agent's
  two slots); then ``--rounds`` rounds, each of ``--steps / --rounds`` steps without, then as many
  with snapshots (the two kinds alternate, so that a slow phase of the machine does not fall on one
  kind only). Each series starts with an untimed lead-in step of its kind, so every timed step with
  snapshots overlaps exactly one background copy (the previous step's) and makes one ``save``; after
  each series with snapshots, ``wait()`` (untimed). A step's time runs from its start to the return
  of its ``save``, so it holds ``save``'s synchronous part (capture; it also joins the previous
  snapshot's thread), the wait of the optimizer's pre-step hook for the previous copy (also timed
  alone, ``hook_wait_ms``: a hook registered before ucp's and one after it), and whatever the
  background copy takes from the step by sharing its cores. ``stall_ms`` = median step with
  snapshots - median step without (the target's figure); ``stall_ms_paired`` = the median over the
  rounds of each round's difference of medians (less sensitive to a machine whose speed drifts).
  On a shared or virtual machine a step's time varies by hundreds of ms from step to step
  (``step_ms_*_all`` show the spread): use more ``--steps`` before drawing conclusions from the stall.
* **snapshot throughput.** With the trainers idle, ``--repeats`` times: barrier, ``save(step)``,
  ``wait()`` (the background copy, checksums and the cross-rank cut: a complete snapshot), on each
  rank; ``snapshot_gbps`` = the bytes of both ranks' snapshots / the slower rank's best time. The
  background thread's ``MemoryTier.write`` (copy + CRC-32C + the agent's begin/commit) is also
  timed alone, and its checksum part (``snapshot_checksum_s``), idle and during training.
* **memcpy.** On both ranks at once, ``--repeats`` times: ``dst.copy_(src)`` of a uint8 buffer of
  that rank's snapshot size into a preallocated, already touched destination; ``memcpy_gbps`` = both
  ranks' bytes / the slower rank's best time (the target's reference). ``memcpy_shm_gbps``: the same
  into a mapping of a (at once unlinked) tmpfs file, the kind of memory the agent's slots are.
* **DCP.** ``--repeats`` times after one untimed call: ``get_model_state_dict`` +
  ``get_optimizer_state_dict``, then ``dcp.async_save`` (default stager and thread executor, to
  ``--work``); ``dcp_async_block_ms`` is the median time until ``async_save`` returns, i.e. until
  the state may change again (its staging copy); the state-dict calls are reported apart
  (``dcp_state_dict_ms``). Each future is waited for before the next call.
* the state after the last snapshot is checksummed (the full tensors of a few parameters and of
  the embedding's AdamW moments, AdamW's step count), and saved durably with a plain
  ``Checkpointer`` to another root (fsynced).

Then the trainers are SIGKILLed from outside (the launcher's workers; the agent, in a session of its
own, survives) and run 2 starts 2 new ranks that build the same config from another seed, overwrite
their state with a constant before each load, and time (barrier, load, barrier):

* ``restore_memory_first_s``: the first ``Checkpointer(snapshot=...).load()`` after the restart
  (it connects to the agent); then ``--repeats`` times each of: from memory (``source ==
  "memory"``), from the durable checkpoint cold (``os.sync()``, then rank 0 drops the page cache of
  its files with ``posix_fadvise(DONTNEED)``) and warm (its pages cached). Figures are the best of
  ``--repeats``. After every load the checksums must equal the saved ones (``bit_exact``).
  ``restore_*_phases`` break the best load down by ucp's collective phases (``memory`` and
  ``memory-manifest``: the agents' headers gathered and made a manifest; ``find``, ``manifest``;
  then ``targets``, ``read``, ``restore``), timed by ``tools/bench_save.py``'s ``PhaseTimer``.

Targets (issue): ``stall_ms`` <= 1/3 of ``dcp_async_block_ms``; ``snapshot_gbps`` >= 50% of
``memcpy_gbps``; ``restore_memory_s`` >= 10x faster than ``restore_durable_cold_s``. On a machine
with fewer cores than ranks x 2 the background copy competes with the training step for the CPU,
so the stall approaches the copy time; that is part of what is measured.

The agent is stopped (its shared memory removed) at the end, also on failure; a leftover segment
of the bench's job fails the run. Output: exactly one JSON line on stdout; progress goes to stderr;
a failure prints nothing on stdout and exits non-zero.

    python tools/bench_snapshot.py [--size-mb 1000] [--steps 16] [--rounds 8] [--warmup 2] [--repeats 5]
                                   [--batch 8] [--work DIR] [--keep]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import benchlib
from benchlib import median, ms

LAYOUT = {"dp": 2, "zero": 3}
NPROC = 2
SRC_SEED = 1234
DST_SEED = 99
BYTES_PER_PARAM = 12  # fp32 parameter + AdamW exp_avg + exp_avg_sq
KILL_WAIT_S = 300  # how long a trainer that has reported waits to be killed
log = benchlib.logger("bench_snapshot")


def model_config(size_mb: float, batch: int) -> dict:
    """``GPTConfig`` fields of a reference GPT whose fp32 params + AdamW state are ~``size_mb`` MB."""
    from bench_convert import model_config as sized

    return sized(size_mb, BYTES_PER_PARAM, global_batch=batch)


def taken_ms(x):
    """Milliseconds of a figure ``WriteTimer`` may have failed to take (negative: None)."""
    return None if x is None or x < 0 else ms(x)


def taken_s(x):
    """Seconds of a figure ``WriteTimer`` may have failed to take (negative: None)."""
    return None if x is None or x < 0 else round(x, 4)


def gbps(nbytes: float, seconds) -> float | None:
    return None if seconds is None or seconds <= 0 else round(nbytes / 1e9 / seconds, 3)


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


class WriteTimer:
    """Times ``MemoryTier.write`` (the snapshot's background copy + checksums + agent requests) and its
    checksum callback (its last positional argument when that is callable), per step, by wrapping the
    method (ucp itself is untouched). A figure it could not take reads -1 (reported as null)."""

    def __init__(self):
        from ucp.snapshot.memory import MemoryTier

        self.by_step: dict = {}
        orig = MemoryTier.write
        timer = self

        def write(self_, step, *args, **kwargs):
            rec = timer.by_step[step] = {"checksum_s": -1.0, "write_s": -1.0}
            if args and callable(args[-1]):
                sums = args[-1]

                def timed_sums(views):
                    t = time.perf_counter()
                    try:
                        return sums(views)
                    finally:
                        rec["checksum_s"] = max(rec["checksum_s"], 0.0) + time.perf_counter() - t

                args = (*args[:-1], timed_sums)
            t0 = time.perf_counter()
            try:
                return orig(self_, step, *args, **kwargs)
            finally:
                rec["write_s"] = time.perf_counter() - t0

        MemoryTier.write = write

    def get(self, step: int, what: str) -> float:
        return self.by_step.get(step, {}).get(what, -1.0)


def shm_buffer(nbytes: int):
    """A uint8 tensor over a fresh mapping of a tmpfs file, as the agent's slots are; the file is
    unlinked at once, so nothing is left behind whatever happens (the pages go with the last view)."""
    import mmap

    import torch

    from ucp.snapshot.shm import SHM_DIR

    path = SHM_DIR / f"ucp-bench-snapshot.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.unlink(path)
        os.ftruncate(fd, nbytes)
        buf = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return torch.frombuffer(buf, dtype=torch.uint8)


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


# -- run 1: train with and without snapshots, measure, then wait to be killed -----------------------


def train_and_snapshot(cfg_fields: dict, paths: dict, job: str, steps: int, rounds: int, warmup: int,
                       repeats: int, threads: int) -> None:
    benchlib.init_rank(threads)
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

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
    writes = WriteTimer()
    marks = {"before": 0.0, "after": 0.0}
    opt.register_step_pre_hook(lambda *a, **k: marks.__setitem__("before", time.perf_counter()))
    after_hook = [None]
    step_no = [0]
    steps_per_round = steps // rounds

    def one_step(ck=None) -> dict:
        step_no[0] += 1
        i = step_no[0]
        marks["before"] = marks["after"] = 0.0
        t0 = time.perf_counter()
        train_steps(cfg, lay, par, opt, SRC_SEED, [i])
        t1 = time.perf_counter()
        if ck is not None:
            saved = ck.save(i)
            if saved is None or saved.tier != "memory":  # the memory tier was lost: ucp warned
                raise RuntimeError(f"save({i}) returned {saved!r}, not a snapshot in memory")
            if after_hook[0] is None:  # ucp's pre-step hook exists from the first snapshot on: time its wait
                after_hook[0] = opt.register_step_pre_hook(
                    lambda *a, **k: marks.__setitem__("after", time.perf_counter()))
        t2 = time.perf_counter()
        wait = marks["after"] - marks["before"] if marks["after"] else 0.0
        return {"step": i, "total": t2 - t0, "save": t2 - t1, "hook_wait": wait}

    def series(ck, name: str, n: int, timed: bool = True) -> list[dict]:
        out = []
        for _ in range(n):
            rec = one_step(ck)
            out.append(rec)
            rank_log(f"  {name:<7} step {rec['step']:3d} {rec['total'] * 1e3:9.1f} ms  save {rec['save'] * 1e3:7.1f} ms"
                     f"  hook wait {rec['hook_wait'] * 1e3:7.1f} ms" + ("" if timed else "  (untimed)"))
        return out if timed else []

    res: dict = {"rank": rank, "pid": os.getpid()}
    ck = ucp.Checkpointer(paths["snap"], model=par.model, optimizer=opt, options=lay.checkpoint_options(cfg),
                          snapshot=ucp.SnapshotOptions(every=1, persist_every=None, job=job))
    rank_log(f"warm-up: {warmup} steps without snapshots, {warmup} with (the first two allocate the slots)")
    series(None, "without", warmup, timed=False)
    series(ck, "with", warmup, timed=False)
    ck.wait()
    without, with_ = [], []
    for r in range(rounds):
        # Each series starts with an untimed lead-in step: in the timed steps with snapshots, every
        # step then overlaps exactly one copy (the previous step's) and makes one save.
        rank_log(f"round {r + 1}/{rounds}: {steps_per_round} steps without snapshots, then with one every step")
        series(None, "without", 1, timed=False)
        without += series(None, "without", steps_per_round)
        series(ck, "with", 1, timed=False)
        with_ += series(ck, "with", steps_per_round)
        ck.wait()
    total = state_bytes(par.model, opt)
    res["state_bytes"] = total
    res["step_without"] = rank_max([r["total"] for r in without])
    res["step_with"] = rank_max([r["total"] for r in with_])
    res["save_call_with"] = rank_max([r["save"] for r in with_])
    res["hook_wait_with"] = rank_max([r["hook_wait"] for r in with_])
    res["write_in_loop"] = rank_max([writes.get(r["step"], "write_s") for r in with_])
    res["checksum_in_loop"] = rank_max([writes.get(r["step"], "checksum_s") for r in with_])

    # -- snapshot throughput, trainers idle --
    rank_log("snapshots, trainers idle")
    snap, write, sums, call = [], [], [], []
    nbytes = 0
    for _ in range(repeats):
        step_no[0] += 1
        dist.barrier()
        t0 = time.perf_counter()
        saved = ck.save(step_no[0])
        t1 = time.perf_counter()
        ck.wait()
        t2 = time.perf_counter()
        dist.barrier()
        nbytes = saved.nbytes
        if saved.tier != "memory":
            raise RuntimeError(f"save({step_no[0]}) went to the {saved.tier!r} tier, not memory")
        snap.append(t2 - t0)
        call.append(t1 - t0)
        write.append(writes.get(step_no[0], "write_s"))
        sums.append(writes.get(step_no[0], "checksum_s"))
        rank_log(f"  snapshot {step_no[0]}: save+wait {(t2 - t0) * 1e3:8.1f} ms (save {(t1 - t0) * 1e3:.1f}, "
                 f"write {write[-1] * 1e3:.1f}, checksums {sums[-1] * 1e3:.1f}) {nbytes / 1e6:.1f} MB")
    last = step_no[0]
    res["snapshot_bytes"] = rank_sum(nbytes)
    res["snapshot_rank_bytes"] = nbytes
    res["snapshot_s"] = rank_max(snap)
    res["snapshot_call_s"] = rank_max(call)
    res["snapshot_write_s"] = rank_max(write)
    res["snapshot_checksum_s"] = rank_max(sums)

    # -- memcpy of as many bytes, both ranks at once: into private memory, and into a tmpfs mapping --
    rank_log("memcpy")
    src = torch.empty(nbytes, dtype=torch.uint8).fill_(7)
    for kind, dst in (("memcpy_s", torch.empty_like(src)), ("memcpy_shm_s", shm_buffer(nbytes))):
        dst.fill_(0)  # preallocated and touched, like the agent's reused slots
        copies = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dst.copy_(src)
            copies.append(time.perf_counter() - t0)
            dist.barrier()
        del dst
        res[kind] = rank_max(copies)
        rank_log(f"  {kind[:-2]} {nbytes / 1e6:.1f} MB per rank: best {min(res[kind]) * 1e3:.1f} ms")
    del src

    # -- DCP async_save of the same state --
    rank_log("dcp.async_save")
    sd_s, block_s, done_s = [], [], []
    for r in range(repeats + 1):
        target = Path(paths["dcp"]) / f"r{r}"
        dist.barrier()
        t0 = time.perf_counter()
        state = {"model": get_model_state_dict(par.model), "optim": get_optimizer_state_dict(par.model, opt)}
        t1 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=target)
        t2 = time.perf_counter()
        fut.result()
        t3 = time.perf_counter()
        del state, fut
        dist.barrier()
        if rank == 0:
            shutil.rmtree(target, ignore_errors=True)
        if r == 0:  # untimed: first-call costs
            continue
        sd_s.append(t1 - t0)
        block_s.append(t2 - t1)
        done_s.append(t3 - t1)
    res["dcp_state_dict_s"] = rank_max(sd_s)
    res["dcp_block_s"] = rank_max(block_s)
    res["dcp_done_s"] = rank_max(done_s)
    rank_log(f"  async_save blocked {[round(x * 1e3, 1) for x in res['dcp_block_s']]} ms, "
             f"done after {[round(x, 2) for x in res['dcp_done_s']]} s")

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


# -- run 2: restart, restore from memory and from the durable checkpoint ----------------------------


def restore(cfg_fields: dict, paths: dict, job: str, repeats: int, saved: dict, threads: int) -> dict:
    import torch.distributed as dist

    import ucp
    from bench_reshard import build_target, check_sums, drop_cache, io_read_bytes, scramble
    from bench_save import PhaseTimer

    with benchlib.elastic_rank(threads):
        opts, model, opt = build_target(cfg_fields, LAYOUT, DST_SEED)
        rank = dist.get_rank()
        memory = ucp.Checkpointer(paths["snap"], model=model, optimizer=opt, options=opts,
                                  snapshot=ucp.SnapshotOptions(every=1, persist_every=None, job=job))
        durable = ucp.Checkpointer(paths["durable"], model=model, optimizer=opt, options=opts)
        out = {"rank": rank, "samples": {}, "sources": {}, "exact": True, "mismatch": [], "disk": {}, "phases": {}}
        phases = PhaseTimer()

        def timed(name: str, ck, want: str) -> None:
            scramble(model, opt)
            if name == "durable_cold":
                drop_cache(Path(paths["durable_path"]))
            io0 = io_read_bytes()
            dist.barrier()
            phases.take()
            t = time.perf_counter()
            res = ck.load()
            dist.barrier()
            s = time.perf_counter() - t
            ph = phases.take()
            if res is None or res.step != saved["step"] or res.source != want:
                raise RuntimeError(f"{name}: load returned {res!r}; expected step {saved['step']} from {want!r}")
            if s <= min(out["samples"].get(name, [s])):
                out["phases"][name] = ph
            out["samples"].setdefault(name, []).append(s)
            out["sources"][name] = res.source
            out["disk"][name] = io_read_bytes() - io0
            check_sums(checksums(model, opt), saved["checksums"], name, out)
            if rank == 0:
                log(f"  {name:<14} {s:8.3f} s  source {res.source}  step {res.step}  "
                    f"rank0 read {res.nbytes / 1e6:.1f} MB  phases {ph}")

        timed("memory_first", memory, "memory")
        for _ in range(repeats):
            timed("memory", memory, "memory")
            timed("durable_cold", durable, "durable")
            timed("durable_warm", durable, "durable")
        memory.close()
        durable.close()
        dist.barrier()
        return out


# -- launcher ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = benchlib.parser(__doc__)
    benchlib.add_size_mb(ap, 1000.0, "both ranks")
    ap.add_argument("--steps", type=int, default=16, help="timed training steps with and without snapshots, each")
    ap.add_argument("--rounds", type=int, default=8,
                    help="the timed steps alternate between the two kinds in this many rounds (must divide --steps)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps of each kind first (>= 2: the slots)")
    benchlib.add_repeats(ap, 5, "idle snapshots, memcpys, DCP saves and loads of each kind")
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences of 32 tokens) of a training step")
    benchlib.add_work(ap)
    benchlib.add_keep(ap, "the work directory: the durable checkpoint, the ranks' reports")
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


def bench(args, work: Path, job: str) -> dict:
    from ucp.snapshot import discovery
    from ucp.trainer.launch import launch

    t_all = time.perf_counter()
    cfg = model_config(args.size_mb, args.batch)
    threads = max(1, (os.cpu_count() or 1) // NPROC)
    paths = {"snap": str(work / "snap"), "durable": str(work / "durable"), "dcp": str(work / "dcp"),
             "results": str(work / "results")}
    Path(paths["results"]).mkdir()
    log(f"run 1: {NPROC} ranks, layout {LAYOUT}, config {cfg}, job {job}")
    reports, killed = run_and_kill(paths, cfg, paths, job, args.steps, args.rounds, args.warmup, args.repeats,
                                   threads)
    r0 = reports[0]
    info = discovery.read_info(job)
    survived = info is not None and discovery.is_alive(info)
    if not survived:
        raise RuntimeError(f"the agent of job {job} did not survive the trainers' kill")
    log(f"  the agent (pid {info.pid}) survived; state {r0['state_bytes'] / 1e9:.3f} GB")

    log(f"run 2: restart on {NPROC} ranks from seed {DST_SEED}, restore")
    paths["durable_path"] = r0["durable_path"]
    saved = {"step": r0["step"], "checksums": r0["checksums"]}
    ranks = launch(NPROC, restore, cfg, paths, job, args.repeats, saved, threads, run_id="ucp-bench-snapshot-restore")
    rr = ranks[0]

    total = r0["state_bytes"]
    snap_bytes = r0["snapshot_bytes"]
    without, with_ = median(r0["step_without"]), median(r0["step_with"])
    stall = with_ - without
    per = args.steps // args.rounds
    paired = median([median(r0["step_with"][i:i + per]) - median(r0["step_without"][i:i + per])
                     for i in range(0, args.steps, per)])
    snap_s, memcpy_s = min(r0["snapshot_s"]), min(r0["memcpy_s"])
    dcp_block = median(r0["dcp_block_s"])
    best = {k: min(v) for k, v in rr["samples"].items()}
    out = {
        "bench": "ucp_snapshot_memory_tier", "nproc": NPROC, "layout": LAYOUT, "config": cfg, "threads": threads,
        "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup, "repeats": args.repeats,
        "state_gb": round(total / 1e9, 4), "snapshot_gb": round(snap_bytes / 1e9, 4),
        # per-step stall
        "step_ms_without": ms(without), "step_ms_with": ms(with_), "stall_ms": ms(stall),
        "stall_ms_paired": ms(paired),
        "stall_fraction": round(stall / without, 4),
        "step_ms_without_all": [ms(x) for x in r0["step_without"]],
        "step_ms_with_all": [ms(x) for x in r0["step_with"]],
        "save_call_ms": ms(median(r0["save_call_with"])), "hook_wait_ms": ms(median(r0["hook_wait_with"])),
        "hook_wait_ms_all": [ms(x) for x in r0["hook_wait_with"]],
        "snapshot_write_in_loop_ms": taken_ms(median(r0["write_in_loop"])),
        "snapshot_checksum_in_loop_ms": taken_ms(median(r0["checksum_in_loop"])),
        # throughput, trainers idle
        "snapshot_s": round(snap_s, 4), "snapshot_gbps": round(snap_bytes / 1e9 / snap_s, 3),
        "snapshot_all_s": [round(x, 4) for x in r0["snapshot_s"]],
        "snapshot_save_call_ms": ms(min(r0["snapshot_call_s"])),
        "snapshot_write_s": taken_s(min(r0["snapshot_write_s"])),
        "snapshot_write_gbps": gbps(snap_bytes, taken_s(min(r0["snapshot_write_s"]))),
        "snapshot_checksum_s": taken_s(min(r0["snapshot_checksum_s"])),
        "memcpy_s": round(memcpy_s, 4), "memcpy_gbps": round(snap_bytes / 1e9 / memcpy_s, 3),
        "memcpy_all_s": [round(x, 4) for x in r0["memcpy_s"]],
        "memcpy_shm_s": round(min(r0["memcpy_shm_s"]), 4),
        "memcpy_shm_gbps": round(snap_bytes / 1e9 / min(r0["memcpy_shm_s"]), 3),
        # DCP
        "dcp_async_block_ms": ms(dcp_block), "dcp_async_block_all_ms": [ms(x) for x in r0["dcp_block_s"]],
        "dcp_state_dict_ms": ms(median(r0["dcp_state_dict_s"])),
        "dcp_async_done_s": round(median(r0["dcp_done_s"]), 3),
        "durable_save_s": round(r0["durable_save_s"], 3),
        # restore after the kill
        "trainers_killed": len(killed), "agent_survived_kill": survived, "restored_step": r0["step"],
        "restore_source_memory": rr["sources"]["memory"], "restore_source_durable": rr["sources"]["durable_cold"],
        "restore_memory_first_s": round(best["memory_first"], 4),
    }
    for name in ("memory", "durable_cold", "durable_warm"):
        benchlib.best_of(out, f"restore_{name}", rr["samples"][name], total)
        out[f"restore_{name}_phases"] = rr["phases"][name]
    out["restore_durable_cold_disk_read_gb"] = round(max(ranks[r]["disk"]["durable_cold"] for r in ranks) / 1e9, 4)
    out["speedup_memory_vs_durable_cold"] = round(best["durable_cold"] / best["memory"], 3)
    out["speedup_memory_vs_durable_warm"] = round(best["durable_warm"] / best["memory"], 3)
    out["stall_over_dcp_block"] = round(stall / dcp_block, 4)
    out["snapshot_over_memcpy"] = round(out["snapshot_gbps"] / out["memcpy_gbps"], 4)
    out["bit_exact"] = rr["exact"]
    if rr["mismatch"]:
        out["mismatch"] = rr["mismatch"]
    out["target_stall_met"] = stall <= dcp_block / 3
    out["target_throughput_met"] = out["snapshot_gbps"] >= 0.5 * out["memcpy_gbps"]
    out["target_restore_met"] = best["durable_cold"] >= 10 * best["memory"]
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
    with benchlib.workdir(args.work, "ucp_bench_snapshot_", log, args.keep) as work:
        try:
            out = benchlib.attempt(bench, args, work, job, log=log)
        finally:
            left = stop_agent(job)
    if left:
        log(f"FAILED: the agent left {len(left)} segment(s) behind (removed now): {left}")
        if isinstance(out, dict):
            out = 1
    if isinstance(out, dict):
        out["shm_left"] = 0
    return benchlib.finish(out)


if __name__ == "__main__":
    sys.exit(main())
