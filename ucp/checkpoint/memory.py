"""The memory tier of a :class:`ucp.Checkpointer`: snapshots into the node agents' memory, their
cut, their parity, and loads from memory (docs/agent.md, docs/erasure.md).

The ``Checkpointer`` holds one :class:`Snapshots` when it is given ``snapshot=SnapshotOptions(...)``
and calls it from ``save``, ``load``, ``wait`` and ``close``; the durable tier is
:mod:`ucp.checkpoint.save`.
"""

from __future__ import annotations

import operator
import os
import random
import threading
import time
import traceback
import warnings

import torch

from ucp import __version__
from ucp.checkpoint.memory_source import (choose_source, decide_own, fold_nodes, fold_own, node_offer, own_offer,
                                         records_of_rank, speaker_mask)
from ucp.checkpoint.results import SaveResult
from ucp.comm.side_groups import SideGroups, all_gather_objects, all_reduce_ints, all_true
from ucp.errors import PersistError, UcpError, few
from ucp.format.keys import model_key
from ucp.plan.save_plan import assign_writers
from ucp.snapshot.header import FragmentRecord, manifest_from_headers
from ucp.snapshot.index import (KeyIndex, SnapshotManifest, decide_states, fold_states, index_messages, own_state,
                               state_offer)
from ucp.snapshot.memory import MemoryTier, cuda_device
from ucp.snapshot.recovery import SnapshotParity, rebuild_lost
from ucp.snapshot.shm import SHM_DIR
from ucp.state.capture import normalize_fqn
from ucp.state.tensors import snapshot_source
from ucp.storage import directory as store


_ALL = object()  # (Snapshots._source_own: not the common case; every rank's headers are needed)


