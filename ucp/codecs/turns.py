"""Work shared between the calling thread and a pool's threads, item by item."""

from __future__ import annotations

import itertools
from collections.abc import Callable


def in_turns(run: Callable[[int], None], count: int, pool=None, helpers: int = 0) -> None:
    """Call ``run(i)`` for each ``i`` of ``range(count)``, on the calling thread and up to ``helpers``
    tasks submitted to ``pool`` (an executor, or None), each taking the next ``i`` in turn. Once one
    fails no other is started, and the first failure is raised after every task has stopped. Tasks
    not started by the time the work is done are cancelled (the calling thread took their items), so
    ``pool`` may be the executor the caller itself runs on."""
    claim = itertools.count()  # (its next() is atomic: one C call under the GIL)
    failed: list[BaseException] = []

    def work() -> None:
        try:
            while not failed:
                i = next(claim)
                if i >= count:
                    return
                run(i)
        except BaseException as e:
            failed.append(e)

    futures = [pool.submit(work) for _ in range(min(helpers, count - 1))] if pool is not None else []
    try:
        work()
    finally:
        for f in futures:
            if not f.cancel():
                f.exception()  # (waits: a task still running may be touching the caller's buffers)
    if failed:
        raise failed[0]
