"""The agents persist snapshots to an object store (``Checkpointer("s3://...", snapshot=...)``), against a
real S3 server (SeaweedFS, tests/s3server.py): the rank files are uploaded by the agents from their
shared memory, the checkpoint becomes visible by its manifest's conditional creation only
(docs/format-checkpoint.md, rule 28; docs/agent.md, section 5), a fresh job loads it bit-exactly, the
agents' commit aborts the multipart uploads killed writers left (rule 33) and no upload in progress,
SIGTERM flushes the snapshot not yet persisted to the store before the agent exits, and a persist the
server dies in leaves the previous checkpoint the newest, its error one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import ucp
from tests.helpers import MLP, bit_diffs, full_state, mlp_optimizer, state_of, tiny_model, train_step
from tests.s3server import cloned_state, dying_server, linear_stack
from ucp.errors import PersistError
from tests.snapshot.conftest import preempt_agent
from ucp.snapshot import agent as agent_mod
from ucp.snapshot import client, persist, shm
from ucp.storage import directory as store
from ucp.storage.lease import LEASE
from ucp.storage.manifest_io import read_manifest
from ucp.storage.objstore import ObjectPath
from ucp.storage.safetensors_file import read_header
from ucp.storage.verify import verify_checkpoint

pytestmark = [pytest.mark.s3, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parents[2]


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


def _uploads(server, url: str) -> list[str]:
    """The keys (below ``url``) of the incomplete multipart uploads under ``url``."""
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    found = server.filesystem().call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
    return sorted(u["Key"][len(prefix) + 1:] for u in found.get("Uploads", []))


def _begin_upload(fs, url: str) -> tuple[str, str, str]:
    """A multipart upload of object ``url`` begun and given one part, never completed (what a writer
    killed mid-upload leaves): its (bucket, key, upload id)."""
    bucket, key = url.removeprefix("s3://").split("/", 1)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    _add_part(fs, (bucket, key, upload), 1)
    return bucket, key, upload


def _add_part(fs, upload: tuple[str, str, str], number: int) -> None:
    bucket, key, upload_id = upload
    fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=b"p" * 1024)


#: an agent, run in the foreground, whose commits take an upload idle for ``argv[2]`` seconds for an
#: orphan (``ORPHAN_AFTER``: retention runs in the agent's commit thread, not in the trainer)
PATIENT_AGENT = textwrap.dedent("""
    import sys
    from ucp.storage import objstore
    objstore.ORPHAN_AFTER = float(sys.argv[2])
    from ucp.snapshot.agent import main
    sys.exit(main(["--job", sys.argv[1]]))
""")
ORPHAN_AFTER = 5.0


def _python(*args: str) -> list[str]:
    return [sys.executable, "-c", *args]


def _environ() -> dict[str, str]:
    """This process's environment (the S3 server's endpoint and credentials), this checkout importable."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


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


