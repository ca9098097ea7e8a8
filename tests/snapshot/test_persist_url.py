"""The agents persist snapshots to an object store (``Checkpointer("s3://...", snapshot=...)``), against a
real S3 server (SeaweedFS, tests/s3server.py): the rank files are uploaded by the agents from their
shared memory, the checkpoint becomes visible by its manifest's conditional creation only
(docs/format-checkpoint.md, rule 28; docs/agent.md, section 5), a fresh job loads it bit-exactly, and
a persist the server dies in leaves the previous checkpoint the newest, its error one line."""

from __future__ import annotations

import json
import time

import pytest
import torch

import ucp
from tests.helpers import MLP, bit_diffs, full_state, mlp_optimizer
from tests.s3server import cloned_state, dying_server, linear_stack
from ucp.errors import PersistError
from ucp.snapshot import agent as agent_mod
from ucp.snapshot import client, persist, shm
from ucp.storage import directory as store
from ucp.storage.lease import LEASE
from ucp.storage.manifest_io import read_manifest
from ucp.storage.objstore import ObjectPath
from ucp.storage.safetensors_file import read_header
from ucp.storage.verify import verify_checkpoint

pytestmark = [pytest.mark.s3, pytest.mark.timeout(300)]


def _keys(server, url: str) -> list[str]:
    root = url.removeprefix("s3://")
    return sorted(k[len(root) + 1:] for k, i in server.filesystem().find(root, detail=True).items()
                  if i.get("type") != "directory")


def _stop_agent(job: str) -> None:
    """Stop the job's agent and check that it is gone, with its shared memory."""
    info = agent_mod.read_info(job)
    client.stop(job, timeout=30)
    deadline = time.monotonic() + 30
    while agent_mod.is_alive(info):
        assert time.monotonic() < deadline, f"the agent (pid {info.pid}) did not exit"
        time.sleep(0.05)
    left = set(shm.listing(shm.prefix(job))) - {f"{shm.prefix(job)}agent.lock"}
    assert not left, left


@pytest.mark.dist
def test_two_ranks_agents_persist_to_a_url_and_a_fresh_job_loads_it_bit_exactly(world2, s3, job, tmp_path,
                                                                                 monkeypatch):
    from tests.snapshot import memory_workloads as mw

    monkeypatch.chdir(tmp_path)  # (nothing may land in a local directory named after the URL)
    url = s3.url("agents")
    ObjectPath(f"{url}/notes.txt").write_bytes(b"not a checkpoint")  # (retention deletes only checkpoints)
    want = world2.run(mw.persist_to_url, "fsdp", url, job, s3.environ(), timeout=240)[0]
    _stop_agent(job)  # the trainers are done (their Checkpointers closed); now the agent
    assert list(tmp_path.iterdir()) == []
    keys = _keys(s3, url)
    assert LEASE not in keys and not [k for k in keys if k.endswith(".tmp")], keys
    assert {k.split("/")[0] for k in keys} == {"notes.txt", "step_00000002", "step_00000003"}  # keep=2
    assert [s for s, _ in store.list_steps(url)] == [2, 3]
    directory = store.step_dir(url, 3)
    assert isinstance(directory, ObjectPath)
    manifest = read_manifest(directory)
    assert {f.file for f in manifest.fragments} == {"rank_00000.safetensors", "rank_00001.safetensors"}
    assert verify_checkpoint(directory, manifest).ok
    local = tmp_path / "rank_00001.safetensors"  # (written by the agent, from its memory: its header says so)
    local.write_bytes((directory / "rank_00001.safetensors").read_bytes())
    meta = json.loads(read_header(local)[0]["__metadata__"][persist.META])
    assert meta["step"] == 3 and meta["rank"] == 1 and meta["token"] > 0

    model = MLP()  # a fresh job: one process, another layout, no snapshots
    opt = mlp_optimizer(model)
    with ucp.Checkpointer(url, model=model, optimizer=opt) as ck:
        res = ck.load()
    assert res.source == "durable" and res.step == 3
    assert bit_diffs(want, full_state(model, opt)) == []


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server):
    """A server of this module's own (the session's must not die), stopped at its end."""
    from tests.s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("s3-persist")) as server:
        yield server


@pytest.fixture
def dying(server, monkeypatch):
    yield from dying_server(server, monkeypatch)


LAYERS = 20  # (of 4 MB each: 80 MB, 5 parts of 16 MiB)


def _uploading(fs, url: str, step: int) -> bool:
    """Whether an upload under ``step``'s prefix is in flight (a multipart upload begun, not completed);
    ``fs``: an s3fs file system on the server. Raises when the step's rank file is there already (the
    upload was missed)."""
    from fsspec.asyn import sync

    bucket, key = url.removeprefix("s3://").split("/", 1)
    prefix = f"{key}/step_{step:08d}/"
    out = sync(fs.loop, fs._call_s3, "list_multipart_uploads", Bucket=bucket, Prefix=prefix)
    if out.get("Uploads"):
        return True
    assert not fs.find(f"{bucket}/{prefix}"), "the agent's upload finished before the test saw it in flight"
    return False


@pytest.mark.fault
def test_the_server_killed_mid_persist_leaves_the_previous_checkpoint_and_one_line(dying, job, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = dying.url("persist")
    model = linear_stack(0, LAYERS)
    ck = ucp.Checkpointer(url, model=model, snapshot=ucp.SnapshotOptions(persist_every=1, job=job, persist_timeout=60))
    ck.save(1)
    ck.wait()  # step 1: durable, by the agent
    saved = cloned_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert ck.save(2).tier == "memory"
    deadline, fs = time.monotonic() + 60, dying.filesystem()
    while not _uploading(fs, url, 2):  # the agent's upload of step 2's rank file has begun
        assert time.monotonic() < deadline, "the agent never began to upload step 2"
        time.sleep(0.01)
    dying.kill()
    with pytest.raises(PersistError) as e:
        ck.wait()
    text = str(e.value)
    assert "\n" not in text and f"{url}/step_00000002/rank_00000.safetensors" in text, text
    assert "writing step 2 of rank 0 to the durable tier failed" in text, text
    dying.start()
    ck.close()  # (reported once: close's wait raises nothing more)
    _stop_agent(job)
    assert [s for s, _ in store.list_steps(url)] == [1]  # step 2: never visible
    assert not [k for k in _keys(dying, url) if k.startswith("step_00000002/")]
    fresh = linear_stack(1, LAYERS)
    with ucp.Checkpointer(url, model=fresh) as ck2:
        assert ck2.load().step == 1
    assert bit_diffs(saved, cloned_state(fresh)) == []
    assert list(tmp_path.iterdir()) == []
