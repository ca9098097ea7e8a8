#!/usr/bin/env python
"""Fault injection for ucp's memory tier: kill simulated nodes of a training job and check what comes back.

The harness starts ``--nodes`` simulated nodes on this machine. A node is a snapshot agent (its job
name ``<run>-n<node>``: every rank of the node snapshots into that agent's shared memory) and its
``--ranks-per-node`` trainer ranks (``tools/chaos_trainer.py``: the reference GPT on FSDP2, a snapshot
after every step, every ``--persist-every``-th one written durably by the agents). The harness owns
the rendezvous store, so killing any node, node 0 included, leaves the job able to re-form.

A kill ``NODE@STEP`` happens at a step boundary: once every rank has trained step STEP and handed
its snapshot to ``save``, the trainers wait; once that snapshot is complete and no agent has a
durable write in flight (or at once, with ``--kill-in-flight``), the node's trainers and agent are
SIGKILLed and its shared memory removed. The other trainers are then SIGKILLed too, as torchrun's
elastic agent would restart them, their agents kept, and the job is relaunched on the surviving
nodes with new rank numbers (the next *attempt*). Kills at the same STEP are one failure of several
nodes at once. The relaunched job restores with ``Checkpointer.load()``: from memory (``"memory"``),
from the newest durable checkpoint (``"durable"``), or from nothing (``"none"``: step 0, from scratch).

Per recovery it records the nodes lost, the step restored and its source, the steps lost (step at
the kill - step restored), the time to resume (from the kill to the first step finished after the
relaunch, less the harness's digest of the restored state, taken before that step) and whether
the restored state is bit-exactly the one recorded at that step before the failure (a
layout-independent sha256 of the whole model and optimizer state, see chaos_trainer.py),
and the first line of the relaunched trainers' stderr that says they fell back ("fall", "durable").

With ``--inprocess`` the trainers run under ``ucp.run_in_process`` (docs/recovery.md): the job is
launched once; at a failure's step the harness kills (``--kill``) or stops (``--hang``, SIGSTOP)
the node and lets the others go on; the survivors detect it, re-form the process group in their own
processes, rebuild the model and restore from memory. Each such recovery reports its ``phases``
(``detect``, ``reform``, ``build``, ``load``, ``first_step``; their sum is the time to resume), and
a stopped node is killed once the job went on without it. Survivors that cannot recover in-process
(more losses than parity) exit with status 3 and the harness relaunches them: that recovery's
``path`` is ``"relaunch (fallback)"``. ``--compare`` runs the failures relaunching, then
in-process, and prints one line with both (``relaunch``, ``inprocess``) and the ratio of their
median times to resume. ``--step-seconds`` makes each step last at least that long.

Output: exactly one JSON line on stdout (also when the run fails: ``ok`` false, ``error`` says why);
progress and the trainers' failures go to stderr, the trainers' own output to per-attempt logs in the
work directory. ``effective_training_time`` = ``useful_step_s`` / ``wall_s``: the step times of the
final trajectory (each step 1..S once, its last execution) over the harness's wall time from the first
launch to the end. Exit status 0 when the run reached ``--steps`` and every recovery with a source was
bit-exact, 1 otherwise, 2 for bad flags (one line on stderr). Every trainer and agent of the run is
killed or stopped and every shared-memory file of the run removed at the end, also on failure
(``shm_left`` counts what could not be).

    python tools/chaos.py --nodes 4 --ranks-per-node 1 --group 4 --parity 1 --steps 8 --kill 1@5
    python tools/chaos.py --nodes 4 --steps 12 --random-failures 2 --seed 3
    python tools/chaos.py --nodes 4 --steps 8 --kill 1@5 --compare --detect-timeout 2
    python tools/chaos.py --nodes 8 --steps 150 --kill 1@50,6@100 --inprocess --step-seconds 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import benchlib

REPO = benchlib.ROOT
TRAINER = Path(__file__).resolve().with_name("chaos_trainer.py")
log = benchlib.logger("chaos", clock=False)

SETTLE_S = 10.0  # how long a kill waits for the hold step's snapshot to complete (see Harness.settle)


class ChaosError(Exception):
    """The run failed (a trainer died unasked, an attempt timed out, ...): the JSON line says why."""


# -- flags -----------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class Kill:
    node: int
    step: int
    kind: str = "kill"  # "kill" (SIGKILL) or "hang" (SIGSTOP, with --inprocess)


def parse_kills(text: str, nodes: int, steps: int, kind: str = "kill", also: list[Kill] = ()) -> list[Kill]:
    """``NODE@STEP[,...]`` -> kills (``kind`` "kill", or "hang" for --hang), with ``also`` (those of the
    other flag); raises ValueError with what to fix."""
    flag = f"--{kind}"
    kills = list(also)
    for part in text.split(","):
        node, at, step = part.strip().partition("@")
        if not at:
            raise ValueError(f"{flag} {part!r}: write NODE@STEP, e.g. 1@5")
        try:
            k = Kill(int(node), int(step), kind)
        except ValueError:
            raise ValueError(f"{flag} {part!r}: NODE and STEP must be integers, e.g. 1@5") from None
        if not 0 <= k.node < nodes:
            raise ValueError(f"{flag} {part!r}: node {k.node} does not exist; nodes are 0..{nodes - 1}")
        if not 1 <= k.step <= steps - 1:
            raise ValueError(f"{flag} {part!r}: step {k.step} is out of 1..{steps - 1} (a failure needs a step "
                             f"before the last of --steps {steps})")
        kills.append(k)
    seen = [k.node for k in kills]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise ValueError(f"{flag}: node {dup[0]} fails twice; a dead node stays dead")
    if len(kills) >= nodes:
        raise ValueError(f"{flag} fails all {nodes} nodes: leave at least one alive")
    return sorted(kills, key=lambda k: (k.step, k.node))


def random_kills(count: int, nodes: int, steps: int, seed: int) -> list[Kill]:
    """``count`` kills of random surviving nodes at random steps of 1..steps-1 spread over the run,
    seeded: distinct steps while there are enough of them."""
    rng = random.Random(seed)
    # one kill in each of ``count`` equal stretches of 1..steps-1 (stretches share a step when too few)
    edges = [1 + (i * (steps - 1)) // max(count, 1) for i in range(count + 1)]
    at = [rng.randrange(edges[i], max(edges[i + 1], edges[i] + 1)) for i in range(count)]
    alive = list(range(nodes))
    kills = []
    for step in sorted(min(s, steps - 1) for s in at):
        node = rng.choice(alive)
        alive.remove(node)
        kills.append(Kill(node, step))
    return kills


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="chaos.py", description="Kill simulated nodes of a ucp training job (the reference GPT on FSDP2) "
               "and report how it recovered: one JSON line on stdout.",
               epilog="A kill happens once every rank has trained step STEP and handed its snapshot to save(), that "
                      "snapshot is complete and the agents' durable writes are done (see --kill-in-flight). "
                      "Exit status: 0 the run finished and every recovery was bit-exact, 1 otherwise, 2 bad flags.")
    p.add_argument("--nodes", type=int, default=4, help="simulated nodes (an agent + its ranks each); default 4")
    p.add_argument("--ranks-per-node", type=int, default=1, help="trainer ranks per node; default 1")
    p.add_argument("--group", type=int, default=4, help="nodes per redundancy group (RedundancyOptions.group); default 4")
    p.add_argument("--parity", type=int, default=1,
                   help="parity stripes per stripe set: node losses a group survives (RedundancyOptions.parity); default 1")
    p.add_argument("--steps", type=int, default=8, help="train steps 1..STEPS; default 8")
    p.add_argument("--seed", type=int, default=0, help="model, data and --random-failures seed; default 0")
    p.add_argument("--persist-every", type=int, default=4,
                   help="every N-th snapshot is also written to disk by the agents (SnapshotOptions.persist_every); default 4")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--kill", metavar="NODE@STEP[,...]",
                       help="kill node NODE (0..nodes-1) once step STEP (1..steps-1) is done; several at one STEP fail "
                            "together")
    which.add_argument("--random-failures", type=int, metavar="K",
                       help="K kills of random surviving nodes at random steps (seeded by --seed); without --kill or "
                            "--random-failures nothing is killed (a baseline)")
    p.add_argument("--hang", metavar="NODE@STEP[,...]",
                   help="with --inprocess: stop (SIGSTOP) node NODE's trainers and agent once step STEP is done; the "
                        "survivors detect it at --detect-timeout and go on without it (the node is then killed)")
    p.add_argument("--inprocess", action="store_true",
                   help="recover in-process (ucp.run_in_process): the survivors keep their processes, re-form the "
                        "process group, rebuild the model and restore from memory; a failure they cannot recover "
                        "in-process falls back to the relaunch")
    p.add_argument("--compare", action="store_true",
                   help="run the failures twice, relaunching then in-process, and report both side by side")
    p.add_argument("--step-seconds", type=float, default=0.0,
                   help="emulated step time: each step takes at least this long (for effective training time); "
                        "default 0")
    p.add_argument("--detect-timeout", type=float, default=10.0,
                   help="with --inprocess: the process group's timeout, which bounds hang detection; default 10")
    p.add_argument("--heartbeat", type=float, default=0.2,
                   help="with --inprocess: seconds between heartbeats; default 0.2")
    p.add_argument("--dead-after", type=float, default=2.0,
                   help="with --inprocess: seconds without a heartbeat after which a rank that did not rejoin is lost "
                        "(longer than --heartbeat: a loaded machine delays heartbeats; 1 s left live ranks out at load 20); "
                        "default 2")
    p.add_argument("--no-probe", dest="probe", action="store_false",
                   help="with --inprocess: no liveness ports (run_in_process(probe=False)): a killed rank is lost only "
                        "after --dead-after of heartbeat silence, as a hung one")
    p.add_argument("--kill-in-flight", action="store_true",
                   help="kill as soon as every rank has handed step STEP to save(), without waiting for its snapshot "
                        "to complete and the agents' durable writes to finish (the source restored and the steps "
                        "lost then vary from run to run)")
    p.add_argument("--rows-per-rank", type=int, default=2,
                   help="sequences per rank and step (the global batch is world size x this); default 2")
    p.add_argument("--attempt-timeout", type=float, default=300.0,
                   help="seconds one attempt (launch to kill or end) may take before the run fails; default 300")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="the trainers' gloo and agent timeout in seconds; default 60")
    p.add_argument("--workdir", type=Path, default=None,
                   help="where the durable checkpoints (ckpt/) and the trainers' logs (logs/) go; default: a new "
                        "temporary directory")
    p.add_argument("--keep-workdir", action="store_true",
                   help="keep them (default: the temporary directory, or ckpt/ and logs/ of --workdir, are removed "
                        "at the end)")
    args = p.parse_args(argv)

    for name, low in (("nodes", 1), ("ranks_per_node", 1), ("steps", 1), ("persist_every", 1), ("rows_per_rank", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: use an integer >= {low}")
    for name in ("attempt_timeout", "timeout", "detect_timeout", "heartbeat", "dead_after"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: use a positive number of seconds")
    from ucp.errors import OptionsError
    from ucp.options import RedundancyOptions

    try:
        RedundancyOptions(group=args.group, parity=args.parity)
    except OptionsError as e:
        p.error(f"--group {args.group} --parity {args.parity}: {e}")
    if args.nodes < args.parity + 1:
        p.error(f"--nodes {args.nodes} cannot hold --parity {args.parity} parity stripe(s) and any data: "
                f"use --nodes >= {args.parity + 1}")
    if args.dead_after <= args.heartbeat:
        p.error(f"--dead-after {args.dead_after} must be longer than --heartbeat {args.heartbeat}")
    if args.step_seconds < 0:
        p.error(f"--step-seconds {args.step_seconds}: use a number >= 0")
    if args.hang is not None and not (args.inprocess or args.compare):
        p.error("--hang needs --inprocess: a relaunch cannot detect a hung rank (torchrun watches exits only)")
    if args.hang is not None and args.random_failures is not None:
        p.error("--hang with --random-failures: give the failures one way (--kill/--hang, or --random-failures)")
    if args.hang is not None and args.compare:
        p.error("--hang with --compare: the relaunch path cannot detect a hang; compare kills only")
    try:
        if args.kill is not None:
            args.kills = parse_kills(args.kill, args.nodes, args.steps)
            if args.hang is not None:
                args.kills = parse_kills(args.hang, args.nodes, args.steps, "hang", args.kills)
        elif args.hang is not None:
            args.kills = parse_kills(args.hang, args.nodes, args.steps, "hang")
        elif args.random_failures is not None:
            k = args.random_failures
            if k < 0:
                raise ValueError(f"--random-failures {k}: use an integer >= 0")
            if k >= args.nodes:
                raise ValueError(f"--random-failures {k} would kill all {args.nodes} nodes: use at most {args.nodes - 1}")
            if k and args.steps < 2:
                raise ValueError("--random-failures needs --steps >= 2 (kills happen at steps 1..steps-1)")
            args.kills = random_kills(k, args.nodes, args.steps, args.seed)
        else:
            args.kills = []
    except ValueError as e:
        p.error(str(e))
    if args.workdir is not None and (args.workdir / "ckpt").exists() and any((args.workdir / "ckpt").iterdir()):
        p.error(f"--workdir {args.workdir} already holds checkpoints ({args.workdir / 'ckpt'}): give a new or empty "
                f"directory")
    return args


# -- processes -------------------------------------------------------------------------------------

@dataclass
class Rank:
    rank: int
    node: int
    proc: subprocess.Popen
    log: Path


@dataclass
class Attempt:
    """One launch of the job on the nodes alive then."""

    number: int
    nodes: list[int]
    hold: int  # the step it is killed after (0: none)
    ranks: list[Rank] = field(default_factory=list)
    started: float = 0.0
    holds: list[int] = field(default_factory=list)  # with --inprocess: every step a failure follows


def job_of(run_id: str, node: int) -> str:
    return f"{run_id}-n{node}"


class Harness:
    def __init__(self, args, run_id: str, workdir: Path):
        from torch.distributed import TCPStore

        self.args = args
        self.run_id = run_id
        self.workdir = workdir
        self.root = workdir / "ckpt"
        self.logs = workdir / "logs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True,
                              timeout=datetime.timedelta(seconds=30))
        self.jobs = [job_of(run_id, n) for n in range(args.nodes)]
        self.live: list[Rank] = []  # trainer processes not yet reaped

    def report(self, attempt: int):
        from torch.distributed import PrefixStore

        return PrefixStore(f"attempt{attempt}/chaos", self.store)

    def launch(self, a: Attempt) -> None:
        args = self.args
        rpn = args.ranks_per_node
        world = len(a.nodes) * rpn
        env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.store.port),
                   WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(rpn))
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        env.pop("TORCHELASTIC_RUN_ID", None)
        a.started = time.time()
        for i, node in enumerate(a.nodes):
            for local in range(rpn):
                rank = i * rpn + local
                path = self.logs / f"attempt{a.number}.node{node}.rank{rank}.log"
                cmd = [sys.executable, str(TRAINER), "--store-port", str(self.store.port), "--attempt", str(a.number),
                       "--node", str(node), "--job", self.jobs[node], "--root", str(self.root),
                       "--steps", str(args.steps), "--seed", str(args.seed), "--persist-every", str(args.persist_every),
                       "--group", str(args.group), "--parity", str(args.parity), "--rows-per-rank",
                       str(args.rows_per_rank), "--hold", str(a.hold), "--timeout", str(args.timeout),
                       "--hold-timeout", str(args.attempt_timeout), "--step-seconds", str(args.step_seconds)]
                if args.inprocess:
                    cmd += ["--inprocess", "--holds", ",".join(map(str, a.holds)), "--detect-timeout",
                            str(args.detect_timeout), "--heartbeat", str(args.heartbeat), "--dead-after", str(args.dead_after)]
                    if not args.probe:
                        cmd.append("--no-probe")
                with open(path, "wb") as out:
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                            env=dict(env, RANK=str(rank), LOCAL_RANK=str(local)),
                                            start_new_session=True)  # a ^C reaches the harness only: it cleans up
                r = Rank(rank, node, proc, path)
                a.ranks.append(r)
                self.live.append(r)

    def watch(self, a: Attempt) -> str:
        """Until the attempt is done ("done") or every rank waits at its hold step ("held"); raises
        ChaosError when a trainer fails or the attempt takes longer than --attempt-timeout."""
        report = self.report(a.number)
        deadline = time.monotonic() + self.args.attempt_timeout
        held_keys = [f"held/{r.rank}" for r in a.ranks]
        while True:
            codes = [r.proc.poll() for r in a.ranks]
            bad = [(r, c) for r, c in zip(a.ranks, codes) if c not in (None, 0)]
            if bad:
                r, c = bad[0]
                log(f"rank {r.rank} (node {r.node}) failed; the end of its log:\n" + tail(r.log))
                raise ChaosError(f"attempt {a.number}: rank {r.rank} (node {r.node}) exited with status {c}: "
                                 f"{last_line(r.log)}")
            if all(c == 0 for c in codes):
                return "done"
            if a.hold and report.check(held_keys):
                return "held"
            if time.monotonic() > deadline:
                for r in a.ranks:
                    log(f"rank {r.rank} (node {r.node}) at the timeout: {last_line(r.log)}")
                raise ChaosError(f"attempt {a.number} on nodes {a.nodes} took over --attempt-timeout "
                                 f"{self.args.attempt_timeout:g} s (--keep-workdir keeps the trainers' logs)")
            time.sleep(0.05)

    def settle(self, a: Attempt, step: int | None = None, ranks: dict[int, list[int]] | None = None) -> None:
        """Wait, the ranks holding at ``step`` (default ``a.hold``), until the job is at rest: no agent
        has a durable write or commit in flight, and (at most SETTLE_S seconds) every rank's snapshot
        of the hold step is complete and, if that step persists, written durably. So the kill point
        is the same from run to run: the step boundary, everything before it where it would have
        gone. ``ranks``: node -> its ranks' numbers now (default: as launched)."""
        from ucp.snapshot import client

        step = a.hold if step is None else step
        persists = step % self.args.persist_every == 0
        ranks = ranks or {n: [r.rank for r in a.ranks if r.node == n] for n in a.nodes}
        agents = {n: client.connect(self.jobs[n], timeout=self.args.timeout) for n in ranks}
        soft = time.monotonic() + SETTLE_S
        hard = time.monotonic() + self.args.attempt_timeout
        while True:
            busy, behind = [], []
            for n, agent in agents.items():
                if agent is None:  # (no agent: that node's memory tier is off)
                    continue
                st = agent.status()
                if st["persisting"]:
                    busy.append(n)
                done = {int(k.split(".")[0]) for k, v in st["snapshots"].items() if v["step"] == step and v["complete"]}
                durable = {int(r) for r, s in st["persisted"].items() if s >= step}
                behind += [r for r in ranks[n] if r not in done or persists and r not in durable]
            if not busy and (not behind or time.monotonic() > soft):
                if behind:
                    log(f"the snapshot of step {step} of ranks {behind} is not complete (or not durable) after "
                        f"{SETTLE_S:g} s; killing anyway")
                return
            if time.monotonic() > hard:
                raise ChaosError(f"attempt {a.number}: the agents of nodes {busy} were still writing to the durable "
                                 f"tier {self.args.attempt_timeout:g} s after step {step}")
            time.sleep(0.02)

    def memory(self, a: Attempt) -> dict:
        """The snapshot and parity bytes the agents of ``a``'s nodes hold (``ucp agent status``)."""
        from ucp.snapshot import client

        data = parity = 0
        for n in a.nodes:
            st = client.connect(self.jobs[n], timeout=self.args.timeout).status()
            data += st.get("data_bytes", 0)
            parity += st.get("parity_bytes", 0)
        return {"snapshot_bytes": data, "parity_bytes": parity,
                "memory_overhead": (data + parity) / data if data else None}

    def records(self, a: Attempt) -> tuple[dict, dict[int, dict]]:
        """The attempt's restore record and its step records (step -> record)."""
        report = self.report(a.number)
        if not report.check(["restored"]):
            raise ChaosError(f"attempt {a.number} recorded no restore")
        restored = json.loads(report.get("restored"))
        progress = int(report.get("progress")) if report.check(["progress"]) else restored["step"]
        steps = {s: json.loads(report.get(f"step/{s}")) for s in range(restored["step"] + 1, progress + 1)}
        return restored, steps

    def kill_node(self, node: int) -> None:
        """SIGKILL the node's trainers and its agent, then remove its shared memory."""
        self.kill_nodes([node])

    def kill_nodes(self, nodes: list[int]) -> None:
        """SIGKILL the trainers of every node in ``nodes`` first, then their agents (each waited for and
        its shared memory removed): nodes failing at one step die together, so that a fast detector
        cannot see one of them dead while another still lives."""
        for r in self.live:
            if r.node in nodes:
                kill(r.proc.pid)
        for node in nodes:
            self.kill_agent(self.jobs[node])

    def stop_node(self, node: int) -> None:
        """SIGSTOP the node's trainers and its agent: a hung node (killed later, by :meth:`kill_node`)."""
        from ucp.snapshot import discovery

        for r in self.live:
            if r.node == node and r.proc.poll() is None:
                os.kill(r.proc.pid, signal.SIGSTOP)
        info = agent_info(self.jobs[node])
        if info is not None and discovery.is_alive(info):
            os.kill(info.pid, signal.SIGSTOP)

    def kill_agent(self, job: str) -> None:
        from ucp.snapshot import discovery

        info = agent_info(job)
        if info is not None and discovery.is_alive(info):
            kill(info.pid)
            deadline = time.monotonic() + 10
            while discovery.is_alive(info) and time.monotonic() < deadline:  # (init reaps it)
                time.sleep(0.01)
        remove_memory(job)

    def stop_trainers(self) -> None:
        for r in self.live:
            if r.proc.poll() is None:
                kill(r.proc.pid)
        for r in self.live:
            try:
                r.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"rank {r.rank} (node {r.node}, pid {r.proc.pid}) did not die")
        self.live = [r for r in self.live if r.proc.poll() is None]

    def cleanup(self) -> int:
        """Kill every trainer, stop every agent of the run (without flushing), remove their shared
        memory; the number of the run's files left in /dev/shm."""
        from ucp.snapshot import client, shm

        from ucp.snapshot import discovery

        self.stop_trainers()
        for job in self.jobs:
            # a trainer killed while it started its node's agent leaves one that publishes itself later
            deadline = time.monotonic() + 15
            while True:
                info = agent_info(job)
                if info is not None and discovery.is_alive(info):
                    try:
                        client.stop(job, timeout=30)
                    except Exception as e:  # a stuck agent: the hard way
                        log(f"stopping the agent of {job} failed ({e}); killing it")
                        self.kill_agent(job)
                pids = agent_pids(job)
                if not pids:
                    break
                if time.monotonic() > deadline:
                    log(f"the agent of {job} (pid {pids}) never came up: killing it")
                    for pid in pids:
                        kill(pid)
                    time.sleep(0.2)
                    break
                time.sleep(0.1)
            remove_memory(job)
        self.store = None
        return sum(len(shm.listing(shm.prefix(job))) for job in self.jobs)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def agent_pids(job: str) -> list[int]:
    """Live processes of ``job``'s agent (``python -m ucp.snapshot.agent --job JOB``), published or not."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        words = [w.decode(errors="replace") for w in argv]
        if state != "Z" and "ucp.snapshot.agent" in words and any(
                a == "--job" and b == job for a, b in zip(words, words[1:])):
            pids.append(int(entry))
    return pids


def agent_info(job: str):
    from ucp.errors import FormatError
    from ucp.snapshot import discovery

    try:
        return discovery.read_info(job)
    except FormatError:  # a torn discovery file: nobody to talk to
        return None


def remove_memory(job: str) -> None:
    """Remove every file of ``job`` in /dev/shm (segments, headers, discovery and lock files); its
    agent must be dead."""
    from ucp.snapshot import discovery

    try:
        discovery.reclaim(job)
    except Exception as e:
        log(f"reclaiming the memory of {job} failed: {e}")
    discovery.lock_path(job).unlink(missing_ok=True)


def last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def fallback_line(a: Attempt) -> str | None:
    """The first line of the attempt's trainer logs that says it fell back to the durable tier."""
    for r in a.ranks:
        try:
            text = r.log.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            low = line.lower()
            if not line.startswith("[chaos") and ("fall" in low or "durable" in low):
                said = re.match(r".*?:\d+: \w*Warning: (.*)", line)  # warnings.warn's "file:line: Category: "
                return (said.group(1) if said else line).strip()
    return None


