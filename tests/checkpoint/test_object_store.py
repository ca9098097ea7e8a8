"""Checkpoints on object storage, against a real S3 server (SeaweedFS, tests/s3server.py): a
Checkpointer saves to and loads from ``s3://`` bit-exactly, in one process and on a gloo world (2 ranks
save with FSDP2, 3 load); ``ucp inspect``/``verify`` read it there; a checkpoint becomes visible by its
manifest's conditional creation only, so saves killed at random points never leave a torn one
(docs/format-checkpoint.md, section 7)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import ucp
from tests.checkpoint import object_workloads as workloads
from tests.checkpoint.common import make, train_step
from tests.helpers import bit_diffs, state_of
from ucp.errors import CheckpointDeletedError, CorruptCheckpointError, LeaseError
from ucp.storage import directory as store
from ucp.storage import objstore
from ucp.storage.lease import LEASE
from ucp.storage.manifest_io import read_manifest
from ucp.storage.multipart import MultipartWriter
from ucp.storage.objstore import ObjectPath
from ucp.storage.verify import verify_checkpoint

pytestmark = pytest.mark.s3


def _keys(s3, url: str) -> list[str]:
    root = url.removeprefix("s3://")
    return sorted(k[len(root) + 1:] for k, i in s3.filesystem().find(root, detail=True).items()
                  if i.get("type") != "directory")


def _verified(url: str) -> list[int]:
    steps = store.list_steps(url)
    for _, path in steps:
        assert verify_checkpoint(path, read_manifest(path)).ok, path
    return [s for s, _ in steps]


def test_save_and_load_round_trip_bit_exact(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (nothing may land in a local directory named after the URL)
    url = s3.url("run")
    model, opt, sched = make()
    with ucp.Checkpointer(url, model=model, optimizer=opt, scheduler=sched, keep=2) as ck:
        for step in (1, 2, 3):
            train_step(model, opt, sched)
            result = ck.save(step, extras={"note": f"step {step}"})
            assert isinstance(result.path, ObjectPath) and str(result.path) == f"{url}/step_{step:08d}"
        saved = state_of(model, opt)
    assert list(tmp_path.iterdir()) == []
    keys = _keys(s3, url)
    assert LEASE not in keys  # (released on close)
    assert {k.split("/")[0] for k in keys} == {"step_00000002", "step_00000003"}  # keep=2
    assert "step_00000003/manifest.json" in keys and "step_00000003/rank_00000.safetensors" in keys
    assert _verified(url) == [2, 3]

    model2, opt2, sched2 = make(seed=7)
    with ucp.Checkpointer(url, model=model2, optimizer=opt2, scheduler=sched2) as ck:
        loaded = ck.load()
    assert loaded.step == 3 and loaded.extras == {"note": "step 3"}
    assert bit_diffs(saved, state_of(model2, opt2)) == []
    with ucp.Checkpointer(url, model=model2, optimizer=opt2, scheduler=sched2) as ck:
        assert ck.load(step=2).step == 2


def test_inspect_and_verify_read_the_url_and_find_a_flipped_byte(s3, tmp_path):
    url = s3.url("cli")
    model, opt, sched = make()
    with ucp.Checkpointer(url, model=model, optimizer=opt, scheduler=sched) as ck:
        ck.save(5)
    env = dict(os.environ)

    def ucp_cli(*args):
        return subprocess.run([sys.executable, "-m", "ucp.cli.main", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    r = ucp_cli("verify", url, "--quiet")
    assert r.returncode == 0 and r.stdout.startswith(f"OK   {url}/step_00000005: step 5"), r
    r = ucp_cli("inspect", url, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["step"] == 5, r
    fs, key = s3.filesystem(), f"{url.removeprefix('s3://')}/step_00000005/rank_00000.safetensors"
    data = bytearray(fs.cat_file(key))
    data[-1] ^= 0x40
    fs.pipe_file(key, bytes(data))
    r = ucp_cli("verify", url, "--quiet")
    assert r.returncode == 3 and "checksum mismatch" in r.stderr, r
    model2, opt2, sched2 = make(seed=3)
    with pytest.raises(CorruptCheckpointError, match="rank_00000.safetensors"):
        ucp.Checkpointer(url, model=model2, optimizer=opt2, scheduler=sched2).load()


SAVER = textwrap.dedent("""
    import sys
    import torch
    import ucp
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    ck = ucp.Checkpointer(sys.argv[1], model=model, optimizer=opt, keep=2)
    step = int(sys.argv[2])
    print("ready", flush=True)
    while True:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ck.save(step)
        print("saved", step, flush=True)
        step += 1
