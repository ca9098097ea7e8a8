"""How a load from memory chooses its snapshot (``ucp.checkpoint.memory_source``): the fold that
decides whether a job resumes in place, each rank its own header on its own node, agrees with the
full path's choice whenever it makes one, and makes it in the common cases."""

from __future__ import annotations

import random
from functools import reduce

from tests.helpers import binomial_fold
from ucp.checkpoint.memory_source import choose_source, decide_own, fold_nodes, fold_own, node_offer, own_offer, \
    speaker_mask

STATUS = {"adopted": None, "discarded": None, "predecessor": None}


def header(rank, step, world, node, complete=True, token=None, slot=0):
    return {"rank": rank, "slot": slot, "step": step, "world_size": world, "complete": complete, "host": node,
            "token": token if token is not None else (step * 1000 + world if complete else None), "adopted": None}


def decide(nodes: dict, node_of, world: int, step=None, status=None):
    """The fold's decision and the full path's choice over ``nodes`` (node -> (headers, parity records))."""
    status = status or {}
    gathered = [(node_of(r), *nodes[node_of(r)], status.get(node_of(r), STATUS)) for r in range(world)]
    offers = [own_offer(r, world, step, held, st) for r, (_, held, _, st) in enumerate(gathered)]
    own = decide_own(reduce(fold_own, offers), world)  # (any order: fold_own is commutative)
    full = choose_source(binomial_fold([node_offer(r, *g) for r, g in enumerate(gathered)], fold_nodes), None, step)
    return own, full


def test_a_job_resuming_in_place_is_decided_by_the_fold_even_with_a_torn_newest_snapshot():
    node_of = lambda r: f"n{r // 2}"  # noqa: E731
    nodes = {f"n{n}": ([header(r, s, 4, f"n{n}", slot=s % 2) for r in (2 * n, 2 * n + 1) for s in (4, 5)], [])
             for n in range(2)}
    assert decide(nodes, node_of, 4)[0] == (5, 4)
    assert decide(nodes, node_of, 4, step=4)[0] == (4, 4)
    nodes["n1"][0].append(header(3, 6, 4, "n1", complete=False, slot=0))  # a snapshot whose cut never finished
    own, full = decide(nodes, node_of, 4)
    assert own == (5, 4) and (full["step"], full["world"], full["rec"]) == (5, 4, None)
    assert decide(nodes, node_of, 4, status={"n1": dict(STATUS, adopted=True)})[0] is None  # (the full path says what)
    assert decide(nodes, node_of, 3)[0] is None  # another world


def test_whenever_the_fold_chooses_the_full_path_chooses_the_same_snapshot():
    rng = random.Random(7)
    chosen = 0
    for _ in range(600):
        world = rng.randint(2, 6)
        per = rng.randint(1, 3)
        nodes_n = -(-world // per)
        node_of = lambda r, per=per: f"n{r // per}"  # noqa: E731
        nodes = {f"n{n}": ([], []) for n in range(nodes_n + 1)}  # (one node holding no rank of this world)
        for r in range(world):
            for s in [4, 5] if rng.random() < 0.8 else rng.sample([3, 4, 5], rng.randint(0, 2)):
                where = node_of(r) if rng.random() < 0.97 else f"n{rng.randrange(nodes_n + 1)}"
                nodes[where][0].append(header(r, s, world, where, complete=rng.random() < 0.7))
        if rng.random() < 0.3:  # a snapshot of another world (a job of more or fewer ranks, before)
            other = world + rng.choice([-1, 1])
            s = rng.choice([4, 5, 6])
            for r in range(max(other, 1)):
                where = f"n{rng.randrange(nodes_n + 1)}"
                nodes[where][0].append(header(r, s, other, where, complete=rng.random() < 0.5))
        if rng.random() < 0.3:  # parity records of a complete snapshot of some world
            done = [h for held, _ in nodes.values() for h in held if h["complete"]]
            if done:
                h = rng.choice(done)
                members = list(range(h["world_size"]))
                for r in members:
                    where = f"n{rng.randrange(nodes_n + 1)}"
                    nodes[where][1].append({"rank": r, "slot": 0, "step": h["step"], "token": h["token"],
                                            "world_size": h["world_size"], "members": members,
                                            "index": r, "m": 1, "stripe": 64, "sizes": [64] * len(members)})
        step = rng.choice([None, None, 4, 5])
        own, full = decide(nodes, node_of, world, step)
        if own is not None:
            chosen += 1
            assert (full["step"], full["world"], full["rec"]) == (*own, None), (own, full, nodes)
            for r in range(world):  # every rank's own header of it on its own node
                assert any(h["rank"] == r and (h["step"], h["world_size"]) == own for h in nodes[node_of(r)][0])
    assert chosen > 150, chosen  # (the fold does decide: it is not a test of "always None")


def test_the_fold_of_node_holdings_keeps_each_node_once_with_its_lowest_rank_as_speaker():
    node_of = lambda r: f"n{(r // 2) % 3}"  # noqa: E731 - nodes 0, 1, 2, 0, 1, 2 (ranks 0-1, 2-3, ..., 10-11)
    offers = [node_offer(r, node_of(r), [header(r, 5, 12, node_of(r))], [], STATUS) for r in range(12)]
    folded = binomial_fold(offers, fold_nodes)
    assert {n: v[0] for n, v in folded.items()} == {"n0": 0, "n1": 2, "n2": 4}
    assert [h["rank"] for h in folded["n1"][1]] == [2]  # the speaker's own summaries (the node's, in a job)
    assert speaker_mask(folded) == 0b10101
    assert [r for r in range(12) if speaker_mask(folded) >> r & 1] == [0, 2, 4]
    # the lowest rank of a node wins from either side
    assert fold_nodes(fold_nodes(offers[4], offers[1]), offers[0]) == {"n2": offers[4]["n2"], "n0": offers[0]["n0"]}


def test_the_speakers_of_a_rebuild_are_the_lowest_ranks_of_the_nodes_holding_its_groups():
    members = [0, 1, 2, 3]
    parity = lambda r, node: {"rank": r, "slot": 0, "step": 5, "token": 5004, "world_size": 4,  # noqa: E731
                               "members": members, "index": r, "m": 1, "stripe": 64, "sizes": [64] * 4}
    # rank 3's node is lost; the new job's ranks 0-1 sit on node a (old ranks 0, 1), 2-3 on node b (old rank 2)
    held = {"a": [header(0, 5, 4, "a"), header(1, 5, 4, "a")], "b": [header(2, 5, 4, "b")]}
    node_of = {0: "a", 1: "a", 2: "b", 3: "b"}
    offers = [node_offer(r, node_of[r], held[node_of[r]], [parity(q, node_of[r]) for q in members
                                                           if q != 3 and (q < 2) == (node_of[r] == "a")], STATUS)
              for r in range(4)]
    chosen = choose_source(binomial_fold(offers, fold_nodes), None, None)
    assert (chosen["step"], chosen["world"], chosen["rec"].lost) == (5, 4, [3])
    assert chosen["speakers"] == {"a": 0, "b": 2}
