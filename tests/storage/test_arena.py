"""The arena: first-fit ranges of one resident block, coalesced on return, waiting when full."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import OptionsError
from ucp.storage.arena import Arena


def test_size_is_rounded_up_to_the_alignment():
    assert Arena(100).size == 128
    assert Arena(128).size == 128
    assert Arena(0).size == 0


def test_negative_size_is_rejected():
    with pytest.raises(OptionsError, match="arena size -1"):
        Arena(-1)


def test_views_are_the_arena_memory_at_their_offsets():
    arena = Arena(256)
    off_a, a = take_now(arena, 10)
    off_b, b = take_now(arena, 100)
    assert (off_a, len(a)) == (0, 10) and (off_b, len(b)) == (64, 100)
    np.frombuffer(a, np.uint8)[:] = 1
    np.frombuffer(b, np.uint8)[:] = 2
    assert (arena.memory[0:10] == 1).all() and (arena.memory[64:164] == 2).all()


def test_returned_neighbours_coalesce_into_one_range():
    arena = Arena(256)
    offs = [take_now(arena, 64)[0] for _ in range(4)]
    assert offs == [0, 64, 128, 192]
    arena.give_back(64, 64)
    arena.give_back(128, 64)
    assert take_now(arena, 128)[0] == 64  # the two freed neighbours serve one larger request
    arena.give_back(64, 128)
    arena.give_back(0, 64)
    arena.give_back(192, 64)
    assert take_now(arena, 256)[0] == 0  # all four back: the whole arena again


def test_first_fit_reuses_the_lowest_hole():
    arena = Arena(512)
    offs = [take_now(arena, 64)[0] for _ in range(4)]
    arena.give_back(offs[1], 64)
    arena.give_back(offs[3], 64)
    assert take_now(arena, 50)[0] == 64
    assert take_now(arena, 64)[0] == 192


def test_a_request_larger_than_the_arena_is_an_options_error():
    arena = Arena(1000)
    with pytest.raises(OptionsError, match="a buffer of 2000 bytes does not fit the 1024-byte arena; raise the memory limit"):
        arena.take(2000)
    assert take_now(arena, 1024)[0] == 0


def _take_in_thread(arena, nbytes):
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("got", arena.take(nbytes)), daemon=True)
    t.start()
    return t, result


def take_now(arena, nbytes):
    """``arena.take(nbytes)``, failing (instead of hanging the run) if it waits for space."""
    t, result = _take_in_thread(arena, nbytes)
    t.join(2)
    assert not t.is_alive(), f"take({nbytes}) waited although enough space is free"
    return result["got"]


def test_take_waits_until_enough_is_given_back():
    arena = Arena(256)
    first = take_now(arena, 128)
    second = take_now(arena, 128)
    t, result = _take_in_thread(arena, 200)
    t.join(0.2)
    assert t.is_alive() and not result, "no range of 200 bytes is free yet"
    arena.give_back(first[0], 128)
    t.join(0.2)
    assert t.is_alive(), "128 free bytes do not fit 200"
    arena.give_back(second[0], 128)
    t.join(5)
    assert not t.is_alive() and result["got"][0] == 0


def test_waiting_takers_all_proceed_as_space_returns():
    arena = Arena(128)
    held = take_now(arena, 128)
    waiters = [_take_in_thread(arena, 64) for _ in range(2)]
    time.sleep(0.1)
    assert all(t.is_alive() for t, _ in waiters)
    arena.give_back(held[0], 128)
    for t, _ in waiters:
        t.join(5)
    assert sorted(r["got"][0] for _, r in waiters) == [0, 64]


def test_many_threads_never_share_bytes():
    arena = Arena(1024)
    errors = []

    def worker(i):
        rng = np.random.default_rng(i)
        for _ in range(50):
            n = int(rng.integers(1, 600))
            off, view = arena.take(n)
            buf = np.frombuffer(view, np.uint8)
            buf[:] = i
            time.sleep(0)
            if not (buf == i).all():
                errors.append((i, off, n))
            arena.give_back(off, n)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert take_now(arena, 1024)[0] == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_ranges_are_disjoint_and_all_return_to_one_range(sizes, rnd):
    need = [-(-n // 64) * 64 for n in sizes]
    arena = Arena(sum(need))
    taken = [(take_now(arena, n)[0], n, a) for n, a in zip(sizes, need)]
    spans = sorted((off, off + a) for off, _, a in taken if a)
    assert all(0 <= lo < hi <= arena.size for lo, hi in spans)
    assert all(x[1] <= y[0] for x, y in zip(spans, spans[1:])), "ranges overlap"
    rnd.shuffle(taken)
    for off, n, _ in taken:
        arena.give_back(off, n)
    if arena.size:
        assert take_now(arena, arena.size)[0] == 0, "returned ranges did not coalesce"


def test_a_zero_byte_request_on_an_empty_arena_does_not_fail():
    """Empty tensors need no buffer: an arena sized for no bytes still serves them."""
    arena = Arena(0)
    off, view = arena.take(0)
    assert len(view) == 0
    arena.give_back(off, 0)
    full = Arena(64)
    held = full.take(64)
    off, view = take_now(full, 0)  # a full arena still serves it at once
    assert len(view) == 0
    full.give_back(off, 0)
    full.give_back(held[0], 64)
    assert take_now(full, 64)[0] == 0