# -- the run ---------------------------------------------------------------------------------------

def run(args, harness: Harness, doc: dict) -> None:
    """Attempts until the job reaches --steps; fills ``doc`` as it goes (so a failure reports what happened)."""
    events: list[tuple[int, list[int]]] = []
    for k in args.kills:
        if events and events[-1][0] == k.step:
            events[-1][1].append(k.node)
        else:
            events.append((k.step, [k.node]))
    alive = list(range(args.nodes))
    known: dict[int, str] = {}  # step -> digest of the state at that step, as last recorded
    step_s: dict[int, float] = {}  # step -> its last execution's time
    pending = None  # the failure whose recovery the next attempt shows
    number = 0
    t_start = time.time()
    try:
        while True:
            hold = events[0][0] if events else 0
            a = Attempt(number, list(alive), hold)
            log(f"attempt {number}: nodes {a.nodes} x {args.ranks_per_node} rank(s)"
                + (f", nodes {events[0][1]} die after step {hold}" if hold else ""))
            harness.launch(a)
            outcome = harness.watch(a)
            restored, steps = harness.records(a)
            if pending is not None:
                rec = recovery(pending, restored, steps, known, fallback_line(a))
                doc["recoveries"].append(rec)
                log(f"recovered from {rec['source']} at step {rec['restored_step']} "
                    f"({rec['steps_lost']} step(s) lost, bit-exact: {rec['bit_exact']})")
                pending = None
            take_steps(doc, steps, known, step_s)
            doc["final_step"] = max(steps, default=restored["step"])
            if outcome == "done":
                if number == 0:
                    doc.update(harness.memory(a))
                break
            step, nodes = events.pop(0)
            if not args.kill_in_flight:
                harness.settle(a)
            if number == 0:  # every node alive, nothing of an earlier job in memory
                doc.update(harness.memory(a))
            t_kill = time.time()
            harness.kill_nodes(nodes)
            harness.stop_trainers()  # the survivors' trainers: restarted, as torchrun would
            _, steps = harness.records(a)  # (nothing moves now)
            progress = max(steps, default=restored["step"])
            log(f"killed nodes {nodes} at step {progress}")
            pending = {"nodes": nodes, "t_kill": t_kill, "step": progress}
            alive = [n for n in alive if n not in nodes]
            doc["failures_injected"] += len(nodes)
            number += 1
    finally:
        doc["t_end"] = time.time()
        doc["wall_s"] = doc["t_end"] - t_start
        doc["useful_step_s"] = sum((step_s.get(s, 0.0) for s in range(1, doc["final_step"] + 1)), 0.0)
        doc["step1_s"] = step_s.get(1)


