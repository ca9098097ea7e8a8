"""In-process recovery: when ranks are lost, the survivors keep their processes, re-form the job's
process group over themselves through the job's store, rebuild model and optimizer for the smaller
world, restore from the snapshot agents' memory (the lost ranks' shares rebuilt from parity,
resharded) and go on (docs/recovery.md).

    def build(world: ucp.World) -> ucp.Checkpointer:       # model, optimizer for world.world_size
        ...
        return ucp.Checkpointer(root, model=model, optimizer=opt, snapshot=..., redundancy=...)

    def train(ckpt: ucp.Checkpointer, restored: ucp.LoadResult | None, world: ucp.World):
        ...                                                  # the loop, calling ckpt.save(step)

    ucp.run_in_process(build, train, store=store)

**Detection.** A dead peer makes the survivors' next collective raise (gloo: within milliseconds
for most); a hung one (SIGSTOP, a stuck kernel) makes it raise at the process group's ``timeout``.
A survivor that gives up shuts down the TCP connections its generation's groups opened
(:mod:`ucp.comm.connections`), so that a peer blocked on one of them (sending to it, waiting for
it) fails at once too instead of at the ``timeout``: gloo cannot abort a collective in flight.
Any exception out of ``build``, the load or ``train`` starts the membership protocol. When it
lost no member, the generation is retried (re-formed, restored, from memory when it holds the
snapshot) if every member failed in a collective's transport (a timeout with nobody lost: a slow
step, not a hang); otherwise (a bug, bad input on some rank) the
exception is raised again.

**Freeing the broken generation.** The survivors drop the Checkpointer, the exception's frames
(its traceback is kept as text, in a note) and the process groups, and collect, so that the broken
generation's model and optimizer are freed before ``build`` makes the next (not two models in
memory): ``build`` must keep them reachable only from the Checkpointer it returns (and ``train``'s
locals). Freeing alone would not release a peer blocked on a connection to a survivor: gloo closes
a group's connections only when the group is freed, and torch 2.13 keeps an FSDP2 job's default
group alive from C++ after ``destroy_process_group()`` (measured: no Python object refers to it);
hence the shut connections above. The collection scans only what the job made: the objects that
existed when ``run_in_process`` was called (torch's modules, the program's imports) are frozen
(``gc.freeze``, undone at the end) and are not scanned (a whole-heap collection took 0.2-0.25 s of
the re-forming under load), and so is what survives each recovery's collection. Modules that
``build`` imports the first time are scanned by the first recovery: import them before the call. A
reference cycle among frozen objects that becomes garbage is collected only after the job.

**Membership.** Each member (a process, named by its rank at the start) beats a heartbeat into the
store every ``heartbeat`` seconds, from a thread with a store connection of its own. After a
failure, each survivor shuts its generation's connections (so peers blocked with it fail at once
too), registers for the next generation ``g`` (at once: a registered member is not waited for by
its heartbeat), frees the broken generation, and the first to be done leads: it waits until every
member of the last generation has registered or is lost: its process exited (its liveness port
refuses a connection, :mod:`ucp.comm.liveness`: milliseconds after a crash or a kill while its host
lives) or it is silent (no heartbeat for ``dead_after`` seconds: a hung process, a lost host),
then publishes the new members in their old order; their index is the new rank. A member that
registers after that is not in the new world: it raises :class:`RecoveryFallbackError`.
The store (``TCPStore``) must outlive the lost ranks: torchrun's agent store, or one the job hosts
away from its workers; a lost store is a fallback too.

**Fallback.** What the survivors cannot recover in-process raises
:class:`~ucp.errors.RecoveryFallbackError` on every survivor, with one line saying why: fewer than
``min_world_size`` survivors, a store that stopped answering, more recoveries than
``max_recoveries``, or (``memory_only``) a snapshot that memory cannot restore (more nodes lost
than parity). The process then exits; torchrun's restart (the relaunch path) resumes the job from
the newest checkpoint, memory or durable.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.distributed as dist

from ucp.comm.connections import OpenedConnections
from ucp.comm.liveness import MAX_PROBES, LivenessPort, probe_address, refused
from ucp.errors import DistributedError, NotInMemoryError, OptionsError, PeerLostError, RecoveryFallbackError

PREFIX = "ucp/inprocess"
PROBE_EVERY = 0.05  # seconds between probes of a missing member's liveness port (Membership._decide)
PROBE_TIMEOUT = 0.05  # seconds a round of probes waits for answers (a lost host never answers)


@dataclass(frozen=True)
class World:
    """The job as it stands in one generation of :func:`run_in_process`.

    Attributes:
        rank: this process's rank in the current process group.
        world_size: ranks in it.
        generation: 0 at the start, +1 for each recovery.
        member: this process's id: its rank in generation 0.
        members: the ids of the current ranks, in rank order.
        lost: the ids the last recovery lost (empty in generation 0).
        phases: wall-clock times (``time.time()``) of the last recovery: ``failed`` (this rank saw
            the failure), ``reformed`` (the new process group formed), ``built`` (``build``
            returned), ``loaded`` (the load returned); empty in generation 0.
    """

    rank: int
    world_size: int
    generation: int
    member: int
    members: tuple[int, ...]
    lost: tuple[int, ...] = ()
    phases: dict = field(default_factory=dict)


def run_in_process(build: Callable[[World], Any], train: Callable[[Any, Any, World], Any], *, store=None,
                   member: int | None = None, world_size: int | None = None, backend: str = "gloo",
                   timeout: float = 10.0, heartbeat: float = 1.0, dead_after: float | None = None,
                   min_world_size: int = 1, max_recoveries: int | None = None, memory_only: bool = True,
                   namespace: str | None = None, probe: bool = True) -> Any:
    """Run ``train`` under in-process recovery; returns what ``train`` returns.

    Initializes torch.distributed itself (and destroys it at the end): the caller must not have.

    Args:
        build: ``build(world)`` makes the model and optimizer for ``world.world_size`` ranks (a
            new process group is the default one) and returns the :class:`~ucp.Checkpointer` over
            them (with ``snapshot=`` and usually ``redundancy=``).
        train: ``train(ckpt, restored, world)``: the training loop from ``restored.step + 1`` (or
            from the start when ``restored`` is None), saving with ``ckpt.save``.
        store: the job's ``torch.distributed.TCPStore``; default: torchrun's (``MASTER_ADDR`` /
            ``MASTER_PORT``, as a client when ``TORCHELASTIC_USE_AGENT_STORE`` says torchrun's
            agent hosts it, else hosted by rank 0, which then cannot be recovered from).
        member: this process's rank at the start (default ``RANK``).
        world_size: ranks at the start (default ``WORLD_SIZE``).
        backend: the process groups' backend ("gloo", or "nccl" with one GPU per rank). Only with
            "gloo" are a broken generation's connections shut (:mod:`ucp.comm.connections`).
        timeout: seconds a collective waits (the process group's timeout): the bound on detecting
            a hung rank; also the bound on the membership protocol's waits.
        heartbeat: seconds between heartbeats.
        dead_after: seconds without a heartbeat after which a member that did not register is
            lost (default 3 x ``heartbeat``).
        min_world_size: fewer survivors fall back to a relaunch.
        max_recoveries: recoveries in-process at most (None: no limit); the next falls back.
        memory_only: a recovery that lost members restores from memory only (no disk read); when memory cannot
            restore the job (more nodes lost than parity), fall back to a relaunch. With False,
            the recovery's load may come from the durable tier in-process.
        namespace: where in the store this launch's keys go (``ucp/inprocess/<namespace>/``): a
            relaunch must not see the keys of the launch before it. Default: torchrun's restart
            count (``attempt<TORCHELASTIC_RESTART_COUNT>``).
        probe: each member listens on a liveness port (:mod:`ucp.comm.liveness`) that its host's
            kernel closes when the process exits, and a member whose port refuses a connection is
            lost at once instead of after ``dead_after`` of silence. Set False on every member where
            a firewall between hosts rejects connections (a refusal would then lose a live member).

    Raises:
        RecoveryFallbackError: the survivors cannot go on in-process; the message says why.
        OptionsError: an argument is invalid, or torch.distributed is initialized already.
        Exception: what ``build``, the load or ``train`` raised, when no member was lost and not
            every member failed in a collective's transport (a bug, bad input).
    """
    if heartbeat <= 0 or timeout <= 0:
        raise OptionsError(f"heartbeat={heartbeat!r}, timeout={timeout!r}: use positive seconds")
    dead_after = 3 * heartbeat if dead_after is None else dead_after
    if dead_after <= heartbeat:
        raise OptionsError(f"dead_after={dead_after!r} must be longer than heartbeat={heartbeat!r}: a member is "
                           "lost after several missed heartbeats")
    if dist.is_initialized():
        raise OptionsError("run_in_process initializes torch.distributed itself: call it before "
                           "init_process_group, not after")
    member = int(os.environ["RANK"]) if member is None else member
    world_size = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    store = default_store(world_size, member, timeout) if store is None else store
    if not isinstance(store, dist.TCPStore):
        raise OptionsError(f"store must be a torch.distributed.TCPStore (the heartbeats open a connection of their "
                           f"own to it), got {type(store).__name__}")
    if namespace is None:
        namespace = f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    prefix = f"{PREFIX}/{namespace}"
    job = Membership(store, prefix, member, world_size, timeout, heartbeat, dead_after, probe)
    recoveries = 0
    phases: dict = {}
    lost: tuple[int, ...] = ()
    froze = gc.get_freeze_count() == 0
    if froze:
        gc.freeze()  # (what the program made before the job: the recovery's collection does not scan it)
    try:
        job.start()
        while True:
            generation, members = job.generation, job.members
            rank = members.index(member)
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(len(members)))  # (for code that reads them)
            world = World(rank, len(members), generation, member, members, lost, phases)
            ckpt = None
            made = OpenedConnections(keep_port=store.port)  # the connections this generation's groups open
            if backend == "gloo":  # (NCCL's own sockets are not ours to shut: its communicators are aborted)
                made.start()
            try:
                dist.init_process_group(backend, store=dist.PrefixStore(f"{prefix}/g{generation}/pg", store),
                                        rank=rank, world_size=len(members), timeout=datetime.timedelta(seconds=timeout))
                if generation:
                    phases["reformed"] = time.time()
                ckpt = build(world)
                made.stop()
                if generation:
                    phases["built"] = time.time()
                try:
                    restored = ckpt.load(memory_only=bool(lost) and memory_only)  # (a retry: from anywhere)
                except NotInMemoryError as e:  # (on every rank: the source is decided together)
                    raise RecoveryFallbackError(f"members {list(lost)} lost: {e}") from e
                if generation:
                    phases["loaded"] = time.time()
                result = train(ckpt, restored, world)
                ckpt.close()
                return result
            except (KeyboardInterrupt, SystemExit, RecoveryFallbackError):
                raise
            except Exception as error:  # noqa: BLE001 - a peer failure, or raised again below
                failed = time.time()
                first = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
                warnings.warn(f"ucp: member {member} (rank {rank} of generation {generation}) failed: "
                              f"{type(error).__name__}: {first[:300]}; asking the job who is lost (in-process "
                              "recovery)", RuntimeWarning, stacklevel=2)
                if ckpt is None:  # (build did not finish: what it opened so far)
                    made.stop()
                made.shut()  # peers blocked on their connections to this rank fail now, not at the timeout
                job.register(transport_failure(error))
                if ckpt is not None:
                    ckpt.abandon()
                ckpt = restored = made = None  # (what the broken generation left here is not frozen below)
                drop_traceback(error)  # (its frames hold the broken generation's model)
                _destroy()
                gc.collect()  # that model and optimizer are freed before build makes the next (the objects
                # made before the job, torch's among them, are frozen: this scans the job's own only)
                if froze:
                    gc.freeze()  # (what survived it, modules imported since among them: not scanned again)
                after, retry = job.next_generation()
                lost = tuple(m for m in members if m not in after)
                if not lost and not retry:
                    raise  # every member is here and one failed on its own: a bug, not a peer's failure
                if member not in after:
                    raise RecoveryFallbackError(f"member {member} registered after the survivors of generation "
                                                f"{generation} had formed the next one without it") from error
                if len(after) < min_world_size:
                    raise RecoveryFallbackError(f"{len(after)} rank(s) survive (lost {list(lost)}), fewer than "
                                                f"min_world_size={min_world_size}") from error
                recoveries += 1
                if max_recoveries is not None and recoveries > max_recoveries:
                    raise RecoveryFallbackError(f"members {list(lost)} lost: more recoveries in-process than "
                                                f"max_recoveries={max_recoveries}") from error
                phases = {"failed": failed}
    finally:
        _destroy()
        job.stop()
        if froze:
            gc.unfreeze()


def _ages(beats: dict[int, float], members: list[int]) -> dict[int, float]:
    """Seconds since each of ``members``' heartbeat (``beats``: its wall-clock time)."""
    now = time.time()
    return {m: now - beats[m] for m in members}


def default_store(world_size: int, rank: int, timeout: float):
    """torchrun's store, as ``init_process_group("env://")`` would find it."""
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    return dist.TCPStore(host, port, world_size, is_master=not agent and rank == 0, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout), multi_tenant=not agent)


