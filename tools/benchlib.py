"""What the benchmark scripts ``tools/bench_*.py`` (and ``tools/chaos.py``) share: their log line, the
launch of a local gloo world, the start of a rank under torch's elastic launcher, the common flags,
the work directory, the run-and-report frame of ``main``, the figures of the JSON line (medians with
their spread), PyTorch DCP's ``async_save`` as a training loop calls it (:class:`DcpSaver`) and the
floors of one pass over the bytes (:class:`Floors`).

The scripts are scripts, not a package: ``python tools/bench_x.py`` puts ``tools/`` first on
``sys.path``, so ``import benchlib`` (and ``from bench_reshard import ...``) find this folder's files;
processes started with the ``spawn`` method inherit that path. Importing this module also puts the
repository root of *this* checkout (``ROOT``) first on ``sys.path``, so that ``import ucp`` gives the
package next to the script (``PYTHONPATH`` and an editable install of another checkout included).

Every script writes exactly one JSON line on stdout (:func:`emit`, by the launching process only;
ranks write to stderr) and its progress on stderr (:func:`logger`).
"""

from __future__ import annotations

import argparse
import json
import os
import queue as queue_mod
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path[:1] != [str(ROOT)]:
    sys.path.insert(0, str(ROOT))


# -- progress ---------------------------------------------------------------------------------------


def logger(name: str, clock: bool = True):
    """A ``log(*args)`` that prints ``[name HH:MM:SS] args`` (``[name] args`` without ``clock``) to stderr."""

    def log(*args) -> None:
        head = f"[{name} {time.strftime('%H:%M:%S')}]" if clock else f"[{name}]"
        print(head, *args, file=sys.stderr, flush=True)

    return log


# -- flags ------------------------------------------------------------------------------------------


def parser(doc: str, **kwargs) -> argparse.ArgumentParser:
    """An argument parser described by the first paragraph of a script's docstring ``doc``."""
    return argparse.ArgumentParser(description=doc.split("\n\n")[0], **kwargs)


def add_repeats(ap: argparse.ArgumentParser, default: int,
                help: str = "each figure is the best of this many runs") -> None:
    ap.add_argument("--repeats", type=int, default=default, help=help)


def add_size_mb(ap: argparse.ArgumentParser, default: float, over: str = "all ranks") -> None:
    ap.add_argument("--size-mb", type=float, default=default,
                    help=f"fp32 params + AdamW moments, MB (1e6 bytes) over {over}")


def add_work(ap: argparse.ArgumentParser, flag: str = "--work", what: str = "") -> None:
    """``flag DIR``: where a bench writes (a fresh directory inside it, removed after; see :func:`workdir`)."""
    ap.add_argument(flag, default=None, help=f"where to write{what} (a fresh directory inside it, removed after)")


def add_keep(ap: argparse.ArgumentParser, what: str = "the checkpoints") -> None:
    ap.add_argument("--keep", action="store_true", help=f"keep {what} (the path is logged)")


# -- processes --------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now (for a rendezvous or ``torchrun --master-port``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_stderr() -> None:
    """In a rank: everything it prints goes to stderr; the launching process alone writes the JSON line."""
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def init_rank(threads: int | None = None) -> None:
    """The start of a rank under torch's elastic launcher (``ucp.trainer.launch.launch``): output to
    stderr, ``threads`` intra-op threads, the gloo process group from the launcher's environment."""
    to_stderr()
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group("gloo")


@contextmanager
def elastic_rank(threads: int | None = None):
    """``with elastic_rank(threads):`` the body of a rank under torch's elastic launcher, between
    :func:`init_rank` and the end of its process group (also on failure)."""
    init_rank(threads)
    import torch.distributed as dist

    try:
        yield
    finally:
        dist.destroy_process_group()