FALLBACK_STATUS = 3  # chaos_trainer.py's exit status when in-process recovery falls back to a relaunch


def run_inprocess(args, harness: Harness, doc: dict) -> None:
    """--inprocess: one launch whose survivors recover each failure in their own processes
    (``ucp.run_in_process``); a failure they cannot recover there (their exit status
    FALLBACK_STATUS) relaunches the job on the nodes alive, as the relaunch path does."""
    events = grouped(args.kills)
    alive = list(range(args.nodes))
    known: dict[int, str] = {}
    step_s: dict[int, float] = {}
    number = 0
    t_start = time.time()
    pending = None  # a failure whose survivors fell back: the next attempt's restore is its recovery
    try:
        while True:
            a = Attempt(number, list(alive), 0, holds=[step for step, _ in events])
            log(f"attempt {number} (in-process recovery): nodes {a.nodes} x {args.ranks_per_node} rank(s)"
                + (f", failures after steps {a.holds}" if a.holds else ""))
            harness.launch(a)
            report = harness.report(number)
            # the first restore: of generation 0, or of a retry of it (a start that failed with nobody lost)
            wait_for(harness, a, alive, lambda: report.check(["generation"]), "the first restore")
            generation = int(report.get("generation"))
            if pending is not None:  # the relaunch after a fallback
                restored, _ = gen_records(report, generation)
                wait_for(harness, a, alive, lambda: report.check([f"g{generation}/step/{restored['step'] + 1}"])
                         or restored["step"] >= args.steps, "the first step after the relaunch")
                restored, steps = gen_records(report, generation)
                rec = recovery(pending, restored, steps, known, fallback_line(a))
                rec.update(path="relaunch (fallback)", fallback=pending["why"])
                doc["recoveries"].append(rec)
                pending = None
            fell_back = False
            while events:
                step, failing = events[0]
                members = gen_records(report, generation)[0]["members"]
                nodes_now = {n: [members.index(r.rank) for r in a.ranks if r.node == n] for n in alive}
                keys = [f"held/{r.rank}/{step}" for r in a.ranks if r.node in alive]
                wait_for(harness, a, alive, lambda: report.check(keys), f"every rank at step {step}")
                if not args.kill_in_flight:
                    harness.settle(a, step, nodes_now)
                if not doc["recoveries"] and doc["snapshot_bytes"] is None:
                    doc.update(harness.memory(Attempt(a.number, alive, step)))
                t_kill = time.time()
                for k in failing:
                    if k.kind == "hang":
                        harness.stop_node(k.node)
                harness.kill_nodes([k.node for k in failing if k.kind != "hang"])
                report.set(f"release/{step}", "1")
                events.pop(0)
                alive = [n for n in alive if n not in {k.node for k in failing}]
                doc["failures_injected"] += len(failing)
                log(f"{'/'.join(sorted({k.kind for k in failing}))} nodes {[k.node for k in failing]} after step {step}")
                fell = wait_for(harness, a, alive, lambda: report.check([f"g{generation + 1}/restored"]),
                                "the recovery", fallback=True)
                for k in failing:
                    if k.kind == "hang":  # fenced: a stopped node is killed once the job went on without it
                        harness.kill_node(k.node)
                _, steps = gen_records(report, generation)
                take_steps(doc, steps, known, step_s)
                progress = max(steps, default=step)
                if fell:
                    why = said(a, "fell back to a relaunch: ")
                    log(f"the survivors fell back to a relaunch: {why or '(no line)'}")
                    harness.stop_trainers()
                    pending = {"nodes": [k.node for k in failing], "t_kill": t_kill, "step": progress, "why": why}
                    fell_back = True
                    break
                generation += 1
                restored, steps = gen_records(report, generation)
                wait_for(harness, a, alive, lambda: report.check([f"g{generation}/step/{restored['step'] + 1}"])
                         or restored["step"] >= args.steps, "the first step after the recovery")
                restored, steps = gen_records(report, generation)
                rec = recovery({"nodes": [k.node for k in failing], "t_kill": t_kill, "step": progress}, restored,
                               steps, known, fallback_line(a))
                rec.update(path="in-process", kind=sorted({k.kind for k in failing}),
                           phases=phases_of(t_kill, restored, steps))
                doc["recoveries"].append(rec)
                log(f"recovered in-process from {rec['source']} at step {rec['restored_step']} in "
                    f"{rec['time_to_resume_s']:.3f} s (bit-exact: {rec['bit_exact']})")
            if fell_back:
                number += 1
                continue
            wait_for(harness, a, alive, lambda: all(r.proc.poll() == 0 for r in a.ranks if r.node in alive), "the end")
            _, steps = gen_records(report, generation)
            take_steps(doc, steps, known, step_s)
            doc["final_step"] = max(known, default=0)
            if doc["snapshot_bytes"] is None:
                doc.update(harness.memory(a))
            break
    finally:
        doc["t_end"] = time.time()
        doc["wall_s"] = doc["t_end"] - t_start
        doc["useful_step_s"] = sum((step_s.get(s, 0.0) for s in range(1, doc["final_step"] + 1)), 0.0)
        doc["step1_s"] = step_s.get(1)