def transport_failure(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a collective's transport failing: torch's
    distributed errors, ucp's PeerLostError, gloo/NCCL runtime errors (a peer gone, a timeout)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (dist.DistError, PeerLostError)):
            return True
        text = str(error)
        if isinstance(error, (RuntimeError, DistributedError)) and any(
                w in text for w in ("gloo", "NCCL", "Connection", "Timed out", "timed out",
                                    "died or became unreachable")):
            return True
        error = error.__cause__ or error.__context__
    return False


def drop_traceback(error: BaseException) -> None:
    """Free the frames of ``error``'s traceback and of the exceptions it chains (they hold the
    broken generation's model, and through it its process groups), keeping the traceback as a note
    on ``error`` for when it is raised again."""
    error.add_note("".join(traceback.format_exception(error)).rstrip()
                   + "\n(the traceback above, as text: its frames were freed to close the broken process group)")
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


def _destroy() -> None:
    """Destroy every process group, whatever state it is in (a failed one may raise)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - broken already: it is dropped all the same
            pass


class Membership:
    """Who is in the job, generation by generation, agreed through ``store`` (docs/recovery.md).

    Keys (under ``prefix``, ``ucp/inprocess/<namespace>``): ``hb/<member>`` each member's heartbeat
    (its wall-clock time), ``port/<member>`` its liveness port's address (with ``probe``);
    ``g<g>/here`` the members registered for generation ``g`` (appended to, ``"<member>,"`` each),
    ``g<g>/count`` how many, ``g<g>/leader`` the first to register, ``g<g>/lost`` the members of the
    last generation lost (JSON) once the leader has decided: each member reads the size of the failure,
    not of the job, and the leader one key per poll for the registrations.
    """

    def __init__(self, store, prefix: str, member: int, world_size: int, timeout: float, heartbeat: float,
                 dead_after: float, probe: bool = True):
        self.prefix = prefix
        self.store = dist.PrefixStore(prefix, store)
        self._tcp = store
        self.member = member
        self.generation = 0
        self.members = tuple(range(world_size))
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.dead_after = dead_after
        self.probe = probe
        self._port: LivenessPort | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Beat the first heartbeat, then one every ``heartbeat`` seconds from a thread with a
        store connection of its own (a blocking wait on the main one would hold the beats back)."""
        if self.probe:
            try:
                self._port = LivenessPort((self._tcp.host, self._tcp.port))
            except OSError as e:  # (no IPv4 route to the store, say): this member is told by its silence only
                warnings.warn(f"ucp: member {self.member} has no liveness port ({e}): if it dies, the job "
                              f"waits dead_after={self.dead_after:g} s of its silence", RuntimeWarning, stacklevel=3)
        try:
            own = dist.PrefixStore(self.prefix, dist.TCPStore(self._tcp.host, self._tcp.port, is_master=False,
                                                         wait_for_workers=False,
                                                         timeout=datetime.timedelta(seconds=self.timeout)))
            if self._port is not None:
                own.set(f"port/{self.member}", self._port.record)
            own.set(f"hb/{self.member}", repr(time.time()))
        except Exception as e:  # noqa: BLE001
            raise RecoveryFallbackError(f"the job's store at {self._tcp.host}:{self._tcp.port} does not answer "
                                        f"({e})") from e
        port = self._port

        def beat():
            while not self._stop.wait(self.heartbeat):
                if port is not None:
                    port.drain()
                try:
                    own.set(f"hb/{self.member}", repr(time.time()))
                except Exception:  # noqa: BLE001 - the store is gone: the next recovery says so
                    return

        self._thread = threading.Thread(target=beat, name="ucp-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._port is not None:
            self._port.close()  # (a member that left the job is gone to a probe)

    def register(self, transport: bool) -> None:
        """Register for the next generation (``transport``: this member failed in a collective's
        transport), at once on a failure: a member registered is not waited for by its heartbeat,
        so the slow work of giving up the broken generation (freeing it, collecting) comes after."""
        g = self.generation + 1
        s = self.store
        try:
            s.append(f"g{g}/here", f"{self.member},")  # (the leader reads who registered in one request)
            if not transport:
                s.add(f"g{g}/own", 1)
            s.add(f"g{g}/count", 1)
        except Exception as e:  # noqa: BLE001 - the store's failures: no agreement without it
            raise RecoveryFallbackError(f"in-process recovery needs the job's store, which failed: "
                                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e

    def next_generation(self) -> tuple[tuple[int, ...], bool]:
        """After :meth:`register`: the next generation's members (agreed by every survivor; the first
        to get here leads and decides) and whether every one of them failed in a transport; raises
        RecoveryFallbackError when the store does not answer or nobody decides in time."""
        g = self.generation + 1
        s = self.store
        try:
            leader = s.compare_set(f"g{g}/leader", "", str(self.member)).decode() == str(self.member)
            if leader:  # (the members lost, not the members: what each member reads is the failure's size)
                kept = set(self._decide(g))
                s.set(f"g{g}/lost", json.dumps([m for m in self.members if m not in kept]))
            s.wait([f"g{g}/lost"], datetime.timedelta(seconds=3 * self.timeout))
            lost = set(json.loads(s.get(f"g{g}/lost")))
            members = tuple(m for m in self.members if m not in lost)
            retry = s.add(f"g{g}/own", 0) == 0
        except RecoveryFallbackError:
            raise
        except Exception as e:  # noqa: BLE001 - the store's failures: no agreement without it
            raise RecoveryFallbackError(f"in-process recovery needs the job's store, which failed: "
                                        f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
        self.generation, self.members = g, members
        return members, retry

    def _decide(self, g: int) -> list[int]:
        """The leader: wait until every member of the last generation has registered for ``g`` or
        is lost, at most twice ``timeout`` (a live member blocked in a collective sees the failure
        within ``timeout`` at the latest); the registered ones, in their old order. A member is
        lost when its liveness port refuses a probe (its process exited:
        :mod:`ucp.comm.liveness`) or when it is silent (its heartbeat older than ``dead_after``:
        a hung process, a lost host). A poll reads the counter; only when it moved is the list of
        registered members read again (one key: registrations only add). The heartbeats of the
        members still missing are read every quarter heartbeat (they change once a heartbeat), and
        again before any is judged silent. Every ``PROBE_EVERY`` seconds the missing members with the
        oldest heartbeats (a dead one's stops) are probed, :data:`~ucp.comm.liveness.MAX_PROBES` at
        most, a member that answered not again within a heartbeat; so a poll costs the missing, not
        the whole job, and a probe round a bounded number of connections."""
        s = self.store
        deadline = time.monotonic() + 2 * self.timeout
        missing, counted = list(self.members), 0
        ports: dict[int, str | None] = {}
        exited: set[int] = set()
        due: dict[int, float] = {}  # member -> when it may be probed again (it answered)
        probed = -PROBE_EVERY
        beats: dict[int, float] = {}  # member -> its last heartbeat read (beats change once a heartbeat)
        read = -self.heartbeat
        while True:
            count = s.add(f"g{g}/count", 0)
            if count != counted:
                counted = count
                here = {int(m) for m in s.get(f"g{g}/here").decode().split(",") if m}
                missing = [m for m in missing if m not in here]
            if not missing:
                return list(self.members)
            fresh = time.monotonic() - read >= self.heartbeat / 4
            if fresh:
                read, beats = time.monotonic(), self._beats(missing)
            age = _ages(beats, missing)
            if self.probe and time.monotonic() - probed >= PROBE_EVERY:
                probed = time.monotonic()
                ready = [m for m in missing if m not in exited and due.get(m, 0.0) <= probed]
                oldest = sorted(ready, key=lambda m: -age[m])[:MAX_PROBES]
                gone = self._probe(oldest, ports)
                exited |= gone
                due.update((m, probed + self.heartbeat) for m in oldest if m not in gone)
            silent = all(m in exited or age[m] > self.dead_after for m in missing)
            if silent and not fresh:  # (decided on heartbeats read now only)
                read, beats = time.monotonic(), self._beats(missing)
                age = _ages(beats, missing)
                silent = all(m in exited or age[m] > self.dead_after for m in missing)
            if silent or time.monotonic() > deadline:
                gone = set(missing)
                return [m for m in self.members if m not in gone]
            time.sleep(min(0.01, self.heartbeat / 10))

    def _beats(self, members: list[int]) -> dict[int, float]:
        """The last heartbeat (wall-clock time) of each of ``members``, in one request."""
        return {m: float(b.decode() or 0) for m, b in zip(members, self.store.multi_get([f"hb/{m}" for m in members]))}

    def _probe(self, members: list[int], ports: dict[int, str | None]) -> set[int]:
        """Those of ``members`` whose liveness port refuses a connection. ``ports`` caches their
        addresses, read from the store on first need: None for a member that published no port or
        one that cannot be probed from here (:func:`~ucp.comm.liveness.probe_address`)."""
        for m in members:
            if m not in ports:
                key = f"port/{m}"
                ports[m] = probe_address(self.store.get(key).decode()) if self.store.check([key]) else None
        return refused({m: ports[m] for m in members if ports[m]}, PROBE_TIMEOUT)
