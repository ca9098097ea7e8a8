"""The cyclic garbage collector is paused over a load and a save, and restored as it was."""

from __future__ import annotations

import gc
import threading

import pytest

import ucp
from ucp.checkpoint import collector
from ucp.checkpoint.collector import collector_paused


@pytest.fixture(autouse=True)
def collector_enabled():
    gc.enable()
    yield
    gc.enable()


def test_the_collector_is_paused_inside_and_enabled_again_after():
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_an_error_inside_still_enables_it_again():
    with pytest.raises(ValueError):
        with collector_paused():
            raise ValueError("boom")
    assert gc.isenabled() and collector._depth == 0


def test_a_caller_that_disabled_the_collector_finds_it_disabled_after():
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_it_stays_paused_until_the_outermost_call_in_any_thread_returns():
    inside, leave = threading.Event(), threading.Event()

    def other():
        with collector_paused():
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=other)
    with collector_paused():
        t.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # the other thread's call is still running
    leave.set()
    t.join(10)
    assert gc.isenabled()


def test_a_checkpointer_loads_and_saves_with_the_collector_paused(tmp_path, monkeypatch):
    from ucp.checkpoint import checkpointer as module

    seen = []
    real_save, real_load = module.save_durable, module.load_checkpoint
    monkeypatch.setattr(module, "save_durable", lambda *a, **k: seen.append(("save", gc.isenabled()))
                        or real_save(*a, **k))
    monkeypatch.setattr(module, "load_checkpoint", lambda *a, **k: seen.append(("load", gc.isenabled()))
                        or real_load(*a, **k))
    import torch

    model = torch.nn.Linear(4, 3)
    ck = ucp.Checkpointer(tmp_path, model=model)
    ck.save(1)
    assert ck.load().step == 1
    assert seen == [("save", False), ("load", False)] and gc.isenabled()
