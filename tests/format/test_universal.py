"""The universal format's pure part: array paths, chunk shapes, and the header's MUST rules."""

from __future__ import annotations

import copy
import json
import math
import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import FormatError, SpecError
from ucp.format import Fused, Layout, Pad, Pattern, Shard
from ucp.format.universal import (
    FORMAT,
    FORMAT_VERSION,
    ArrayMeta,
    UniversalHeader,
    array_path,
    chunk_shape,
    padded_shape,
    shard_shape,
    stored_dtype,
    universal_shape,
)

# --------------------------------------------------------------------------- array paths


@pytest.mark.parametrize("key, path", [
    ("model/w", "model/w"),
    ("model/layers.0.attn.qkv.weight", "model/layers.0.attn.qkv.weight"),
    ("model/lm-head_w", "model/lm-head_w"),
    ("optim/layers.0.w/exp_avg", "optim/exp_avg/layers.0.w"),
    ("optim/w/step", "optim/step/w"),
    ("extra/rng", "extra/rng"),
    ("extra/_private", "extra/_private"),
])
def test_array_path_of_plain_keys(key, path):
    assert array_path(key) == path


@pytest.mark.parametrize("key, path", [
    ("model/a b", "model/a%20b"),
    ("model/w[0]", "model/w%5B0%5D"),
    ("model/%41", "model/%2541"),  # a literal '%' is itself escaped, so '%41' never reads back as 'A'
    ("model/__w", "model/%5F_w"),  # zarr reserves names starting with '__'
    ("model/.", "model/%2E"),  # and names of periods only
    ("model/..", "model/%2E."),
    ("model/.hidden x", "model/%2Ehidden%20x"),
    ("model/é", "model/%C3%A9"),
    ("optim/a:b/exp avg", "optim/exp%20avg/a%3Ab"),
    # a node named like its parent group's metadata file would replace that file
    ("model/zarr.json", "model/%7Aarr.json"),
    ("extra/ZARR.JSON", "extra/%5AARR.JSON"),
    ("optim/w/zarr.json", "optim/%7Aarr.json/w"),
    ("model/zarr.json.bak", "model/zarr.json.bak"),
])
def test_array_path_escapes_odd_names(key, path):
    assert array_path(key) == path


@pytest.mark.parametrize("key", ["w", "model/", "model/a/b", "optim/w", "optim//exp_avg", "weights/w", ""])
def test_array_path_rejects_malformed_keys(key):
    with pytest.raises(SpecError, match="malformed"):
        array_path(key)


def _zarr_safe(segment: str) -> bool:
    """A zarr v3 node name: non-empty, no '/', not only periods, not starting with '__'; portable
    characters only (ASCII letters, digits, '-', '_', '.', and the '%' of an escape)."""
    return (bool(re.fullmatch(r"[A-Za-z0-9._%-]+", segment)) and not segment.startswith("__")
            and set(segment) != {"."} and segment.lower() != "zarr.json")


NAMES = (st.text(min_size=1, max_size=12) | st.sampled_from(["zarr.json", "Zarr.JSON", "__", "...", "c", "%25"])).filter(
    lambda s: "/" not in s)


@settings(max_examples=200, deadline=None)
@given(NAMES)
def test_segments_are_zarr_safe_and_decode_back_to_the_name(name):
    for key, segments in ((f"model/{name}", 1), (f"extra/{name}", 1)):
        seg = array_path(key).split("/")[1]
        assert _zarr_safe(seg), seg
        assert unquote(seg, errors="strict") == name
    kind, state, fqn = array_path(f"optim/{name}/{name[::-1]}").split("/")
    assert kind == "optim" and unquote(state) == name[::-1] and unquote(fqn) == name
    assert _zarr_safe(state) and _zarr_safe(fqn)


@settings(max_examples=100, deadline=None)
@given(st.lists(NAMES, min_size=2, max_size=6, unique=True))
def test_distinct_keys_get_distinct_paths(names):
    keys = [f"{kind}/{n}" for kind in ("model", "extra") for n in names]
    keys += [f"optim/{a}/{b}" for a in names for b in names]
    paths = [array_path(k) for k in keys]
    assert len(set(paths)) == len(paths)


