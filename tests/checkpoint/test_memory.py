"""ucp.checkpoint.memory.Snapshots, the Checkpointer's memory-tier part, in a job of one rank: which
steps it takes, what its saves return, where a load comes from, and what happens once it has failed."""

from __future__ import annotations

import warnings

import pytest
import torch

import ucp
from ucp.checkpoint.memory import Snapshots
from ucp.errors import UcpError
from ucp.snapshot.shm import SHM_DIR
from tests.snapshot.conftest import job  # noqa: F401 - the fixture: a fresh job, its agent stopped after
from tests.helpers import same_state, state_of, tiny_model, train_step


def test_snapshots_are_taken_every_nth_step_and_loaded_from_memory(tmp_path, job):  # noqa: F811
    m, opt = tiny_model()
    with ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(every=2, job=job)) as ck:
        assert isinstance(ck._snapshots, Snapshots)
        for s in range(1, 5):
            train_step(m, opt, s)
            res = ck.save(s)
            if s % 2:
                assert res is None  # a step the snapshots skip
            else:
                assert res.tier == "memory" and res.path == SHM_DIR and res.step == s and res.nbytes > 0
        want = state_of(m, opt)
        ck.wait()
        directory, manifest = ck._snapshots.source(None)
        assert directory == SHM_DIR and manifest.step == 4
    assert not list(tmp_path.iterdir())  # nothing durable: persist_every is None
    m2, opt2 = tiny_model(seed=1)
    res = ucp.Checkpointer(tmp_path, model=m2, optimizer=opt2, snapshot=ucp.SnapshotOptions(job=job)).load()
    assert res.source == "memory" and res.step == 4 and same_state(state_of(m2, opt2), want)


def test_once_lost_the_memory_tier_warns_once_and_saves_go_durable(tmp_path, job):  # noqa: F811
    m, opt = tiny_model()
    with ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job)) as ck:
        with pytest.warns(RuntimeWarning, match="the memory tier failed \\(agent gone\\)"):
            ck._snapshots.lose(UcpError("agent gone"))
        assert ck._snapshots.lost == "agent gone"
        train_step(m, opt, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            res = ck.save(1)
        assert res.tier == "durable" and (tmp_path / res.path.name / "manifest.json").exists()
        res = ck.load()
        assert res.source == "durable" and res.step == 1


def test_a_closed_checkpointer_refuses_work_and_releases_its_part(tmp_path, job):  # noqa: F811
    m, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=m, optimizer=opt, snapshot=ucp.SnapshotOptions(job=job))
    ck.save(0)
    ck.close()
    assert ck._snapshots._hook is None  # the optimizer no longer waits on snapshot copies
    train_step(m, opt, 1)  # and can step
    with pytest.raises(UcpError, match="closed"):
        ck.save(1)
    assert torch.isfinite(next(m.parameters())).all()
