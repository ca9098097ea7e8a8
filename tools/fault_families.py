"""The fault families of ``tools/faults.py``: each a function ``(ctx, rng, trial, tdir) -> (findings,
load checks)`` that injects one fault into fresh copies (or fresh jobs) under the trial's directory
``tdir``, runs what a user would run, and returns what it found at once plus the loads to run after
the family's trials (see ``fault_harness.LoadCheck``). ``docs/faults.md`` describes each family."""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import struct
import sys
import time
import zipfile
import zlib
from pathlib import Path

from fault_harness import (MEMORY_LIMIT_MB, TOOLS, Context, HarnessError, Job, LoadCheck, Result, cli_findings,
                           copy_tree, event_findings, events_of, judge_load, message_findings, short, step_name)

SPECS = Path(__file__).resolve().parents[1] / "ucp" / "lang" / "specs"


# -- helpers ----------------------------------------------------------------------------------------

def saves(job: Job) -> dict[int, dict]:
    """The finished save events of ``job`` (rank 0) by step."""
    return {int(e["action"].split(":")[1]): e for e in job.events()
            if e.get("action", "").startswith("save:") and not e.get("begin")}


def begun(job: Job) -> dict[int, str]:
    """step -> the digest of the state each save of ``job`` was handed (also saves killed midway)."""
    return {int(e["action"].split(":")[1]): e["digest"] for e in job.events()
            if e.get("action", "").startswith("save:") and e.get("begin")}


def failed_events(what: str, job: Job, names=()) -> list:
    found = []
    for e in job.events():
        if not e.get("begin") and not e.get("ok", True):
            found += event_findings(f"{what} {e.get('action')}", e, names)
    return found


def rank_file_regions(path: Path) -> dict[str, tuple[int, int]]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    return {"header": (0, min(8 + n, len(data))), "data": (min(8 + n, len(data)), len(data))}


def universal_files(uni: Path) -> dict[str, list[Path]]:
    """The universal checkpoint's chunk files, arrays' zarr.json and groups' zarr.json."""
    chunks, arrays, groups = [], [], []
    for p in sorted(uni.rglob("*")):
        if not p.is_file():
            continue
        if p.name == "zarr.json":
            doc = json.loads(p.read_text())
            (arrays if doc.get("node_type") == "array" else groups).append(p)
        elif p.name.startswith("c"):
            chunks.append(p)
    return {"chunk": chunks, "array_json": arrays, "group_json": groups}


def pick_target(ctx: Context, rng: random.Random, tdir: Path, kinds) -> tuple[str, Path, Path, int, int, bool]:
    """A fresh copy of a base checkpoint and one of its files of kind ``rng.choice(kinds)``:
    (kind, checkpoint path to verify/load, file, first byte, end byte of the region, universal?)."""
    base = ctx.base()
    kind = rng.choice(kinds)
    if kind in ("data", "header", "manifest", "fragments"):
        root = copy_tree(base["root"], tdir / "root")
        d = root / step_name(2)
        if kind in ("data", "header"):
            f = d / rng.choice(sorted(p.name for p in d.glob("rank_*.safetensors")))
            lo, hi = rank_file_regions(f)[kind]
        else:
            f = d / ("manifest.json" if kind == "manifest" else "fragments.parquet")
            lo, hi = 0, f.stat().st_size
        return kind, d, f, lo, hi, False
    uni = copy_tree(base["uni"], tdir / "uni")
    f = rng.choice(universal_files(uni)[kind])
    return kind, uni, f, 0, f.stat().st_size, True


def names_of(f: Path, top: Path) -> tuple:
    rel = f.relative_to(top).as_posix()
    parent = f.parent.relative_to(top).as_posix()
    return tuple(n for n in (str(f), rel, f.name if f.name != "zarr.json" else "", parent if parent != "." else "")
                 if n)


def refused_and_loaded(ctx: Context, trial: int, what: str, ckpt: Path, f: Path, uni: bool) -> tuple[list, list]:
    """``ucp verify`` must refuse ``ckpt`` (its file ``f`` was damaged) in one line naming the file;
    the load must refuse it the same way or return exactly what was saved."""
    base = ctx.base()
    names = names_of(f, ckpt)
    r = ctx.ucp("verify", ckpt, "--quiet")
    found = []
    if r.rc == 0:
        found.append(("wrong", f"{what}: `ucp verify` passed it"))
    else:
        found += cli_findings(f"{what}: ucp verify", r, names)
    path = str(ckpt) if uni else f"{ckpt.parent}@2"
    return found, [LoadCheck(trial, path, what, base["digests"], names=names)]


# -- families ---------------------------------------------------------------------------------------

FILE_KINDS = ("data", "header", "manifest", "fragments", "chunk", "array_json", "group_json")