def said(a: Attempt, marker: str) -> str | None:
    """What follows ``marker`` on the first line of the attempt's trainer logs that has it."""
    for r in a.ranks:
        try:
            text = r.log.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if marker in line:
                return line.split(marker, 1)[1].strip()
    return None


def take_steps(doc: dict, steps: dict[int, dict], known: dict[int, str], step_s: dict[int, float]) -> None:
    """Record step records read from the trainers: each step's digest and time (its last execution's),
    the time of the harness's checks, and when step 1 first ended."""
    for s, r in steps.items():
        known[s] = r["digest"]
        step_s[s] = r["dt"]
        doc["check_s"] += r.get("check", 0.0)
        if s == 1:
            doc.setdefault("first_step_at", r["t"])


def grouped(kills: list[Kill]) -> list[tuple[int, list[Kill]]]:
    """Failures at the same step, together, in step order."""
    events: list[tuple[int, list[Kill]]] = []
    for k in kills:
        if events and events[-1][0] == k.step:
            events[-1][1].append(k)
        else:
            events.append((k.step, [k]))
    return events


def wait_for(harness: Harness, a: Attempt, alive: list[int], done, what: str, fallback: bool = False) -> bool:
    """Poll ``done()`` while the trainers of the ``alive`` nodes run; True when they all exited with
    FALLBACK_STATUS (only with ``fallback``). Raises ChaosError when one fails otherwise, or at
    --attempt-timeout."""
    deadline = time.monotonic() + harness.args.attempt_timeout
    ranks = [r for r in a.ranks if r.node in alive]
    while True:
        if done():
            return False
        codes = [r.proc.poll() for r in ranks]
        if fallback and codes and all(c == FALLBACK_STATUS for c in codes):
            return True
        bad = [(r, c) for r, c in zip(ranks, codes) if c not in (None, 0, FALLBACK_STATUS)
               or c == FALLBACK_STATUS and not fallback]
        if bad:
            r, c = bad[0]
            log(f"rank {r.rank} (node {r.node}) failed; the end of its log:\n" + tail(r.log))
            raise ChaosError(f"attempt {a.number}: member {r.rank} (node {r.node}) exited with status {c} waiting for "
                             f"{what}: {last_line(r.log)}")
        if time.monotonic() > deadline:
            for r in ranks:
                log(f"rank {r.rank} (node {r.node}) at the timeout: {last_line(r.log)}")
            raise ChaosError(f"attempt {a.number}: waited over --attempt-timeout {harness.args.attempt_timeout:g} s "
                             f"for {what} (--keep-workdir keeps the trainers' logs)")
        time.sleep(0.005)


