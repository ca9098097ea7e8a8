"""The snapshot's fragment index spread over the loading ranks (ucp.snapshot.index): a resharded
restore from memory asks the owners of its keys for the fragments it loads; no rank gathers every
header."""

from __future__ import annotations

import random

import pytest

from tests.helpers import binomial_fold
from ucp.errors import FormatError, SpecError
from ucp.format.box import Box
from ucp.format.fragment import RegionQuery
from ucp.snapshot.header import FragmentRecord
from ucp.snapshot.index import (KeyIndex, decide_states, fold_states, index_messages, key_owner, own_state,
                               query_messages, state_offer)

pytestmark = pytest.mark.timeout(120)


def _frag(key, offsets, sizes, flat=None):
    return {"key": key, "offsets": list(offsets), "sizes": list(sizes), "flat": flat, "dtype": "float32",
            "length": 4, "file": f"seg.{key}", "offset": 0, "crc32c": 1, "blocks": []}


def _header(rank, host, frags, state=None, tensors=None):
    return {"rank": rank, "host": host, "file_size": 1 << 20, "fragments": frags, "state": state or {},
            "tensors": tensors or {}, "step": 7, "layout": {"mesh": {"dp": 2}}, "created_by": "t"}


def test_owners_partition_the_keys_and_queries_go_to_the_owner():
    headers = [_header(r, "a", [_frag(f"model/w{k}", (0,), (4,)) for k in range(10)]) for r in range(3)]
    msgs = index_messages(headers, 4)
    assert sum(len(v[0]) for v in msgs.values()) == 30
    for owner, (entries, _) in msgs.items():
        assert {key_owner(e[3]["key"], 4) for e in entries} <= {owner}
    asked = query_messages({f"model/w{k}": None for k in range(10)}, 4)
    assert {o: sorted(q) for o, q in asked.items()} == {
        o: sorted(e[3]["key"] for e in entries if e[0] == 0) for o, (entries, _) in msgs.items() if entries}


def test_answers_are_the_fragments_region_query_wants():
    """Boxes and flat ranges of random fragments: the vectorized overlap agrees with RegionQuery."""
    rnd = random.Random(5)
    for trial in range(60):
        shape = [rnd.randint(1, 9) for _ in range(rnd.randint(1, 3))]
        frags = []
        for rank in range(rnd.randint(1, 8)):
            lo = [rnd.randint(0, s - 1) for s in shape]
            sizes = [rnd.randint(1, s - o) for s, o in zip(shape, lo)]
            n = 1
            for s in sizes:
                n *= s
            flat = None
            if rnd.random() < 0.5:
                start = rnd.randint(0, n - 1)
                flat = [start, rnd.randint(1, n - start)]
            frags.append((rank, _frag("model/w", lo, sizes, flat)))
        index = KeyIndex({0: ([(r, "a", 1, f) for r, f in frags], {})})
        qlo = [rnd.randint(0, s - 1) for s in shape]
        boxes = [Box(tuple(qlo), tuple(rnd.randint(1, s - o) for s, o in zip(shape, qlo)))]
        got = {(e[0], tuple(e[3]["offsets"]), tuple(e[3]["sizes"])) for e in index.answer({"model/w": boxes}, "a")}
        query = RegionQuery({"model/w": boxes})
        want = {}
        for r, f in frags:
            frag = FragmentRecord.from_dict(f).fragment(r)
            if query.wants(frag):
                want.setdefault(frag.region, (r, tuple(f["offsets"]), tuple(f["sizes"])))
        assert got == set(want.values()), (trial, frags, boxes)


def test_a_region_held_by_several_ranks_comes_once_from_the_askers_node():
    entries = [(r, "a" if r < 2 else "b", 1, _frag("model/w", (0, 0), (4, 4))) for r in range(4)]
    entries.append((5, "b", 1, _frag("model/w", (4, 0), (4, 4))))
    index = KeyIndex({0: (entries, {})})
    assert sorted(e[0] for e in index.answer({"model/w": None}, "b")) == [2, 5]
    assert sorted(e[0] for e in index.answer({"model/w": None}, "a")) == [0, 5]
    assert sorted(e[0] for e in index.answer({"model/w": [Box((5, 0), (1, 1))]}, "a")) == [5]
    # a query asked again (its regions remembered) is answered for the asker's own host
    assert sorted(e[0] for e in index.answer({"model/w": None}, "b")) == [2, 5]
    assert sorted(e[0] for e in index.answer({"model/w": [Box((5, 0), (1, 1))]}, "b")) == [5]
    assert sorted(e[0] for e in index.answer({"model/w": [Box((0, 0), (1, 1))]}, "b")) == [2]
    assert sorted(e[0] for e in index.answer({"model/w": [Box((0, 0), (1, 1))]}, "c")) == [0]
    assert index.answer({"model/other": None}, "a") == []


