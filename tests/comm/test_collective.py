"""Named collective phases (``ucp.comm.collective``): in one process a world of one that returns or
re-raises as is; in a world of more, one rank's failure raised on every rank as the same
``DistributedError`` (simulated in one process, and on a real gloo world of 2)."""

from __future__ import annotations

import pytest

from ucp.comm.collective import Collective, distributed_error_class
from ucp.errors import CorruptCheckpointError, DistributedError, FormatError, LoadError, StorageError, UcpError

# -- a world of one (no torch.distributed) -------------------------------------------------------


def test_without_a_process_group_it_is_a_world_of_one():
    coll = Collective()
    assert (coll.active, coll.rank, coll.world_size) == (False, 0, 1)
    assert coll.all_gather({"x": 1}) == [{"x": 1}]
    assert coll.broadcast("mine") == "mine"
    coll.barrier()  # nothing to wait for


def test_a_phase_in_a_world_of_one_returns_its_result_in_a_list():
    calls = []
    assert Collective().phase("read", lambda: calls.append(1) or 42) == [42]
    assert calls == [1]  # run once


@pytest.mark.parametrize("error", [ValueError("bad value"), LoadError("no such tensor"), KeyError("k")])
def test_a_phase_in_a_world_of_one_re_raises_the_very_error(error):
    def fail():
        raise error

    with pytest.raises(type(error)) as e:
        Collective().phase("read", fail)
    assert e.value is error and not isinstance(e.value, DistributedError)


# -- a world of two, simulated: the other rank's outcome is given -----------------------------------


class RankZeroOfTwo(Collective):
    """Rank 0 of a world of two whose all-gather hands back rank 1's ``other`` outcome."""

    def __init__(self, other):
        super().__init__()
        self.world_size = 2
        self.other = other
        self.gathered = []

    def all_gather(self, obj):
        self.gathered.append(obj)
        return [obj, self.other]


def test_a_phase_every_rank_passes_returns_every_ranks_result():
    coll = RankZeroOfTwo((True, "theirs", None))
    assert coll.phase("plan", lambda: "mine") == ["mine", "theirs"]
    assert coll.gathered == [(True, "mine", None)]


def test_the_other_ranks_failure_fails_this_rank_too_naming_that_rank():
    coll = RankZeroOfTwo((False, "disk full", None))
    with pytest.raises(DistributedError) as e:
        coll.phase("write", lambda: "fine here")
    assert type(e.value) is DistributedError
    assert e.value.phase == "write" and e.value.failures == {1: "disk full"}
    assert str(e.value) == "phase 'write' failed on rank 1: disk full"


def test_this_ranks_failure_is_shared_and_chained():
    coll = RankZeroOfTwo((True, None, None))
    boom = ValueError("bad shape")

    def fail():
        raise boom

    with pytest.raises(DistributedError) as e:
        coll.phase("read", fail)
    assert e.value.failures == {0: "ValueError: bad shape"} and e.value.__cause__ is boom
    assert coll.gathered == [(False, "ValueError: bad shape", None)]  # what the other rank learns


def test_a_ucp_error_is_shared_by_its_message_and_class():
    coll = RankZeroOfTwo((True, None, None))

    def fail():
        raise CorruptCheckpointError("rank_00000.safetensors: fails its checksum")

    with pytest.raises(CorruptCheckpointError) as e:  # still caught as the class one process raises
        coll.phase("read", fail)
    assert isinstance(e.value, DistributedError) and e.value.exit_code == CorruptCheckpointError.exit_code == 3
    assert coll.gathered == [(False, "rank_00000.safetensors: fails its checksum", CorruptCheckpointError)]


def test_failures_of_two_classes_raise_the_plain_distributed_error():
    coll = RankZeroOfTwo((False, "bad header", FormatError))

    def fail():
        raise CorruptCheckpointError("bad bytes")

    with pytest.raises(DistributedError) as e:
        coll.phase("read", fail)
    assert type(e.value) is DistributedError and e.value.failures == {0: "bad bytes", 1: "bad header"}
    assert str(e.value) == "phase 'read' failed on rank 0: bad bytes (and 1 more rank(s))"