""")


def test_saves_killed_at_random_points_never_leave_a_torn_checkpoint(s3):
    """20 saver processes, each killed (SIGKILL) at a random moment of its saves; after each, every
    complete checkpoint verifies and the newest loads; the next saver takes over the dead one's lease
    and clears what it left. (Retention runs after a commit, so a kill between the two leaves more
    than ``keep`` complete checkpoints: not a torn one.)"""
    url, rng, step, visible, partial = s3.url("killed"), random.Random(22), 1, [], 0
    for trial in range(20):
        p = subprocess.Popen([sys.executable, "-c", SAVER, url, str(step)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ))
        try:
            assert p.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            p.send_signal(signal.SIGKILL)
            out, _ = p.communicate(timeout=60)
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
        step = max([step, *saved]) + 1  # (a step may have been committed after its last "saved" line)
        complete = _verified(url)
        if saved:  # (the last step reported saved is there, or a later one committed before the kill)
            assert complete and complete[-1] >= saved[-1], (saved, complete)
        partial += len(store.list_steps(url, complete=False)) > len(complete)  # (killed mid-save: objects, no manifest)
        visible.append(len(complete))
        if complete:
            model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 64))
            with ucp.Checkpointer(url, model=model) as ck:
                assert ck.load(strict=False).step == complete[-1]
    assert max(visible) > 0 and partial > 0  # (some kills landed mid-save, and readers skipped what they left)


STALLED = textwrap.dedent("""
    import sys, time
    import torch
    import ucp
    from ucp.storage.multipart import MultipartWriter
    send = MultipartWriter._send

    def stalling(self):  # (once a part of the rank file has landed, the writer hangs: killed mid-upload)
        send(self)
        self._inflight[0][0].result()
        print("uploading", self.name, flush=True)
        time.sleep(600)

    MultipartWriter._send = stalling
    torch.manual_seed(0)
    ucp.Checkpointer(sys.argv[1], model=torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(6)])).save(1)
