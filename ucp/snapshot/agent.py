"""The snapshot agent: one long-lived process per node and job that owns the snapshots' shared memory.

Lifecycle (docs/agent.md):

* **Start.** ``ucp agent start --job J`` (a launcher), or the first trainer of the node through
  :func:`ucp.snapshot.client.ensure_agent`. The agent detaches into a session of its own (double
  fork + ``setsid``): torchrun kills a worker's whole process group when it restarts workers, and
  the agent must outlive that.
* **Discovery.** The agent hosts a ``torch.distributed.TCPStore`` on 127.0.0.1 (its control
  channel: requests are pushed to a store queue, each answered on the caller's own queue) and
  publishes ``/dev/shm/ucp.<uid>.<job>.agent.json`` (pid, process start time, port). Trainers that
  restart find it there; the start time tells a live agent from a recycled pid.
* **Memory.** Segments ``ucp.<uid>.<job>.<name>`` are created by the agent on request and mapped by
  trainers without the resource tracker (:mod:`ucp.snapshot.shm`), so a dying trainer deletes nothing.
* **Stop.** A ``shutdown`` request or SIGTERM/SIGINT: the agent unlinks its segments and its
  discovery file and exits. A crashed agent's leftovers are reclaimed by the next start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ucp.errors import FormatError, UcpError
from ucp.snapshot import shm
from ucp.storage.atomic import write_atomic

FORMAT = "ucp.agent"
FORMAT_VERSION = "1.0"
REQUESTS = "ucp/requests"  # the store queue the agent serves


class AgentError(UcpError):
    """The snapshot agent is not running, not answering, or refused a request."""


@dataclass(frozen=True)
class AgentInfo:
    """What the discovery file says about a running agent."""

    job: str
    pid: int
    start_time: int  # the process's start time in clock ticks since boot (/proc/<pid>/stat field 22)
    host: str
    port: int
    started: float  # wall clock (time.time())
    format: str = FORMAT
    format_version: str = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: Path) -> "AgentInfo":
        """Parse and validate a discovery file (docs/agent.md)."""
        from ucp.spec.manifest import check_version

        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FormatError(f"{where}: not a ucp agent discovery file (not JSON: {e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise FormatError(f"{where}: not a ucp agent discovery file (format is "
                              f"{d.get('format') if isinstance(d, dict) else None!r})")
        check_version(d.get("format_version"), FORMAT_VERSION, str(where))
        try:
            info = cls(job=shm.check_job(d["job"]), pid=int(d["pid"]), start_time=int(d["start_time"]),
                       host=str(d["host"]), port=int(d["port"]), started=float(d["started"]),
                       format_version=d["format_version"])
        except (KeyError, TypeError, ValueError, UcpError) as e:
            raise FormatError(f"{where}: malformed agent discovery file: {e}") from None
        if info.pid <= 0 or not 0 < info.port < 65536:
            raise FormatError(f"{where}: malformed agent discovery file: pid {info.pid}, port {info.port}")
        return info


def discovery_path(job: str) -> Path:
    return shm.SHM_DIR / (shm.prefix(job) + "agent.json")


def lock_path(job: str) -> Path:
    return shm.SHM_DIR / (shm.prefix(job) + "agent.lock")


def process_start_time(pid: int) -> int | None:
    """Start time of process ``pid`` (clock ticks since boot), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields and fields[0] == "Z":
        return None  # a zombie is not an agent
    return int(fields[19])


def read_info(job: str) -> AgentInfo | None:
    """The discovery file of job ``job``'s agent on this node, or None."""
    path = discovery_path(job)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return AgentInfo.from_json(data, path)


def is_alive(info: AgentInfo) -> bool:
    """Whether the process the discovery file names is still that agent (not a recycled pid)."""
    return process_start_time(info.pid) == info.start_time