def bit_flip(ctx, rng, i, tdir):
    kind, ckpt, f, lo, hi, uni = pick_target(ctx, rng, tdir, FILE_KINDS)
    if hi <= lo:
        raise HarnessError(f"{f} has no {kind} bytes")
    data = bytearray(f.read_bytes())
    at, bit = rng.randrange(lo, hi), rng.randrange(8)
    data[at] ^= 1 << bit
    f.write_bytes(bytes(data))
    rel = f.relative_to(ckpt.parent if not uni else ckpt).as_posix()
    return refused_and_loaded(ctx, i, f"bit {bit} of byte {at} of {rel} ({kind}) flipped", ckpt, f, uni)


def truncation(ctx, rng, i, tdir):
    kind, ckpt, f, _, _, uni = pick_target(ctx, rng, tdir, FILE_KINDS)
    size = f.stat().st_size
    n = rng.randrange(0, size)
    os.truncate(f, n)
    rel = f.relative_to(ckpt.parent if not uni else ckpt).as_posix()
    return refused_and_loaded(ctx, i, f"{rel} ({kind}) truncated from {size} to {n} bytes", ckpt, f, uni)


def chunk_swap(ctx, rng, i, tdir):
    uni = copy_tree(ctx.base()["uni"], tdir / "uni")
    chunks = universal_files(uni)["chunk"]
    pairs = [(a, b) for a in chunks for b in chunks if a < b and a.parent != b.parent and a.name == b.name
             and a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()]
    if not pairs:
        raise HarnessError("no two same-shape chunks of different arrays to swap")
    a, b = rng.choice(pairs)
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    what = f"chunks {a.relative_to(uni).as_posix()} <-> {b.relative_to(uni).as_posix()} swapped"
    return refused_and_loaded(ctx, i, what, uni, a, True)


def rollback(ctx, rng, i, tdir):
    nproc, keep = 1 + i % 2, rng.choice([None, None, 5])
    root = tdir / "root"
    what = f"rollback ({nproc} rank(s), keep={keep})"
    run1 = Job(ctx, root, ["save:2", "save:4", "save:6"], nproc=nproc, keep=keep, seed=1)
    run1.wait(ctx.timeout)
    s1 = saves(run1)
    found = failed_events(f"{what} run 1", run1, (root,))
    if not all(s1.get(s, {}).get("ok") for s in (2, 4, 6)):
        return found or [("unclear", f"{what}: run 1's saves failed")], []
    run2 = Job(ctx, root, ["load:2", "save:3", "save:4"], nproc=nproc, keep=keep, seed=1)
    run2.wait(ctx.timeout)
    evs = {e["action"]: e for e in run2.events() if not e.get("begin")}
    ld = evs.get("load:2", {})
    if not ld.get("ok"):
        found += event_findings(f"{what} run 2 load(2)", ld, (root,)) or [("unclear", f"{what}: run 2 load(2) failed")]
    elif ld.get("digest") != s1[2]["digest"]:
        found.append(("wrong", f"{what}: run 2's load(2) returned other tensors than run 1 saved"))
    for s in (3, 4):
        e = evs.get(f"save:{s}", {})
        if not e.get("ok"):
            found.append(("unclear", f"{what}: after load(2), save({s}) refused: {short(e.get('error', 'no event'))}"))
    s2 = saves(run2)
    if 4 in s2 and s2[4].get("ok"):
        return found, [LoadCheck(i, str(root), f"{what}: restart after run 2", {4: {s2[4]['digest']}}, step=4,
                                 must_load=True)]
    return found, []


