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
* **Persistence.** On a ``persist`` request the agent writes a complete snapshot to the durable
  tier from a thread of its own (:mod:`ucp.snapshot.persist`); a rank's ``begin`` of that slot waits
  until it is written. Failures are handed to the rank with its next ``begin`` or ``drain``.
* **Stop.** A ``shutdown`` request or SIGINT: the agent finishes the writes in flight, unlinks its
  segments and its discovery file and exits. SIGTERM (preemption) first flushes each rank's newest
  complete snapshot to the durable tier, if it is not there yet. A crashed agent's leftovers are
  reclaimed by the next start.
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
from pathlib import Path

from ucp.errors import AgentError, FormatError, UcpError
from ucp.format.jsonio import parse_json
from ucp.snapshot.agent_state import Agent, Deferred
from ucp.snapshot.discovery import REQUESTS, AgentInfo, discovery_path, is_alive, process_start_time, read_info, reclaim  # noqa: F401 - (re-exported)
from ucp.storage.atomic import write_atomic


def serve(job: str, host: str = "127.0.0.1", ready=None) -> None:
    """Run the agent of ``job`` in this process until shutdown; ``ready(info)`` once it serves."""
    from torch.distributed import TCPStore

    agent = Agent(job)
    running = read_info(job) if discovery_path(job).exists() else None
    if running is not None and is_alive(running):
        raise AgentError(f"an agent of job {job!r} already runs on this node (pid {running.pid})")
    agent.predecessor = running.pid if running is not None else None
    agent.adopt()  # a crashed agent's intact snapshots are kept; the rest of what it left is removed
    store = TCPStore(host, 0, is_master=True, wait_for_workers=False, use_libuv=True,
                     timeout=datetime.timedelta(seconds=1))
    info = AgentInfo(job=agent.job, pid=os.getpid(), start_time=process_start_time(os.getpid()),
                     host=host, port=store.port, started=agent.started)
    write_atomic(discovery_path(job), info.to_json(), mode=0o600)  # published whole

    flush = []

    def on_signal(signum, frame):
        if signum == signal.SIGTERM:
            flush.append(True)  # preemption: the newest snapshots go to the durable tier first
        agent.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if ready is not None:
        ready(info)
    pusher = TCPStore(host, store.port, is_master=False, use_libuv=True, timeout=datetime.timedelta(seconds=30))
    push_lock = threading.Lock()  # deferred answers come from their own threads

    def send(reply_to: str, rid, result=None, error: Exception | None = None) -> None:
        if error is None:
            reply = {"ok": True, "result": result, "id": rid}
        else:  # every failure goes back to the caller, the agent goes on
            text = str(error) if isinstance(error, UcpError) else f"{type(error).__name__}: {error}"
            reply = {"ok": False, "error": text, "id": rid}
        with push_lock:
            pusher.queue_push(reply_to, json.dumps(reply))

    def send_later(reply_to: str, rid, deferred: Deferred, wait: float) -> None:
        try:
            result = agent.answer_deferred(deferred, wait)
        except Exception as e:
            send(reply_to, rid, error=e)
        else:
            send(reply_to, rid, result)

    try:
        while not agent.stopping.is_set():
            try:
                raw = store.queue_pop(REQUESTS)
            except Exception:  # the store's timeout: look at the stop flag, then wait again
                continue
            try:
                request = parse_json(raw, "request")
                reply_to = request["reply"]
            except (FormatError, KeyError, TypeError):
                continue  # not a request: nobody to answer
            rid = request.get("id")
            try:
                result = agent.handle(request)
            except Exception as e:
                send(reply_to, rid, error=e)
                continue
            if isinstance(result, Deferred):
                wait = float(request.get("timeout", 300.0))
                threading.Thread(target=send_later, args=(reply_to, rid, result, wait), daemon=True).start()
            else:
                send(reply_to, rid, result)
            if request.get("op") == "shutdown":  # the caller has its answer before the store goes away
                deadline = time.monotonic() + 2.0
                while pusher.queue_len(reply_to) and time.monotonic() < deadline:
                    time.sleep(0.005)
    finally:
        agent.cleanup(flush=bool(flush))


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
    import faulthandler

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: every thread's stack to the log
    try:
        serve(args.job, ready=lambda info: print(f"ucp agent of job {info.job}: pid {info.pid}, "
                                                 f"port {info.port} on {socket.gethostname()}", flush=True))
    except UcpError as e:
        print(f"ucp agent: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
