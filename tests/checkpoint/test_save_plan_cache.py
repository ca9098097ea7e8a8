"""The durable save plan, made once per layout and reused while no rank's pieces change
(docs/architecture.md, "Scale"): what a reused plan writes, when a plan is made again, and what the
committing rank checks of the ranks' reports when it does not validate every fragment again."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import ucp
import ucp.checkpoint.save as save_mod
from tests.helpers import state_of, tiny_model, train_step
from ucp.errors import UcpError
from ucp.format.manifest import Manifest
from ucp.storage import directory as store
from ucp.storage.manifest_io import read_manifest


@pytest.fixture
def counted(monkeypatch):
    """How many plans were made and how many times every fragment was validated."""
    calls = {"plans": 0, "fragments": 0}
    real_plan, real_validate = save_mod.plan_save, Manifest.validate_fragments

    def plan(*a, **k):
        calls["plans"] += 1
        return real_plan(*a, **k)

    def validate(self, cover=True):
        calls["fragments"] += cover  # (a load validates the rows it reads, without the whole cover)
        return real_validate(self, cover)

    monkeypatch.setattr(save_mod, "plan_save", plan)
    monkeypatch.setattr(Manifest, "validate_fragments", validate)
    return calls


def test_a_plan_is_made_when_the_pieces_change_and_reused_while_they_do_not(tmp_path, counted):
    model, opt = tiny_model()
    ck = ucp.Checkpointer(tmp_path, model=model, optimizer=opt)
    ck.save(0)  # before the first step: no optimizer state yet
    assert counted["plans"] == 1
    train_step(model, opt, 0)
    ck.save(1)  # the optimizer's state appeared: new pieces, a new plan
    assert counted["plans"] == 2
    for s in (2, 3):
        train_step(model, opt, s)
        ck.save(s)
    assert counted["plans"] == 2
    want = state_of(model, opt)
    m2, o2 = tiny_model(seed=5)
    assert ucp.Checkpointer(tmp_path, model=m2, optimizer=o2).load().step == 3
    got = state_of(m2, o2)
    assert all(np.array_equal(want[k].view(-1).numpy().view(np.uint8), got[k].view(-1).numpy().view(np.uint8))
               for k in want) and set(want) == set(got)


def test_a_reused_plan_writes_the_manifest_a_new_plan_writes(tmp_path, counted):
    model, opt = tiny_model()
    train_step(model, opt, 0)
    ck = ucp.Checkpointer(tmp_path / "a", model=model, optimizer=opt)
    ck.save(1)
    ck.save(2)  # reused
    ucp.Checkpointer(tmp_path / "b", model=model, optimizer=opt).save(2)  # a new Checkpointer: a new plan
    assert counted["plans"] == 2
    assert counted["fragments"] == 2  # every fragment checked once per plan, not at each save
    reused, fresh = (read_manifest(store.step_dir(tmp_path / r, 2)) for r in ("a", "b"))
    assert reused.fragments == fresh.fragments and reused.tensors == fresh.tensors
    assert reused.files == fresh.files and reused.file_headers == fresh.file_headers


def test_a_report_that_does_not_match_the_plan_is_refused_and_nothing_is_published(tmp_path, monkeypatch):
    model, opt = tiny_model()
    train_step(model, opt, 0)
    ck = ucp.Checkpointer(tmp_path, model=model, optimizer=opt)
    ck.save(1)
    real = save_mod.write_share
    bad = {"how": None}

    def tampered(*a, **k):
        w = real(*a, **k)
        if bad["how"] == "count":
            return replace(w, offsets=w.offsets[:-1])
        if bad["how"] == "offset":
            return replace(w, offsets=w.offsets + w.size)
        return replace(w, block_counts=w.block_counts + 1)

    monkeypatch.setattr(save_mod, "write_share", tampered)
    for step, how, said in ((2, "count", "fragments written to"), (3, "offset", "outside its file"),
                            (4, "blocks", "block checksums")):
        bad["how"] = how
        with pytest.raises(UcpError, match=said):
            ck.save(step)
        assert [s for s, _ in store.list_steps(tmp_path)] == [1]
        assert not store.step_dir(tmp_path, step).exists()  # the partial save is cleared