def disk_full(ctx, rng, i, tdir):
    nproc = 1 + i % 2
    mnt = tdir / "tmpfs"
    ctx.mount_tmpfs(mnt, 20)
    try:
        root = mnt / "root"
        big = 38000  # about 6 MB of fp32 parameters and AdamW moments: the fourth save does not fit
        what = f"disk_full ({nproc} rank(s), 20 MB tmpfs)"
        run1 = Job(ctx, root, [f"save:{s}" for s in range(1, 6)], nproc=nproc, size=big)
        run1.wait(ctx.timeout)
        s1 = saves(run1)
        bad = sorted(s for s, e in s1.items() if not e.get("ok"))
        good = sorted(s for s, e in s1.items() if e.get("ok"))
        if not bad:
            raise HarnessError(f"the 20 MB tmpfs never filled (saves {good})")
        found = [("unclear" if f[0] == "unclear" else f[0], f[1]) for f in failed_events(what, run1, (str(mnt),))]
        checks = []
        # a smaller state in the same root, nothing freed: the failed saves' partial files must be gone
        small = Job(ctx, root, ["save:20"], nproc=nproc, size=16)
        small.wait(ctx.timeout)
        e = saves(small).get(20, {})
        if not e.get("ok"):
            found.append(("unclear", f"{what}: after the disk filled, a small save into the same root failed: "
                                     f"{short(e.get('error', 'no event'))}"))
        # the user frees the oldest checkpoint: the newest loads exactly and the next full-size save fits
        if good:
            shutil.rmtree(root / step_name(good[0]), ignore_errors=True)
            run2 = Job(ctx, root, [f"load:{good[-1]}", "save:21"], nproc=nproc, size=big)
            run2.wait(ctx.timeout)
            evs = {e["action"]: e for e in run2.events() if not e.get("begin")}
            ld = evs.get(f"load:{good[-1]}", {})
            if not ld.get("ok"):
                found.append(("unclear", f"{what}: load({good[-1]}) after freeing space failed: "
                                         f"{short(ld.get('error', 'no event'))}"))
            elif ld.get("digest") != s1[good[-1]]["digest"]:
                found.append(("wrong", f"{what}: load({good[-1]}) returned other tensors than were saved"))
            if not evs.get("save:21", {}).get("ok"):
                found.append(("unclear", f"{what}: after freeing step {good[0]} (6 MB), save(21) failed: "
                                         f"{short(evs.get('save:21', {}).get('error', 'no event'))}"))
        return found, checks
    finally:
        ctx.procs.end_all()
        ctx.unmount(mnt)


def two_writers(ctx, rng, i, tdir):
    """Two jobs save steps 1..4 into one root, their saves spread over a second or so, so that they
    overlap. A second writer may be refused (one line naming the root) or may take the root over once
    the first is gone (re-saving a step then rolls back, docs/format-checkpoint.md section 1), but the
    two must never both commit while both are saving: the successful saves, in time order, change
    writer at most once, no two saves of one step overlap in time, and every step complete at the end
    verifies and loads as its last successful save left it."""
    root = tdir / "root"
    n = 4
    nproc = 1 + (i % 4 == 3)
    gap = f"sleep:{rng.uniform(0.1, 0.4):.2f}"
    jobs = []
    for w in range(2):
        actions = [f"sleep:{rng.uniform(0, 0.3):.2f}"]
        for s in range(1, n + 1):
            actions += [f"save:{s}", gap]
        jobs.append(Job(ctx, root, actions, nproc=nproc, seed=w + 1, name=f"writer{w}"))
    for j in jobs:
        j.wait(ctx.timeout)
    what = f"two jobs ({nproc} rank(s) each) saving steps 1..{n} into one root at once"
    found = []
    for w, j in enumerate(jobs):
        found += failed_events(f"{what}: writer {w}", j, (str(root),))
    done = [{s: e for s, e in saves(j).items() if e.get("ok")} for j in jobs]
    order = sorted((e["t"], w, s) for w in range(2) for s, e in done[w].items())
    switches = sum(a[1] != b[1] for a, b in zip(order, order[1:]))
    if switches > 1:
        found.append(("wrong", f"{what}: both committed while both were saving: "
                               + " ".join(f"w{w}:s{s}" for _, w, s in order)))
    for s in range(1, n + 1):
        if s in done[0] and s in done[1]:
            a, b = done[0][s], done[1][s]
            if a["t0"] < b["t"] and b["t0"] < a["t"]:
                found.append(("wrong", f"{what}: both writers' save({s}) succeeded at the same time"))
    checks = []
    for s in range(1, n + 1):
        if not (root / step_name(s) / "manifest.json").exists():
            continue
        last = max(((done[w][s]["t"], w) for w in range(2) if s in done[w]), default=None)
        if last is None:
            found.append(("wrong", f"{what}: step {s} is complete on disk though no save of it succeeded"))
            continue
        r = ctx.ucp("verify", root, "--step", s, "--quiet")
        if r.rc != 0:
            found.append(("wrong", f"{what}: step {s}, reported saved, fails `ucp verify`: {short(r.err, 100)}"))
        checks.append(LoadCheck(i, f"{root}@{s}", f"{what}: step {s}", {s: {done[last[1]][s]["digest"]}}, step=s,
                                must_load=True))
    return found, checks