class Agent:
    """The agent process's state and request handlers (run by :func:`serve`)."""

    def __init__(self, job: str):
        self.job = shm.check_job(job)
        self.segments: dict[str, int] = {}  # segment name -> bytes
        self.clients: dict[str, dict] = {}  # client id -> what it said in hello
        self.slots: dict[tuple[int, int], dict] = {}  # (rank, slot) -> committed snapshot header
        self.stopping = threading.Event()
        self.started = time.time()

    # -- requests ------------------------------------------------------------------------
    def handle(self, request: dict) -> dict:
        op = request.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise AgentError(f"unknown request {op!r}")
        return handler(**request.get("args", {}))

    def op_hello(self, client: str, pid: int, rank: int | None = None) -> dict:
        self.clients[client] = {"pid": pid, "rank": rank, "since": time.time()}
        return self.op_status()

    def op_status(self) -> dict:
        return {"job": self.job, "pid": os.getpid(), "started": self.started, "segments": dict(self.segments),
                "nbytes": sum(self.segments.values()), "clients": len(self.clients),
                "snapshots": {f"{r}.{s}": {"step": h["step"], "complete": h["complete"]}
                              for (r, s), h in sorted(self.slots.items())}}

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

    # -- snapshot slots (docs/agent.md section 4) ---------------------------------------------
    def _slot(self, rank: int, slot: int) -> str:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0 or slot not in (0, 1):
            raise AgentError(f"no slot {slot!r} of rank {rank!r}: ranks are >= 0, slots 0 and 1")
        return shm.segment_name(self.job, f"r{rank}.s{slot}.json")

    def op_begin(self, rank: int, slot: int, step: int) -> dict:
        """Rank ``rank`` is about to overwrite ``slot``: whatever it held stops being a snapshot."""
        path = shm.SHM_DIR / self._slot(rank, slot)
        path.unlink(missing_ok=True)
        self.slots.pop((rank, slot), None)
        return {"slot": slot, "step": step}

    def op_commit(self, rank: int, slot: int, step: int, header: dict) -> dict:
        """Rank ``rank`` wrote all of ``step`` into ``slot``: publish its header (not yet complete:
        the job-wide cut decides that)."""
        self._publish(rank, slot, {**header, "step": step, "complete": False})
        return {"slot": slot, "step": step}

    def op_complete(self, rank: int, slot: int, step: int) -> dict:
        """Every rank of the job committed ``step``: the snapshot in ``slot`` is complete."""
        header = self.slots.get((rank, slot))
        if header is None or header["step"] != step:
            raise AgentError(f"rank {rank} has no committed snapshot of step {step} in slot {slot}")
        self._publish(rank, slot, {**header, "complete": True})
        return {"slot": slot, "step": step}

    def op_slots(self, rank: int | None = None) -> dict:
        """Headers of the committed snapshots (of one rank, or of every rank of the node)."""
        out = {}
        for (r, slot), header in sorted(self.slots.items()):
            if rank is None or r == rank:
                out[f"{r}.{slot}"] = header
        return {"slots": out}

    def _publish(self, rank: int, slot: int, header: dict) -> None:
        write_atomic(shm.SHM_DIR / self._slot(rank, slot), json.dumps(header).encode(), mode=0o600)
        self.slots[(rank, slot)] = header

    def op_shutdown(self) -> dict:
        self.stopping.set()
        return {"stopping": True}

    def cleanup(self) -> None:
        """Remove every segment and the discovery file (a clean shutdown leaves nothing behind)."""
        for name in list(self.segments):
            shm.unlink(name)
        self.segments.clear()
        for rank, slot in list(self.slots):
            shm.unlink(self._slot(rank, slot))
        self.slots.clear()
        try:
            info = read_info(self.job)
        except FormatError:
            info = None
        if info is not None and info.pid == os.getpid():
            discovery_path(self.job).unlink(missing_ok=True)
            lock_path(self.job).unlink(missing_ok=True)


def reclaim(job: str) -> list[str]:
    """Remove what a dead agent of ``job`` left in shared memory (segments, discovery file); the
    names removed. Refuses while the agent is alive."""
    info = read_info(job) if discovery_path(job).exists() else None
    if info is not None and is_alive(info):
        raise AgentError(f"the agent of job {job!r} (pid {info.pid}) is running; stop it instead")
    removed = []
    for name in shm.listing(shm.prefix(job)):
        if name.endswith(".agent.lock"):
            continue
        if shm.unlink(name):
            removed.append(name)
    return removed


def serve(job: str, host: str = "127.0.0.1", ready=None) -> None:
    """Run the agent of ``job`` in this process until shutdown; ``ready(info)`` once it serves."""
    from torch.distributed import TCPStore

    agent = Agent(job)
    running = read_info(job) if discovery_path(job).exists() else None
    if running is not None and is_alive(running):
        raise AgentError(f"an agent of job {job!r} already runs on this node (pid {running.pid})")
    reclaim(job)  # a crashed agent's segments and discovery file
    store = TCPStore(host, 0, is_master=True, wait_for_workers=False, use_libuv=True,
                     timeout=datetime.timedelta(seconds=1))
    info = AgentInfo(job=agent.job, pid=os.getpid(), start_time=process_start_time(os.getpid()),
                     host=host, port=store.port, started=agent.started)
    write_atomic(discovery_path(job), info.to_json(), mode=0o600)  # published whole

    def on_signal(signum, frame):
        agent.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if ready is not None:
        ready(info)
    try:
        while not agent.stopping.is_set():
            try:
                raw = store.queue_pop(REQUESTS)
            except Exception:  # the store's timeout: look at the stop flag, then wait again
                continue
            try:
                request = json.loads(raw)
                reply_to = request["reply"]
            except (ValueError, KeyError, TypeError):
                continue  # not a request: nobody to answer
            try:
                reply = {"ok": True, "result": agent.handle(request)}
            except Exception as e:  # every failure goes back to the caller, the agent goes on
                reply = {"ok": False, "error": str(e) if isinstance(e, UcpError) else f"{type(e).__name__}: {e}"}
            store.queue_push(reply_to, json.dumps(reply))
    finally:
        agent.cleanup()


def daemonize(log: Path | None) -> bool:
    """Double fork into a new session; True in the daemon, False in the original process (after the
    first child has exited, so nothing is left to reap)."""
    pid = os.fork()
    if pid:
        os.waitpid(pid, 0)
        return False
    os.setsid()
    if os.fork():
        os._exit(0)
    fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(fd, 0)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log else os.open(os.devnull, os.O_WRONLY)
    os.dup2(out, 1)
    os.dup2(out, 2)
    return True


def main(argv: list[str] | None = None) -> int:
    """``python -m ucp.snapshot.agent --job J [--daemon] [--log FILE]``: run an agent."""
    p = argparse.ArgumentParser(prog="ucp-agent", description="Run the ucp snapshot agent of one job on this node.")
    p.add_argument("--job", required=True)
    p.add_argument("--daemon", action="store_true", help="detach into a session of its own")
    p.add_argument("--log", type=Path, default=None, help="append the agent's output here (daemon)")
    args = p.parse_args(argv)
    if args.daemon and not daemonize(args.log):
        return 0
    try:
        serve(args.job, ready=lambda info: print(f"ucp agent of job {info.job}: pid {info.pid}, "
                                                 f"port {info.port} on {socket.gethostname()}", flush=True))
    except UcpError as e:
        print(f"ucp agent: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