def gen_records(report, generation: int) -> tuple[dict, dict[int, dict]]:
    """Generation ``generation``'s restore record and its step records (step -> record)."""
    restored = json.loads(report.get(f"g{generation}/restored"))
    steps = {}
    s = restored["step"] + 1
    while report.check([f"g{generation}/step/{s}"]):
        steps[s] = json.loads(report.get(f"g{generation}/step/{s}"))
        s += 1
    return restored, steps


def phases_of(t_kill: float, restored: dict, steps: dict[int, dict]) -> dict:
    """An in-process recovery's phases in seconds: detect (the kill to rank 0 seeing the failure),
    re-form (the membership protocol and the new process group), build (model and optimizer),
    load (from memory, rebuilt from parity), first step (without the harness's digest of the
    restored state, taken before it)."""
    ph = restored.get("phases") or {}
    first = steps.get(restored["step"] + 1)
    if not {"failed", "reformed", "built", "loaded"} <= ph.keys():
        return {}
    return {"detect": ph["failed"] - t_kill, "reform": ph["reformed"] - ph["failed"],
            "build": ph["built"] - ph["reformed"], "load": ph["loaded"] - ph["built"],
            "first_step": None if first is None else first["t"] - ph["loaded"] - restored.get("check", 0.0)}


def recovery(pending: dict, restored: dict, steps: dict[int, dict], known: dict[int, str], warning) -> dict:
    source, step = restored["source"], restored["step"]
    first = steps.get(step + 1)
    return {
        "nodes": pending["nodes"],
        "killed_at_step": pending["step"],
        "restored_step": step,
        "source": source,
        "steps_lost": pending["step"] - step,
        "time_to_resume_s": None if first is None else first["t"] - pending["t_kill"] - restored.get("check", 0.0),
        "bit_exact": None if source == "none" else (restored["digest"] is not None
                                                    and restored["digest"] == known.get(step)),
        "warning": warning,
    }


