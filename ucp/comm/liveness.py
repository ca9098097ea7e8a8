"""Whether a process is gone, answered by its host's kernel: a port that refuses once it exits.

A process listens on a TCP port it never reads from (:class:`LivenessPort`) and publishes the
port's address. When the process exits for any reason (a crash, SIGKILL, the OOM killer) while its
host lives on, the kernel closes the port with the process's other files, and a connection to it is
refused within one round trip. A live process accepts (the kernel completes the handshake), a
stopped one too (SIGSTOP), a slow one too; a host that is gone does not answer (the probe times
out). So a refused probe proves that the process exited, and any other answer proves nothing:
:func:`refused` reports only the refusals, and whoever asks waits on its other evidence (a
heartbeat) for the rest.

A refusal can also come from a firewall that rejects connections between hosts (``REJECT
--reject-with tcp-reset``): where one does, do not use the probe (``run_in_process(...,
probe=False)``).
"""

from __future__ import annotations

import errno
import selectors
import socket
import time

#: the most connections :func:`refused` opens at once (descriptors: one each)
MAX_PROBES = 64


class LivenessPort:
    """A listening TCP port on the address this process's peers reach it by; closed with the
    process. Connections made to it are accepted and closed by :meth:`drain` (a probe only needs
    the handshake; draining keeps the accept queue from filling)."""

    def __init__(self, toward: tuple[str, int]):
        """Listen on the local address this host uses to reach ``toward`` (host, port): the job's
        store, which every peer reaches too."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.bind((local_address(toward), 0))
            self._sock.listen(128)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        host, port = self._sock.getsockname()[:2]
        self.address = f"{host}:{port}"

    def drain(self) -> None:
        """Accept and close the connections waiting (probes); never blocks."""
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # (none waiting; or closed)
                return
            conn.close()

    def close(self) -> None:
        self._sock.close()


def local_address(toward: tuple[str, int]) -> str:
    """The local IPv4 address of the route to ``toward`` (no packet is sent: a UDP socket's connect
    only picks the route)."""
    host = socket.gethostbyname(toward[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect((host, toward[1]))
        return udp.getsockname()[0]


def refused(addresses: dict, timeout: float) -> set:
    """The keys of ``addresses`` (key -> ``"host:port"`` of a :class:`LivenessPort`) whose port
    refused a connection within ``timeout`` seconds: processes that are gone. At most
    :data:`MAX_PROBES` probes are in flight at once, each batch with its share of ``timeout``; an
    address that accepts, does not answer in time or cannot be parsed is not reported."""
    items = list(addresses.items())
    batches = [items[i:i + MAX_PROBES] for i in range(0, len(items), MAX_PROBES)]
    gone: set = set()
    for batch in batches:
        gone |= _probe(batch, timeout / len(batches))
    return gone


def _probe(batch: list, timeout: float) -> set:
    gone, opened = set(), []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        try:
            for key, address in batch:
                try:
                    host, port = address.rsplit(":", 1)
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except (ValueError, OSError):
                    continue
                opened.append(sock)
                sock.setblocking(False)
                try:
                    code = sock.connect_ex((host, int(port)))
                except (ValueError, OverflowError, OSError):
                    continue
                if code == errno.ECONNREFUSED:
                    gone.add(key)
                elif code in (errno.EINPROGRESS, errno.EAGAIN):
                    sel.register(sock, selectors.EVENT_WRITE, key)
            while sel.get_map() and (left := deadline - time.monotonic()) > 0:
                for selected, _ in sel.select(left):
                    sel.unregister(selected.fileobj)
                    if selected.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
                        gone.add(selected.data)
        finally:
            for sock in opened:
                sock.close()
    return gone