def retention_race(ctx, rng, i, tdir):
    root = tdir / "root"
    n = 40
    writer = Job(ctx, root, [f"save:{s}" for s in range(1, n + 1)], keep=1, size=64, name="writer")
    deadline = time.monotonic() + ctx.timeout
    while not saves(writer) and time.monotonic() < deadline and writer.procs[0].poll() is None:
        time.sleep(0.05)
    results: list[tuple[str, Result]] = []
    k = 0
    loads = None
    while writer.procs[0].poll() is None and k < 4:
        what = "convert" if rng.random() < 0.5 or loads is not None else "load"
        if what == "convert":
            results.append((f"ucp convert {k}", ctx.ucp("convert", root, tdir / f"uni{k}", "--quiet")))
        else:
            loads = ctx.python(str(TOOLS / "fault_job.py"), "load", "--size", "64", *[str(root)] * 6)
        k += 1
    writer.wait(ctx.timeout)
    digests = {s: {e["digest"]} for s, e in saves(writer).items() if e.get("ok")}
    what = "a reader racing retention (keep=1)"
    found = failed_events(f"{what}: writer", writer, (str(root),))
    checks = []
    for label, r in results:
        if r.rc == 3 or "corrupt" in r.err.lower():
            found.append(("unclear", f"{what}: {label} called a just-pruned checkpoint corrupt: {short(r.err, 120)}"))
        elif r.rc != 0:
            found += cli_findings(f"{what}: {label}", r, (str(root),))
        else:
            k = label.split()[-1]
            checks.append(LoadCheck(i, str(tdir / f"uni{k}"), f"{what}: the result of {label}", digests,
                                    must_load=True, size=64))
    if loads is not None:
        evs = events_of(loads.out)
        found += message_findings(f"{what}: load", "", loads.rc, timed_out=loads.timed_out) if loads.rc else []
        for ev in evs:
            if not ev.get("ok") and ("corrupt" in ev.get("error", "").lower() or ev.get("cls") == "CorruptCheckpointError"):
                found.append(("unclear", f"{what}: load() called a just-pruned checkpoint corrupt: "
                                         f"{short(ev.get('error'), 120)}"))
            else:
                found += judge_load(LoadCheck(i, str(root), f"{what}: load", digests, names=(str(root),)), ev)
    return found, checks