def test_the_distributed_class_of_a_ucp_error_is_one_class_of_both():
    cls = distributed_error_class(CorruptCheckpointError)
    assert issubclass(cls, DistributedError) and issubclass(cls, CorruptCheckpointError)
    assert cls.__name__ == "DistributedCorruptCheckpointError" and cls.exit_code == 3
    assert distributed_error_class(CorruptCheckpointError) is cls  # one class, so except clauses agree
    assert distributed_error_class(None) is DistributedError
    assert distributed_error_class(ValueError) is DistributedError
    assert distributed_error_class(DistributedError) is DistributedError
    assert distributed_error_class(UcpError) is not DistributedError  # UcpError itself is a ucp error class


# -- a gather phase: results to one rank, its verdict to every rank ---------------------------------


class GatheringRank(Collective):
    """Rank ``rank`` of a world of two whose gather hands rank 0 the other rank's ``other`` outcome and
    whose broadcast hands a rank other than 0 rank 0's ``verdict``; what it sends is recorded."""

    def __init__(self, rank, other=None, verdict=None):
        super().__init__()
        self.rank, self.world_size, self.other, self.verdict = rank, 2, other, verdict
        self.sent = []

    def gather(self, obj, dst=0):
        self.sent.append(("gather", obj))
        return [obj, self.other] if self.rank == dst else None

    def broadcast(self, obj, src=0):
        self.sent.append(("broadcast", obj))
        return obj if self.rank == src else self.verdict

    def scatter(self, objs, src=0):
        self.sent.append(("scatter", objs))
        return objs[self.rank] if self.rank == src else self.verdict

    def all_gather(self, obj):
        raise AssertionError("a gather phase never all-gathers")


def test_a_gather_phase_in_a_world_of_one_decides_on_its_own_result():
    assert Collective().gather_phase("commit", lambda: 3, lambda rs: rs[0] * 2) == ([3], 6)
    assert Collective().gather_phase("write", lambda: 3) == ([3], None)


def test_a_gather_phase_hands_the_results_to_the_root_alone_and_its_decision_to_every_rank():
    root = GatheringRank(0, other=(True, "theirs", None))
    seen = []
    assert root.gather_phase("plan", lambda: "mine", lambda rs: seen.append(rs) or len(rs)) == (["mine", "theirs"], 2)
    assert seen == [["mine", "theirs"]] and root.sent == [("gather", (True, "mine", None)), ("broadcast", ({}, 2))]
    leaf = GatheringRank(1, verdict=({}, 2))
    decided = []
    assert leaf.gather_phase("plan", lambda: "theirs", lambda rs: decided.append(rs)) == (None, 2)
    assert decided == [] and leaf.sent[0] == ("gather", (True, "theirs", None))  # (it decides nothing)


def test_a_failure_on_another_rank_fails_the_root_without_deciding():
    root = GatheringRank(0, other=(False, "disk full", StorageError))
    decided = []
    with pytest.raises(StorageError) as e:
        root.gather_phase("write", lambda: "fine", lambda rs: decided.append(rs))
    assert decided == [] and e.value.failures == {1: "disk full"} and isinstance(e.value, DistributedError)
    assert root.sent[-1] == ("broadcast", ({1: ("disk full", StorageError)}, None))


def test_a_failed_decision_is_charged_to_the_root_on_every_rank():
    root = GatheringRank(0, other=(True, 1, None))

    def decide(results):
        raise LoadError("the plan cannot hold")

    with pytest.raises(LoadError) as e:
        root.gather_phase("plan", lambda: 0, decide)
    assert str(e.value) == "phase 'plan' failed on rank 0: the plan cannot hold"
    leaf = GatheringRank(1, verdict=root.sent[-1][1])
    with pytest.raises(LoadError) as e:
        leaf.gather_phase("plan", lambda: 1, decide)
    assert e.value.failures == {0: "the plan cannot hold"} and e.value.__cause__ is None


