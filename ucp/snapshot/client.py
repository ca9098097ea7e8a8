"""Talking to the snapshot agent of this node: find it, start it, send it requests.

A trainer (or ``ucp agent``) finds the agent through its discovery file, connects to its
``TCPStore``, and pushes JSON requests ``{"op", "args", "reply"}`` to the agent's request queue;
the answer ``{"ok", "result" | "error"}`` comes back on the caller's own reply queue. Starting is
serialized per job and node by a lock file, so the local ranks of a node start one agent between
them, and a stale agent (its process gone) is reclaimed first.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from ucp.errors import AgentError
from ucp.snapshot import shm
from ucp.snapshot.discovery import REQUESTS, AgentInfo, discovery_path, is_alive, lock_path, read_info, reclaim
from ucp.snapshot.header import SNAPSHOT_FORMAT_VERSION


_C10D_NOISE = re.compile(rb"^(\[[WE]\d{4} [^]]*\] \[c10d\] .*|Exception raised from .*|frame #\d+: .*|#\d+ .*|"
                         rb"C\+\+ CapturedTraceback:|<omitting python frames>|\s*)$")
_stderr_lock = threading.Lock()


@contextmanager
def _c10d_quiet():
    """Run a call on a store with c10d's C++ log lines kept off stderr. A store call on a connection
    the agent closed (it died between the liveness check and the call) makes c10d log the error with
    its C++ stack to file descriptor 2, which no Python setting turns off: the descriptor points to a
    memory file during the call, and whatever else was written there meanwhile goes to stderr after."""
    with _stderr_lock:
        if sys.stderr is not None:
            sys.stderr.flush()
        saved = os.dup(2)
        sink = os.memfd_create("ucp-c10d", 0)
        try:
            os.dup2(sink, 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
            size = os.lseek(sink, 0, os.SEEK_END)
            if size:
                os.lseek(sink, 0, os.SEEK_SET)
                kept = [line for line in os.read(sink, size).splitlines(keepends=True)
                        if not _C10D_NOISE.match(line.rstrip(b"\n"))]
                out = memoryview(b"".join(kept))
                while out:
                    out = out[os.write(2, out):]
        finally:
            os.close(sink)
            os.close(saved)


class AgentClient:
    """A connection to a running agent."""

    def __init__(self, info: AgentInfo, timeout: float = 30.0):
        from torch.distributed import TCPStore

        self.info = info
        self.timeout = timeout
        self.id = uuid.uuid4().hex
        self._reply = f"ucp/reply/{self.id}"
        try:
            self._store = TCPStore(info.host, info.port, is_master=False, use_libuv=True,
                                   timeout=datetime.timedelta(seconds=timeout))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]  # (without c10d's C++ frames)
            raise AgentError(f"cannot reach the agent of job {info.job!r} (pid {info.pid}, port {info.port}): {first}") from None
        self._sent = 0

    def request(self, op: str, wait: float | None = None, **args) -> dict:
        """Send one request and wait for its answer (``wait`` seconds at most, default ``timeout``).
        A request the agent answers later (``begin`` of a slot being written durably, ``drain``)
        may take longer than ``timeout``: pass ``wait``.

        The answer is polled for (``queue_len``, then a pop that cannot block), and the agent's
        process is looked at before every call on the store: a store call on a connection the agent
        closed makes c10d log the C++ stack of its error to stderr, and a blocking pop cannot tell
        that closed connection from a timeout. An agent that dies is reported at once, in one line.

        Raises:
            AgentError: the agent died (or was killed), refused the request, or did not answer in time.
        """
        wait = self.timeout if wait is None else wait
        self._check_alive(op)
        self._sent += 1
        rid = f"{self.id}.{self._sent}"
        self._call(op, self._store.queue_push, REQUESTS, json.dumps({"op": op, "args": args, "reply": self._reply,
                                                                       "id": rid, "timeout": wait}))
        deadline = time.monotonic() + wait
        pause = 0.0001
        while True:
            self._check_alive(op)
            if self._call(op, self._store.queue_len, self._reply):
                reply = json.loads(self._call(op, self._store.queue_pop, self._reply, False))
                if reply.get("id") == rid:
                    break
                continue  # an answer to an earlier request that timed out: dropped
            if time.monotonic() > deadline:
                raise AgentError(f"the snapshot agent of job {self.info.job!r} on {os.uname().nodename} (pid "
                                 f"{self.info.pid}, still running) did not answer {op!r} within {wait:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)
        if not reply.get("ok"):
            raise AgentError(f"the agent of job {self.info.job!r} refused {op!r}: {reply.get('error')}")
        return reply["result"]

    def _closed(self, op: str) -> AgentError:
        return AgentError(f"snapshot agent on {os.uname().nodename} (pid {self.info.pid}) closed the connection during "
                          f"{op!r}; it died or was killed")

    def _check_alive(self, op: str) -> None:
        if not is_alive(self.info):
            raise self._closed(op)

    def _call(self, op: str, fn, *args):
        """``fn(*args)``, a call on the agent's store; a failure (the connection reset or closed) as
        one line (c10d's message may carry C++ frames: only its first line is kept)."""
        try:
            with _c10d_quiet():
                return fn(*args)
        except Exception as e:  # torch.distributed.DistNetworkError and kin
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AgentError(f"{self._closed(op)} ({first})") from None

    def hello(self, rank: int | None = None) -> dict:
        return self.request("hello", client=self.id, pid=os.getpid(), rank=rank)

    def status(self) -> dict:
        return self.request("status")

    def alloc(self, name: str, nbytes: int) -> str:
        """The full name of segment ``name`` of ``nbytes``, created by the agent if new."""
        return self.request("alloc", name=name, nbytes=nbytes)["name"]

    def free(self, name: str) -> bool:
        return self.request("free", name=name)["freed"]

    def shutdown(self, wait: float = 10.0) -> None:
        """Ask the agent to remove its memory and exit; wait until it has."""
        self.request("shutdown")
        deadline = time.monotonic() + wait
        while is_alive(self.info):
            if time.monotonic() > deadline:
                raise AgentError(f"the agent of job {self.info.job!r} (pid {self.info.pid}) is still running "
                                 f"{wait:g} s after shutdown")
            time.sleep(0.02)


def connect(job: str, timeout: float = 30.0) -> AgentClient | None:
    """A client of job ``job``'s live agent on this node, or None when none is running."""
    info = read_info(job)
    if info is None or not is_alive(info):
        return None
    return AgentClient(info, timeout)


@contextmanager
def _start_lock(job: str):
    path = lock_path(job)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ensure_agent(job: str, timeout: float = 30.0, log: Path | None = None) -> AgentClient:
    """The live agent of ``job`` on this node, started (detached, in a session of its own) if none
    runs; a dead agent's leftovers are reclaimed first. Safe to call from every local rank at once."""
    shm.check_job(job)
    with _start_lock(job):
        client = connect(job, timeout)
        if client is not None:
            _check_formats(client.info)
            return client
        # (a dead agent's leftovers: the new agent takes over its intact snapshots and removes the rest)
        cmd = [sys.executable, "-m", "ucp.snapshot.agent", "--job", job, "--daemon"]
        if log is not None:
            cmd += ["--log", str(log)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                          env.get("PYTHONPATH")]))
        subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, env=env, timeout=timeout, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            info = read_info(job)
            if info is not None and is_alive(info):
                return AgentClient(info, timeout)
            if time.monotonic() > deadline:
                raise AgentError(f"the agent of job {job!r} did not come up within {timeout:g} s"
                                 + (f"; see {log}" if log else ""))
            time.sleep(0.02)


