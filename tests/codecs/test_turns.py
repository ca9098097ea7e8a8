"""ucp.codecs.turns: work taken item by item by the calling thread and a pool's tasks."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ucp.codecs.turns import in_turns


@pytest.mark.parametrize("helpers", [0, 3])
def test_every_item_runs_once_on_the_caller_and_the_helpers(helpers):
    done, threads = [], set()

    def run(i):
        done.append(i)
        threads.add(threading.get_ident())
        time.sleep(0.002)

    with ThreadPoolExecutor(4) as pool:
        in_turns(run, 40, pool, helpers)
    assert sorted(done) == list(range(40))
    assert threading.get_ident() in threads and (len(threads) > 1) == (helpers > 0)


def test_a_failure_stops_the_items_not_started_and_is_raised_once_all_stopped():
    started, running = [], []

    def run(i):
        started.append(i)
        if i == 0:
            raise OSError("item 0")
        running.append(i)
        time.sleep(0.2)  # (still running when item 0 fails)
        running.remove(i)

    with ThreadPoolExecutor(2) as pool, pytest.raises(OSError, match="item 0"):
        in_turns(run, 50, pool, 2)
    assert not running and len(started) <= 3  # (one item per other thread at most, then none)


def test_helpers_not_started_are_cancelled_so_the_callers_own_pool_cannot_deadlock():
    with ThreadPoolExecutor(1) as pool:  # the caller runs on the pool's one thread
        assert pool.submit(lambda: in_turns(lambda i: None, 10, pool, 4)).result(timeout=10) is None