class FoldingRank(Collective):
    """Rank ``rank`` of a world of ``world`` ranks whose receives from the tree's children hand back
    ``received[src]`` and whose broadcast hands a rank other than 0 ``verdict``; what it sends is recorded."""

    def __init__(self, rank, world, received=None, verdict=None):
        super().__init__()
        self.rank, self.world_size, self.received, self.verdict = rank, world, received or {}, verdict
        self.sent, self.asked = [], []

    def _send_object(self, obj, dst):
        self.sent.append(("send", dst, obj))

    def _recv_object(self, src):
        self.asked.append(src)
        return self.received[src]

    def broadcast(self, obj, src=0):
        self.sent.append(("broadcast", obj))
        return obj if self.rank == src else self.verdict

    def gather(self, obj, dst=0):
        raise AssertionError("a reduce phase never gathers")


def test_a_reduce_phase_in_a_world_of_one_decides_on_its_own_result():
    assert Collective().reduce_phase("targets", lambda: {1}, set.union, sorted) == ({1}, [1])
    with pytest.raises(KeyError):
        Collective().reduce_phase("targets", lambda: {}["k"], set.union)


def test_a_reduce_phase_folds_up_a_binomial_tree_each_rank_receiving_log2_world_values():
    # world 8: rank 0 receives from 1, 2 and 4 (each a folded subtree), rank 4 from 5 and 6, rank 6 from 7
    root = FoldingRank(0, 8, received={1: ({}, {"b"}), 2: ({}, {"c", "d"}), 4: ({}, {"e", "f", "g", "h"})})
    assert root.reduce_phase("targets", lambda: {"a"}, set.union, sorted) == \
        ({"a", "b", "c", "d", "e", "f", "g", "h"}, list("abcdefgh"))
    assert root.asked == [1, 2, 4] and root.sent == [("broadcast", ({}, list("abcdefgh")))]
    middle = FoldingRank(4, 8, received={5: ({}, {"f"}), 6: ({}, {"g", "h"})}, verdict=({}, ["any"]))
    assert middle.reduce_phase("targets", lambda: {"e"}, set.union, sorted) == (None, ["any"])
    assert middle.asked == [5, 6] and middle.sent[0] == ("send", 0, ({}, {"e", "f", "g", "h"}))
    leaf = FoldingRank(7, 8, verdict=({}, ["any"]))
    assert leaf.reduce_phase("targets", lambda: {"h"}, set.union, sorted) == (None, ["any"])
    assert leaf.asked == [] and leaf.sent[0] == ("send", 6, ({}, {"h"}))
    odd = FoldingRank(0, 5, received={1: ({}, {1}), 2: ({}, {2, 3}), 4: ({}, {4})})  # a world of 5
    assert odd.reduce_phase("targets", lambda: {0}, set.union, sorted)[1] == [0, 1, 2, 3, 4] and odd.asked == [1, 2, 4]


def test_a_reduce_phase_names_every_failing_rank_on_every_rank_and_decides_nothing():
    decided = []
    root = FoldingRank(0, 4, received={1: ({1: ("disk full", StorageError)}, None),
                                       2: ({3: ("disk full", StorageError)}, None)})
    with pytest.raises(StorageError) as e:
        root.reduce_phase("targets", lambda: {0}, set.union, decided.append)
    assert decided == [] and e.value.failures == {1: "disk full", 3: "disk full"}
    mine = FoldingRank(2, 4, received={3: ({}, {3})}, verdict=root.sent[-1][1])
    with pytest.raises(StorageError):
        mine.reduce_phase("targets", lambda: (_ for _ in ()).throw(ValueError("bad")), set.union)
    assert mine.sent[0] == ("send", 0, ({2: ("ValueError: bad", None)}, None))  # (its value dropped)

    def clash(a, b):
        raise LoadError("ranks 2 and 3 disagree")

    inner = FoldingRank(2, 4, received={3: ({}, {3})}, verdict=({2: ("ranks 2 and 3 disagree", LoadError)}, None))
    with pytest.raises(LoadError) as e:  # a fold that fails is sent up the tree, never left hanging
        inner.reduce_phase("targets", lambda: {2}, clash)
    assert inner.sent[0] == ("send", 0, ({2: ("ranks 2 and 3 disagree", LoadError)}, None))
    assert e.value.failures == {2: "ranks 2 and 3 disagree"}

    def decide(value):
        raise LoadError("the layout cannot hold it")

    root = FoldingRank(0, 2, received={1: ({}, {1})})
    with pytest.raises(LoadError) as e:
        root.reduce_phase("targets", lambda: {0}, set.union, decide)
    assert e.value.failures == {0: "the layout cannot hold it"}