""")


def _uploads(s3, url: str) -> list[str]:
    bucket, prefix = url.removeprefix("s3://").split("/", 1)
    found = s3.filesystem().call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix + "/")
    return sorted(u["Key"][len(prefix) + 1:] for u in found.get("Uploads", []))


def test_a_save_aborts_the_upload_a_killed_writer_left_never_one_in_progress(s3, monkeypatch):
    """A writer killed mid-upload leaves an incomplete multipart upload (parts stored, no object); the
    next save's retention aborts it once it has been idle ``ORPHAN_AFTER`` seconds (format rule 33),
    while an upload still adding parts under the root (an agent's, say) is left to complete."""
    url = s3.url("orphan")
    p = subprocess.Popen([sys.executable, "-c", STALLED, url], stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = p.stdout.readline().strip()
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
    assert line == f"uploading {url}/step_00000001/rank_00000.safetensors", line
    assert _uploads(s3, url) == ["step_00000001/rank_00000.safetensors"]
    root = ObjectPath(url)
    live = MultipartWriter(root.fs, (root / "step_00000003/rank_00000.safetensors").key, part_bytes=5 << 20)
    part, saving, parts = os.urandom(5 << 20), threading.Event(), [0]

    def uploading() -> None:  # (a part a second while the save runs, however long it takes)
        while not saving.wait(1.0):
            live.write(part)
            parts[0] += 1

    try:
        live.write(part)
        monkeypatch.setattr(objstore, "ORPHAN_AFTER", 5.0)
        time.sleep(7)  # (the killed writer's upload is idle for longer than ORPHAN_AFTER ...)
        live.write(part)  # (... the live one adds a part now, and every second until the save is done)
        parts[0] = 2
        live._inflight[-1][0].result()
        thread = threading.Thread(target=uploading, daemon=True)
        thread.start()
        try:
            with ucp.Checkpointer(url, model=torch.nn.Linear(8, 8)) as ck, pytest.warns(UserWarning, match="took over"):
                ck.save(2)  # (the killed writer's lease, its pid gone)
        finally:
            saving.set()
            thread.join(timeout=60)
        assert _uploads(s3, url) == ["step_00000003/rank_00000.safetensors"]
        live.write(b"end")
        live.close()
    finally:
        live.abort()
    assert ObjectPath(f"{url}/step_00000003/rank_00000.safetensors").read_bytes() == part * parts[0] + b"end"
    assert _uploads(s3, url) == [] and _verified(url) == [2]


def test_a_second_job_is_refused_while_the_first_holds_the_lease(s3):
    url = s3.url("lease")
    model, opt, sched = make()
    first = ucp.Checkpointer(url, model=model, optimizer=opt, scheduler=sched)
    first.save(1)
    holder = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys, torch, ucp
        ck = ucp.Checkpointer(sys.argv[1], model=torch.nn.Linear(2, 2))
        try:
            ck.save(2)
        except ucp.UcpError as e:
            print(type(e).__name__, e)
    """), url], env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert holder.stdout.startswith(f"LeaseError {url}: another job saves into this checkpoint root"), holder
    assert f"pid {os.getpid()}" in holder.stdout
    first.close()
    assert _verified(url) == [1] and LEASE not in _keys(s3, url)


@pytest.mark.dist
def test_fsdp_save_on_2_ranks_loads_on_3_bit_exact(s3, worlds):
    url = s3.url("fsdp")
    saved = worlds(2).run(workloads.fsdp_save, s3.environ(), url)
    assert bit_diffs(saved[0], saved[1]) == []
    loaded = worlds(3).run(workloads.fsdp_load, s3.environ(), url)
    for out in loaded:
        assert out["step"] == 3
        assert bit_diffs(saved[0], out["state"]) == []


def trained_and_saved(url: str, step: int) -> dict:
    """A model trained one step and saved to ``url`` as ``step``: its state (``state_of``)."""
    model, opt, sched = make()
    train_step(model, opt, sched)
    with ucp.Checkpointer(url, model=model, optimizer=opt, scheduler=sched) as ck:
        ck.save(step)
    return state_of(model, opt)


def test_convert_from_s3_to_s3_bit_exact(s3, tmp_path):
    zarr = pytest.importorskip("zarr")
    src, dst = s3.url("src"), s3.url("universal")
    saved = trained_and_saved(src, 6)
    r = subprocess.run([sys.executable, "-m", "ucp.cli.main", "convert", src, dst, "--quiet", "--json"],
                       env=dict(os.environ), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r
    assert json.loads(r.stdout)["src"] == f"{src}/step_00000006" and list(tmp_path.iterdir()) == []
    group = zarr.open_group(dst, mode="r")
    header = group.attrs["ucp"]
    assert header["step"] == 6 and header["source"]["path"] == f"{src}/step_00000006"
    for key, tensor in saved.items():
        if tensor.dtype == torch.float32:
            stored = group[header["tensors"][key]["path"]][...]
            assert stored.tobytes() == tensor.numpy().tobytes(), key


def test_export_and_load_of_a_universal_checkpoint_on_s3_bit_exact(s3, tmp_path):
    """``ucp export`` from ``s3://`` to a local directory, and a Checkpointer loading the universal
    checkpoint from its URL: the saved tensors, bit for bit (the chunks read by ranged GETs)."""
    pytest.importorskip("zarr")
    from safetensors.numpy import load_file

    src, universal = s3.url("src"), s3.url("universal")
    saved = trained_and_saved(src, 4)
    env = dict(os.environ)
    for args in (("convert", src, universal), ("export", universal, str(tmp_path / "hf"), "--optimizer")):
        r = subprocess.run([sys.executable, "-m", "ucp.cli.main", *args, "--quiet"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    states = load_file(tmp_path / "hf" / "optimizer.safetensors")
    assert sorted(weights) == sorted(k.removeprefix("model/") for k in saved if k.startswith("model/"))
    for key, tensor in saved.items():
        kind, name = key.split("/", 1)
        if kind == "model":
            assert weights[name].tobytes() == tensor.numpy().tobytes(), key
        elif tensor.dim():  # (the step counts: one per parameter, 0-d)
            assert states[name].tobytes() == tensor.numpy().tobytes(), key
    model2, opt2, sched2 = make(seed=9)
    with ucp.Checkpointer(universal, model=model2, optimizer=opt2, scheduler=sched2) as ck:
        assert ck.load().step == 4
    assert bit_diffs(saved, state_of(model2, opt2)) == []


def _many_tensors(layers: int, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    return model, opt


def test_a_load_fetches_many_small_fragments_in_a_few_gets_and_names_a_corrupted_one(s3, monkeypatch):
    """A rank's fragments lie side by side in its file: a load fetches them in ranged GETs that each span
    many (FragmentFiles.read_spans), so its GETs do not grow with the number of tensors (one per fragment
    before: 6 layers of AdamW are 48 fragments and 12 step counts); each fragment is still checked on its
    own, and a flipped byte is named by its tensor."""
    import s3fs

    gets: list = []
    real = s3fs.S3FileSystem._cat_file

    async def counted(self, path, start=None, end=None, **kw):
        gets.append((path, start, end))
        return await real(self, path, start=start, end=end, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counted)
    counts = {}
    for layers in (2, 12):
        url = s3.url(f"many{layers}")
        model, opt = _many_tensors(layers)
        with ucp.Checkpointer(url, model=model, optimizer=opt) as ck:
            ck.save(1)
        saved = state_of(model, opt)
        model2, opt2 = _many_tensors(layers, seed=5)
        gets.clear()
        with ucp.Checkpointer(url, model=model2, optimizer=opt2) as ck:
            assert ck.load().step == 1
        data = [g for g in gets if g[0].endswith(".safetensors")]
        counts[layers] = len(data)
        assert bit_diffs(saved, state_of(model2, opt2)) == []
    assert counts[12] == counts[2] <= 3, counts  # (the header's check and one span; 96 fragments are not 96 GETs)

    manifest = read_manifest(ObjectPath(f"{url}/step_00000001"))
    f = next(f for f in manifest.fragments if f.key == "optim/5.bias/exp_avg_sq")
    fs, key = s3.filesystem(), f"{url.removeprefix('s3://')}/step_00000001/{f.file}"
    raw = bytearray(fs.cat_file(key))
    raw[f.offset + 5] ^= 0x01
    fs.pipe_file(key, bytes(raw))
    model3, opt3 = _many_tensors(12, seed=9)
    with pytest.raises(CorruptCheckpointError, match=f"fragment of {f.key}.*fails its checksum"):
        ucp.Checkpointer(url, model=model3, optimizer=opt3).load()
    raw[f.offset + 5] ^= 0x01
    raw[20] ^= 0x01  # (in the safetensors header, which comes in the same GET as the fragments)
    fs.pipe_file(key, bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="safetensors header fails its checksum"):
        ucp.Checkpointer(url, model=model3, optimizer=opt3).load()


def test_a_checkpoint_deleted_while_its_objects_are_read_is_told_as_deleted(s3, monkeypatch):
    """Retention deletes a checkpoint's manifest first: a rank file found missing at its GET (its size
    was asked before) with the manifest gone is a checkpoint deleted while being read, not corruption."""
    from ucp.checkpoint import load as load_module
    from ucp.checkpoint.readers import FragmentReader

    url = s3.url("pruned")
    model, opt = _many_tensors(3)
    with ucp.Checkpointer(url, model=model, optimizer=opt) as ck:
        ck.save(1)

    class Pruned(FragmentReader):
        def __init__(self, directory, manifest=None, **kwargs):
            store.remove_checkpoint(directory)  # (as retention does: the manifest first)
            super().__init__(directory, manifest, **kwargs)

    monkeypatch.setattr(load_module, "FragmentReader", Pruned)
    model2, opt2 = _many_tensors(3, seed=4)
    with pytest.raises(CheckpointDeletedError, match="step 1 was deleted") as e:
        ucp.Checkpointer(url, model=model2, optimizer=opt2).load(step=1)
    assert not isinstance(e.value, CorruptCheckpointError)


def test_a_load_asks_the_shared_objects_once_and_each_rank_file_in_one_round_trip(s3, worlds):
    """At 16,384 ranks an object store throttles requests on one key: rank 0 alone finds the checkpoint
    and reads its manifest.json (sent to the others with the phase's answer); a rank asks nothing of the
    root's listing, zarr.json or manifest.json, and reads each rank file it needs in one HEAD (its size)
    and one ranged GET, the safetensors header checked from the GET's first bytes (another rank's file,
    whose fragments lie far from its header: a GET of its first bytes sent beside the fragments' GETs,
    in the same round trip). Only the paged tables' pages (index and the rank's leaves) are read on
    every rank."""
    url = s3.url("requests")
    saved = worlds(2).run(workloads.fsdp_save, s3.environ(), url)
    loaded = worlds(2).run(workloads.fsdp_load_counted, s3.environ(), url)
    for rank, out in enumerate(loaded):
        assert out["step"] == 3 and bit_diffs(saved[0], out["state"]) == []
        made = out["requests"]
        shared = [(op, key) for op, key, _ in made if not key.startswith("step_00000003/")
                  or key.endswith(("manifest.json", "zarr.json", "zarr.json/"))]
        if rank > 0:
            assert shared == [], made
        files = {key for _, key, _ in made if key.endswith(".safetensors")}
        mine = f"step_00000003/rank_{rank:05d}.safetensors"
        assert mine in files, made
        for name in files:  # (each header comes with the data: in its GET, or in a GET sent beside them)
            asked = [(op, at) for op, key, at in made if key == name]
            assert [op for op, _ in asked].count("head_object") == 1, (name, asked)
            assert ("get_object", "bytes=0-7") not in asked, (name, asked)  # (no GETs of the header alone)
        assert [op for op, key, _ in made if key == mine] == ["head_object", "get_object"], made
        tables = [key for _, key, _ in made if key.endswith(".pages")]
        assert all(op == "get_object" for op, key, _ in made if key.endswith(".pages")) and len(tables) <= 8, made


def test_a_resharded_load_fetches_each_rank_file_in_a_few_gets(s3, worlds):
    """2 ranks save, 3 load: every piece is resharded (runs of checked blocks from one or two rank
    files); their runs are asked first and fetched together, fragments side by side in one GET: a
    rank reads a rank file of 21 fragments in at most 3 GETs (its header's, and runs too far apart to
    join), where it took a GET per run of blocks and per edge block before (19)."""
    url = s3.url("reshard")
    saved = worlds(2).run(workloads.fsdp_save, s3.environ(), url)
    loaded = worlds(3).run(workloads.fsdp_load_counted, s3.environ(), url)
    fragments = read_manifest(ObjectPath(f"{url}/step_00000003")).fragments
    for rank, out in enumerate(loaded):
        assert out["step"] == 3 and bit_diffs(saved[0], out["state"]) == []
        for name in {key for _, key, _ in out["requests"] if key.endswith(".safetensors")}:
            gets = [at for op, key, at in out["requests"] if key == name and op == "get_object"]
            held = sum(1 for f in fragments if name.endswith(f.file))
            assert 1 <= len(gets) <= 3 < held, (rank, name, len(gets), held)  # (19 of 21 before)
