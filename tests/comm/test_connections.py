"""ucp.comm.connections: a rank that shuts its group's connections releases a peer blocked on them
at once (not at the group's timeout), and leaves alone what it must keep (the store, listeners,
sockets opened before)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import queue
import socket
import sys
import time

import pytest

from ucp.comm.connections import OpenedConnections, open_sockets

TIMEOUT_S = 30  # the group's timeout: a peer released by the shut fails long before it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a TCP connection on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


def rank_main(rank: int, world: int, port: int, out) -> None:
    try:
        ranked(rank, world, port, out)
    except BaseException as e:  # noqa: BLE001 - said to the test, not lost in a child's stderr
        out.put((rank, "failed", repr(e)))


def ranked(rank: int, world: int, port: int, out) -> None:
    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=TIMEOUT_S))
    kept_a, kept_b = tcp_pair()
    made = OpenedConnections(keep_port=store.port)
    made.start()
    dist.init_process_group("gloo", store=dist.PrefixStore("g0", store), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    made.stop()
    dist.barrier()
    if rank == 0:  # gives up on the group: its peers are blocked receiving from it
        time.sleep(0.5)
        shut = made.shut()
        store.set("after", "still answers")  # the store's connections were kept
        kept_a.sendall(b"x")  # and so was a connection opened before
        out.put((rank, "shut", shut, store.get("after").decode(), kept_b.recv(1)))
        time.sleep(2)  # (its listener kept: gloo's accept thread would abort the process on a shut one)
        out.put((rank, "alive"))
        return
    t0 = time.monotonic()
    try:
        dist.recv(torch.empty(4), src=0)
        out.put((rank, "received", time.monotonic() - t0))
    except Exception as e:  # noqa: BLE001
        out.put((rank, "raised", time.monotonic() - t0, str(e).splitlines()[0][:200]))


@pytest.mark.dist
@pytest.mark.timeout(90)
@pytest.mark.skipif(sys.platform != "linux", reason="the connections are found in /proc/self/fd")
def test_a_peer_blocked_on_a_shut_connection_fails_at_once_and_the_store_is_kept():
    world, port = 3, free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, out), daemon=True) for r in range(world)]
    try:
        for p in procs:
            p.start()
        got = {}
        deadline = time.monotonic() + 60
        while len(got) < 4 and time.monotonic() < deadline:
            try:
                msg = out.get(timeout=1)
            except queue.Empty:
                continue
            got[(msg[0], msg[1])] = msg
            assert msg[1] != "failed", msg
        for p in procs:
            p.join(10)
        assert (0, "shut") in got, got
        _, _, shut, answer, byte = got[(0, "shut")]
        assert shut >= 1 and answer == "still answers" and byte == b"x"
        assert (0, "alive") in got and procs[0].exitcode == 0, (got, procs[0].exitcode)
        for r in (1, 2):
            assert (r, "raised") in got, got
            assert got[(r, "raised")][2] < 5, got[(r, "raised")]  # not the 30 s timeout
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def test_sockets_opened_before_the_window_are_not_recorded():
    before = socket.socket()
    made = OpenedConnections()
    made.start()
    during = socket.socket()
    made.stop()
    try:
        if sys.platform == "linux":
            assert during.fileno() in made.opened and before.fileno() not in made.opened
            assert set(made.opened) <= set(open_sockets())
        assert made.shut() == 0  # (neither is a connected TCP socket: nothing to shut)
    finally:
        before.close()
        during.close()


def test_a_window_never_started_records_and_shuts_nothing():
    made = OpenedConnections()
    made.stop()
    assert made.opened == {} and made.shut() == 0