def summarize(args, doc: dict, shm_left: int) -> dict:
    recs = doc["recoveries"]
    with_source = [r for r in recs if r["source"] != "none"]
    doc.update(
        recoveries_from_memory=sum(r["source"] == "memory" for r in recs),
        fallbacks_to_disk=sum(r["source"] == "durable" for r in recs),
        restarts_from_scratch=sum(r["source"] == "none" for r in recs),
        steps_lost=sum(r["steps_lost"] for r in recs),
        time_to_resume_s=[r["time_to_resume_s"] for r in recs],
        effective_training_time=doc["useful_step_s"] / doc["wall_s"] if doc["wall_s"] > 0 else None,
        # the same from the end of the first step on (the job's start, imports and build, left out),
        # without the harness's own checks after each step (the global loss, the state's digest)
        effective_training_time_after_start=(
            (doc["useful_step_s"] - step1) / (doc["t_end"] - doc["first_step_at"] - doc["check_s"])
            if (step1 := doc.pop("step1_s", None)) is not None and doc.get("first_step_at") else None),
        all_bit_exact=all(r["bit_exact"] for r in with_source),
        shm_left=shm_left,
    )
    doc["ok"] = (doc.get("error") is None and doc["final_step"] == args.steps and doc["all_bit_exact"]
                 and shm_left == 0)
    # the order the issue lists them in, then the rest
    head = ["tool", "nodes", "ranks_per_node", "group", "parity", "steps", "seed", "persist_every", "kills",
            "failures_injected", "recoveries_from_memory", "fallbacks_to_disk", "restarts_from_scratch",
            "steps_lost", "time_to_resume_s", "useful_step_s", "wall_s", "effective_training_time", "recoveries",
            "all_bit_exact", "final_step", "shm_left", "ok", "snapshot_bytes", "parity_bytes", "memory_overhead"]
    return {**{k: doc[k] for k in head}, **{k: v for k, v in doc.items() if k not in head}}