@pytest.mark.timeout(120)
def test_the_agents_commit_aborts_the_upload_a_killed_writer_left_never_one_in_progress(s3, job, tmp_path,
                                                                                       monkeypatch):
    """The agents' commit of a persisted snapshot applies retention, which aborts the incomplete multipart
    uploads under the root's step prefixes idle for ``ORPHAN_AFTER`` (format rule 33; docs/agent.md section
    5): the one a writer killed mid-upload left is aborted, one begun as long ago that still adds a part
    every second is left to complete. Retention runs in the agent's commit thread, so the agent is
    started (ahead of the trainer, as ``ucp agent start`` would) with ``ORPHAN_AFTER`` lowered; this
    process's (900 s) can abort neither."""
    monkeypatch.chdir(tmp_path)
    url = s3.url("orphan")
    fs = s3.filesystem()
    killed = _begin_upload(fs, f"{url}/step_00000007/rank_00000.safetensors")
    live = _begin_upload(fs, f"{url}/step_00000009/rank_00000.safetensors")
    begun, saved, parts = time.monotonic(), threading.Event(), [1]

    def uploading() -> None:  # (a part a second until the commit is done, however long it takes)
        while not saved.wait(1.0):
            parts[0] += 1
            _add_part(fs, live, parts[0])

    thread = threading.Thread(target=uploading, daemon=True)
    thread.start()
    agent = None
    try:
        agent = subprocess.Popen(_python(PATIENT_AGENT, job, str(ORPHAN_AFTER)), stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, text=True, env=_environ(), cwd=ROOT)
        line = agent.stdout.readline()
        assert line.startswith(f"ucp agent of job {job}: pid {agent.pid}"), line
        time.sleep(max(0.0, begun + ORPHAN_AFTER + 2 - time.monotonic()))  # (the killed writer's: idle longer)
        assert _uploads(s3, url) == ["step_00000007/rank_00000.safetensors", "step_00000009/rank_00000.safetensors"]
        m, opt = tiny_model()
        train_step(m, opt, 1)
        with ucp.Checkpointer(url, model=m, optimizer=opt,
                              snapshot=ucp.SnapshotOptions(persist_every=1, job=job)) as ck:
            assert ck.save(1).tier == "memory"
            ck.wait()  # the agent's commit of step 1, and its retention
        assert [s for s, _ in store.list_steps(url)] == [1]
        assert _uploads(s3, url) == ["step_00000009/rank_00000.safetensors"]  # (as old: its parts kept it)
        _stop_agent(job)
        assert agent.wait(timeout=30) == 0
    finally:
        saved.set()
        thread.join(timeout=60)
        if agent is not None:
            if agent.poll() is None:  # (the test failed: stopped as a shutdown does, its memory removed)
                agent.send_signal(signal.SIGINT)
                try:
                    agent.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    agent.kill()
                    agent.wait(timeout=30)
            agent.stdout.close()
        for bucket, key, upload_id in (killed, live):
            try:
                fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)
            except FileNotFoundError:
                pass  # (aborted by the commit)
    assert list(tmp_path.iterdir()) == []


#: a fresh process loads the newest checkpoint under ``argv[1]`` into a tiny model and saves what it
#: loaded to ``argv[2]``
LOAD = textwrap.dedent("""
    import sys, torch, ucp
    from tests.helpers import state_of, tiny_model
    m, opt = tiny_model(seed=7)
    with ucp.Checkpointer(sys.argv[1], model=m, optimizer=opt) as ck:
        res = ck.load()
    torch.save({"step": res.step, "source": res.source, "state": state_of(m, opt)}, sys.argv[2])
""")


@pytest.mark.timeout(120)
def test_sigterm_flushes_the_pending_snapshot_to_the_url_and_a_fresh_process_loads_it(s3, job, tmp_path,
                                                                                    monkeypatch):
    """Preemption on a URL root: SIGTERM makes the agent write the newest snapshot that is not durable
    yet to the object store, commit it (its manifest created last) and exit, its memory gone; another
    process loads it bit-exactly (docs/agent.md, the agent's stop)."""
    monkeypatch.chdir(tmp_path)
    url = s3.url("sigterm")
    m, opt = tiny_model()
    ck = ucp.Checkpointer(url, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(persist_every=2, job=job))
    for s in (1, 2, 3):
        train_step(m, opt, s)
        ck.save(s)
    ck.wait()
    want = state_of(m, opt)
    assert [s for s, _ in store.list_steps(url)] == [2]  # step 3: in the agent's memory only
    preempt_agent(job, 60)  # its memory is gone ...
    keys = _keys(s3, url)  # ... and step 3 is on the store, complete
    assert "step_00000003/manifest.json" in keys and "step_00000003/rank_00000.safetensors" in keys, keys
    assert not [k for k in keys if k.endswith(".tmp")], keys
    assert [s for s, _ in store.list_steps(url)] == [2, 3]
    directory = store.step_dir(url, 3)
    assert verify_checkpoint(directory, read_manifest(directory)).ok
    out = tmp_path / "loaded.pt"
    done = subprocess.run(_python(LOAD, url, str(out)), stdin=subprocess.DEVNULL, env=_environ(), cwd=ROOT,
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = torch.load(out)
    assert (loaded["step"], loaded["source"]) == (3, "durable")
    assert bit_diffs(want, loaded["state"]) == []


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_server):
    """A server of this module's own (the session's must not die), stopped at its end."""
    from tests.s3server import S3Server

    with S3Server(tmp_path_factory.mktemp("s3-persist")) as server:
        yield server


@pytest.fixture
def dying(server, monkeypatch):
    yield from dying_server(server, monkeypatch)


LAYERS = 20  # (of 4 MB each: 80 MB, 10 parts of 8 MiB)


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
