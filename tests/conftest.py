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
