"""Shared test configuration.

``require(module)`` imports an optional dependency for a test: locally a missing one skips the
test, under ``CI=true`` it fails it, so CI never goes green by skipping.
"""

from __future__ import annotations

import importlib
import os

import pytest


def require(module: str):
    """Import ``module`` or skip the test (fail it under CI=true)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"dependency {module!r} is missing under CI=true: {e}")
        pytest.skip(f"optional dependency {module!r} is not installed")


@pytest.fixture
def ckpt_root(tmp_path):
    return tmp_path / "ckpts"


@pytest.fixture(scope="session")
def worlds():
    """Shared gloo worlds by size (spawning one costs seconds): ``worlds(4).run(fn, *args)``.

    A broken world (a test timed out or killed a rank) is replaced; all are shut down at the end.
    """
    from tests.world import World

    pool: dict = {}

    def get(size: int):
        w = pool.get(size)
        if w is None or w.broken:
            if w is not None:
                w.close()
            w = pool[size] = World(size)
        return w

    yield get
    for w in pool.values():
        w.close()


@pytest.fixture
def world2(worlds):
    return worlds(2)


@pytest.fixture
def world4(worlds):
    return worlds(4)