# -- a real world of two ---------------------------------------------------------------------------


def phase_failing_on(rank: int, kind: str) -> dict:
    """Run a phase that fails on ``rank`` (with a ``kind`` error: "ucp" or "other"; any other rank
    returns its rank times ten); what this rank got."""
    from ucp.comm.collective import Collective

    coll = Collective()

    def fn():
        if coll.rank == rank:
            raise (CorruptCheckpointError if kind == "ucp" else ValueError)(f"broken on rank {rank}")
        return coll.rank * 10

    try:
        return {"result": coll.phase("probe", fn)}
    except DistributedError as e:
        return {"class": type(e).__name__, "corrupt": isinstance(e, CorruptCheckpointError), "phase": e.phase,
                "failures": e.failures, "message": str(e), "exit_code": e.exit_code}


def gather_phase_failing_on(rank: int) -> dict:
    """A gather phase on a real world: rank ``rank`` fails (-1: none does); rank 0 decides the sum."""
    from ucp.comm.collective import Collective

    coll = Collective()

    def fn():
        if coll.rank == rank:
            raise ValueError(f"broken on rank {rank}")
        return coll.rank + 1

    try:
        return {"result": coll.gather_phase("probe", fn, sum)}
    except DistributedError as e:
        return {"failures": e.failures}


def scatter_uneven() -> object:
    """Rank 1 scatters objects of very different sizes: a list of 10,000 ints to rank 0, None to itself."""
    from ucp.comm.collective import Collective

    coll = Collective()
    return coll.scatter([list(range(10_000)), None] if coll.rank == 1 else None, src=1)


@pytest.mark.dist
def test_on_a_gloo_world_a_scatter_gives_each_rank_its_own_object_whatever_its_size(world2):
    assert world2.run(scatter_uneven) == [list(range(10_000)), None]


@pytest.mark.dist
def test_on_a_gloo_world_a_gather_phase_decides_on_the_root(world2):
    assert world2.run(gather_phase_failing_on, -1) == [{"result": ([1, 2], 3)}, {"result": (None, 3)}]
    assert world2.run(gather_phase_failing_on, 1) == [{"failures": {1: "ValueError: broken on rank 1"}}] * 2


@pytest.mark.dist
def test_on_a_gloo_world_every_rank_raises_the_same_error(world2):
    assert world2.run(phase_failing_on, -1, "other") == [{"result": [0, 10]}] * 2
    out = world2.run(phase_failing_on, 1, "other")
    assert out[0] == out[1] == {"class": "DistributedError", "corrupt": False, "phase": "probe",
                                "failures": {1: "ValueError: broken on rank 1"},
                                "message": "phase 'probe' failed on rank 1: ValueError: broken on rank 1",
                                "exit_code": 1}
    out = world2.run(phase_failing_on, 0, "ucp")
    assert out[0] == out[1]
    assert out[0]["class"] == "DistributedCorruptCheckpointError" and out[0]["corrupt"] and out[0]["exit_code"] == 3
    assert out[0]["failures"] == {0: "broken on rank 0"}


def reduce_phase_failing_on(rank: int) -> dict:
    """A reduce phase on a real world: each rank gives ``{its rank, "all"}`` (rank ``rank`` fails
    instead; -1: none does), folded by union; rank 0 decides the sorted union. What this rank got,
    and the ranks it received from."""
    from ucp.comm.collective import Collective

    coll = Collective()
    asked = []
    recv = coll._recv_object
    coll._recv_object = lambda src: asked.append(src) or recv(src)

    def fn():
        if coll.rank == rank:
            raise ValueError(f"broken on rank {rank}")
        return {coll.rank, "all"}

    try:
        return {"result": coll.reduce_phase("probe", fn, set.union, lambda s: sorted(s, key=str)), "asked": asked}
    except DistributedError as e:
        return {"failures": e.failures}