def _die_with_launcher(launcher: int) -> None:
    """This process dies (SIGKILL) when the one that spawned it (pid ``launcher``) does, however that
    ends (a SIGTERM runs no ``finally``): no rank is left running alone (Linux; elsewhere nothing)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # (the launcher was gone already: this process has another parent now)
        os._exit(1)


def _world_rank(fn, rank: int, nproc: int, port: int, pg_timeout, threads, results, args, launcher: int) -> None:
    """One process of :func:`spawn_world`: join the world, run ``fn``, leave it, report the value."""
    _die_with_launcher(launcher)
    to_stderr()
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    extra = {} if pg_timeout is None else {"timeout": timedelta(seconds=pg_timeout)}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=nproc, **extra)
    try:
        value = fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results.put((rank, value))


def spawn_world(fn, nproc: int, *args, timeout: float | None = None, pg_timeout: float | None = None,
                threads: int | None = None, join_s: float = 60.0) -> dict:
    """Run ``fn(rank, *args)`` in ``nproc`` fresh processes (``spawn``) forming one gloo world on
    127.0.0.1 (a free port, ``GLOO_SOCKET_IFNAME=lo`` unless set); returns ``{rank: fn's value}``.

    ``torch.distributed`` is initialized before ``fn`` runs (collective timeout ``pg_timeout`` seconds,
    torch's default if None) and destroyed after; ``threads``: ``torch.set_num_threads`` first. ``fn``
    and ``args`` must pickle (a module-level function of the script is fine). A rank prints to stderr.

    Raises:
        RuntimeError: a rank failed (its traceback is on stderr), or the world took over ``timeout``
            seconds. Whatever happens, also on ``KeyboardInterrupt``, no process of the world is left;
            a launcher killed outright takes its ranks with it.
    """
    import multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_world_rank, args=(fn, r, nproc, port, pg_timeout, threads, results, args,
                                                   os.getpid()), name=f"rank{r}") for r in range(nproc)]
    deadline = None if timeout is None else time.monotonic() + timeout
    out: dict = {}
    try:
        for p in procs:
            p.start()
        while len(out) < nproc:
            try:
                rank, value = results.get(timeout=0.5)
                out[rank] = value
                continue
            except queue_mod.Empty:
                pass
            failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                raise RuntimeError("rank(s) failed: " + ", ".join(f"rank {r} exit code {c}" for r, c in failed)
                                   + " (the error is above)")
            if all(p.exitcode == 0 for p in procs):
                try:  # (a value still on its way through the pipe)
                    rank, value = results.get(timeout=5)
                    out[rank] = value
                    continue
                except queue_mod.Empty:
                    raise RuntimeError(f"ranks {sorted(set(range(nproc)) - set(out))} exited without a result") from None
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"the world of {nproc} ranks took over {timeout:g} s")
        for p in procs:
            p.join(join_s)
        failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed:
            raise RuntimeError("rank(s) failed after reporting: "
                               + ", ".join(f"rank {r} exit code {c}" for r, c in failed))
        return out
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            if p.pid is not None:
                p.join(5)
        results.close()


# -- the frame of main ------------------------------------------------------------------------------


@contextmanager
def workdir(parent, prefix: str, log, keep: bool = False):
    """A fresh directory under ``parent`` (the system's temporary folder if None), logged; removed at
    the end, also on failure, unless ``keep`` (then its path is logged)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    log(f"writing under {path}")
    try:
        yield path
    finally:
        if keep:
            log(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def attempt(fn, *args, log, trace: bool = False, **kwargs):
    """``fn(*args, **kwargs)``: its document, or the exit status after logging why not (1 for a failure,
    with its traceback when ``trace``; 130 for an interrupt)."""
    try:
        return fn(*args, **kwargs)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - one line, non-zero exit, nothing on stdout
        if trace:
            traceback.print_exc()
        log(f"FAILED: {type(e).__name__}: {e}")
        return 1


def emit(doc: dict, compact: bool = True) -> None:
    """The one JSON line on stdout (``compact``: no spaces after separators)."""
    print(json.dumps(doc, separators=(",", ":")) if compact else json.dumps(doc), flush=True)


def finish(out, compact: bool = True) -> int:
    """The end of ``main``: a document is printed (exit status 0); an exit status is returned as it is."""
    if isinstance(out, int):
        return out
    emit(out, compact)
    return 0


# -- figures ----------------------------------------------------------------------------------------


def rotated(kinds, r: int) -> list:
    """``kinds`` starting at the ``r``-th (round ``r``'s order: a slow phase of the machine falls on
    every kind in turn)."""
    r %= len(kinds)
    return [*kinds[r:], *kinds[:r]]


def median(xs):
    """The median of ``xs``; None when empty."""
    xs = list(xs)
    return statistics.median(xs) if xs else None


def spread(xs):
    """(max - min) / median of ``xs``: how far apart repeated measurements are; None for fewer than two."""
    xs = list(xs)
    if len(xs) < 2:
        return None
    mid = statistics.median(xs)
    return (max(xs) - min(xs)) / mid if mid else None


def quantile(xs, q: float):
    """The ``q``-quantile of ``xs`` (linear between the two nearest ranks); None when empty."""
    xs = sorted(xs)
    if not xs:
        return None
    at = q * (len(xs) - 1)
    lo = int(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


def summary(xs, scale: float = 1.0, digits: int = 4) -> dict | None:
    """The spread of repeated measurements ``xs`` (each times ``scale``, rounded to ``digits``):
    ``{"min", "p25", "median", "p75", "max", "n"}``; None when empty."""
    xs = [x * scale for x in xs]
    if not xs:
        return None
    out = {k: round(quantile(xs, q), digits) for k, q in (("min", 0), ("p25", .25), ("median", .5), ("p75", .75),
                                                          ("max", 1))}
    out["n"] = len(xs)
    return out


def ms(x):
    """Seconds as milliseconds to 0.01 ms; None stays None."""
    return None if x is None else round(x * 1e3, 2)


def best_of(out: dict, key: str, samples: list[float], nbytes: float) -> float:
    """Set ``key_s`` (the best of ``samples``, seconds), ``key_gbps`` (``nbytes`` / 10^9 over it) and
    ``key_all_s`` (every sample) in ``out``; returns the best."""
    best = min(samples)
    out[f"{key}_s"] = round(best, 4)
    out[f"{key}_gbps"] = round(nbytes / 1e9 / best, 3)
    out[f"{key}_all_s"] = [round(x, 4) for x in samples]
    return best


def median_of(out: dict, key: str, samples: list[float], nbytes: float) -> float:
    """Set ``key_s`` (the median of ``samples``, seconds), ``key_gbps`` (``nbytes`` / 10^9 over it),
    ``key_all_s`` (every sample) and ``key_spread_s`` (:func:`summary`) in ``out``; returns the median."""
    mid = median(samples)
    out[f"{key}_s"] = round(mid, 4)
    out[f"{key}_gbps"] = round(nbytes / 1e9 / mid, 3)
    out[f"{key}_all_s"] = [round(x, 4) for x in samples]
    out[f"{key}_spread_s"] = summary(samples)
    return mid


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (how busy the machine was around a measurement)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions(out: dict, t0: float) -> dict:
    """Add torch's and ucp's versions and ``wall_s`` (since ``time.perf_counter()`` was ``t0``) to ``out``."""
    import torch

    import ucp

    out["torch"] = torch.__version__
    out["ucp"] = getattr(ucp, "__version__", None)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    return out


# -- storage ----------------------------------------------------------------------------------------


def files_under(path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


def dir_bytes(path) -> int:
    return sum(p.stat().st_size for p in files_under(path))


def drop_cache(paths) -> None:
    """Make the next read of ``paths`` cold: flush dirty pages, then drop these files' cached pages."""
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _stagers_keep_their_copy_table() -> None:
    """Some torch releases (2.11 among them) fail the second staging of a reused ``DefaultStager`` when
    the state holds a class object (AdamW's does): ``StateDictStager.close()`` empties its copy table
    after each staging and the next one indexes it (``KeyError: <class 'type'>``). Each stager made
    from now on gets its table back before every staging (once per process; where the table is never
    emptied this changes nothing)."""
    try:
        from torch.distributed.checkpoint import _state_dict_stager as module
    except ImportError:
        return
    cls = getattr(module, "StateDictStager", None)
    if cls is None or getattr(cls.stage, "ucp_keeps_table", False):
        return
    init, stage = cls.__init__, cls.stage

    def patched_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.ucp_table = dict(getattr(self, "_deepcopy_dispatch", None) or {})

    def patched_stage(self, *args, **kwargs):
        table = getattr(self, "_deepcopy_dispatch", None)
        if table is not None and not table:
            table.update(getattr(self, "ucp_table", {}))
        return stage(self, *args, **kwargs)

    patched_stage.ucp_keeps_table = True
    cls.__init__, cls.stage = patched_init, patched_stage


class DcpSaver:
    """PyTorch DCP's ``async_save`` of an FSDP2 model and its optimizer, called after a training step,
    as a training loop would: kind ``dcp_default`` (no ``async_stager``: a fresh CPU copy of the state
    made before the call returns; thread executor) or ``dcp_best`` (DCP's best documented settings: one
    ``DefaultStager`` reused by every call with ``StagingOptions(use_async_staging=True,
    use_shared_memory=True)``, pinned memory and non-blocking copies where CUDA is there, the upload in
    a background process, ``AsyncCheckpointerType.PROCESS``; the staging waited for in an optimizer
    pre-step hook, so that it overlaps the next forward and backward).

    Each :meth:`save` first waits for the previous upload; the state comes from
    ``get_model_state_dict`` + ``get_optimizer_state_dict`` every time; collectives run on ``group``
    (one of their own: a training's must not interleave with them); checkpoints go to
    ``directory / kind`` (overwritten). ``last`` holds the parts of the newest call, in seconds:
    ``upload_wait``, ``state_dict``, ``async_save`` (until it returned) and ``staging_wait`` (the pre-step
    hook's wait; the caller resets it)."""

    def __init__(self, kind: str, model, opt, directory: Path, group):
        import torch
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        self.kind, self.model, self.opt, self.dir, self.group = kind, model, opt, directory, group
        self.pending = None  # the previous call's future (dcp_default) or AsyncSaveResponse (dcp_best)
        self.staging = None  # dcp_best: the staging not yet waited for
        self.last = {"state_dict": 0.0, "upload_wait": 0.0, "async_save": 0.0, "staging_wait": 0.0}
        self.kwargs = {"process_group": group}
        if kind == "dcp_best":
            cuda = torch.cuda.is_available()
            self.config = StagingOptions(use_pinned_memory=cuda, use_shared_memory=True, use_async_staging=True,
                                         use_non_blocking_copy=cuda)
            _stagers_keep_their_copy_table()
            self.kwargs.update(async_stager=DefaultStager(self.config),
                               async_checkpointer_type=AsyncCheckpointerType.PROCESS)
            opt.register_step_pre_hook(self._wait_staging)

    def describe(self) -> dict:
        if self.kind == "dcp_default":
            return {"async_stager": None, "async_checkpointer_type": "thread", "dir": str(self.dir)}
        return {"async_stager": "DefaultStager, reused", "staging_options": vars(self.config),
                "async_checkpointer_type": "process", "staging_waited": "optimizer pre-step hook",
                "dir": str(self.dir)}

    def _wait_staging(self, *_args, **_kwargs) -> None:
        if self.staging is not None:
            t0 = time.perf_counter()
            self.staging.result()
            self.last["staging_wait"] = time.perf_counter() - t0
            self.staging = None

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        t0 = time.perf_counter()
        self.drain()
        t1 = time.perf_counter()
        state = {"model": get_model_state_dict(self.model), "optim": get_optimizer_state_dict(self.model, self.opt)}
        t2 = time.perf_counter()
        self.pending = dcp.async_save(state, checkpoint_id=self.dir / self.kind, **self.kwargs)
        self.staging = getattr(self.pending, "staging_completion", None)
        t3 = time.perf_counter()
        self.last.update(upload_wait=t1 - t0, state_dict=t2 - t1, async_save=t3 - t2)

    def drain(self) -> None:
        """Wait for the previous save (its staging, then its upload)."""
        self._wait_staging()
        if self.pending is not None:
            getattr(self.pending, "upload_completion", self.pending).result()
            self.pending = None

    def close(self) -> None:
        self.drain()
        stager = self.kwargs.get("async_stager")
        if stager is not None:
            stager.close()


# -- floors: what one pass over a rank's bytes costs at best ---------------------------------------


VERIFIED_CHUNK = 1 << 20  # Floors.verified_copy's chunk: fits in a core's L2 cache


class Floors:
    """The single passes a snapshot or a restore of ``nbytes`` per rank can be compared with, each on
    preallocated, already touched buffers and in one thread: ``memcpy`` (numpy's copy, which never
    splits a copy over threads), ``memcpy_4k`` (the same between buffers in 4 KiB pages),
    ``verified_copy`` (a copy checksummed chunk by chunk as it goes), ``crc32c`` (the ``crc32c``
    library over the whole buffer),
    ``write_fsync`` (the buffer written to ``path`` and fsynced) and ``cold_read`` (``path``'s cached
    pages dropped, then read back into the buffer; ``disk_read_bytes`` says whether the bytes came
    from the device). The caller times them and decides which ranks run them at once."""

    def __init__(self, nbytes: int):
        import numpy as np
        import torch

        self.src = np.full(nbytes, 7, dtype=np.uint8)
        self.dst = np.empty(nbytes, dtype=np.uint8)
        self.dst.fill(0)  # touched: np.zeros would leave the pages to the first copy to fault in
        # numpy asks for transparent huge pages for buffers this large; torch's allocator does not, so
        # a model's tensors (and tmpfs segments) are in 4 KiB pages: these are.
        self.tsrc = torch.full((nbytes,), 7, dtype=torch.uint8).numpy()
        self.tdst = torch.zeros(nbytes, dtype=torch.uint8).numpy()
        self.disk_read_bytes = 0

    def memcpy(self) -> None:
        import numpy as np

        np.copyto(self.dst, self.src)

    def memcpy_4k(self) -> None:
        """memcpy between buffers in 4 KiB pages (allocated by torch, as a model's tensors are)."""
        import numpy as np

        np.copyto(self.tdst, self.tsrc)

    def verified_copy(self, dst=None, src=None, chunk: int = VERIFIED_CHUNK) -> int:
        """The least a copy whose destination is checksummed can cost in one thread: ``src`` (default
        :attr:`tsrc`) copied into ``dst`` (default :attr:`tdst`) ``chunk`` bytes at a time, each chunk
        checksummed (one ``crc32c`` call) right after its copy, while it is in cache. Returns the CRC.

        A whole-buffer memcpy this large uses non-temporal stores, which a checksum of the copy cannot
        (the bytes must come back through the cache), so this floor sits well above :meth:`memcpy`."""
        import crc32c
        import numpy as np

        dst = self.tdst if dst is None else dst
        src = self.tsrc if src is None else src
        crc = 0
        for a in range(0, len(dst), chunk):
            np.copyto(dst[a:a + chunk], src[a:a + chunk])
            crc = crc32c.crc32c(dst[a:a + chunk], crc)
        return crc

    def crc32c(self) -> int:
        import crc32c

        return crc32c.crc32c(self.src)

    def write_fsync(self, path: Path) -> None:
        view = memoryview(self.src)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def drop(self, path: Path) -> None:
        """Drop ``path``'s cached pages (:func:`drop_cache`)."""
        drop_cache([path])

    def cold_read(self, path: Path) -> None:
        io0 = io_read_bytes()
        view = memoryview(self.dst)
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < view.nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise RuntimeError(f"{path}: {done} bytes, expected {view.nbytes}")
                done += n
        self.disk_read_bytes = io_read_bytes() - io0


def io_read_bytes() -> int:
    """Bytes this process has read from block devices so far (``/proc/self/io``; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def barrier_timed(fn) -> tuple[float, object]:
    """``fn()`` between two barriers of the default process group: (seconds, its result). The
    slowest rank sets the time, as a job waits for it."""
    import torch.distributed as dist

    dist.barrier()
    t = time.perf_counter()
    out = fn()
    dist.barrier()
    return time.perf_counter() - t, out