def test_array_paths_open_as_zarr_nodes(tmp_path):
    """zarr-python itself accepts every escaped path and returns the node at it."""
    import zarr

    keys = ["model/a b", "model/__w", "model/..", "model/é", "model/zarr.json", "optim/w[0]/exp avg",
            "optim/w/zarr.json", "extra/%41", "extra/c"]
    group = zarr.open_group(str(tmp_path / "g"), mode="w", zarr_format=3)
    for i, key in enumerate(keys):
        group.create_array(array_path(key), shape=(2,), dtype="int32", fill_value=i)
    reopened = zarr.open_group(str(tmp_path / "g"), mode="r")
    for i, key in enumerate(keys):
        assert reopened[array_path(key)][...].tolist() == [i, i]
    arrays = {path for path, node in reopened.members(max_depth=None) if isinstance(node, zarr.Array)}
    assert arrays == {array_path(k) for k in keys}, "every group's metadata is intact and every array is listed"


# --------------------------------------------------------------------------- dtypes and shapes


@pytest.mark.parametrize("dtype, stored", [
    ("bfloat16", "uint16"), ("float8_e4m3fn", "uint8"), ("float8_e5m2", "uint8"),
    ("float32", "float32"), ("float16", "float16"), ("int64", "int64"), ("bool", "bool"), ("uint8", "uint8"),
])
def test_stored_dtype(dtype, stored):
    assert stored_dtype(dtype) == stored


def test_stored_dtype_rejects_unknown_names():
    with pytest.raises(SpecError, match="unknown dtype 'float7'"):
        stored_dtype("float7")


def test_chunk_shape_splits_every_dim_of_a_big_tensor():
    for shape in [(8192, 8192), (1024, 1024, 256), (4096, 3000)]:
        chunks = chunk_shape(shape, 4)
        assert all(c < s for c, s in zip(chunks, shape)), (shape, chunks)
        assert math.prod(chunks) * 4 <= 1 << 20


def test_chunk_shape_keeps_a_small_tensor_in_one_chunk():
    assert chunk_shape((10, 10), 4) == (10, 10)
    assert chunk_shape((256, 1024), 4) == (256, 1024)  # exactly 1 MiB
    assert chunk_shape((7,), 8, target=56) == (7,)


def test_chunk_shape_of_scalars_and_empty_tensors():
    assert chunk_shape((), 4) == ()
    assert chunk_shape((0,), 4) == (1,)
    assert chunk_shape((0, 5), 2) == (1, 5)


def test_chunk_shape_holds_at_least_one_element():
    assert chunk_shape((1000,), 8, target=4) == (1,)


def test_chunk_shape_rejects_a_non_positive_target():
    with pytest.raises(SpecError, match="chunk target 0"):
        chunk_shape((4,), 4, target=0)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5000), min_size=0, max_size=4), st.sampled_from([1, 2, 4, 8]),
       st.integers(1, 1 << 16))
