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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS, :mod:`tests.s3server`) for the session, stopped at its
    end whatever happened; tests using it carry the ``s3`` marker (their own tier in .ci/run)."""
    require("s3fs")
    from tests.s3server import S3Server, require_weed

    require_weed()
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3(s3_server, monkeypatch):
    """The session's S3 server, with the environment pointing S3 clients at it (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), as a user's would."""
    for name, value in s3_server.environ().items():
        monkeypatch.setenv(name, value)
    return s3_server
