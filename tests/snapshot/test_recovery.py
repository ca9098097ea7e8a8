"""Which snapshot parity can complete (``ucp.snapshot.recovery.find_recoverable``), from the summaries
the live agents report: pure bookkeeping, no agents, no process group."""

from __future__ import annotations

import pytest

from ucp.snapshot.recovery import Recoverable, find_recoverable


def header(rank: int, step: int, *, world: int = 4, complete: bool = True, token: int | None = 7) -> dict:
    """A data header summary as an agent reports it."""
    return {"rank": rank, "step": step, "world_size": world, "complete": complete, "token": token}


def record(rank: int, step: int, members, *, token: int = 7, m: int = 1) -> dict:
    """A parity record summary: ``rank`` keeps parity for its redundancy group ``members``."""
    return {"rank": rank, "step": step, "token": token, "members": list(members), "m": m}


def node(name: str, ranks, step: int, members=(0, 1, 2, 3), *, parity=None, **kw):
    """A live node holding the data of ``ranks`` of ``step`` and (unless ``parity`` says which) their
    parity records."""
    parity = ranks if parity is None else parity
    token, m = kw.pop("token", 7), kw.pop("m", 1)
    return (name, [header(r, step, token=token, **kw) for r in ranks],
            [record(r, step, members, token=token, m=m) for r in parity])


def test_nothing_held_is_nothing_to_recover_and_no_reason():
    assert find_recoverable([], None) == (None, "")
    assert find_recoverable([("a", [], [])], 3) == (None, "")


def test_a_lost_rank_is_rebuilt_from_its_groups_survivors():
    rec, why = find_recoverable([node("a", [0, 1], 5), node("b", [2], 5)], None)
    assert why == ""
    assert rec == Recoverable(step=5, token=7, world_size=4, holder={0: "a", 1: "a", 2: "b"}, lost=[3],
                              groups=[[0, 1, 2, 3]], m=1)


def test_every_damaged_group_is_named_once():
    def held(ranks, step=9):  # one node; redundancy groups (0, 1) and (2, 3)
        return [("a", [header(r, step) for r in ranks], [record(r, step, (0, 1) if r < 2 else (2, 3)) for r in ranks])]

    rec, why = find_recoverable(held([0, 2, 3]), None)
    assert why == "" and rec.lost == [1] and rec.groups == [[0, 1]]
    rec, why = find_recoverable(held([0, 3]), None)
    assert why == "" and rec.lost == [1, 2] and rec.groups == [[0, 1], [2, 3]]
    assert rec.holder == {0: "a", 3: "a"}


def test_more_lost_in_a_group_than_its_parity_stripes_is_refused_with_the_reason():
    rec, why = find_recoverable([node("a", [0, 1], 5)], None)
    assert rec is None
    assert why == ("the snapshot of step 5 cannot be rebuilt: ranks 2, 3 of one redundancy group (ranks 0, 1, 2, 3) "
                   "are lost, more than its 1 parity stripe(s) can rebuild")
    rec, why = find_recoverable([node("a", [0, 1], 5, m=2)], None)  # two stripes rebuild two
    assert why == "" and rec.lost == [2, 3] and rec.m == 2


def test_a_survivor_without_its_parity_record_counts_as_lost():
    rec, why = find_recoverable([node("a", [0, 1, 2], 5, parity=[0, 1])], None)
    assert rec is None and "ranks 2, 3 of one redundancy group" in why


def test_a_lost_rank_whose_whole_group_is_gone_is_named():
    nodes = [("a", [header(0, 5), header(1, 5)], [record(0, 5, (0, 1)), record(1, 5, (0, 1))])]
    rec, why = find_recoverable(nodes, None)
    assert rec is None
    assert why == "the snapshot of step 5 cannot be rebuilt: rank 2 and every rank of its redundancy group are lost"


def test_a_snapshot_without_parity_is_not_recoverable_and_says_so():
    rec, why = find_recoverable([node("a", [0, 1, 2], 5, parity=[])], None)
    assert rec is None and why == "the snapshot of step 5 lost ranks 3 and carries no parity"


def test_the_newest_recoverable_snapshot_wins_and_an_older_one_is_taken_when_the_newest_is_not():
    both = [("a", node("a", [0, 1, 2], 4)[1] + node("a", [0, 1, 2], 6)[1],
             node("a", [0, 1, 2], 4)[2] + node("a", [0, 1, 2], 6)[2])]
    assert find_recoverable(both, None)[0].step == 6
    # step 6 lost two ranks of its one group: step 4 is taken, and the reason for 6 is not reported
    older = [("a", node("a", [0, 1, 2], 4)[1] + node("a", [0, 1], 6)[1],
              node("a", [0, 1, 2], 4)[2] + node("a", [0, 1], 6)[2])]
    rec, why = find_recoverable(older, None)
    assert rec.step == 4 and rec.lost == [3] and why == ""


def test_a_requested_step_is_the_only_one_considered():
    both = [("a", node("a", [0, 1, 2], 4)[1] + node("a", [0, 1, 2], 6)[1],
             node("a", [0, 1, 2], 4)[2] + node("a", [0, 1, 2], 6)[2])]
    assert find_recoverable(both, 4)[0].step == 4
    assert find_recoverable(both, 5) == (None, "")


def test_a_snapshot_no_rank_marked_complete_is_not_recoverable():
    rec, why = find_recoverable([node("a", [0, 1, 2], 5, complete=False)], None)
    assert (rec, why) == (None, "")
    rec, why = find_recoverable([node("a", [0, 1, 2], 5, token=None)], None)  # complete, but no token yet
    assert (rec, why) == (None, "")


def test_parity_of_another_snapshot_of_the_same_step_does_not_count():
    name, headers, _ = node("a", [0, 1, 2], 5, token=8)
    stale = [record(r, 5, (0, 1, 2, 3), token=7) for r in (0, 1, 2)]  # parity of an earlier save of step 5
    rec, why = find_recoverable([(name, headers, stale)], None)
    assert rec is None and "carries no parity" in why


@pytest.mark.parametrize("world", [3, 8])
def test_snapshots_of_other_world_sizes_are_judged_apart(world):
    # the same step saved by an old job of 4 ranks and a new one of ``world`` (all its ranks held,
    # no parity): each judged alone
    old = node("a", [0, 1, 2], 5)
    new = [header(r, 5, world=world, token=9) for r in range(world)]
    rec, _ = find_recoverable([(old[0], old[1] + new, old[2])], None)
    assert rec is not None and rec.world_size == 4 and rec.lost == [3]