def _check_formats(info: AgentInfo) -> None:
    """Refuse an agent whose code reads and writes other snapshot headers than this process (an agent
    outlives its trainers: it may have been started by an older ucp)."""
    if info.snapshot_format_version != SNAPSHOT_FORMAT_VERSION:
        raise AgentError(f"the snapshot agent of job {info.job!r} (pid {info.pid}) reads snapshot format "
                         f"{info.snapshot_format_version}, this ucp writes {SNAPSHOT_FORMAT_VERSION}: stop it with "
                         f"`ucp agent stop --job {info.job}` (its snapshots in memory are dropped; durable checkpoints "
                         "stay) and start the job again")


def stop(job: str, timeout: float = 30.0) -> str:
    """Stop job ``job``'s agent on this node (or reclaim a dead one's leftovers); says what it did."""
    with _start_lock(job):
        info = read_info(job)
        stopped = info is not None and is_alive(info)
        if stopped:
            AgentClient(info, timeout).shutdown(timeout)
        removed = reclaim(job)
    lock_path(job).unlink(missing_ok=True)
    if stopped:
        return f"stopped the agent of job {job!r} (pid {info.pid})"
    if info is not None or removed:
        return f"no agent of job {job!r} was running; removed {len(removed)} leftover file(s)"
    return f"no agent of job {job!r} is running"


def discovered_jobs() -> list[str]:
    """Jobs of this user that have a discovery file on this node."""
    pre = shm.prefix("x")[:-2]  # "ucp.<uid>."
    return sorted(n[len(pre):-len(".agent.json")] for n in shm.listing(pre) if n.endswith(".agent.json"))


__all__ = ["AgentClient", "AgentError", "connect", "ensure_agent", "stop", "discovered_jobs", "discovery_path"]
