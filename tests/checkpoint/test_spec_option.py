"""``Checkpointer(spec=...)`` in one process: how the spec is given, what it records, what it refuses,
and what the strict-load error advises."""

from __future__ import annotations

import pytest
import torch

import ucp
from ucp.errors import LoadError, OptionsError, UclError
from ucp.format import Fused, Pattern, Shard
from ucp.storage.manifest_io import read_manifest

SPEC = ('ucl 1\n"experts.{e}.*" : expert(ep, experts=2)\n'
        '"qkv.weight" : fused(dim=0, q=2, k=1, v=1)\n"*" : replicate(ep)\n')


def model(experts: int = 2):
    m = torch.nn.Module()
    m.qkv = torch.nn.Linear(3, 4, bias=False)
    m.experts = torch.nn.ModuleList(torch.nn.Linear(3, 3) for _ in range(experts))
    return m


def options(**kw):
    return ucp.CheckpointOptions(layout=ucp.Layout.from_sizes(ep=1), fsync=False, **kw)


def test_a_spec_file_or_text_names_and_shapes_what_is_saved(tmp_path):
    path = tmp_path / "moe.ucl"
    path.write_text(SPEC)
    for spec, root in [(path, tmp_path / "a"), (str(path), tmp_path / "b"), (SPEC, tmp_path / "c")]:
        res = ucp.Checkpointer(root, model(), options=options(), spec=spec).save(1)
        manifest = read_manifest(res.path)
        assert manifest.tensors["model/qkv.weight"].pattern == Pattern(fused=Fused(0, (("q", 2), ("k", 1), ("v", 1))))
        assert "model/experts.1.weight" in manifest.tensors
        assert manifest.state["shared"]["spec"].startswith("ucl 1\n")  # the rules a load is checked against


def test_spec_is_refused_with_patterns_and_when_it_does_not_fit(tmp_path):
    with pytest.raises(OptionsError, match="spec= and options.patterns"):
        ucp.Checkpointer(tmp_path, model(), options=options(patterns={"qkv.*": Pattern((Shard("ep", 0),))}), spec=SPEC)
    with pytest.raises(OptionsError, match="no such spec file"):
        ucp.Checkpointer(tmp_path, model(), options=options(), spec=str(tmp_path / "none.ucl"))
    with pytest.raises(OptionsError, match="spec must be UCL text"):
        ucp.Checkpointer(tmp_path, model(), options=options(), spec=3)
    with pytest.raises(UclError, match="<spec>:2:19: expert.* names axis 'ep', which the checkpoint's layout"):
        ucp.Checkpointer(tmp_path, model(), spec=SPEC)  # (the default layout is dp=1)
    ckpt = ucp.Checkpointer(tmp_path, model(3), options=options(), spec=SPEC)
    with pytest.raises(UclError, match="local expert index 2 is out of range: each of the 1 ep rank"):
        ckpt.save(1)


def test_the_strict_error_advises_a_spec_for_local_indices(tmp_path):
    ucp.Checkpointer(tmp_path, model(), options=options(), spec=SPEC).save(1)
    with pytest.raises(LoadError) as e:
        ucp.Checkpointer(tmp_path, model(3), options=options(), spec=SPEC.replace("=2", "=3")).load()
    assert "expert(experts=2)" in str(e.value) and "expert(experts=3)" in str(e.value)
    assert "load it with a model of the same number of experts/layers and a spec= with those rules" in str(e.value)
    other = torch.nn.Module()
    other.qkv = torch.nn.Linear(3, 4, bias=False)
    with pytest.raises(LoadError) as e:
        ucp.Checkpointer(tmp_path, other, options=options()).load()
    assert "strict=False does not change that" in str(e.value)  # saved with expert() rules, loaded without
    ckpt = ucp.Checkpointer(tmp_path / "plain", model(), options=options())
    ckpt.save(1)
    with pytest.raises(LoadError) as e:
        ucp.Checkpointer(tmp_path / "plain", other, options=options()).load()
    assert "give Checkpointer(spec=...) with expert()/stage() rules" in str(e.value)
    assert "if the model really lacks or adds these tensors, strict=False loads the ones both have" in str(e.value)
    assert ucp.Checkpointer(tmp_path / "plain", other, options=options()).load(strict=False).unexpected_keys