class Snapshots:
    """A Checkpointer's snapshots in the memory of its nodes' agents.

    Args:
        ckpt: the :class:`~ucp.Checkpointer` (its ``coll``, ``layout``, ``root``, ``keep``,
            ``options``, ``model``, ``optimizer`` and ``capture``).
        snapshot: the :class:`~ucp.SnapshotOptions`.
        redundancy: the :class:`~ucp.RedundancyOptions`, or None.
    """

    def __init__(self, ckpt, snapshot, redundancy):
        self._ckpt = ckpt  # read live: its root, keep, options, model and optimizer are the durable tier's too
        self.snapshot = snapshot
        self.redundancy = redundancy
        self._memory_tier = None
        self.lost: str | None = None  # why the memory tier stopped, once it has
        self._pending: dict | None = None  # the snapshot whose copy or cut is in flight
        self._groups = SideGroups(ckpt.coll, snapshot.timeout)  # "cut" and "parity", created on first use
        self._parity = None  # the snapshots' parity (ucp.snapshot.recovery.SnapshotParity), with redundancy
        self._rebuilt: list[str] = []
        self.rebuilt_ranks: tuple = ()  # ranks a load rebuilt from parity; their segments freed once read
        self._hook = None
        self._persist_regions = None  # the pieces the agent was configured with (durable writes)
        self.why_not: str | None = None  # why the last source() found nothing (its memory_only form)
        self._folded: dict | None = None  # rank 0: every node's holdings the last choice saw (for its warnings)
        self._own: tuple | None = None  # ((slot, step, world, token), layout, manifest): the last own header built

    coll = property(lambda self: self._ckpt.coll)
    layout = property(lambda self: self._ckpt.layout)
    root = property(lambda self: self._ckpt.root)
    keep = property(lambda self: self._ckpt.keep)
    options = property(lambda self: self._ckpt.options)
    model = property(lambda self: self._ckpt.model)
    optimizer = property(lambda self: self._ckpt.optimizer)

    def capture(self, extras: dict | None):
        return self._ckpt.capture(extras)

    def wait(self) -> None:
        """Finish the snapshot in flight and the agents' durable writes (every rank together).

        Raises:
            PersistError: an agent failed to write a snapshot durably (on every rank).
        """
        if self.lost is not None or self._memory_tier is None:
            return
        try:
            self.finish()
            errors = self._memory_tier.drain()
        except PersistError:
            raise
        except UcpError as e:
            self.lose(e, stacklevel=4)  # (called by Checkpointer.wait)
            return
        if all_reduce_ints([int(bool(errors))], "max", self._cut_group())[0] and not errors:
            errors = ["the agent of another rank failed to write a snapshot to the durable tier (see its error)"]
        if errors:
            raise PersistError("; ".join(errors))

    def close(self) -> None:
        """Release the optimizer hook, the snapshots' process groups and this rank's mappings of the
        agent's memory (the snapshots stay with the agent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._groups.destroy()
        if self._memory_tier is not None:
            self._memory_tier.close()

    def abandon(self) -> None:
        """:meth:`close` without collectives, after the job's process group broke: the snapshot
        in flight may still be blocked on a dead peer; once its thread ends, this rank's mappings
        are released (by a thread of its own, so nothing here waits)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._groups.forget()
        pending, tier = self._pending, self._memory_tier
        self._pending = None
        self._ckpt = None  # (the thread in flight would keep the model, and so its process groups, alive)
        if tier is None:
            return
        if pending is None or not pending["thread"].is_alive():
            tier.close()
            return

        def release():
            pending["thread"].join()
            tier.close()

        threading.Thread(target=release, name="ucp-abandon", daemon=True).start()

    def lose(self, error: Exception, stacklevel: int = 3) -> None:
        """The memory tier failed (its agent killed, say): say so once, at the user's call
        (``stacklevel`` frames up); the durable tier carries on."""
        self._pending = None
        self.lost = str(error)
        warnings.warn(f"ucp: the memory tier failed ({error}); snapshots stop, saves and loads use the "
                      f"durable tier only", RuntimeWarning, stacklevel=stacklevel)

    def _memory(self):
        if self._memory_tier is None:
            # every rank of a node asks; the first starts the node's agent, the others find it
            self._memory_tier = MemoryTier(self.snapshot.job_name(self.root), self.coll.rank, self.snapshot.timeout,
                                           self.snapshot.persist_timeout, self.options.io_threads)
        return self._memory_tier

    def save(self, step: int, extras: dict | None, persist: bool) -> SaveResult:
        """A snapshot of ``step`` into the memory of this node's agent (and, with ``persist``, by the
        agent to the durable tier, in the background).

        The state is captured now (non-tensor state encoded, module buffers copied, since a forward
        pass may change them); parameters and optimizer state are copied into the slot by a
        background thread, overlapping the next forward/backward: the optimizer's pre-step hook
        waits for that copy before the step mutates them. The snapshot becomes complete (the
        consistent cut: an all-reduce of every rank's "committed" on a gloo group of its own, in the
        same background thread) as soon as every rank has copied it.
        """
        t0 = time.perf_counter()
        self.finish()
        tier = self._memory()
        pieces, state = self.capture(extras)
        metas = {p.key: p.meta.to_dict() for p in pieces}
        pieces = [p for p in pieces if p.numel]
        buffers = self._buffer_keys()
        items = [(p.meta.dtype, snapshot_source(p.data, p.key in buffers)) for p in pieces]
        ready, device = None, cuda_device([t for _, t in items])
        if device is not None:  # the side stream's copies start after what is queued now on the tensors' GPU
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(device))
        fragments = [FragmentRecord(p.key, p.box, p.flat, p.meta.dtype, t.numel() * t.element_size()).to_dict()
                     for p, (_, t) in zip(pieces, items)]
        header = {"layout": self.layout.to_dict(), "world_size": self.coll.world_size, "tensors": metas,
                  "state": state, "fragments": fragments, "created_by": f"ucp {__version__}"}
        pending = {"step": step, "copied": threading.Event(), "device_copied": None, "device": device}
        cut = self._cut_group()
        if self.redundancy is not None:
            self._groups.get("parity")  # (created here, in the training thread, by every rank together)
        if self.redundancy is not None and self._parity is None:
            self._parity = SnapshotParity(self.redundancy, self.coll)

        def copied(event) -> None:  # the sources may change now (after ``event``, on a GPU)
            pending["device_copied"] = event
            pending["copied"].set()

        regions = [(f["key"], f["offsets"], f["sizes"], f["flat"], f["dtype"], f["length"]) for f in fragments]

        def copy():  # (the collector is not paused here: a copy stuck on a broken group would keep it paused)
            errors = []
            try:
                committed, errors = tier.write(step, items, header, ready=ready, on_copied=copied)
                pending["slot"] = committed["slot"]
            except BaseException as e:  # surfaced by the next ucp call, never lost
                pending["error"] = e
            finally:
                pending["copied"].set()  # the state may change now; the cut waits for the other ranks
            try:
                ok, token, failed, changed = self._cut_flags(cut, "error" not in pending, bool(errors),
                                                             regions != self._persist_regions)
                if not ok and "error" not in pending:
                    pending["error"] = UcpError(f"another rank failed its snapshot of step {step}; "
                                               "that snapshot is not complete")
                if failed:
                    pending["persist_error"] = PersistError("; ".join(errors) or "the agent of another rank failed "
                                                            "to write a snapshot to the durable tier (see its error)")
                if ok:
                    local = None
                    if changed:  # where this rank's snapshots go durably, and its share of the save plan
                        try:
                            self._configure_persist(tier, cut, committed)
                            self._persist_regions = regions
                        except BaseException as e:  # (with parity, every rank still joins its collectives)
                            if self._parity is None:
                                raise
                            local = e
                    if self._parity is not None and not self._encode_parity(tier, cut, committed, step, token, local):
                        pending.setdefault("error", UcpError(f"the parity of the snapshot of step {step} failed on "
                                                             "another rank; that snapshot is not complete"))
                        return
                    tier.complete(pending["slot"], step, token)
                    if persist:
                        tier.persist(pending["slot"], step)
            except BaseException as e:
                pending.setdefault("error", e)

        thread = threading.Thread(target=copy, name=f"ucp-snapshot-{step}", daemon=True)
        pending["thread"] = thread
        self._pending = pending
        self._hook_optimizer()
        thread.start()
        nbytes = sum(f["length"] for f in fragments)
        return SaveResult(step, SHM_DIR, nbytes, time.perf_counter() - t0, "memory")

    def _cut_flags(self, cut, committed: bool, failed: bool, changed: bool) -> tuple[bool, int, bool, bool]:
        """The cut, in one all-reduce on the group ``cut``: whether every rank committed, the cut's
        token (rank 0's random id), whether any rank's agent failed a durable write, whether any
        rank's pieces changed since the agents were configured."""
        token = random.getrandbits(62) + 1 if self.coll.rank == 0 else 0
        ok, token, failed, changed = all_reduce_ints([int(committed), -token, -int(failed), -int(changed)], "min", cut)
        return ok == 1, -token, failed < 0, changed < 0

    def _encode_parity(self, tier, cut, committed: dict, step: int, token: int, error=None) -> bool:
        """Encode this rank's share of the snapshot's parity (docs/erasure.md section 7); whether every
        rank's succeeded. Every rank joins the same collectives whatever fails where: the groups'
        forming (once), then an all-reduce on ``cut`` of "ready" after the steps that may fail on one
        rank alone (``error``: one that already did), then the stripes' exchange, then an all-reduce
        of "done" (complete is sent only once all parity is). Raises this rank's own failure."""
        parity = self._parity
        sequence = parity.sequence
        parity.sequence += 1
        prepared = None
        try:
            parity.setup(tier, self._groups.get("parity"))
            if error is None:
                prepared = parity.prepare(tier, committed, step, sequence)
        except BaseException as e:
            error = error or e
        if all_true(error is None, cut):
            try:
                parity.exchange(tier, prepared, token)
            except BaseException as e:
                error = e
            done = all_true(error is None, cut)
        else:
            done = False
        if error is not None:
            traceback.clear_frames(error.__traceback__)  # its frames held views of the shared memory
            raise error if isinstance(error, UcpError) else UcpError(f"the parity of step {step} failed: {error!r}")
        return done

    def _configure_persist(self, tier, cut, committed: dict) -> None:
        """Tell the agent the checkpoint root and the fragments this rank writes there: the durable
        save plan (each replicated region written by one holder) over every rank's pieces."""
        infos = [FragmentRecord.from_dict(f).piece_info() for f in committed["fragments"]]
        write = assign_writers(all_gather_objects(infos, cut, self.coll.world_size))[self.coll.rank]
        tier.configure(str(self.root.resolve()), write, self.coll.world_size, self.keep, self.options.fsync)

    def _buffer_keys(self) -> set[str]:
        """Keys of module buffers (not parameters): state a forward pass may change."""
        if self.model is None:
            return set()
        params = {id(p) for p in self.model.parameters()}
        geometry = self._ckpt.geometry
        return {model_key(geometry.name(normalize_fqn(n))) for n, b in self.model.named_buffers() if id(b) not in params}

    def _hook_optimizer(self) -> None:
        if self.optimizer is not None and self._hook is None:
            self._hook = self.optimizer.register_step_pre_hook(lambda *a, **k: self._wait_copy())

    def _wait_copy(self) -> None:
        """Block until this rank's snapshot copy in flight is done, so the state may change (the
        optimizer's pre-step hook; the cut may still wait for other ranks). A failed copy is reported
        by the next ``save``/``wait``/``load``, not here."""
        pending = self._pending
        if pending is not None:
            pending["copied"].wait()
            if pending["device_copied"] is not None:  # copies from the GPU: its next kernels wait, not the host
                torch.cuda.current_stream(pending["device"]).wait_event(pending["device_copied"])

    def finish(self) -> None:
        """Wait for the snapshot in flight (copy and cut) and raise its error, if any, then a
        failure of the agents to write an earlier snapshot durably (:class:`PersistError`). Either is
        raised on every rank together: the cut tells every rank of both."""
        pending = self._pending
        if pending is None:
            return
        pending["thread"].join()
        self._pending = None
        error = pending.get("error")
        if error is not None:
            raise error if isinstance(error, UcpError) else UcpError(f"snapshot of step {pending['step']} failed: {error!r}")
        if "persist_error" in pending:
            raise pending["persist_error"]

    def _cut_group(self):
        """The process group of the snapshots' cut (created on first use, by every rank's first
        snapshot); None for a job of one rank, whose cut is its own commit."""
        return self._groups.get("cut")

    # -- loads from memory ---------------------------------------------------------------

    def source(self, step: int | None, memory_only: bool = False):
        """``(directory, manifest)`` of the newest snapshot the agents of this job's nodes hold whole
        or can complete from parity (of ``step`` if given; saved by any number of ranks), or None;
        it is marked complete. Ranks rebuilt from parity are listed in ``self.rebuilt_ranks`` and
        their segments in ``self._rebuilt`` (freed after the load).

        The common case, a job resuming in place (the snapshot whole, saved by as many ranks under
        this layout, each rank's own on its node), costs a rank its own share
        (:meth:`_source_own`); any other goes through every rank's headers (:meth:`_source_all`).

        With ``memory_only`` (the load reads nothing else), why memory cannot restore the job goes
        to ``self.why_not`` (the same on every rank) instead of a warning about the durable tier."""
        self.why_not = None
        chosen, holdings = self._choose_own(step)
        if chosen is not None:
            own = self._source_own(chosen, holdings[1])
            if own is not _ALL:
                return own
        return self._source_all(step, memory_only, self._choose(step, holdings))  # (every node's holdings to rank 0)

    def _holdings(self) -> tuple:
        """``(node, header summaries, agent status)`` of this rank's node (a node is an agent)."""
        tier = self._memory()
        host = os.uname().nodename
        status = tier.client.status()
        return (f"{host}:{tier.client.info.pid}",
                [dict(h, host=h.get("host") or host) for h in tier.node_headers(summary=True)],
                {k: status.get(k) for k in ("adopted", "discarded", "predecessor")})

    def _choose_own(self, step: int | None) -> tuple[tuple[int, int] | None, tuple]:
        """``(step, world size)`` of the snapshot every rank finds whole on its own node under this
        world, when that is the one to load, else None: every rank's :func:`own_offer` folded up a
        tree to rank 0, which decides (:func:`decide_own`); a few numbers per message, whatever the
        world. Returned with this rank's :meth:`_holdings`, which the next phase reuses."""
        coll = self.coll
        seen = []

        def offer():
            seen.append(self._holdings())
            _, held, status = seen[0]
            return own_offer(coll.rank, coll.world_size, step, held, status)

        _, chosen = coll.reduce_phase("memory", offer, fold_own, lambda folded: decide_own(folded, coll.world_size))
        return chosen, seen[0]

    def _choose(self, step: int | None, holdings: tuple) -> tuple:
        """Every node's holdings (``holdings``: this rank's node's :meth:`_holdings`, with its parity
        summaries) folded to rank 0, each node once (:func:`fold_nodes`), which decides
        (:func:`choose_source`); the decision is broadcast with the speakers' ranks as bits. Returns
        this rank's share of it: ``("all", the choice, whether this rank is its node's speaker)``."""
        coll = self.coll
        node, held, status = holdings

        def offer():
            return node_offer(coll.rank, node, held, self._memory().node_parity(summary=True), status)

        def decide(folded):  # rank 0
            self._folded = folded  # (for rank 0's warnings)
            return choose_source(folded, self._durable_step(step), step), speaker_mask(folded)

        _, (chosen, speakers) = coll.reduce_phase("memory-all", offer, fold_nodes, decide)
        return "all", chosen, bool(speakers >> coll.rank & 1)

    def _source_own(self, chosen: tuple[int, int], held: list[dict]):
        """:meth:`source` when every rank holds its own header of snapshot ``chosen`` (step, world
        size) on its node: each rank checks that its header is there, of this layout, and builds its
        manifest alone (or reuses the one it built last, when ``held``, its node's header summaries,
        show the same snapshot). Returns ``(directory, manifest of this rank's fragments)``, or
        :data:`_ALL` when some rank cannot (every header is then needed)."""
        coll = self.coll
        tier = self._memory()
        host = os.uname().nodename
        layout = self.layout.to_dict()
        built: dict = {}

        def own():
            cached = self._own_manifest(chosen, layout, held)
            if cached is not None:
                summary, built["manifest"] = cached
                if not summary["complete"]:
                    tier.complete_rank(coll.rank, summary["slot"], chosen[0])
                return True
            mine = [h for h in tier.headers(step=chosen[0]).values() if h["world_size"] == chosen[1]]
            if len(mine) != 1 or mine[0]["layout"] != layout:
                return False
            if not mine[0]["complete"]:  # the cut finished (some rank marked it): mark it here too
                tier.complete_rank(coll.rank, mine[0]["slot"], chosen[0])
            built["manifest"] = manifest_from_headers([dict(mine[0], host=host)], host, whole=False)
            if mine[0].get("token") is not None:
                self._own = ((mine[0]["slot"], *chosen, mine[0]["token"]), layout, built["manifest"])
            return True

        _, every = coll.reduce_phase("memory-own", own, operator.and_, bool)
        if not every:
            return _ALL
        self.rebuilt_ranks = ()
        return SHM_DIR, built["manifest"]

    def _own_manifest(self, chosen: tuple[int, int], layout: dict, held: list[dict]) -> tuple[dict, object] | None:
        """``(this rank's header summary, manifest)`` of snapshot ``chosen`` (step, world size) when the
        manifest last built from this rank's own header is of that very snapshot: the same slot, step,
        world, layout and snapshot token (a slot written again gets a new token). A job that rolls back
        to the snapshot it took, or loads it again, then fetches and parses no header; None otherwise."""
        if self._own is None:
            return None
        key, built_layout, manifest = self._own
        for h in held:
            if h["rank"] == self.coll.rank and (h["step"], h["world_size"]) == chosen:
                if (h["slot"], *chosen, h.get("token")) == key and built_layout == layout:
                    return h, manifest  # (its state is decoded anew by each load)
        return None

    def _source_all(self, step: int | None, memory_only: bool, choice: tuple):
        """:meth:`source` for parity rebuilds, other worlds and layouts, at a rank's share
        (:mod:`ucp.snapshot.index`), from ``choice`` (:meth:`_choose`'s, not own): the lost ranks are
        rebuilt from parity; each node's speaker sends its headers' fragments to their keys' owners
        and their ranks' states to their new ranks; their metadata and states' digests are folded to
        rank 0 (:mod:`ucp.snapshot.index`); each rank gets the tensors' metadata, its own state,
        and later (:meth:`~ucp.snapshot.index.SnapshotManifest.select`) the fragments it loads."""
        coll = self.coll
        tier = self._memory()
        host = os.uname().nodename
        _, chosen, speaker = choice
        if coll.rank == 0 and not (memory_only and chosen["step"] is None):
            self._warn_source(step, chosen, self._folded)
        self._folded = None
        if chosen["step"] is None:
            self.why_not = chosen["why"] or "no snapshot is held"
            return None
        chosen_step, world, rec = chosen["step"], chosen["world"], chosen["rec"]
        mine: list[dict] = []  # the headers this rank speaks for: its node's (it is the speaker), those it rebuilt
        if speaker:
            for h in tier.node_headers(step=chosen_step):  # the cut finished (some rank marked it): mark it here too
                if h["world_size"] != world:
                    continue
                if not h["complete"]:
                    tier.complete_rank(h["rank"], h["slot"], chosen_step)
                mine.append(dict(h, host=h.get("host") or host))
        self.rebuilt_ranks = ()
        if rec is not None:
            damaged = {r for g in rec.groups for r in g}

            def records():
                if not speaker:
                    return []
                return [r for r in tier.node_parity(step=rec.step) if r["token"] == rec.token and r["rank"] in damaged]

            # the damaged groups' records (a few per lost rank) folded to rank 0 and broadcast; each
            # rank keeps those of the groups whose rebuild it joins
            _, found = coll.reduce_phase("memory-parity", records, operator.add, lambda got: got)
            full = records_of_rank(rec, chosen["speakers"], found, coll.rank)
            group = self._groups.get("parity")
            made: list = []
            self._rebuilt = made  # freed after the load, or if anything below fails
            try:
                coll.gather_phase("memory-rebuild", lambda: mine.extend(
                    rebuild_lost(coll, tier, group, rec, chosen["speakers"], full, made)))
            except UcpError as e:  # a stripe failed its checksum, say: never loaded from
                self.free_rebuilt()
                why = " ".join(str(e).split())
                self.why_not = f"the snapshot of step {rec.step} cannot be rebuilt from parity ({why})"
                if coll.rank == 0 and not memory_only:
                    durable = chosen["durable"]
                    then = (f"resuming from durable step {durable}" if durable is not None
                            else "and there is no durable checkpoint to resume from")
                    warnings.warn(f"ucp: not resuming from memory: the snapshot of step {rec.step} cannot be rebuilt "
                                  f"from parity ({why}); {then}", RuntimeWarning, stacklevel=3)
                return None
            self.rebuilt_ranks = tuple(rec.lost)
            if coll.rank == 0:
                warnings.warn(f"ucp: ranks {few(rec.lost)} of the snapshot of step {rec.step} were lost with their "
                              f"nodes and are rebuilt from parity", RuntimeWarning, stacklevel=3)
        try:
            received = coll.exchange_phase("memory-index", lambda: index_messages(mine, coll.world_size))
            _, common = coll.reduce_phase("memory-state", lambda: state_offer(mine), fold_states,
                                          lambda folded: decide_states(folded, world))
            built: dict = {}

            def build():
                built["manifest"] = SnapshotManifest(common, coll.rank, own_state(received, coll.rank, common),
                                                     KeyIndex(received), host)

            coll.gather_phase("memory-manifest", build)
        except BaseException:
            self.free_rebuilt()
            raise
        return SHM_DIR, built["manifest"]

    def _warn_source(self, step, chosen: dict, nodes: dict) -> None:
        """Rank 0's warnings about a load from memory that was decided from every node's holdings
        (``nodes``, :meth:`_choose`'s fold): snapshots discarded by agents that died, or why it does
        not come from memory."""
        if chosen["step"] is None:
            unique = [h for _, held, _, _ in nodes.values() for h in held if step is None or h["step"] == step]
            self._say_fallback(step, chosen["why"], unique, {n: st for n, (_, _, _, st) in nodes.items()},
                               chosen["durable"], stacklevel=5)
            return
        lost = {n: st["discarded"] for n, (_, _, _, st) in nodes.items() if st.get("discarded")}
        if lost:
            damaged = "; ".join(f"the snapshot agent on {n.rsplit(':', 1)[0]} had died and its damaged snapshots were "
                                f"discarded: " + ", ".join(f"{k} ({v})" for k, v in sorted(d.items()))
                                for n, d in sorted(lost.items()))
            warnings.warn(" ".join(f"ucp: {damaged}; resuming from step {chosen['step']} in memory".split()),
                          RuntimeWarning, stacklevel=4)

    def _durable_step(self, step: int | None) -> int | None:
        """The step a load from the durable tier would resume (rank 0): the newest complete
        checkpoint under the root, or ``step`` when it is there; None when there is none."""
        steps = [s for s, _ in store.list_steps(self.root)]
        if step is not None:
            return step if step in steps else None
        return steps[-1] if steps else None

    @staticmethod
    def _say_fallback(step, why: str, held: list[dict], status: dict, durable: int | None, stacklevel: int = 4) -> None:
        """Warn, in one line, that the load does not come from memory: what was lost and why, and
        the durable step it resumes (nothing is said for a job's first start, with nothing anywhere)."""
        reasons = [why] if why else []
        for node, st in sorted(status.items()):
            where = node.rsplit(":", 1)[0]
            if st.get("discarded"):
                damaged = ", ".join(f"{k} ({v})" for k, v in sorted(st["discarded"].items()))
                reasons.append(f"the snapshot agent on {where} had died (pid {st.get('predecessor')}) and its "
                               f"damaged snapshots were discarded: {damaged}")
            elif st.get("predecessor") is not None and not st.get("adopted"):
                reasons.append(f"the snapshot agent on {where} had died (pid {st['predecessor']}) and left no "
                               f"snapshot")
        if not reasons and held:
            reasons.append(f"no snapshot{'' if step is None else f' of step {step}'} in memory has every rank "
                           "committed")
        if not reasons and durable is None:
            return  # a first start: nothing was lost
        if not reasons:
            reasons.append(f"no snapshot{'' if step is None else f' of step {step}'} is in memory")
        then = (f"resuming from durable step {durable}" if durable is not None
                else "and there is no durable checkpoint to resume from")
        text = " ".join("; ".join(reasons).split())  # one line
        warnings.warn(f"ucp: not resuming from memory: {text}; {then}", RuntimeWarning, stacklevel=stacklevel)

    def mapping(self, name: str):
        """Segment ``name`` of this node's agent mapped for a load from memory
        (:meth:`ucp.snapshot.memory.MemoryTier.mapping`)."""
        return self._memory().mapping(name)

    def free_rebuilt(self) -> None:
        """After a load from memory: drop its mappings of other ranks' segments, and free the
        segments it rebuilt from parity (every rank has read them: the load's last phase is
        collective)."""
        if self._memory_tier is not None:
            self._memory_tier.unmap()
        names, self._rebuilt = self._rebuilt, []
        for name in names:
            try:
                self._memory_tier.client.free(name)
            except UcpError:
                pass
