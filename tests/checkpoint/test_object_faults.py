"""The S3 server itself failing (SeaweedFS killed outright, tests/s3server.py) in the middle of a save and
of a load: the error is one line naming the URL (a StorageError; the CLI exits non-zero without a
traceback), nothing torn becomes visible, and after the server's restart the previous checkpoint loads
bit-exactly. (Savers killed at random points: test_object_store.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ucp
from tests.helpers import bit_diffs
from tests.s3server import cloned_state, dying_server, linear_stack
from ucp.errors import StorageError
from ucp.storage import directory as store
from ucp.storage import fragment_files, objstore
from ucp.storage.multipart import MultipartWriter
from ucp.storage.objstore import ObjectPath

pytestmark = [pytest.mark.s3, pytest.mark.fault]


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server):
    """A server of this module's own (the session's must not die), stopped at its end."""
    from tests.s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("s3-faults")) as server:
        yield server


@pytest.fixture
def dying(server, monkeypatch):
    yield from dying_server(server, monkeypatch)


LAYERS = 10  # (of 4 MB each: 40 MB, 5 parts of 8 MiB)


def _one_line_naming(e: BaseException, url: str) -> None:
    assert "\n" not in str(e) and url in str(e), str(e)


def test_server_killed_mid_save_leaves_the_previous_checkpoint(dying, monkeypatch):
    url = dying.url("save")
    model = linear_stack(0, LAYERS)
    ck = ucp.Checkpointer(url, model=model)
    ck.save(1)
    saved = cloned_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    send = MultipartWriter._send

    def killing(self):  # (the server dies as the rank file's second part goes out)
        if self._parts or self._inflight:
            dying.kill()
        return send(self)

    monkeypatch.setattr(MultipartWriter, "_send", killing)
    with pytest.raises(StorageError) as e:
        ck.save(2)
    _one_line_naming(e.value, f"{url}/step_00000002/rank_00000.safetensors")
    monkeypatch.setattr(MultipartWriter, "_send", send)
    dying.start()
    ck.close()
    assert [s for s, _ in store.list_steps(url)] == [1]  # (step 2: never visible)
    fresh = linear_stack(1, LAYERS)
    with ucp.Checkpointer(url, model=fresh) as ck2:
        assert ck2.load().step == 1
    assert bit_diffs(saved, cloned_state(fresh)) == []


def test_server_killed_mid_load_then_the_load_succeeds_after_restart(dying, monkeypatch):
    url = dying.url("load")
    model = linear_stack(0, LAYERS)
    with ucp.Checkpointer(url, model=model) as ck:
        ck.save(1)
    saved = cloned_state(model)
    read_objects, calls = fragment_files.read_objects, []

    def killing(requests, gets=objstore.GETS):  # (the server dies as the fragments' GETs go out)
        calls.append(len(requests))
        dying.kill()
        return read_objects(requests, gets)

    monkeypatch.setattr(fragment_files, "read_objects", killing)
    fresh = linear_stack(1, LAYERS)
    with pytest.raises(StorageError) as e:
        ucp.Checkpointer(url, model=fresh).load()
    assert calls  # (it died in the middle of the load, after the manifest)
    _one_line_naming(e.value, url)
    monkeypatch.setattr(fragment_files, "read_objects", read_objects)
    dying.start()
    with ucp.Checkpointer(url, model=fresh) as ck:
        assert ck.load().step == 1
    assert bit_diffs(saved, cloned_state(fresh)) == []


def test_the_cli_fails_in_one_line_while_the_server_is_down(dying, tmp_path):
    url = dying.url("cli")
    with ucp.Checkpointer(url, model=torch.nn.Linear(4, 4)) as ck:
        ck.save(1)
    dying.kill()
    for command in ("verify", "inspect"):
        r = subprocess.run([sys.executable, "-m", "ucp.cli.main", command, url], env=dict(os.environ), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and r.stdout == "", r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and url in lines[0] and "Traceback" not in r.stderr, r.stderr