@pytest.mark.dist
@pytest.mark.parametrize("size", [3, 4])
def test_on_a_gloo_world_a_reduce_phase_folds_every_ranks_value_to_the_root(worlds, size):
    world = worlds(size)
    union = sorted({*range(size), "all"}, key=str)
    want = {3: [([1, 2], union), ([], None), ([], None)],
            4: [([1, 2], union), ([], None), ([3], None), ([], None)]}[size]
    got = world.run(reduce_phase_failing_on, -1)
    assert [(g["asked"], g["result"][0] and sorted(g["result"][0], key=str)) for g in got] == want
    assert all(g["result"][1] == union for g in got)
    assert world.run(reduce_phase_failing_on, size - 1) == \
        [{"failures": {size - 1: f"ValueError: broken on rank {size - 1}"}}] * size


def test_an_exchange_in_a_world_of_one_keeps_what_it_sends_itself():
    assert Collective().exchange({0: "mine"}) == {0: "mine"}
    assert Collective().exchange({}) == {}
    assert Collective().exchange_phase("index", lambda: {0: [1, 2]}) == {0: [1, 2]}
    with pytest.raises(ValueError, match="no index"):
        Collective().exchange_phase("index", lambda: (_ for _ in ()).throw(ValueError("no index")))


def exchange_failing_on(rank: int) -> dict:
    """A sparse exchange on a real world of three: each rank sends ``(its rank, dst)`` to the ranks
    above it (rank 2 sends nothing); rank ``rank`` fails instead (-1: none does)."""
    from ucp.comm.collective import Collective

    coll = Collective()

    def fn():
        if coll.rank == rank:
            raise ValueError(f"broken on rank {rank}")
        return {dst: (coll.rank, dst) for dst in range(coll.rank + 1, coll.world_size)}

    try:
        return {"got": coll.exchange_phase("index", fn)}
    except DistributedError as e:
        return {"failures": e.failures, "phase": e.phase}


@pytest.mark.dist
def test_on_a_gloo_world_an_exchange_delivers_to_each_rank_what_was_sent_to_it(worlds):
    world3 = worlds(3)
    assert world3.run(exchange_failing_on, -1) == [{"got": {}}, {"got": {0: (0, 1)}},
                                                   {"got": {0: (0, 2), 1: (1, 2)}}]
    assert world3.run(exchange_failing_on, 1) == [{"failures": {1: "ValueError: broken on rank 1"},
                                                   "phase": "index"}] * 3


# -- a peer that died: the transport's RuntimeError is one PeerLostError line -------------------------


GLOO_RESET = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:33845: "
              "Connection reset by peer\nException raised from recvLoop at ...\nframe #0: c10::Error")


class RankZeroWithDeadPeer(Collective):
    """Rank 0 of a world of two whose peer is gone: torch.distributed's collectives raise gloo's error."""

    def __init__(self):
        super().__init__()
        self.world_size = 2


@pytest.mark.parametrize("call", ["phase", "broadcast", "barrier"])
def test_a_dead_peer_is_one_peer_lost_line_naming_the_phase(call, monkeypatch):
    import torch.distributed as dist

    from ucp.errors import PeerLostError

    def reset(*args, **kwargs):
        raise RuntimeError(GLOO_RESET)

    for name in ("all_gather_object", "broadcast_object_list", "barrier"):
        monkeypatch.setattr(dist, name, reset)
    coll = RankZeroWithDeadPeer()
    with pytest.raises(PeerLostError) as e:
        if call == "phase":
            coll.phase("write", lambda: "mine")
        else:
            getattr(coll, call)(*(["x"] if call == "broadcast" else []))
    msg = str(e.value)
    assert "\n" not in msg and "Connection reset by peer" in msg and "frame #" not in msg
    assert msg.startswith("rank 0: the collective ")
    if call == "phase":
        assert "of phase 'write' failed: another rank of the job died or became unreachable" in msg
    assert e.value.__cause__ is None and isinstance(e.value, UcpError)


def test_a_gather_uses_the_gpu_under_nccl_and_the_cpu_under_gloo(monkeypatch):
    import torch
    import torch.distributed as dist

    coll = RankZeroWithDeadPeer()
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert coll._device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert coll._device() == torch.device("cuda", 3)  # (NCCL moves no CPU tensor)