def test_the_state_fold_gives_every_rank_the_shared_state_and_the_index_its_own():
    meta = {"shape": [4], "dtype": "float32", "pattern": {}}
    opt_a, opt_b = {"param_groups": [{"lr": 1, "params": ["a"]}]}, {"param_groups": [{"lr": 1, "params": ["b"]}]}
    nodes = [[_header(0, "a", [], {"rng": 0, "sched": 5, "optimizer": opt_a}, {"model/w": meta}),
              _header(1, "a", [], {"rng": 1, "sched": 5, "optimizer": opt_b}, {"model/w": meta})],
             [_header(2, "b", [], {"rng": 2, "sched": 5, "optimizer": opt_a}, {"model/v": meta})]]
    # loading ranks 0-3 of a new world of 4: rank 1 speaks for no node; rank 3 for node b
    for order in ([nodes[0], [], [], nodes[1]], [[], nodes[1], nodes[0], []]):
        common = decide_states(binomial_fold([state_offer(h) for h in order], fold_states), world_size=3)
        assert common["shared"] == {"sched": 5} and common["step"] == 7
        assert sorted(common["tensors"]) == ["model/v", "model/w"]
        assert common["optimizer"] == [opt_a, opt_b]  # distinct values once, ordered by the first rank holding each
        sent = [index_messages(h, 4) for h in order]
        received = [{src: m[r] for src, m in enumerate(sent) if r in m} for r in range(4)]
        assert [own_state(received[r], r, common) for r in range(4)] == \
            [{"rng": 0, "optimizer": opt_a}, {"rng": 1, "optimizer": opt_b}, {"rng": 2, "optimizer": opt_a}, {}]
    every = dict(nodes[1][0], state={"rng": 2, "sched": 5, "optimizer": opt_a})
    alike = [dict(h, state=dict(h["state"], optimizer=opt_a)) for h in nodes[0]]
    same = decide_states(binomial_fold([state_offer(alike), state_offer([every])], fold_states), 3)
    assert same["shared"] == {"optimizer": opt_a, "sched": 5} and same["optimizer"] == []
    lacking = [state_offer(nodes[0]), state_offer([dict(every, state={"rng": 2})])]
    missing_name = decide_states(binomial_fold(lacking, fold_states), 3)
    assert missing_name["shared"] == {}  # (a name some rank lacks is no rank's shared state)
    with pytest.raises(SpecError, match=r"saving ranks \[2\]"):
        decide_states(binomial_fold([state_offer(nodes[0]), None], fold_states), world_size=3)
    other = dict(meta, shape=[5])
    for order in ([nodes[0], [_header(2, "b", [], {}, {"model/w": other})]],
                  [[_header(2, "b", [], {}, {"model/w": other})], nodes[0]]):
        with pytest.raises(SpecError, match="ranks 0 and 2 disagree about tensor model/w"):
            decide_states(binomial_fold([state_offer(h) for h in order], fold_states), 3)
    assert common["block_bytes"] == 64 << 10  # headers without block_bytes (format 1.0)
    newer = [dict(h, block_bytes=1 << 20) for h in (*nodes[0], *nodes[1])]
    assert decide_states(binomial_fold([state_offer(newer[:2]), state_offer(newer[2:])], fold_states),
                         3)["block_bytes"] == 1 << 20
    with pytest.raises(FormatError, match=r"disagree about their block size: \[65536, 1048576\]"):
        decide_states(binomial_fold([state_offer(newer[:2]), state_offer(nodes[1])], fold_states), 3)


def test_the_state_fold_carries_the_models_metadata_not_a_copy_per_node():
    meta = {"shape": [4], "dtype": "float32", "pattern": {}}
    tensors = {f"model/w{k}": meta for k in range(20)}
    one = state_offer([_header(0, "a", [], {"sched": 5, "rng": 0}, tensors)])
    offers = [state_offer([_header(r, f"n{r}", [], {"sched": 5, "rng": r}, tensors)]) for r in range(64)]
    folded = binomial_fold(offers, fold_states)
    assert len(folded["metas"]) == 20 and set(folded["values"]) == set(one["values"]) - {one["names"]["rng"]}
    assert folded["ranks"] == (1 << 64) - 1 and folded["names"]["rng"] is None


@pytest.mark.dist
def test_a_resharded_restore_from_memory_selects_only_its_fragments(world4, worlds, tmp_path, job):
    from tests.snapshot import memory_workloads as mw

    want = world4.run(mw.snapshot_steps, "fsdp", str(tmp_path), job)[0]
    out = worlds(2).run(mw.load_from_memory_traced, "fsdp", str(tmp_path), job, want)
    for rank, r in enumerate(out):
        assert r["source"] == "memory" and r["step"] == 3 and r["diffs"] == [], r
        assert all(key_owner(k, 2) == rank for k in r["owned"]), r  # the index holds only the keys it owns
        assert 0 < r["selected"] < r["total"], r  # its own fragments, not the snapshot's
    assert sorted(out[0]["owned"] + out[1]["owned"]) == sorted(set(out[0]["keys"]) | set(out[1]["keys"]))


def test_parity_records_go_to_the_ranks_that_rebuild_their_group():
    from ucp.checkpoint.memory_source import records_of_rank
    from ucp.snapshot.recovery import Recoverable

    # old ranks 0-3 form a group; rank 1 was lost; nodes a and b hold the others, read by new ranks 0 and 2;
    # old ranks 4-7 another group, whole, held by node c (new rank 3)
    rec = Recoverable(step=5, token=9, world_size=8, holder={0: "a", 2: "a", 3: "b", 4: "c"}, lost=[1],
                      groups=[[0, 1, 2, 3]])
    found = [{"rank": 0}, {"rank": 2}, {"rank": 3}]
    out = [records_of_rank(rec, {"a": 0, "b": 2, "c": 3}, found, r) for r in range(4)]
    assert sorted(out[0]) == sorted(out[2]) == [0, 2, 3] and out[1] == out[3] == {}
