"""Workloads of the parity exchange tests (run on every rank of a gloo world)."""

from __future__ import annotations

import time

import numpy as np
import torch.distributed as dist

from ucp.errors import ParityError

from ucp.codecs.checksum import crc32c
from ucp.snapshot.parity import ParityEncoder, rebuild

STRIPE = 4096


def member_data(rank: int, seed: int, sizes: list[int]) -> np.ndarray:
    return np.random.default_rng([seed, rank]).integers(0, 256, sizes[rank], dtype=np.uint8)


def chunk_crcs(plan, member: int, data: np.ndarray) -> list[int]:
    """CRC-32C of each chunk of ``member``'s buffer ``data``, one by one (what the encoder must return)."""
    return [crc32c(data[slice(*plan.chunk_span(member, c))]) for c in range(plan.chunks(member))]


def encode_then_rebuild(sizes: list[int], m: int, lost: list[int], rebuilder: int, seed: int,
                        corrupt: tuple | None = None, rate: float | None = None) -> dict:
    """Every rank encodes its buffer (one group of the whole world); then the ``lost`` members are
    rebuilt on ``rebuilder`` from the others (``corrupt``: ``(member, "data"|"parity")`` whose stored
    bytes are flipped first). Returns, on the rebuilder, whether each rebuilt buffer is bit-exact,
    or the ParityError's message."""
    me = dist.get_rank()
    members = list(range(dist.get_world_size()))
    group = dist.new_group(backend="gloo")
    enc = ParityEncoder(group, members, me, m, STRIPE, rate)
    plan = enc.plan(sizes)
    data = member_data(me, seed, sizes)
    parity = np.zeros(plan.parity_bytes(me), np.uint8)
    t0 = time.perf_counter()
    parity_sums, chunk_sums = enc.encode(sizes, data, parity)
    encode_s = time.perf_counter() - t0
    sums = (chunk_sums, parity_sums)
    everyone = [None] * len(members)
    dist.all_gather_object(everyone, sums, group=group)
    if corrupt is not None and corrupt[0] == me:
        target = data if corrupt[1] == "data" else parity
        target[len(target) // 2] ^= 0xFF
    held = {me: (data, parity)} if me not in lost else {}
    servers = {i: i for i in members if i not in lost}
    out = {i: np.zeros(sizes[i], np.uint8) for i in lost} if me == rebuilder else None
    result: dict = {"parity_bytes": int(parity.size), "chunk_sums_exact": chunk_sums == chunk_crcs(plan, me, data),
                    "encode_s": encode_s}
    try:
        if me == rebuilder or me not in lost:
            rebuild(group, plan, members, lost, servers, rebuilder, me, held, dict(enumerate(everyone)), out, "group 0")
        if me == rebuilder:
            result["exact"] = {i: bool(np.array_equal(out[i], member_data(i, seed, sizes))) for i in lost}
    except ParityError as e:
        result["error"] = str(e)
    dist.barrier(group=group)
    dist.destroy_process_group(group)
    return result


def node_job(base: str, rank: int, replaced=()) -> str:
    """Each rank its own simulated node (its own agent); a replaced node is a fresh one."""
    return f"{base}-{rank}" + ("x" if rank in replaced else "")


def redundant_snapshots(root: str, base: str, m: int, steps: int = 3, persist_every=None, rate=None) -> dict:
    """FSDP over 4 ranks, each rank its own node; a snapshot with parity after every step (its
    exchange paced at ``rate``). The full state at the last step and this node's agent status."""
    import ucp
    from tests.helpers import build_mlp, full_state, mlp_step
    from ucp.snapshot import client

    rank = dist.get_rank()
    model, opt = build_mlp("fsdp", seed=0)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt,
                          snapshot=ucp.SnapshotOptions(job=node_job(base, rank), persist_every=persist_every),
                          redundancy=ucp.RedundancyOptions(group=4, parity=m, stripe=STRIPE, rate=rate))
    tiers = []
    for s in range(steps):
        mlp_step(model, opt, s)
        tiers.append(ck.save(s + 1).tier)
    ck.wait()
    state = {k: v.detach().clone() for k, v in full_state(model, opt).items()}
    ck.close()
    status = client.connect(node_job(base, rank)).status()
    return {"state": state, "tiers": tiers, "status": status}


def recover(root: str, base: str, replaced: list[int], expected: dict) -> dict:
    """A fresh job on the same 4 ranks, the ``replaced`` ranks on fresh nodes: load, then compare
    with ``expected``; then one more step and snapshot (the new groups' parity)."""
    import warnings

    import ucp
    from tests.helpers import bit_diffs, build_mlp, full_state, mlp_step

    rank = dist.get_rank()
    model, opt = build_mlp("fsdp", seed=1)
    ck = ucp.Checkpointer(root, model=model, optimizer=opt,
                          snapshot=ucp.SnapshotOptions(job=node_job(base, rank, replaced), timeout=20),
                          redundancy=ucp.RedundancyOptions(group=4, parity=len(replaced) or 1, stripe=STRIPE))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ck.load()
    out = {"warnings": [str(w.message) for w in caught if "ucp" in str(w.message)],
           "source": None if res is None else res.source, "step": None if res is None else res.step,
           "rebuilt": None if res is None else list(res.rebuilt),
           "diffs": bit_diffs(expected, full_state(model, opt)) if res is not None else None}
    if res is not None:
        mlp_step(model, opt, res.step)
        out["next"] = ck.save(res.step + 1).tier
        ck.wait()
    ck.close()
    return out


def corrupt_parity(base: str, rank: int) -> str:
    """Flip one byte of the parity stripes the agent of ``rank``'s node keeps for its newest snapshot."""
    from ucp.snapshot import client, shm

    records = client.connect(node_job(base, rank)).request("parity")["parity"].values()
    newest = max(records, key=lambda r: r["step"])
    assert newest["parity_crc32c"], "this rank holds no parity stripe"
    seg = shm.attach(newest["file"])
    try:
        seg.buf[0] ^= 0xFF
    finally:
        seg.close()
    return newest["file"]
