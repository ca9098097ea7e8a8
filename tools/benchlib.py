"""What the benchmark scripts ``tools/bench_*.py`` (and ``tools/chaos.py``) share: their log line, the
launch of a local gloo world, the start of a rank under torch's elastic launcher, the common flags,
the work directory, the run-and-report frame of ``main`` and the figures of the JSON line.

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


def _world_rank(fn, rank: int, nproc: int, port: int, pg_timeout, threads, results, args) -> None:
    """One process of :func:`spawn_world`: join the world, run ``fn``, leave it, report the value."""
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
            seconds. Whatever happens, also on ``KeyboardInterrupt``, no process of the world is left.
    """
    import multiprocessing as mp

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_world_rank, args=(fn, r, nproc, port, pg_timeout, threads, results, args),
                         name=f"rank{r}") for r in range(nproc)]
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