def test_chunk_shape_properties(shape, item, target):
    shape = tuple(shape)
    chunks = chunk_shape(shape, item, target)
    assert len(chunks) == len(shape)
    assert all(1 <= c <= max(1, s) for c, s in zip(chunks, shape))
    nbytes = math.prod(chunks) * item
    assert nbytes <= target or all(c == 1 for c in chunks)
    split = [d for d, (c, s) in enumerate(zip(chunks, shape)) if c < max(1, s)]
    if split:
        # halving stopped as soon as a chunk fitted: it is not far below the target
        assert nbytes * 2 > target
        # balanced: a dim that was cut is at least half the longest chunk dim
        assert all(chunks[d] >= -(-max(chunks) // 2) for d in split)
    grid = shard_shape(shape, chunks)
    assert all(g % c == 0 and g >= s and g - max(1, s) < c for g, c, s in zip(grid, chunks, shape))


def test_shard_shape_rounds_up_to_whole_chunks():
    assert shard_shape((10, 7), (4, 4)) == (12, 8)
    assert shard_shape((8, 8), (4, 4)) == (8, 8)
    assert shard_shape((0, 3), (1, 3)) == (1, 3)
    assert shard_shape((), ()) == ()


def test_universal_and_padded_shape_are_inverse():
    p = Pattern((Shard("tp", 0),), pad=Pad(0, 12, 10))
    assert universal_shape((12, 4), p) == (10, 4)
    assert padded_shape((10, 4), p) == (12, 4)
    assert universal_shape((12, 4), Pattern()) == (12, 4)
    assert padded_shape((), Pattern()) == ()


# --------------------------------------------------------------------------- the header

LAYOUT = Layout.from_sizes(dp=2, tp=2, zero=1)


def _meta(key, shape, dtype="float32", pattern=Pattern(), **kw):
    return ArrayMeta(array_path(key), tuple(shape), dtype, chunk_shape(tuple(shape), 4), pattern, **kw)


def header(**changes) -> UniversalHeader:
    tensors = {
        "model/w": _meta("model/w", (4, 6), pattern=Pattern((Shard("tp", 0),)), metadata_crc32c=123),
        "model/qkv": _meta("model/qkv", (6, 4), "bfloat16",
                           Pattern((Shard("tp", 0),), fused=Fused(0, (("q", 2), ("k", 2), ("v", 2))))),
        "model/emb": _meta("model/emb", (9, 4), pattern=Pattern((Shard("tp", 0),), pad=Pad(0, 10, 9)), compressor="zstd"),
        "optim/w/exp_avg": _meta("optim/w/exp_avg", (4, 6), pattern=Pattern((Shard("tp", 0),), flat="dp")),
        "optim/w/step": _meta("optim/w/step", (), "int64", metadata_crc32c=2**32 - 1),
        "extra/empty": _meta("extra/empty", (0, 3), "uint8"),
    }
    fields = dict(step=7, source_layout=LAYOUT, tensors=tensors,
                  state={"shared": {"epoch": 3}, "ranks": {"0": {"seed": 1}}},
                  source={"format": "ucp.checkpoint", "path": "/x/step_00000007"},
                  fragment_table={"file": "fragments.parquet", "crc32c": 99, "rows": 12},
                  spec="ucl 1\nsource layout dp=2 tp=2 zero=1\n", created_by="ucp tests")
    fields.update(changes)
    return UniversalHeader(**fields)


def test_header_round_trips_through_json():
    h = header()
    h.validate()
    doc = json.loads(json.dumps(h.to_dict()))
    assert doc["format"] == FORMAT and doc["format_version"] == FORMAT_VERSION
    assert doc["tensors"]["model/qkv"]["data_type"] == "uint16" and doc["tensors"]["model/qkv"]["dtype"] == "bfloat16"
    back = UniversalHeader.from_dict(doc)
    assert back == h
    assert back.to_dict() == h.to_dict()


def test_header_nbytes_counts_true_dtypes():
    h = header()
    assert h.tensors["model/qkv"].nbytes == 6 * 4 * 2
    assert h.tensors["optim/w/step"].nbytes == 8
    assert h.tensors["extra/empty"].nbytes == 0
    assert h.nbytes == sum(a.nbytes for a in h.tensors.values())


def test_a_newer_minor_version_is_read():
    doc = header().to_dict()
    doc["format_version"] = "1.9"
    assert UniversalHeader.from_dict(doc).format_version == "1.9"


def test_header_without_a_spec_is_valid():
    header(spec=None).validate()


def _doc_with(edit) -> dict:
    doc = copy.deepcopy(header().to_dict())
    edit(doc)
    return doc


# Each MUST rule, broken alone, in the document a reader sees; the error must name the culprit.
DOC_VIOLATIONS = [
    ("not ucp", lambda d: d.update(format="zarr"), "not a ucp universal checkpoint (format is 'zarr')"),
    ("no format", lambda d: d.pop("format"), "format is None"),
    ("bad version", lambda d: d.update(format_version="1"), "format_version '1' is not of the form"),
    ("no version", lambda d: d.pop("format_version"), "format_version None"),
    ("major 2", lambda d: d.update(format_version="2.0"), "format_version 2.0 is not supported"),
    ("negative step", lambda d: d.update(step=-1), "step -1 must be a non-negative integer"),
    ("float step", lambda d: d.update(step=1.0), "step 1.0 must be"),
    ("bool step", lambda d: d.update(step=True), "step True must be"),
    ("no step", lambda d: d.pop("step"), "lacks field 'step'"),
    ("no layout", lambda d: d.pop("source_layout"), "lacks field 'source_layout'"),
    ("bad layout", lambda d: d.update(source_layout={"axes": [["TP", 2]]}), "axis name 'TP'"),
    ("no tensors", lambda d: d.pop("tensors"), "lacks field 'tensors'"),
    ("tensors list", lambda d: d.update(tensors=[]), "'tensors' must be an object"),
    ("bad key", lambda d: d["tensors"].update(bogus=d["tensors"]["model/w"]), "tensor key 'bogus' is malformed"),
    ("path mismatch", lambda d: d["tensors"]["model/w"].update(path="model/v"),
     "model/w: path 'model/v', expected 'model/w'"),
    ("optim path", lambda d: d["tensors"]["optim/w/exp_avg"].update(path="optim/w/exp_avg"),
     "expected 'optim/exp_avg/w'"),
    ("unknown dtype", lambda d: d["tensors"]["model/w"].update(dtype="float7"), "model/w: unknown dtype 'float7'"),
    ("data_type not the stored type", lambda d: d["tensors"]["model/w"].update(data_type="int32"),
     "model/w: data_type 'int32', but dtype float32 is stored as 'float32'"),
    ("bfloat16 data_type as itself",
     lambda d: d["tensors"]["optim/w/exp_avg"].update(dtype="bfloat16", data_type="bfloat16"),
     "optim/w/exp_avg: data_type 'bfloat16', but dtype bfloat16 is stored as 'uint16'"),
    ("no data_type", lambda d: d["tensors"]["model/w"].pop("data_type"), "'model/w': malformed entry"),
    ("crc as text", lambda d: d["tensors"]["model/w"].update(metadata_crc32c="123"), "'model/w': malformed entry"),
    ("chunk rank", lambda d: d["tensors"]["model/w"].update(chunks=[4]), "model/w: chunks [4] do not fit shape [4, 6]"),
    ("zero chunk", lambda d: d["tensors"]["model/w"].update(chunks=[0, 6]), "chunks [0, 6] do not fit"),
    ("negative dim", lambda d: d["tensors"]["model/w"].update(shape=[-4, 6]), "do not fit shape [-4, 6]"),
    ("float shape", lambda d: d["tensors"]["model/w"].update(shape=[4.0, 6]), "'model/w': malformed entry"),
    ("bool chunks", lambda d: d["tensors"]["model/w"].update(chunks=[True, 6]), "'model/w': malformed entry"),
    ("no path", lambda d: d["tensors"]["model/w"].pop("path"), "'model/w': malformed entry"),
    ("no crc", lambda d: d["tensors"]["model/w"].pop("metadata_crc32c"), "'model/w': malformed entry"),
    ("entry not object", lambda d: d["tensors"].update({"model/w": 5}), "'model/w': malformed entry"),
    ("compressor", lambda d: d["tensors"]["model/emb"].update(compressor="lz4"), "model/emb: unknown compressor 'lz4'"),
    ("crc too big", lambda d: d["tensors"]["model/w"].update(metadata_crc32c=2**32), "model/w: metadata_crc32c out of range"),
    ("crc negative", lambda d: d["tensors"]["model/w"].update(metadata_crc32c=-1), "model/w: metadata_crc32c out of range"),
    ("axis not in layout", lambda d: d["tensors"]["model/w"]["pattern"].update(shards=[["ep", 0]]),
     "model/w: pattern for model/w shards over axis 'ep', which the layout ['dp', 'tp'] lacks"),
    ("flat axis not in layout", lambda d: d["tensors"]["optim/w/exp_avg"]["pattern"].update(flat="pp"),
     "partitions over axis 'pp'"),
    ("shard dim outside", lambda d: d["tensors"]["model/w"]["pattern"].update(shards=[["tp", 2]]),
     "shards dim 2, outside a tensor of shape [4, 6]"),
    ("fused sizes", lambda d: d["tensors"]["model/qkv"]["pattern"]["fused"].update(parts=[["q", 2], ["k", 2]]),
     "model/qkv: fused sizes for model/qkv sum to 4 but dim 0 has 6"),
    ("pad keep", lambda d: d["tensors"]["model/emb"]["pattern"]["pad"].update(keep=11),
     "model/emb: padding for model/emb (dim=0, to=10, keep=11)"),
    ("pad keep is not the universal size", lambda d: d["tensors"]["model/emb"]["pattern"]["pad"].update(keep=5, to=10),
     "model/emb"),
    ("unknown pattern field", lambda d: d["tensors"]["model/w"]["pattern"].update(tiled=1), "unknown field(s) ['tiled']"),
    ("no fragment_table", lambda d: d.pop("fragment_table"), "lacks field 'fragment_table'"),
    ("empty fragment_table", lambda d: d.update(fragment_table={}), "'fragment_table' must give file, rows and crc32c"),
    ("fragment_table rows", lambda d: d["fragment_table"].pop("rows"), "'fragment_table' must give file, rows and crc32c"),
    ("fragment_table str rows", lambda d: d["fragment_table"].update(rows="12"), "'fragment_table' must give"),
    ("escaping table", lambda d: d["fragment_table"].update(file="../fragments.parquet"),
     "file name '../fragments.parquet' is not a plain file name"),
    ("state keys", lambda d: d.update(state={"shared": {}, "global": {}}), "state must be an object with 'shared'"),
    ("state ranks a list", lambda d: d.update(state={"shared": {}, "ranks": [1]}), "'ranks' (rank number -> object)"),
    ("table rows a bool", lambda d: d["fragment_table"].update(rows=True), "'fragment_table' must give"),
    ("state list", lambda d: d.update(state=[]), "state must be an object"),
    ("spec not text", lambda d: d.update(spec=5), "spec must be the UCL text or null"),
]


@pytest.mark.parametrize("edit, message", [v[1:] for v in DOC_VIOLATIONS], ids=[v[0] for v in DOC_VIOLATIONS])
def test_each_must_rule_rejects_its_violation(edit, message):
    doc = _doc_with(edit)
    with pytest.raises(FormatError) as e:
        UniversalHeader.from_dict(doc)
    assert message in str(e.value)


def test_from_dict_rejects_a_non_object():
    with pytest.raises(FormatError, match="not a ucp universal checkpoint"):
        UniversalHeader.from_dict([1, 2])


def test_validate_enforces_the_rules_on_a_built_header():
    """validate() alone (as a writer calls it) catches what from_dict catches."""
    bad = [
        header(step=-3),
        header(format_version="2.1"),
        header(fragment_table={"file": "t.parquet", "rows": 1}),
        header(tensors={"model/w": ArrayMeta("model/W", (2,), "float32", (2,))}),
        header(tensors={"model/w": ArrayMeta("model/w", (2,), "float32", (2,), Pattern((Shard("pp", 0),)))}),
    ]
    for h in bad:
        with pytest.raises(FormatError):
            h.validate()


def test_padding_rule_names_keep_and_the_universal_size():
    """The universal array holds exactly the ``keep`` real rows of a padded dim."""
    h = header(tensors={"model/emb": _meta("model/emb", (10, 4), pattern=Pattern(pad=Pad(0, 12, 9)))})
    with pytest.raises(FormatError, match=r"model/emb.*keep=9.*10"):
        h.validate()


def test_a_chunk_larger_than_its_array_is_rejected():
    doc = _doc_with(lambda d: None)
    key = next(iter(doc["tensors"]))
    doc["tensors"][key]["chunks"] = [2**40] * len(doc["tensors"][key]["shape"])
    with pytest.raises(FormatError, match="do not fit shape"):
        UniversalHeader.from_dict(doc)
