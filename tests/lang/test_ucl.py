"""UCL: parsing, the canonical printer, validation passes, matching; fuzzed for stray exceptions."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import UcpError
from ucp.errors import UclError
from ucp.lang.parse import parse
from ucp.lang.printer import print_program
from ucp.lang.validate import bind_layout, check, match, match_names
from ucp.format.layout import Layout
from ucp.format.pattern import Fused, Pad, Shard

VALID = [
    "ucl 1\nsource layout dp=2\n",
    "# comment first\n\nucl 1\nsource layout tp=2 dp=4 zero=1   # trailing comment\n\n",
    """ucl 1
source layout tp=2 pp=2 dp=4 zero=1
model layers=24 vocab=50257
"*.word_embeddings.weight" : shard(tp, dim=0) pad(dim=0, to=50304, keep=50257)
"*.attention.qkv.weight" : shard(tp, dim=0) fused(dim=0, q=4096, k=1024, v=1024)
"*.attention.dense.weight" : shard(tp, dim=1)
"*.norm.*", "*.fc2.bias" : replicate(tp)
"*.router.weight" : average(tp)
"layers.{i}.*" : stage(pp, layers=24)
"lm_head.weight" : tied("embedding.word_embeddings.weight")
optimizer adam states exp_avg exp_avg_sq step master=fp32
export rename "layers.{i}." -> "model.layers.{i}."
export split "*.attention.qkv.weight"
""",
    """ucl 1