def kill_during_save(ctx, rng, i, tdir):
    nproc, keep = rng.choice([1, 2]), rng.choice([None, 2])
    root = tdir / "root"
    at = rng.randint(2, 4)
    victims = rng.choice([[0], [nproc - 1], list(range(nproc))])
    fixed = rng.random() < 0.5
    env = None
    if fixed:
        point = f"{rng.choice(['replace', 'rename', 'fsync', 'write', 'open', 'mkdir', 'unlink', 'ftruncate'])}:" \
                f"{rng.randint(1, 4)}"
        env = lambda r: {"FAULT_KILL": point, "FAULT_KILL_STEP": str(at)} if r in victims else {}  # noqa: E731
        how = f"rank(s) {victims} SIGKILLed at call {point} of os during save({at})"
    else:
        delay = rng.uniform(0, 0.08)
        how = f"rank(s) {victims} SIGKILLed {delay * 1e3:.0f} ms into save({at})"
    what = f"{how} ({nproc} rank(s), keep={keep})"
    job = Job(ctx, root, [f"save:{s}" for s in range(1, 6)], nproc=nproc, keep=keep, size=20000, env_of_rank=env)
    if not fixed:
        deadline = time.monotonic() + ctx.timeout
        while at not in begun(job) and time.monotonic() < deadline and job.procs[0].poll() is None:
            time.sleep(0.005)
        time.sleep(delay)
        for r in victims:
            ctx.procs.end(job.procs[r])
    deadline = time.monotonic() + 15
    while any(p.poll() is None for p in job.procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.end()
    digests = {s: {d} for s, d in begun(job).items()}
    done = sorted(s for s, e in saves(job).items() if e.get("ok"))
    found = [f for f in failed_events(what, job) if "not a UcpError" in f[1]]
    r = ctx.ucp("verify", root, "--quiet")
    if r.rc not in (0, 2):
        found.append(("wrong", f"{what}: the newest complete checkpoint fails `ucp verify`: {short(r.err, 100)}"))
    elif r.rc == 2 and done:
        found.append(("wrong", f"{what}: step {done[-1]} was saved but `ucp verify ROOT` finds nothing"))
    nxt = max(digests, default=0) + 1
    restart = Job(ctx, root, ["load", f"save:{nxt}", f"save:{nxt + 1}"], nproc=nproc, keep=keep, size=20000)
    restart.wait(ctx.timeout)
    evs = {e["action"]: e for e in restart.events() if not e.get("begin")}
    ld = evs.get("load", {})
    if not ld.get("ok"):
        found.append(("unclear", f"{what}: the restarted job's load() failed: {short(ld.get('error', 'no event'))}"))
    elif ld.get("step") is None:
        if done:
            found.append(("wrong", f"{what}: the restarted job found no checkpoint though step {done[-1]} was saved"))
    elif ld["step"] < (done[-1] if done else 0) or ld.get("digest") not in digests.get(ld["step"], ()):
        found.append(("wrong", f"{what}: the restarted job resumed step {ld['step']} with tensors not those saved"))
    for s in (nxt, nxt + 1):
        e = evs.get(f"save:{s}", {})
        if not e.get("ok"):
            found.append(("unclear", f"{what}: the restarted job's save({s}) failed: {short(e.get('error', 'no event'))}"))
    return found, []


# -- crafted files ----------------------------------------------------------------------------------

def safetensors_bytes(header, data: bytes) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def hf_dir(tdir: Path, header, data: bytes) -> Path:
    d = tdir / "hf"
    d.mkdir()
    (d / "model.safetensors").write_bytes(safetensors_bytes(header, data))
    return d


def torch_zip(path: Path, pkl: bytes, deflate: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")
        z.writestr("archive/byteorder", "little")


class _Payload:
    def __init__(self, marker: str, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "eval":
            return eval, (f"open({self.marker!r}, 'w').close()",)
        return getattr(__import__("builtins"), "exec"), (f"open({self.marker!r}, 'w').close()",)


def big_binbytes_pt(ctx: Context, n: int) -> Path:
    """A torch.save-style zip whose deflated data.pkl holds ``n`` zero bytes in one BINBYTES8 (a few
    MB on disk), written once per run and copied into the trials."""
    path = ctx.work / f"binbytes8-{n}.pt"
    if not path.exists():
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
            with z.open("archive/data.pkl", "w", force_zip64=True) as f:
                f.write(b"\x80\x04\x8e" + struct.pack("<Q", n))
                block = bytes(1 << 24)
                for _ in range(n >> 24):
                    f.write(block)
                f.write(b".")
            z.writestr("archive/version", "3\n")
            z.writestr("archive/byteorder", "little")
    return path


def hostile_pickle(ctx, rng, i, tdir):
    marker = tdir / "PAYLOAD_RAN"
    kind = rng.choice(["system", "eval", "exec", "binbytes8_short", "binbytes8_real"])
    src = tdir / "ds"
    step = src / "global_step1"
    if kind in ("system", "eval", "exec"):
        pkl = pickle.dumps({"module": _Payload(str(marker), kind)}, protocol=2)
        what = f"a DeepSpeed .pt whose data.pkl calls {kind}()"
    elif kind == "binbytes8_short":
        pkl = b"\x80\x04\x8e" + struct.pack("<Q", 4 << 30) + b"\0" * 64 + b"."
        what = "a DeepSpeed .pt whose data.pkl declares a 4 GiB BINBYTES8 (64 bytes there)"
    else:
        pkl = None
        what = "a DeepSpeed .pt whose deflated data.pkl holds a 1.5 GiB BINBYTES8"
    files = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    for name in files:  # (both: whichever the importer reads first is hostile)
        if pkl is None:
            step.mkdir(parents=True, exist_ok=True)
            shutil.copy(big_binbytes_pt(ctx, 1536 << 20), step / name)
        else:
            torch_zip(step / name, pkl, deflate=True)
    (src / "latest").write_text("global_step1")
    r = ctx.ucp("convert", "--from", "deepspeed", src, tdir / "out", "--quiet")
    found = []
    if marker.exists():
        found.append(("wrong", f"{what}: the pickle's payload ran"))
    if r.rc == 0:
        found.append(("wrong", f"{what}: `ucp convert --from deepspeed` accepted it"))
    if r.maxrss_mb > MEMORY_LIMIT_MB:
        found.append(("unclear", f"{what}: convert peaked at {r.maxrss_mb:.0f} MB of memory"))
    found += cli_findings(f"{what}: ucp convert", r, files)
    return found, []


def resign(header: dict) -> dict:
    header.pop("header_crc32c", None)
    try:
        from ucp.storage.manifest_io import sign_header
    except ImportError as e:
        raise HarnessError(f"cannot re-sign a manifest: {e}") from None
    return sign_header(header)


def hostile_sizes(ctx, rng, i, tdir):
    kind = rng.choice(["manifest_shape", "manifest_files", "manifest_rows", "hf_identical", "hf_overlap", "hf_shape_string",
                       "hf_header_len", "hf_beyond"])
    found = []
    if kind.startswith("manifest"):
        root = copy_tree(ctx.base()["root"], tdir / "root")
        m = root / step_name(2) / "manifest.json"
        header = json.loads(m.read_text())
        if kind == "manifest_shape":
            key = rng.choice(sorted(header["tensors"]))
            header["tensors"][key]["shape"] = [1 << 33] if rng.random() < 0.5 else [1 << 17, 1 << 16]
            what = f"a re-signed manifest declaring {key} of 2^33 elements"
        elif kind == "manifest_files":
            name = rng.choice(sorted(header["files"]))
            header["files"][name] = 1 << 40
            what = f"a re-signed manifest declaring {name} of 2^40 bytes"
        else:
            header["fragment_table"]["rows"] = 1 << 31
            what = "a re-signed manifest declaring a fragment table of 2^31 rows"
        m.write_text(json.dumps(resign(header), indent=1))
        for cmd in (["verify", root, "--quiet"], ["convert", root, tdir / "out", "--quiet"]):
            r = ctx.ucp(*cmd)
            if r.rc == 0:
                found.append(("wrong", f"{what}: `ucp {cmd[0]}` accepted it"))
            if r.maxrss_mb > MEMORY_LIMIT_MB:
                found.append(("unclear", f"{what}: `ucp {cmd[0]}` peaked at {r.maxrss_mb:.0f} MB"))
            found += cli_findings(f"{what}: ucp {cmd[0]}", r, ("manifest.json", step_name(2)))
        return found, [LoadCheck(i, str(root), what, ctx.base()["digests"], names=("manifest.json", step_name(2)))]
    data = bytes(range(32))
    t = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    if kind == "hf_identical":
        header, what = {"a": t, "b": dict(t)}, "an HF file with two tensors at identical data_offsets"
    elif kind == "hf_overlap":
        header = {"a": t, "b": dict(t, data_offsets=[8, 24]), "c": dict(t, data_offsets=[16, 32])}
        what = "an HF file with overlapping data_offsets"
    elif kind == "hf_shape_string":
        header, what = {"a": dict(t, shape="22")}, 'an HF file with "shape": "22"'
        data = data[:16]
    elif kind == "hf_header_len":
        d = tdir / "hf"
        d.mkdir()
        (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
        header, what = None, "an HF file whose header length is 2^60"
    else:
        header = {"a": dict(t, shape=[1 << 20, 1 << 20], data_offsets=[0, 1 << 42])}
        what = "an HF file declaring a 4 TiB tensor in 32 bytes"
    d = hf_dir(tdir, header, data) if header is not None else tdir / "hf"
    r = ctx.ucp("convert", "--from", "hf", d, tdir / "out", "--quiet")
    if r.rc == 0:
        found.append(("wrong", f"{what}: `ucp convert --from hf` accepted it"))
    if r.maxrss_mb > MEMORY_LIMIT_MB:
        found.append(("unclear", f"{what}: convert peaked at {r.maxrss_mb:.0f} MB"))
    found += cli_findings(f"{what}: ucp convert --from hf", r, ("model.safetensors",))
    return found, []


def deep(depth: int, rng: random.Random) -> str:
    o, c = rng.choice([("[", "]"), ('{"a":', "}")])
    return o * depth + "1" + c * depth


def deep_json(ctx, rng, i, tdir):
    kind = rng.choice(["manifest", "manifest_field", "array_json", "group_json", "hf_header"])
    depth = rng.choice([1000, 20000, 200000])
    found, checks = [], []
    if kind.startswith("manifest"):
        root = copy_tree(ctx.base()["root"], tdir / "root")
        f = root / step_name(2) / "manifest.json"
        if kind == "manifest":
            f.write_text(deep(depth, rng))
        else:
            text = f.read_text()
            f.write_text(text[:text.index("{") + 1] + f'"x": {deep(depth, rng)}, ' + text[text.index("{") + 1:])
        cmds = [["verify", root / step_name(2), "--quiet"], ["inspect", root / step_name(2)],
                ["convert", root / step_name(2), tdir / "out", "--quiet"]]
        checks.append(LoadCheck(i, f"{root}@2", f"manifest.json {depth} deep", ctx.base()["digests"],
                                names=("manifest.json",)))
        names = ("manifest.json",)
    elif kind in ("array_json", "group_json"):
        uni = copy_tree(ctx.base()["uni"], tdir / "uni")
        f = rng.choice(universal_files(uni)[kind])
        f.write_text(deep(depth, rng))
        cmds = [["verify", uni, "--quiet"], ["inspect", uni], ["export", uni, tdir / "out", "--quiet"]]
        checks.append(LoadCheck(i, str(uni), f"{f.relative_to(uni)} {depth} deep", ctx.base()["digests"],
                                names=names_of(f, uni)))
        names = names_of(f, uni)
    else:
        d = hf_dir(tdir, deep(depth, rng).encode(), b"")
        cmds = [["convert", "--from", "hf", d, tdir / "out", "--quiet"]]
        names = ("model.safetensors",)
    for cmd in cmds:
        r = ctx.ucp(*cmd)
        what = f"{kind} nested {depth} deep: ucp {cmd[0]}"
        if r.rc == 0 and cmd[0] in ("verify", "convert"):  # (inspect and export need not read every file)
            found.append(("wrong", f"{what} accepted it"))
        found += cli_findings(what, r, names)
    return found, checks


# -- command lines ----------------------------------------------------------------------------------

HUGE = "9" * 40


def cli_case(rng: random.Random, root: Path, uni: Path, tdir: Path) -> tuple[list, tuple, bool]:
    """(arguments, what the message should name, must fail)"""
    nl = tdir / "bad\npath"
    junk = rng.choice(["", " ", "-", "--", "\x7f", "é\u202e", "a" * 5000, "\t\n", "$(id)", "../../..", "%s%n"])
    missing = tdir / f"missing{rng.randrange(1000)}"
    big = rng.choice(["0", "-3", HUGE])
    cases = [
        (["verify", nl], (), True),
        (["inspect", nl, "--json"], (), True),
        (["convert", nl, tdir / "o1"], (), True),
        (["convert", root, tdir / "o\nx"], (), False),
        (["export", uni, tdir / "o\ny"], (), False),
        (["verify", missing], (str(missing),), True),
        (["inspect", root / step_name(2) / "manifest.json"], ("manifest.json",), True),
        (["verify", "/dev/null"], ("/dev/null",), True),
        (["verify", root, "--step", rng.choice(["-1", HUGE, "0", "x"])], (), True),
        (["inspect", root, "--step", rng.choice(["-5", HUGE, "1e3"])], (), True),
        # (a 40-digit size or count is an upper bound a convert may clamp: refused or not, in one line)
        (["convert", root, tdir / "o2", "--workers", big], (), big != HUGE),
        (["convert", root, tdir / "o3", "--chunk-kib", big], (), big != HUGE),
        (["convert", root, tdir / "o4", "--memory-mib", big], (), big != HUGE),
        (["convert", root, tdir / "o5", "--set", rng.choice(["=", "a", "x=1e400", "x=" + "9" * 5000, "=3", junk])],
         (), True),
        (["convert", root, root], (str(root),), True),
        (["convert", root, "/proc/nonexistent/x"], ("/proc/nonexistent",), True),
        (["convert", "--from", rng.choice(["hf", "dcp", "deepspeed"]), root, tdir / "o6"], (str(root),), True),
        (["convert", root, tdir / "o7", "--spec", rng.choice([str(missing), str(tdir), "/dev/null", junk])], (), True),
        (["export", uni, tdir / "o8", "--max-shard-size", rng.choice([HUGE + "GB", "0", "-5GB", "5XB", "", "1e400GB",
                                                                      "nan", "inf GB", "99999999999999999999TiB"])],
         (), True),
        (["export", uni, tdir / "o9", "--dtype", junk or "x"], (), True),
        (["export", root, tdir / "o10"], (), True),
        (["inspect", junk or "x"], (), True),
        (["agent", "status", "--job", rng.choice(["a\nb", "../../etc", "x" * 5000, junk or "y"])], (), False),
        (["train", "--nproc", rng.choice(["0", "-1", "x"])], (), True),
        (["verify"], (), True),
        ([rng.choice(["frobnicate", junk or "z", "--nope"])], (), True),
        (["verify", root, "--" + (junk.strip("-") or "bogus")], (), True),
    ]
    return rng.choice(cases)


def cli_garbage(ctx, rng, i, tdir):
    base = ctx.base()
    args, names, must_fail = cli_case(rng, base["root"], base["uni"], tdir)
    r = ctx.ucp(*args, timeout=60)
    what = "ucp " + " ".join(repr(str(a))[1:-1][:60] for a in args)
    found = []
    if must_fail and r.rc == 0:
        found.append(("wrong", f"{what}: accepted (exit 0)"))
    return found + cli_findings(what, r, names), []


def mutate_spec(text: str, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["chars", "chars", "line_drop", "line_dup", "bigint", "nesting", "truncate", "unicode",
                       "swap_lines", "empty", "binary"])
    lines = text.splitlines(keepends=True)
    if kind == "chars":
        s = list(text)
        for _ in range(rng.randint(1, 5)):
            at = rng.randrange(len(s))
            op = rng.choice(["del", "ins", "rep"])
            ch = rng.choice("(){}[]=,:;*.\"'#\\\n 0123456789-+abcxyz_$")
            if op == "del":
                del s[at]
            elif op == "ins":
                s.insert(at, ch)
            else:
                s[at] = ch
        return "".join(s), "random characters changed"
    if kind == "line_drop" and len(lines) > 1:
        del lines[rng.randrange(len(lines))]
        return "".join(lines), "a line dropped"
    if kind == "line_dup":
        at = rng.randrange(len(lines))
        lines.insert(at, lines[at])
        return "".join(lines), "a line repeated"
    if kind == "bigint":
        nums = list(re.finditer(r"\b\d+\b", text))
        if nums:
            m = rng.choice(nums)
            return text[:m.start()] + "9" * 4300 + text[m.end():], "a number replaced by a 4,300-digit integer"
        return text + "\nx = " + "9" * 4300 + "\n", "a 4,300-digit integer appended"
    if kind == "nesting":
        at = rng.randrange(len(text))
        n = rng.choice([500, 5000, 50000])
        return text[:at] + "(" * n + text[at:], f"{n} '(' inserted"
    if kind == "truncate":
        return text[:rng.randrange(len(text))], "truncated"
    if kind == "unicode":
        at = rng.randrange(len(text))
        return text[:at] + rng.choice(["\u00e9", "\u202e", "\x00", "\ufeff", "\U0001f600", "\x1b[31m"]) + text[at:], \
            "an odd character inserted"
    if kind == "swap_lines" and len(lines) > 1:
        a, b = rng.sample(range(len(lines)), 2)
        lines[a], lines[b] = lines[b], lines[a]
        return "".join(lines), "two lines swapped"
    if kind == "binary":
        return bytes(rng.randrange(256) for _ in range(200)).decode("latin-1"), "random bytes"
    return "", "empty"


def ucl_fuzz(ctx, rng, i, tdir):
    specs = sorted(SPECS.glob("*.ucl"))
    text = rng.choice(specs).read_text()
    mutated, how = mutate_spec(text, rng)
    spec = tdir / "fuzzed.ucl"
    spec.write_bytes(mutated.encode("utf-8", "surrogateescape"))
    r = ctx.ucp("convert", ctx.base()["root"], tdir / "out", "--spec", spec, "--quiet", timeout=60)
    what = f"a UCL spec with {how}"
    found = message_findings(f"{what}: ucp convert --spec", r.err, r.rc, (), r.timed_out)
    lines = [line for line in r.err.splitlines() if line.strip()]
    if r.rc not in (0, None) and not found and lines and "fuzzed.ucl" not in r.err \
            and not re.search(r"line \d+|\d+:\d+", r.err):
        found.append(("unclear", f"{what}: the message names neither the spec nor a line: {short(lines[0])}"))
    return found, []


def memory_tier(ctx, rng, i, tdir):
    node, step = rng.randrange(2), rng.randint(1, 3)
    args = ["--nodes", "2", "--ranks-per-node", "1", "--group", "2", "--parity", "1", "--steps", "4",
            "--persist-every", "2", "--kill", f"{node}@{step}", "--seed", str(i), "--timeout", "30",
            "--attempt-timeout", "120", "--workdir", str(tdir / "chaos")]
    if rng.random() < 0.5:
        args.append("--kill-in-flight")
    r = ctx.procs.run([sys.executable, str(TOOLS / "chaos.py"), *args], timeout=300, env=ctx.env)
    what = "tools/chaos.py " + " ".join(args[args.index("--kill"):args.index("--kill") + 2]) + \
        (" --kill-in-flight" if "--kill-in-flight" in args else "")
    found = []
    lines = r.out.strip().splitlines()
    try:
        doc = json.loads(lines[-1])
    except (IndexError, ValueError):
        return [("unclear", f"{what}: no JSON line (exit {r.rc}): {short(r.err[-200:], 160)}")], []
    for rec in doc.get("recoveries", []):
        if rec.get("bit_exact") is False:
            found.append(("wrong", f"{what}: restored step {rec['restored_step']} from {rec['source']} not bit-exact"))
        if rec.get("warning") and "\n" in rec["warning"]:
            found.append(("unclear", f"{what}: a multi-line warning: {short(rec['warning'], 80)}"))
    if doc.get("error"):
        found.append(("unclear", f"{what}: {short(doc['error'], 160)}"))
    if doc.get("shm_left"):
        found.append(("unclear", f"{what}: {doc['shm_left']} file(s) left in /dev/shm"))
    for mark in ("Traceback (most recent call last)", "terminate called", "Exception raised from"):
        if mark in r.err:
            at = r.err.index(mark)
            found.append(("unclear", f"{what}: {mark!r} in the trainers' output: {short(r.err[at:at + 160], 120)}"))
            break
    if r.rc not in (0, 1):
        found.append(("unclear", f"{what}: exit {r.rc}"))
    return found, []


FAMILIES = ("kill_during_save", "bit_flip", "truncation", "chunk_swap", "rollback", "disk_full", "two_writers",
            "retention_race", "hostile_pickle", "hostile_sizes", "deep_json", "cli_garbage", "ucl_fuzz", "memory_tier")
FAMILY_FUNCTIONS = {name: globals()[name] for name in FAMILIES}