def one_run(args) -> dict:
    """One run of the failures on the path ``args.inprocess`` says; its summary."""
    run_id = "chaos-" + uuid.uuid4().hex[:10]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ucp-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    doc = {"tool": "ucp_chaos", "nodes": args.nodes, "ranks_per_node": args.ranks_per_node, "group": args.group,
           "parity": args.parity, "steps": args.steps, "seed": args.seed, "persist_every": args.persist_every,
           "kills": [{"node": k.node, "step": k.step, "kind": k.kind} for k in args.kills], "failures_injected": 0,
           "path": "in-process" if args.inprocess else "relaunch", "step_seconds": args.step_seconds,
           "detect_timeout": args.detect_timeout if args.inprocess else None,
           "heartbeat": args.heartbeat if args.inprocess else None,
           "dead_after": args.dead_after if args.inprocess else None, "probe": args.probe if args.inprocess else None,
           "recoveries": [], "final_step": 0, "wall_s": 0.0, "useful_step_s": 0.0, "check_s": 0.0, "run_id": run_id,
           "snapshot_bytes": None, "parity_bytes": None, "memory_overhead": None,
           "kill_in_flight": args.kill_in_flight, "load_avg": os.getloadavg()}
    log(f"run {run_id} ({doc['path']}): {args.nodes} node(s) x {args.ranks_per_node} rank(s), {args.steps} steps, "
        f"failures {[f'{k.kind} {k.node}@{k.step}' for k in args.kills]}; work directory {workdir}")
    harness = None
    try:
        harness = Harness(args, run_id, workdir)
        (run_inprocess if args.inprocess else run)(args, harness, doc)
    except ChaosError as e:
        doc["error"] = str(e)
        log(f"FAILED: {e}")
    except Exception as e:  # noqa: BLE001 - reported in the JSON line, not lost
        doc["error"] = f"{type(e).__name__}: {e}"
        log(f"FAILED: {doc['error']}")
    finally:
        shm_left = harness.cleanup() if harness is not None else 0
        if args.keep_workdir:
            log(f"work directory kept: {workdir}")
        elif args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        else:  # the user's directory: only what the run put there goes
            for sub in ("ckpt", "logs"):
                shutil.rmtree(workdir / sub, ignore_errors=True)
    return summarize(args, doc, shm_left)


def compare(args) -> dict:
    """--compare: the same failures relaunching, then in-process, in one run; both summaries and
    the ratios of their medians."""
    import statistics

    docs = {}
    for path, inprocess in (("relaunch", False), ("inprocess", True)):
        workdir = args.workdir / path if args.workdir is not None else None  # (never one run's checkpoints in the other)
        docs[path] = one_run(argparse.Namespace(**{**vars(args), "inprocess": inprocess, "workdir": workdir}))

    def median(doc, key):
        values = [v for v in doc[key] if v is not None] if isinstance(doc[key], list) else [doc[key]]
        return statistics.median(values) if values and None not in values else None

    a, b = median(docs["relaunch"], "time_to_resume_s"), median(docs["inprocess"], "time_to_resume_s")
    return {"tool": "ucp_chaos_compare", "ok": docs["relaunch"]["ok"] and docs["inprocess"]["ok"],
            "time_to_resume_s": {"relaunch": a, "inprocess": b},
            "inprocess_speedup": a / b if a and b else None,
            "effective_training_time": {k: d["effective_training_time"] for k, d in docs.items()},
            "load_avg": os.getloadavg(), **docs}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below still cleans up
    out = compare(args) if args.compare else one_run(args)
    benchlib.emit(out, compact=False)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