source layout ep=4 dp=2 zero=3
"experts.{e}.*" : expert(ep, experts=64) flat(dp)
optimizer sgd states momentum_buffer
""",
]


@pytest.mark.parametrize("text", VALID)
def test_valid_programs_round_trip_through_the_printer(text):
    program = parse(text, "v.ucl")
    printed = print_program(program)
    assert parse(printed) == program
    assert print_program(parse(printed)) == printed  # the printed form is a fixed point
    check(program, "v.ucl")


INVALID = [
    ("ucl 1\nsource layout tp=\n", "2:18", "unexpected end of line; expected"),
    ('ucl 1\nsource layout tp=2\n"a" : shard(tp dim=0)\n', "3:16", "unexpected 'dim'"),
    ("ucl one\n", "1:5", "expected an integer"),
    ('ucl 1\nsource layout tp=2\n"a" shard(tp)\n', "3:5", "expected ',', ':'"),
    ("ucl 1\n$\n", "2:1", "unexpected character '$'"),
    ('ucl 1\nsource layout tp=2\n"a" : shard(pp, dim=0)\n', "3:7", "names axis 'pp', which the source layout lacks"),
    ('ucl 1\nsource layout tp=2\n"a" : warp(tp)\n', "3:7", "unknown transform 'warp'"),
    ('ucl 1\nsource layout tp=2\n"a" : shard(tp)\n', "3:7", "shard() needs dim=..."),
    ('ucl 1\nsource layout tp=2\n"a" : pad(dim=0, to=4, keep=9)\n', "3:7", "keep=9 must be between 1 and to=4"),
    ('ucl 1\nsource layout tp=2\n"a" : tied(wte)\n', "3:7", "quoted name"),
    ('ucl 1\nsource layout tp=2\n"a{" : replicate(tp)\n', "3:1", "must open a capture"),
    ("ucl 2\nsource layout tp=2\n", "1:1", "UCL version 2 is not supported"),
    ('ucl 1\nsource layout tp=2\n"a" : shard(tp, dim=0) pad(dim=0, to=padded, keep=3)\n', "3:24",
     "'padded' is not a model setting; declare it with 'model padded=N'"),
    ("ucl 1\nsource layout tp=2\nsource layout tp=4\n", "3:1", "'source layout' is given twice"),
    ("ucl 1\nsource layout tp=0\n", "2:1", "sizes must be integers >= 1"),
    ("ucl 1\nsource layout tp=2 zero=7\n", "2:1", "not a sharding mode"),
    ('ucl 1\nsource layout tp=2\n"a" : fused(dim=0)\n', "3:7", "needs the sizes of its parts"),
    # integers past Python's int-string limit (4,300 digits) or past 2^63: one line with line:column
    ("ucl 1\nmodel vocab=" + "7" * 4301 + "\n", "2:13", "integer 77777777777777777777... (4301 digits) is too large"),
    ("ucl " + "1" * 5000 + "\n", "1:5", "(5000 digits) is too large"),
    ('ucl 1\nsource layout tp=2\n"a" : shard(tp, dim=9223372036854775808)\n', "3:21",
     "integer 9223372036854775808 is too large; UCL integers are at most 9223372036854775807"),
]


@pytest.mark.parametrize("text, where, words", INVALID)
def test_invalid_programs_say_where_and_what(text, where, words):
    with pytest.raises(UclError) as e:
        check(parse(text, "bad.ucl"), "bad.ucl")
    assert str(e.value).startswith(f"bad.ucl:{where}: "), str(e.value)
    assert words in str(e.value) and "\n" not in str(e.value)


SPEC = """ucl 1
source layout tp=2 dp=2 zero=1
"wte.weight" : shard(tp, dim=0) pad(dim=0, to=256, keep=250)
"blocks.{i}.attn.qkv.weight" : shard(tp, dim=0) fused(dim=0, q=64, k=64, v=64)
"blocks.{i}.*.weight", "ln_f.*" : replicate(tp)
"""


def test_first_match_wins_with_captures():
    shapes = {"wte.weight": (256, 64), "blocks.3.attn.qkv.weight": (192, 64), "blocks.3.ln1.weight": (64,),
              "ln_f.bias": (64,)}
    got = match(check(parse(SPEC, "m.ucl"), "m.ucl"), shapes)
    assert got["blocks.3.attn.qkv.weight"].captures == {"i": 3}
    assert str(got["blocks.3.attn.qkv.weight"].pattern) == "shard(tp, dim=0) fused(dim=0, q=64, k=64, v=64)"
    assert str(got["wte.weight"].pattern) == "shard(tp, dim=0) pad(dim=0, to=256, keep=250)"
    assert got["ln_f.bias"].pattern.is_replicated


def test_every_tensor_must_be_matched():
    with pytest.raises(UclError, match="tensor 'head.bias' .* is matched by no rule"):
        match(check(parse(SPEC, "m.ucl"), "m.ucl"), {"wte.weight": (256, 64), "blocks.0.attn.qkv.weight": (192, 64),
                                                      "ln_f.bias": (64,), "head.bias": (3,)})


def test_every_rule_must_match_something():
    with pytest.raises(UclError, match=r"m.ucl:4:1: rule \"blocks.\{i\}.attn.qkv.weight\" matches no tensor"):
        match(check(parse(SPEC, "m.ucl"), "m.ucl"), {"wte.weight": (256, 64), "ln_f.bias": (64,)})


def test_fused_sizes_must_sum_to_the_dim():
    with pytest.raises(UclError, match="m.ucl:4:1: fused sizes .* sum to 192 but dim 0 has 200"):
        match(check(parse(SPEC, "m.ucl"), "m.ucl"), {"wte.weight": (256, 64), "blocks.0.attn.qkv.weight": (200, 64),
                                                      "ln_f.bias": (64,)})



TEMPLATE = """ucl 1
# no source layout: any layout whose axes the rules name; sizes named, from the model settings
"wte.weight" : shard(tp, dim=0) pad(dim=0, to=padded_vocab, keep=vocab)
"h.{i}.qkv.weight" : shard(tp, dim=0) fused(dim=0, q=q_size, k=kv_size, v=kv_size)
"*" : replicate(tp)
"""


def test_rules_take_model_settings_by_name_and_given_settings_win():
    program = parse("ucl 1\nmodel vocab=10 padded_vocab=12 q_size=8 kv_size=4\n" + TEMPLATE.split("\n", 1)[1], "t.ucl")
    checked = check(program, "t.ucl", settings={"vocab": 11})
    found = match(checked, {"wte.weight": (12, 4), "h.0.qkv.weight": (16, 4), "ln.weight": (4,)})
    assert found["wte.weight"].pattern.pad == Pad(0, 12, 11)
    assert found["h.0.qkv.weight"].pattern.fused == Fused(0, (("q", 8), ("k", 4), ("v", 4)))
    assert parse(print_program(program), "t.ucl") == program  # the program keeps the names


def test_a_layout_less_program_binds_to_the_checkpoint_layout_and_prints_concrete():
    checked = check(parse(TEMPLATE, "t.ucl"), "t.ucl", settings={"vocab": 10, "padded_vocab": 12, "q_size": 8,
                                                                  "kv_size": 4})
    assert checked.layout is None
    bound = bind_layout(checked, Layout.from_sizes(dp=2, tp=2, zero=1))
    assert bound.layout == Layout.from_sizes(dp=2, tp=2, zero=1)
    text = print_program(bound.concrete())
    assert "source layout dp=2 tp=2 zero=1" in text and "model vocab=10 padded_vocab=12 q_size=8 kv_size=4" in text
    again = check(parse(text, "c.ucl"), "c.ucl")  # the concrete text stands on its own
    assert again.layout == bound.layout and again.model == bound.model
    with pytest.raises(UclError, match="names axis 'tp', which the checkpoint's layout dp=4 zero=0 lacks"):
        bind_layout(checked, Layout.from_sizes(dp=4))


def test_match_names_finds_rules_before_shapes_are_known():
    checked = check(parse(TEMPLATE, "t.ucl"), "t.ucl", settings={"vocab": 10, "padded_vocab": 12, "q_size": 8,
                                                                  "kv_size": 4})
    found = match_names(checked, ["wte.weight", "h.3.qkv.weight", "ln.weight"])
    assert found["h.3.qkv.weight"][1].shards == (Shard("tp", 0),)
    assert found["ln.weight"][1].is_replicated
    with pytest.raises(UclError, match='rule "h.{i}.qkv.weight" matches no tensor'):
        match_names(checked, ["wte.weight", "ln.weight"])


def _only_ucp_errors(text: str) -> None:
    try:
        program = parse(text, "fuzz.ucl")
        check(program, "fuzz.ucl")
        assert parse(print_program(program)) == program
    except UcpError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_random_text_gives_only_ucp_errors(text):
    _only_ucp_errors(text)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(VALID), st.integers(0, 10_000), st.integers(0, 5), st.text(max_size=4))
def test_mutated_programs_give_only_ucp_errors(base, at, drop, insert):
    at %= len(base) + 1
    _only_ucp_errors(base[:at] + insert + base[at + drop:])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_give_only_ucp_errors(data):
    _only_ucp_errors(data.decode("utf-8", errors="replace"))


def test_settings_precedence_and_size_one_axes():
    from ucp.lang.apply import check_layout

    text = 'ucl 1\nsource layout dp=2 zero=1\nmodel vocab=10\n"w" : pad(dim=0, to=padded, keep=vocab)\n'
    checked = check(parse(text, "p.ucl"), "p.ucl", defaults={"vocab": 99, "padded": 12})
    assert checked.model == {"vocab": 10, "padded": 12}  # the model line over what the checkpoint says
    assert check(parse(text, "p.ucl"), "p.ucl", {"vocab": 11}, defaults={"padded": 12}).model["vocab"] == 11
    check_layout(checked, Layout.from_sizes(zero=1, dp=2, tp=1))  # (a size-1 axis is no axis)
    with pytest.raises(UclError, match="is not the checkpoint's"):
        check_layout(checked, Layout.from_sizes(zero=1, dp=2, tp=2))
