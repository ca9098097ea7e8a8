"""A persistent gloo world for multi-process tests.

Spawning a gloo world costs seconds, so tests share one per size: the worker processes stay up and
run module-level functions submitted to them (``World.run(fn, *args)`` calls ``fn(*args)`` on every
rank and returns the per-rank results). A test that fails on some rank gets every rank's traceback;
a test that hangs marks the world broken and it is replaced. Processes are daemonic and are
terminated at exit, so a failing test cannot leak them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import traceback
from datetime import timedelta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, tasks, results, pg_timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args = task
        try:
            results.put((rank, True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 - report everything to the test
            results.put((rank, False, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    dist.destroy_process_group()


class WorldError(AssertionError):
    """Some ranks failed; ``failures`` maps rank -> traceback text."""

    def __init__(self, failures: dict[int, str]):
        self.failures = failures
        super().__init__("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items())))


class World:
    """``size`` worker processes in one gloo process group."""

    def __init__(self, size: int, pg_timeout: float = 60.0):
        ctx = mp.get_context("spawn")
        self.size = size
        self.broken = False
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(size)]
        port = free_port()
        self.procs = [
            ctx.Process(target=_worker, args=(r, size, port, self.tasks[r], self.results, pg_timeout), daemon=True)
            for r in range(size)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn, *args, timeout: float = 120.0, may_die: frozenset = frozenset()) -> list:
        """``fn(*args)`` on every rank; the list of results in rank order.

        Ranks in ``may_die`` may vanish (fault tests): their result is None and the world is
        marked broken afterwards.

        Raises:
            WorldError: some rank raised (every failing rank's traceback in the message).
            TimeoutError: not every rank answered in ``timeout`` s; the world is marked broken.
        """
        if self.broken:
            raise RuntimeError("this world is broken")
        for q in self.tasks:
            q.put((fn, args))
        out, failures = {}, {}
        for _ in range(self.size - len(may_die)):
            try:
                rank, ok, value = self.results.get(timeout=timeout)
            except queue.Empty:
                self.broken = True
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise TimeoutError(f"ranks {sorted(set(range(self.size)) - set(out) - set(failures))} did not answer "
                                   f"in {timeout} s (dead: {dead}); partial failures: {failures}") from None
            (out if ok else failures)[rank] = value
        if may_die:
            self.broken = True
        if failures:
            raise WorldError(failures)
        return [out.get(r) for r in range(self.size)]

    def close(self) -> None:
        if not self.broken:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
