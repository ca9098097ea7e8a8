"""The snapshot agent's state and its request handlers (the process around them:
:mod:`ucp.snapshot.agent`): segments, committed snapshot headers and parity records per rank and slot,
and the durable writes of snapshots from threads of its own (docs/agent.md)."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

from ucp.codecs.checksum import block_crc32c
from ucp.errors import AgentError, FormatError
from ucp.format.jsonio import parse_json
from ucp.snapshot import persist, shm
from ucp.snapshot.discovery import discovery_path, lock_path, read_info
from ucp.snapshot.header import block_bytes_of
from ucp.storage.atomic import write_atomic
from ucp.storage.directory import step_dir
from ucp.storage.objstore import as_location

_SUMMARY = ("rank", "slot", "step", "world_size", "complete", "host", "token", "adopted")  # a header's fields ``slots`` summarizes
# the fields of a parity record ``parity`` summarizes (docs/erasure.md section 7)
_PARITY_SUMMARY = ("rank", "slot", "step", "token", "world_size", "members", "index", "m", "stripe", "sizes")
_DATA = re.compile(r"\.r\d+\.s[01]\Z")  # segment names: snapshot data
_PARITY = re.compile(r"\.r\d+\.p[01]\Z")  # segment names: parity
_HEADER = re.compile(r"r(\d{1,9})\.s([01])\.json")  # a slot's header file, after the job's prefix


class Deferred:
    """A request answered later, by a thread of its own: once ``ready()`` holds (checked under the
    agent's lock), ``answer()`` is the reply."""

    def __init__(self, ready, answer):
        self.ready = ready
        self.answer = answer


class Agent:
    """The agent process's state and request handlers (run by :func:`serve`)."""

    def __init__(self, job: str):
        self.job = shm.check_job(job)
        self.segments: dict[str, int] = {}  # segment name -> bytes
        self.clients: dict[str, dict] = {}  # client id -> what it said in hello
        self.slots: dict[tuple[int, int], dict] = {}  # (rank, slot) -> committed snapshot header
        self.parity: dict[tuple[int, int], dict] = {}  # (rank, slot) -> parity record of that slot's snapshot
        self.stopping = threading.Event()
        self.abandon = threading.Event()  # stop waiting for other ranks' files (a shutdown without flush)
        self.started = time.time()
        self.adopted: dict[str, int] = {}  # "r<rank>.s<slot>" -> step: a dead agent's intact snapshots, taken over
        self.discarded: dict[str, str] = {}  # "r<rank>.s<slot>" -> why a dead agent's snapshot was not taken over
        self.predecessor: int | None = None  # the pid of the dead agent whose leftovers this one found
        # persistence (docs/agent.md section 5); every field below is guarded by ``lock``
        self.lock = threading.Condition(threading.RLock())
        self.config: dict[int, dict] = {}  # rank -> where and what it persists
        self.job_world: int | None = None  # the world size of the job that configured last
        self.work: list[tuple[int, int, int, dict]] = []  # (rank, slot, step, its config) to write, in order
        self.busy: set[tuple[int, int]] = set()  # slots queued or being written
        self.inflight: dict[int, int] = {}  # rank -> writes (and, for rank 0, commits) not finished
        self.persisted: dict[int, int] = {}  # rank -> newest step written
        # rank -> (session, failure) not yet reported: a failure is handed only to the session (the
        # trainer's connection, one per Checkpointer) whose snapshot failed, never to a later job
        self.errors: dict[int, list[tuple[str | None, str]]] = {}
        self.commits: list[tuple[dict, dict]] = []  # (rank 0's header, config) to commit, in order
        for loop, name in ((self._write_loop, "ucp-persist"), (self._commit_loop, "ucp-commit")):
            threading.Thread(target=loop, name=name, daemon=True).start()

    # -- requests ------------------------------------------------------------------------
    def handle(self, request: dict):
        """The reply to ``request``: a dict, or a :class:`Deferred` one."""
        op = request.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise AgentError(f"unknown request {op!r}")
        with self.lock:
            return handler(**request.get("args", {}))

    def answer_deferred(self, deferred: Deferred, timeout: float) -> dict:
        with self.lock:
            if not self.lock.wait_for(lambda: deferred.ready() or self.stopping.is_set(), timeout):
                raise AgentError(f"still busy after {timeout:g} s")
            return deferred.answer()

    def op_hello(self, client: str, pid: int, rank: int | None = None) -> dict:
        self.clients[client] = {"pid": pid, "rank": rank, "since": time.time()}
        return self.op_status()

    def op_status(self) -> dict:
        return {"job": self.job, "pid": os.getpid(), "started": self.started, "segments": dict(self.segments),
                "nbytes": sum(self.segments.values()), "clients": len(self.clients),
                "snapshots": {f"{r}.{s}": {"step": h["step"], "complete": h["complete"]}
                              for (r, s), h in sorted(self.slots.items())},
                "persisted": {str(r): s for r, s in sorted(self.persisted.items())},
                "persisting": sum(self.inflight.values()),
                "parity": {f"{r}.{s}": {"step": p["step"], "members": p["members"], "m": p["m"]}
                           for (r, s), p in sorted(self.parity.items())},
                "adopted": dict(self.adopted), "discarded": dict(self.discarded), "predecessor": self.predecessor,
                "data_bytes": sum(n for name, n in self.segments.items() if _DATA.search(name)),
                "parity_bytes": sum(n for name, n in self.segments.items() if _PARITY.search(name))}

    def op_alloc(self, name: str, nbytes: int) -> dict:
        """Create segment ``name`` of ``nbytes``, or hand back the one of that name and size."""
        full = shm.segment_name(self.job, name)
        if full in self.segments:
            if self.segments[full] != nbytes:
                raise AgentError(f"segment {name!r} exists with {self.segments[full]} bytes, not {nbytes}")
            return {"name": full, "nbytes": nbytes, "created": False}
        seg = shm.create(full, nbytes)
        seg.close()
        self.segments[full] = nbytes
        return {"name": full, "nbytes": nbytes, "created": True}

    def op_free(self, name: str) -> dict:
        full = shm.segment_name(self.job, name)
        existed = self.segments.pop(full, None) is not None
        shm.unlink(full)
        return {"freed": existed}

    def adopt(self) -> None:
        """Take over what a dead agent of this job left in shared memory (docs/agent.md section 1):
        each slot whose header is well formed and whose data segment holds every fragment with its
        checksums is kept, as it was (``adopted``); a damaged one is removed and named with the
        reason (``discarded``); everything else of the job's prefix (parity, whose records died with
        the agent, rebuilt segments, temporary files, the old discovery file) is removed."""
        pre = shm.prefix(self.job)
        files = shm.listing(pre)
        keep = set()
        for name in files:
            m = _HEADER.fullmatch(name[len(pre):])
            if m is None:
                continue
            rank, slot = int(m.group(1)), int(m.group(2))
            what = f"r{rank}.s{slot}"
            try:
                header, data = self._intact(shm.SHM_DIR / name, pre + what, files, rank, slot)
            except (AgentError, FormatError) as e:
                self.discarded[what] = str(e)
                print(f"ucp agent: discarded the snapshot in {shm.SHM_DIR / name}: {e}", file=sys.stderr, flush=True)
                continue
            self.slots[(rank, slot)] = dict(header, adopted=True)
            self.segments[data] = files[data]
            self.adopted[what] = header["step"]
            keep.update((name, data))
        for name in files:
            if name not in keep and not name.endswith(".agent.lock"):
                shm.unlink(name)

    @staticmethod
    def _intact(path: Path, data: str, files: dict, rank: int, slot: int) -> tuple[dict, str]:
        """The header in ``path`` of slot ``slot`` of ``rank`` and the name of its data segment,
        once every fragment is found in the segment with its checksums."""
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise AgentError(f"cannot read the header: {e.strerror or e}") from None
        header = parse_json(raw, str(path))
        try:
            step, size, fragments = header["step"], header["file_size"], header["fragments"]
            ok = (header["format"] == "ucp.snapshot" and header["rank"] == rank and header["slot"] == slot
                  and isinstance(step, int) and isinstance(size, int) and isinstance(fragments, list)
                  and isinstance(header["complete"], bool) and isinstance(header["world_size"], int)
                  and all(isinstance(f, dict) for f in fragments))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise AgentError("its header is not a snapshot header of that slot")
        if files.get(data) != size:
            raise AgentError(f"step {step}: its data segment {data} is "
                             + ("missing" if data not in files else f"{files[data]} bytes, the header says {size}"))
        try:
            block = block_bytes_of(header)  # (the header's own: 1 MiB since format 1.1, 64 KiB before)
        except FormatError as e:
            raise AgentError(str(e)) from None
        seg = shm.attach(data) if fragments else None
        try:
            for f in fragments:
                try:
                    lo, n, crc, blocks = f["offset"], f["length"], f["crc32c"], tuple(f["blocks"])
                    if f["file"] != data or not 0 <= lo <= lo + n <= size:
                        raise ValueError
                except (KeyError, TypeError, ValueError):
                    raise AgentError(f"step {step}: fragment {f.get('key')!r} is not placed in its data segment") from None
                view = memoryview(seg.buf)[lo:lo + n]
                try:
                    got = block_crc32c(view, block)
                finally:
                    view.release()
                if got != (crc, blocks):
                    raise AgentError(f"step {step}: fragment {f.get('key')!r} fails its checksum")
        finally:
            if seg is not None:
                seg.close()
        return header, data

    # -- snapshot slots (docs/agent.md section 4) ---------------------------------------------
    def _slot(self, rank: int, slot: int) -> str:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0 or slot not in (0, 1):
            raise AgentError(f"no slot {slot!r} of rank {rank!r}: ranks are >= 0, slots 0 and 1")
        return shm.segment_name(self.job, f"r{rank}.s{slot}.json")

    def op_begin(self, rank: int, slot: int, step: int, session: str | None = None):
        """Rank ``rank`` is about to overwrite ``slot``: whatever it held stops being a snapshot
        (answered once a write of the slot to the durable tier is done). The reply hands over the
        persistence failures of ``session``'s snapshots of that rank not yet reported."""
        path = shm.SHM_DIR / self._slot(rank, slot)

        def begin() -> dict:
            path.unlink(missing_ok=True)
            self.slots.pop((rank, slot), None)
            self.parity.pop((rank, slot), None)  # its parity goes with it
            return {"slot": slot, "step": step, "errors": self._take_errors(rank, session)}

        if (rank, slot) in self.busy:
            return Deferred(lambda: (rank, slot) not in self.busy, begin)
        return begin()

    def op_commit(self, rank: int, slot: int, step: int, header: dict) -> dict:
        """Rank ``rank`` wrote all of ``step`` into ``slot``: publish its header (not yet complete:
        the job-wide cut decides that)."""
        self._publish(rank, slot, {**header, "step": step, "complete": False})
        return {"slot": slot, "step": step}

    def op_complete(self, rank: int, slot: int, step: int, token: int | None = None) -> dict:
        """Every rank of the job committed ``step``: the snapshot in ``slot`` is complete. ``token``
        names the cut (the same on every rank): the durable files written from it carry it."""
        header = self.slots.get((rank, slot))
        if header is None or header["step"] != step:
            raise AgentError(f"rank {rank} has no committed snapshot of step {step} in slot {slot}")
        self._publish(rank, slot, {**header, "complete": True, "token": header.get("token", token)})
        if self.job_world is not None and header.get("world_size") == self.job_world:
            self._drop_other_jobs()
        return {"slot": slot, "step": step}

    def _drop_other_jobs(self) -> None:
        """A snapshot of the newest job is complete: the snapshots of jobs of another size (the job
        before a recovery on fewer ranks) are no longer needed. Drop their headers and parity, and
        free their segments unless a rank of the newest job owns that segment's name."""
        ours = {r for (r, _), h in self.slots.items() if h.get("world_size") == self.job_world}
        for (rank, slot), header in list(self.slots.items()):
            if header.get("world_size") == self.job_world or (rank, slot) in self.busy:
                continue
            shm.unlink(self._slot(rank, slot))
            del self.slots[(rank, slot)]
            self.parity.pop((rank, slot), None)
            if rank not in ours:
                for kind in ("s", "p"):
                    self.op_free(f"r{rank}.{kind}{slot}")
        for key, record in list(self.parity.items()):
            if record.get("world_size") != self.job_world and key not in self.slots:
                del self.parity[key]

    # -- persistence (docs/agent.md section 5) ------------------------------------------------
    def op_parity_commit(self, rank: int, slot: int, step: int, record: dict) -> dict:
        """Rank ``rank`` computed its parity stripes of the snapshot of ``step`` in ``slot``:
        keep its record (docs/erasure.md section 7) until the slot is overwritten."""
        header = self.slots.get((rank, slot))
        if header is None or header["step"] != step:
            raise AgentError(f"rank {rank} has no committed snapshot of step {step} in slot {slot} for its parity")
        self.parity[(rank, slot)] = {**record, "rank": rank, "slot": slot, "step": step}
        return {"slot": slot, "step": step}

    def op_parity(self, step: int | None = None, summary: bool = False) -> dict:
        """The parity records of the node's ranks (of one step, or of all); with ``summary``, only
        the fields that place them (not their checksums and the group's headers)."""
        out = {}
        for (r, slot), record in sorted(self.parity.items()):
            if step is None or record["step"] == step:
                out[f"{r}.{slot}"] = {k: record.get(k) for k in _PARITY_SUMMARY} if summary else record
        return {"parity": out}

    def op_configure(self, rank: int, root: str, write: list[int], world_size: int, keep: int | None = None,
                     fsync: bool = True, timeout: float = 300.0, session: str | None = None) -> dict:
        """Where rank ``rank``'s snapshots go durably (checkpoint root ``root``) and which of its
        fragments it writes there (indices into its header's fragments; the save plan's share).
        ``session`` names the trainer's connection: the failures of writes it asked for are its own.
        The failures of another session's writes of this rank not yet reported are dropped (said in
        the agent's log): they belong to a job that is gone.

        ``root`` is a local path or a URL (``s3://bucket/run``, any fsspec URL), which stays a URL: the
        agent reaches it with the credentials and endpoint of its own environment (inherited from
        the trainer that started it). A root the agent cannot serve is refused here, in one line."""
        as_location(root)  # (LocationError: a URL made into a path, or fsspec/s3fs missing for the URL)
        if session is not None:
            for other, error in self.errors.get(rank, []):
                if other != session:
                    print(f"ucp agent: not reported (its job is gone): {error}", file=sys.stderr, flush=True)
            self.errors[rank] = [(s, e) for s, e in self.errors.get(rank, []) if s == session]
        self.config[rank] = {"root": root, "write": list(write), "world_size": world_size, "keep": keep,
                             "fsync": fsync, "timeout": timeout, "session": session}
        self.job_world = world_size  # the newest job's size: commits of a job of another size give up
        return {"rank": rank}

    def op_persist(self, rank: int, slot: int, step: int) -> dict:
        """Write rank ``rank``'s complete snapshot of ``step`` (in ``slot``) to the durable tier, in
        the background; rank 0's agent then commits the checkpoint once every rank's file is there."""
        header = self.slots.get((rank, slot))
        if header is None or header["step"] != step or not header["complete"] or header.get("token") is None:
            raise AgentError(f"rank {rank} has no complete snapshot of step {step} in slot {slot} (with its cut's token)")
        if rank not in self.config:
            raise AgentError(f"rank {rank} has not said where to persist (configure)")
        self._queue(rank, slot, step)
        return {"queued": True}

    def op_drain(self, rank: int, session: str | None = None):
        """Answered once rank ``rank``'s writes (and for rank 0, commits) are done: the failures of
        ``session``'s."""
        return Deferred(lambda: not self.inflight.get(rank), lambda: {"errors": self._take_errors(rank, session)})

    def _take_errors(self, rank: int, session: str | None) -> list[str]:
        """Rank ``rank``'s failures of ``session`` (of every session when None), no longer kept."""
        mine = [e for s, e in self.errors.get(rank, []) if session is None or s == session]
        rest = [(s, e) for s, e in self.errors.pop(rank, []) if session is not None and s != session]
        if rest:
            self.errors[rank] = rest
        return mine

    def _queue(self, rank: int, slot: int, step: int) -> None:
        self.busy.add((rank, slot))
        self.inflight[rank] = self.inflight.get(rank, 0) + 1
        self.work.append((rank, slot, step, dict(self.config[rank])))  # where it goes is fixed now
        self.lock.notify_all()

    def _done(self, rank: int, error: str | None = None, session: str | None = None) -> None:
        with self.lock:
            if error is not None:
                self.errors.setdefault(rank, []).append((session, error))
            self.inflight[rank] -= 1
            self.lock.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.work)
                rank, slot, step, cfg = self.work.pop(0)
                header = self.slots.get((rank, slot))
            error = None
            try:
                if header is None or header["step"] != step:
                    raise persist.PersistError(f"slot {slot} of rank {rank} no longer holds step {step}")
                self._write(header, cfg)
            except Exception as e:
                error = f"writing step {step} of rank {rank} to the durable tier failed: {e}"
            finally:
                with self.lock:
                    self.busy.discard((rank, slot))
                    if error is None:
                        self.persisted[rank] = max(step, self.persisted.get(rank, -1))
            if error is None and rank == 0:
                with self.lock:  # commits run one at a time, in order (retention assumes the newest last)
                    self.commits.append((header, cfg))
                    self.lock.notify_all()
            else:
                self._done(rank, error, cfg.get("session"))

    def _write(self, header: dict, cfg: dict) -> None:
        directory = step_dir(as_location(cfg["root"]), header["step"])
        if not persist.prepare(directory):
            return  # that step is durable already
        seg = shm.attach(header["fragments"][0]["file"]) if header["fragments"] else None
        data = memoryview(seg.buf) if seg is not None else memoryview(b"")
        try:
            persist.write_rank(directory, header, data, cfg["write"], header["token"], cfg["fsync"])
        finally:
            try:
                data.release()
                if seg is not None:
                    seg.close()
            except BufferError:
                pass  # a failed write's traceback still holds views of the mapping: it goes with them

    def _commit_loop(self) -> None:
        while True:
            with self.lock:
                self.lock.wait_for(lambda: self.commits)
                header, cfg = self.commits.pop(0)
            self._commit(header, cfg)

    def _commit(self, header: dict, cfg: dict) -> None:
        error = None
        world = cfg["world_size"]
        try:
            root = as_location(cfg["root"])
            cleared = persist.commit_when_written(step_dir(root, header["step"]), root, header["step"],
                                                  world, header["token"], cfg["keep"], cfg["timeout"],
                                                  abandon=lambda: self.abandon.is_set() or self._superseded(world))
            if cleared is not None and cleared.error is not None:  # (committed: not the save's failure)
                print(f"ucp agent: step {header['step']} is committed under {cfg['root']}, but pruning old "
                      f"checkpoints failed (the next commit retries): {cleared.error}", file=sys.stderr, flush=True)
        except Exception as e:
            error = f"committing step {header['step']} to the durable tier failed: {e}"
            if self._superseded(world):  # the job that saved it is gone (a recovery on fewer ranks): not the new job's
                print(f"ucp agent: {error} (a job of another size has taken over)", file=sys.stderr, flush=True)
                error = None
        self._done(0, error, cfg.get("session"))

    def _superseded(self, world_size: int) -> bool:
        """Whether a job of another size configured this agent since (a restart after nodes were lost:
        the files of the old job's lost ranks will never come)."""
        return self.job_world is not None and self.job_world != world_size

    def flush(self, timeout: float) -> None:
        """Write each rank's newest complete snapshot that is not durable yet, and wait (``timeout``
        seconds at most) for every write and commit: what SIGTERM does before the agent exits."""
        with self.lock:
            newest: dict[int, tuple[int, int]] = {}
            for (rank, slot), h in self.slots.items():
                if h["complete"] and h.get("token") is not None and h["step"] > newest.get(rank, (-1, 0))[0]:
                    newest[rank] = (h["step"], slot)
            for rank, (step, slot) in sorted(newest.items()):
                queued = {(r, s) for r, _, s, _ in self.work}
                if rank in self.config and step > self.persisted.get(rank, -1) and (rank, step) not in queued:
                    self._queue(rank, slot, step)
        self.drain_all(timeout)

    def drain_all(self, timeout: float) -> bool:
        """Wait (``timeout`` s at most) until no write or commit is in flight."""
        with self.lock:
            return self.lock.wait_for(lambda: not any(self.inflight.values()), timeout)

    def op_slots(self, rank: int | None = None, step: int | None = None, summary: bool = False) -> dict:
        """Headers of the committed snapshots (of one rank, or of every rank of the node; of one
        step, or of all); with ``summary``, only their ``rank``, ``slot``, ``step``, ``world_size``,
        ``complete`` and ``host``."""
        out = {}
        for (r, slot), header in sorted(self.slots.items()):
            if (rank is None or r == rank) and (step is None or header["step"] == step):
                out[f"{r}.{slot}"] = {k: header.get(k) for k in _SUMMARY} if summary else header
        return {"slots": out}

    def _publish(self, rank: int, slot: int, header: dict) -> None:
        write_atomic(shm.SHM_DIR / self._slot(rank, slot), json.dumps(header).encode(), mode=0o600)
        self.slots[(rank, slot)] = header

    def op_shutdown(self) -> dict:
        self.stopping.set()
        return {"stopping": True}

    def cleanup(self, flush: bool = False) -> None:
        """Finish the writes in flight (after flushing the newest snapshots, with ``flush``), then
        remove every segment and the discovery file (a clean shutdown leaves nothing behind)."""
        timeout = max([c["timeout"] for c in self.config.values()], default=60.0)
        if flush:
            self.flush(timeout)
        else:
            self.abandon.set()  # the writes in flight finish; a commit still waiting for files gives up
            self.drain_all(timeout)
        for name in list(self.segments):
            shm.unlink(name)
        self.segments.clear()
        for rank, slot in list(self.slots):
            shm.unlink(self._slot(rank, slot))
        self.slots.clear()
        self.parity.clear()
        try:
            info = read_info(self.job)
        except FormatError:
            info = None
        if info is not None and info.pid == os.getpid():
            discovery_path(self.job).unlink(missing_ok=True)
            lock_path(self.job).unlink(missing_ok=True)
