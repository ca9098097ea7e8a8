"""Tensor keys: model/<fqn>, optim/<fqn>/<state>, extra/<name>."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import SpecError
from ucp.format import extra_key, model_key, optim_key, parse_key
from ucp.format.keys import ParsedKey


def test_builders():
    assert model_key("layers.0.attn.weight") == "model/layers.0.attn.weight"
    assert optim_key("layers.0.attn.weight", "exp_avg") == "optim/layers.0.attn.weight/exp_avg"
    assert extra_key("rng") == "extra/rng"


def test_parse():
    assert parse_key("model/a.b") == ParsedKey("model", "a.b", None)
    assert parse_key("optim/a.b/exp_avg_sq") == ParsedKey("optim", "a.b", "exp_avg_sq")
    assert parse_key("extra/x") == ParsedKey("extra", "x")
    k = parse_key("optim/w/step")
    assert (k.kind, k.name, k.state) == ("optim", "w", "step")


names = st.text(alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=1, max_size=20)


@settings(max_examples=100, deadline=None)
@given(names, names)
def test_build_then_parse_round_trips(fqn, state):
    assert parse_key(model_key(fqn)) == ("model", fqn, None)
    assert parse_key(optim_key(fqn, state)) == ("optim", fqn, state)
    assert parse_key(extra_key(fqn)) == ("extra", fqn, None)


@pytest.mark.parametrize(
    "key",
    [
        "", "model", "model/", "model/a/b", "model//", "optim/w", "optim/w/", "optim//exp_avg",
        "optim/w/exp_avg/x", "extra/", "extra/a/b", "params/w", "Model/w", "/model/w", None, 5,
    ],
)
def test_malformed_keys(key):
    with pytest.raises(SpecError, match=re.escape(f"tensor key {key!r} is malformed")):
        parse_key(key)


@pytest.mark.parametrize("bad", ["", "a/b", None, 3])
def test_bad_parameter_name(bad):
    with pytest.raises(SpecError, match=re.escape(f"parameter name {bad!r} must be a non-empty string without '/'")):
        model_key(bad)
    with pytest.raises(SpecError, match=re.escape(f"parameter name {bad!r}")):
        optim_key(bad, "exp_avg")


@pytest.mark.parametrize("bad", ["", "m/v", None])
def test_bad_state_name(bad):
    with pytest.raises(SpecError, match=re.escape(f"optimizer state name {bad!r} must be a non-empty string")):
        optim_key("w", bad)


@pytest.mark.parametrize("bad", ["", "a/b"])
def test_bad_extra_name(bad):
    with pytest.raises(SpecError, match=re.escape(f"extra name {bad!r} must be a non-empty string")):
        extra_key(bad)
