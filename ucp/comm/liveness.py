"""Whether a process is gone, answered by its host's kernel: a port that refuses once it exits.

A process listens on a TCP port it never reads from (:class:`LivenessPort`) and publishes the
port's address. When the process exits for any reason (a crash, SIGKILL, the OOM killer) while its
host lives on, the kernel closes the port with the process's other files, and a connection to it is
refused within one round trip. A live process accepts (the kernel completes the handshake), a
stopped one too (SIGSTOP), a slow one too; a host that is gone does not answer (the probe times
out). So a refused probe proves that the process exited, and any other answer proves nothing:
:func:`refused` reports only the refusals, and whoever asks waits on its other evidence (a
heartbeat) for the rest.

Three things could make a live process look gone, and are ruled out here or by the caller:

- a loopback address (the store's host name resolving to ``127.0.1.1``, say) probed from another
  host or network namespace would reach the prober's own loopback: a published record carries the
  :func:`identity` of its network namespace, and :func:`probe_address` gives no address to probe for
  a loopback one from elsewhere;
- a child forked after the port opened (a data loader's workers) would hold it open after its parent
  died: the port is closed in forked children (``os.register_at_fork``), so that a gone parent is
  still seen, not hidden;
- a firewall that rejects connections between hosts (``REJECT``, with a TCP reset or the default
  ICMP port-unreachable, both read as a refusal): where one does, do not use the probe
  (``run_in_process(..., probe=False)``).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import selectors
import socket
import time
import weakref

#: the most connections :func:`refused` opens at once (descriptors: one each)
MAX_PROBES = 64

_OPEN: "weakref.WeakSet[LivenessPort]" = weakref.WeakSet()


class LivenessPort:
    """A listening TCP port on the address this process's peers reach it by; closed with the
    process (and in its forked children). Connections made to it are accepted and closed by
    :meth:`drain` (a probe only needs the handshake; draining keeps the accept queue from filling).
    :attr:`record` is what to publish: the address and this process's :func:`identity`."""

    def __init__(self, toward: tuple[str, int]):
        """Listen on the local address this host uses to reach ``toward`` (host, port): the job's
        store, which every peer reaches too."""
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self._sock.bind((local_address(toward), 0))
            self._sock.listen(socket.SOMAXCONN)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        host, port = self._sock.getsockname()[:2]
        self.address = f"{host}:{port}"
        self.record = f"{self.address} {identity()}"
        _OPEN.add(self)

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


def _close_in_child() -> None:
    for port in list(_OPEN):
        port.close()  # (the child's copy only: the parent's port stays open)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)


def identity() -> str:
    """Where a loopback address means the same: this boot of this host and this network namespace
    (Linux: ``/proc/sys/kernel/random/boot_id`` and ``/proc/self/ns/net``; elsewhere the host name)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return socket.gethostname()


def probe_address(record: str) -> str | None:
    """The address to probe for a published :attr:`LivenessPort.record`, or None when it cannot be
    probed from here (a loopback address of another host or namespace; a malformed record)."""
    address, _, where = record.partition(" ")
    host = address.rpartition(":")[0]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        return None
    return None if loopback and where != identity() else address


def local_address(toward: tuple[str, int]) -> str:
    """The local IPv4 address of the route to ``toward`` (no packet is sent: a UDP socket's connect
    only picks the route)."""
    host = socket.gethostbyname(toward[0])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect((host, toward[1]))
        return udp.getsockname()[0]


def refused(addresses: dict, timeout: float) -> set:
    """The keys of ``addresses`` (key -> ``"host:port"`` of a :class:`LivenessPort`) whose port
    refused a connection: processes that are gone. At most :data:`MAX_PROBES` probes are in flight
    at once, each batch waiting ``timeout`` seconds at most for its answers (so up to ``timeout``
    per :data:`MAX_PROBES` addresses in all); an address that accepts, does not answer in time or
    cannot be parsed is not reported."""
    items = list(addresses.items())
    gone: set = set()
    for i in range(0, len(items), MAX_PROBES):
        gone |= _probe(items[i:i + MAX_PROBES], timeout)
    return gone


def _probe(batch: list, timeout: float) -> set:
    gone, opened = set(), []
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
            deadline = time.monotonic() + timeout  # (from when every connect was issued)
            while sel.get_map() and (left := deadline - time.monotonic()) > 0:
                for selected, _ in sel.select(left):
                    sel.unregister(selected.fileobj)
                    if selected.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNREFUSED:
                        gone.add(selected.data)
        finally:
            for sock in opened:
                sock.close()
    return gone
