"""Manifest and TensorMeta: the MUST rules of the checkpoint format, and header/table round trips."""

from __future__ import annotations

import copy
import dataclasses
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import FormatError, SpecError, UcpError
from ucp.format import (
    FORMAT_VERSION,
    Box,
    FlatRange,
    Fragment,
    Fused,
    Layout,
    Manifest,
    Pad,
    Pattern,
    Shard,
    TensorMeta,
    local_box,
)
from ucp.format.dtypes import itemsize
from ucp.format.fragment import fragments_from_parquet, fragments_to_parquet
from ucp.format.manifest import FORMAT, check_version, header_from_json, header_to_json
from ucp.format.pattern import chunk_bounds

# --------------------------------------------------------------------------- a builder of valid manifests


JSON_VERSION = "1.2"  # the last version whose header holds every file and every rank's state

def build(layout: Layout, tensors: dict, *, step: int = 7, keep_empty: bool = True) -> Manifest:
    """A valid manifest: every tensor written once, by the ranks at coordinate 0 of its replica axes."""
    files: dict[str, int] = {}
    frags = []
    for key, meta in tensors.items():
        p = meta.pattern
        split = {s.axis for s in p.shards} | ({p.flat} if p.flat else set())
        for r in range(layout.world_size):
            c = layout.coords(r)
            if any(c[a] for a in layout.names if a not in split):
                continue  # a replica, not written
            box = local_box(p, meta.shape, layout.sizes, c)
            flat = None
            if p.flat:
                lo, hi = chunk_bounds(box.numel, layout.size(p.flat), c[p.flat])
                flat = FlatRange(lo, hi - lo)
            numel = flat.numel if flat else box.numel
            if not numel and not keep_empty:
                continue
            name = f"rank{r:05d}.safetensors"
            off = files.get(name, 0)
            length = numel * itemsize(meta.dtype)
            frags.append(Fragment(key, box, flat, meta.dtype, r, name, off, length, (r * 7919 + off) % 2**32))
            files[name] = off + length
    state = {"shared": {"epoch": 3, "lr": 0.5}, "ranks": {str(r): {"seed": r} for r in range(layout.world_size)}}
    # (the header's JSON form of 1.2, which readers still read: the data model's rules are the same in
    # 1.3, whose header moves files and rank state into paged tables: tests/storage/test_manifest_io.py)
    return Manifest(step, layout, tensors, tuple(frags), state=state, files=files, created_by="ucp tests",
                    format_version=JSON_VERSION)


LAYOUT = Layout.from_sizes(dp=2, tp=2, zero=1)
TENSORS = {
    "model/w": TensorMeta((4, 6), "float32", Pattern(shards=(Shard("tp", 0),))),
    "model/qkv": TensorMeta((6, 4), "float16", Pattern(shards=(Shard("tp", 0),), fused=Fused(0, (("q", 2), ("k", 2), ("v", 2))))),
    "model/emb": TensorMeta((10, 4), "bfloat16", Pattern(shards=(Shard("tp", 0),), pad=Pad(0, 10, 9))),
    "model/b": TensorMeta((3,), "float32", Pattern(shards=(Shard("dp", 0),))),
    "optim/w/exp_avg": TensorMeta((4, 6), "float32", Pattern(shards=(Shard("tp", 0),), flat="dp")),
    "optim/w/step": TensorMeta((), "int64"),
    "extra/rng": TensorMeta((5,), "uint8"),
}


@pytest.fixture
def m() -> Manifest:
    manifest = build(LAYOUT, TENSORS)
    manifest.validate()
    return manifest


def with_fragment(m: Manifest, i: int, **kw) -> Manifest:
    frags = list(m.fragments)
    frags[i] = dataclasses.replace(frags[i], **kw)
    return dataclasses.replace(m, fragments=tuple(frags))


def index_of(m: Manifest, key: str, rank: int) -> int:
    return next(i for i, f in enumerate(m.fragments) if f.key == key and f.rank == rank)


def small(fragments, shape=(4,), dtype="float32") -> Manifest:
    """A one-tensor manifest over dp=4 whose fragments all live in one file."""
    files = {"data.bin": 10**6}
    return Manifest(1, Layout.from_sizes(dp=4), {"model/x": TensorMeta(shape, dtype)}, tuple(fragments), files=files,
                    format_version=JSON_VERSION)


def f(box: Box, flat: FlatRange | None = None, rank: int = 0, offset: int = 0) -> Fragment:
    numel = flat.numel if flat else box.numel
    return Fragment("model/x", box, flat, "float32", rank, "data.bin", offset, 4 * numel, 0)


# --------------------------------------------------------------------------- valid manifests


def test_builder_manifest_is_valid(m):
    assert FORMAT_VERSION == "1.3" and m.format_version == JSON_VERSION == "1.2"
    assert len(m.fragments_of("model/w")) == 2  # one per tp rank, dp replicas not written
    assert len(m.fragments_of("optim/w/exp_avg")) == 4  # tp x flat(dp)
    assert len(m.fragments_of("optim/w/step")) == 1
    assert {fr.rank for fr in m.fragments_of("model/w")} == {0, 1}
    assert m.nbytes == sum(m.files.values())
    assert m.nbytes == sum(Box.full(t.shape).numel * itemsize(t.dtype) for t in TENSORS.values())


def test_fragments_of_unknown_key_is_empty(m):
    assert m.fragments_of("model/nope") == []


def test_minor_version_bump_is_accepted(m):
    dataclasses.replace(m, format_version="1.7").validate()


def test_header_contents(m):
    table = {"file": "fragments.parquet", "crc32c": 1234, "rows": len(m.fragments)}
    h = m.header(table)
    assert h["format"] == FORMAT == "ucp.checkpoint"
    assert h["format_version"] == "1.2"
    assert h["step"] == 7
    assert h["created_by"] == "ucp tests"
    assert h["layout"] == LAYOUT.to_dict()
    assert h["tensors"]["model/w"] == {"shape": [4, 6], "dtype": "float32", "pattern": {"shards": [["tp", 0]]}}
    assert h["tensors"]["optim/w/step"] == {"shape": [], "dtype": "int64", "pattern": {}}
    assert h["fragment_table"] == table
    assert h["files"] == m.files
    assert h["state"] == m.state


def test_header_json_parquet_round_trip(m):
    table = {"file": "fragments.parquet", "crc32c": 99, "rows": len(m.fragments)}
    data = header_to_json(m.header(table))
    assert isinstance(data, bytes)
    header = header_from_json(data, "manifest.json")
    assert header["fragment_table"] == table
    frags = fragments_from_parquet(fragments_to_parquet(m.fragments))
    back = Manifest.from_header(header, frags)
    assert back == m
    assert isinstance(back.fragments, tuple)


def test_from_header_defaults_for_optional_fields(m):
    h = json.loads(header_to_json(m.header({})))
    del h["state"], h["created_by"]
    back = Manifest.from_header(h, m.fragments)
    assert back.state == {"shared": {}, "ranks": {}}
    assert back.created_by == ""


@st.composite
def cases(draw):
    names = draw(st.lists(st.sampled_from(["pp", "dp", "tp", "ep"]), min_size=1, max_size=3, unique=True))
    layout = Layout(tuple((n, draw(st.integers(1, 3))) for n in names), zero=draw(st.integers(0, 3)))
    tensors = {}
    for i in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        axes = draw(st.lists(st.sampled_from(names), unique=True, max_size=2)) if shape else []
        shards = tuple(Shard(a, draw(st.integers(0, len(shape) - 1))) for a in axes)
        flat = draw(st.none() | st.sampled_from([n for n in names if n not in axes] or [None]))
        dtype = draw(st.sampled_from(["float32", "bfloat16", "int8", "float64"]))
        tensors[f"model/t{i}"] = TensorMeta(shape, dtype, Pattern(shards=shards, flat=flat))
    return layout, tensors, draw(st.booleans())


@settings(max_examples=40, deadline=None)
@given(cases())
def test_random_sharded_manifests_validate_and_round_trip(case):
    layout, tensors, keep_empty = case
    m = build(layout, tensors, keep_empty=keep_empty)
    m.validate()
    header = header_from_json(header_to_json(m.header({"rows": len(m.fragments)})), "manifest.json")
    assert Manifest.from_header(header, fragments_from_parquet(fragments_to_parquet(m.fragments))) == m


def test_empty_fragments_with_equal_boxes_are_not_an_overlap():
    # shape (1,) split over dp=2 then tp=2: three ranks hold the same empty box [1:1]
    layout = Layout.from_sizes(dp=2, tp=2)
    tensors = {"model/tiny": TensorMeta((1,), "float32", Pattern(shards=(Shard("dp", 0), Shard("tp", 0))))}
    m = build(layout, tensors)
    empties = [fr for fr in m.fragments if fr.numel == 0]
    assert len(empties) == 3 and len({fr.box for fr in empties}) == 1
    m.validate()


# --------------------------------------------------------------------------- TensorMeta


def test_tensor_meta_round_trip():
    for meta in TENSORS.values():
        assert TensorMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    assert TensorMeta.from_dict({"shape": [2], "dtype": "float32"}) == TensorMeta((2,), "float32", Pattern())


@pytest.mark.parametrize(
    "d",
    [{"dtype": "float32"}, {"shape": [2]}, {"shape": ["a"], "dtype": "float32"}, {"shape": 3, "dtype": "float32"},
     {"shape": [2], "dtype": "float32", "pattern": {"bogus": 1}}, None],
    ids=["no-shape", "no-dtype", "shape-str", "shape-int", "bad-pattern", "none"],
)
def test_tensor_meta_malformed(d):
    with pytest.raises(FormatError, match=re.escape("tensor 'model/w': malformed entry")):
        TensorMeta.from_dict(d, "model/w")


# --------------------------------------------------------------------------- check_version


@pytest.mark.parametrize("found", ["2.0", "2.1", "10.0", "0.9"])
def test_unknown_major_version(found):
    with pytest.raises(FormatError, match=re.escape(f"format_version {found} is not supported by this ucp (reads 1.x); upgrade ucp")):
        check_version(found, "1.0", "checkpoint manifest")


@pytest.mark.parametrize("found", [None, 1.0, "", "v1.0", "x.y"])
def test_malformed_version(found):
    with pytest.raises(FormatError, match=re.escape(f"format_version {found!r} is not of the form 'MAJOR.MINOR'")):
        check_version(found, "1.0", "checkpoint manifest")


# --------------------------------------------------------------------------- validate: header-level rules


def test_validate_rejects_major_version_2(m):
    with pytest.raises(FormatError, match="checkpoint manifest: format_version 2.0 is not supported.*upgrade"):
        dataclasses.replace(m, format_version="2.0").validate()


@pytest.mark.parametrize("step", [-1, True, "7", 7.0, None])
def test_validate_bad_step(m, step):
    with pytest.raises(FormatError, match=re.escape(f"manifest step {step!r} must be a non-negative integer")):
        dataclasses.replace(m, step=step).validate()


@pytest.mark.parametrize("step, shown", [(10 ** 30, repr(10 ** 30)), (1 << 63, repr(1 << 63)),
                                         (10 ** 4000, "of about 4000 digits")])
def test_validate_refuses_an_absurd_step_in_one_line(m, step, shown):
    # issue 17, item 9: steps are int64; a step of 10^30 (or of 4,000 digits) is refused, one line
    with pytest.raises(FormatError, match=re.escape(f"manifest step {shown} must be a non-negative integer below 2^63")) as e:
        dataclasses.replace(m, step=step).validate()
    assert "\n" not in str(e.value) and len(str(e.value)) < 120
    dataclasses.replace(m, step=(1 << 63) - 1).validate()


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/b", ".hidden", "..", ".", ""])
def test_validate_file_name_escaping_the_directory(m, name):
    with pytest.raises(FormatError, match=re.escape(f"file name {name!r} is not a plain file name inside the checkpoint directory")):
        dataclasses.replace(m, files={**m.files, name: 0}).validate()


@pytest.mark.parametrize("name", ["../x.safetensors", "/etc/passwd", "a/b", ".hidden"])
def test_validate_fragment_file_escaping_the_directory(m, name):
    # the fragment's file is not listed either: the escape is what gets reported
    with pytest.raises(FormatError, match=re.escape(f"file name {name!r} is not a plain file name")):
        with_fragment(m, 0, file=name).validate()


@pytest.mark.parametrize("size", [-1, 1.5, "10", None])
def test_validate_bad_file_size(m, size):
    name = next(iter(m.files))
    with pytest.raises(FormatError, match=re.escape(f"manifest file {name}: size {size!r} must be a non-negative integer")):
        dataclasses.replace(m, files={**m.files, name: size}).validate()


def test_validate_malformed_tensor_key(m):
    tensors = {**m.tensors, "weights/w": TensorMeta((1,), "float32")}
    with pytest.raises(SpecError, match=re.escape("tensor key 'weights/w' is malformed")):
        dataclasses.replace(m, tensors=tensors).validate()


def test_validate_unknown_tensor_dtype(m):
    tensors = {**m.tensors, "extra/rng": TensorMeta((5,), "uint4")}
    with pytest.raises(FormatError, match=re.escape("tensor extra/rng: unknown dtype 'uint4'")):
        dataclasses.replace(m, tensors=tensors).validate()


def test_validate_negative_shape(m):
    tensors = {**m.tensors, "extra/rng": TensorMeta((5, -1), "uint8")}
    with pytest.raises(FormatError, match=re.escape("tensor extra/rng: negative size in shape [5, -1]")):
        dataclasses.replace(m, tensors=tensors).validate()


def test_validate_pattern_axis_not_in_layout(m):
    tensors = {**m.tensors, "model/w": TensorMeta((4, 6), "float32", Pattern(shards=(Shard("pp", 0),)))}
    with pytest.raises(SpecError, match=re.escape("pattern for model/w shards over axis 'pp', which the layout ['dp', 'tp'] lacks")):
        dataclasses.replace(m, tensors=tensors).validate()


def test_validate_pattern_fused_sizes(m):
    bad = Pattern(shards=(Shard("tp", 0),), fused=Fused(0, (("q", 2), ("k", 2))))
    tensors = {**m.tensors, "model/qkv": TensorMeta((6, 4), "float16", bad)}
    with pytest.raises(SpecError, match=re.escape("fused sizes for model/qkv sum to 4 but dim 0 has 6")):
        dataclasses.replace(m, tensors=tensors).validate()


def test_validate_bad_state(m):
    with pytest.raises(FormatError, match="manifest state must be an object with 'shared' and 'ranks'"):
        dataclasses.replace(m, state={"shared": {}, "ranks": {}, "other": 1}).validate()
    with pytest.raises(FormatError, match="manifest state must be an object"):
        dataclasses.replace(m, state=[1]).validate()


# --------------------------------------------------------------------------- validate: fragment rules


def test_validate_fragment_of_unknown_tensor(m):
    i = index_of(m, "model/w", 1)
    with pytest.raises(FormatError, match=re.escape(f"fragment in {m.fragments[i].file} names tensor 'model/ghost', which the manifest does not list")):
        with_fragment(m, i, key="model/ghost").validate()


def test_validate_fragment_file_not_listed(m):
    with pytest.raises(FormatError, match=re.escape("fragment of model/w names file 'other.safetensors', which the manifest does not list")):
        with_fragment(m, index_of(m, "model/w", 0), file="other.safetensors").validate()


def test_validate_fragment_past_end_of_file(m):
    i = index_of(m, "model/w", 1)
    fr = m.fragments[i]
    with pytest.raises(FormatError, match=re.escape(f"fragment of model/w ends at byte {fr.offset + fr.length}, past the end of {fr.file}")):
        dataclasses.replace(m, files={**m.files, fr.file: fr.offset + fr.length - 1}).validate()
    with pytest.raises(FormatError, match="past the end of"):
        with_fragment(m, i, offset=m.files[fr.file]).validate()


def test_validate_dtype_mismatch(m):
    i = index_of(m, "model/w", 1)
    fr = m.fragments[i]
    with pytest.raises(FormatError, match=re.escape(f"fragment of model/w in {fr.file} has dtype float16, tensor has float32")):
        with_fragment(m, i, dtype="float16", length=fr.length // 2).validate()


def test_validate_box_outside_shape(m):
    i = index_of(m, "model/w", 1)  # box [2:4,0:6]
    assert m.fragments[i].box == Box((2, 0), (2, 6))
    with pytest.raises(FormatError, match=re.escape("box [3:5,0:6] outside shape [4, 6]")):
        with_fragment(m, i, box=Box((3, 0), (2, 6))).validate()
    with pytest.raises(FormatError, match=re.escape("box [0:12] outside shape [4, 6]")):
        with_fragment(m, i, box=Box((0,), (12,)), length=48).validate()


def test_validate_rank_past_world_size(m):
    i = index_of(m, "model/w", 1)
    with pytest.raises(FormatError, match=re.escape("fragment of model/w written by rank 4, layout has 4 ranks")):
        with_fragment(m, i, rank=4).validate()


def test_validate_wrong_byte_length(m):
    i = index_of(m, "model/w", 1)
    fr = m.fragments[i]
    with pytest.raises(SpecError, match=re.escape(f"fragment of model/w in {fr.file}: {fr.length - 4} bytes recorded, {fr.length} expected")):
        with_fragment(m, i, length=fr.length - 4).validate()


def test_validate_flat_range_past_its_box(m):
    i = index_of(m, "optim/w/exp_avg", 3)
    assert m.fragments[i].flat == FlatRange(6, 6)
    with pytest.raises(SpecError, match=re.escape("flat range {8:14} exceeds box [2:4,0:6] (12 elements)")):
        with_fragment(m, i, flat=FlatRange(8, 6)).validate()


def test_validate_coverage_hole(m):
    frags = tuple(fr for fr in m.fragments if not (fr.key == "model/w" and fr.rank == 1))
    with pytest.raises(FormatError, match=re.escape("tensor model/w: fragments hold 12 elements, the tensor has 24")):
        dataclasses.replace(m, fragments=frags).validate()


def test_validate_tensor_without_fragments(m):
    frags = tuple(fr for fr in m.fragments if fr.key != "optim/w/step")
    with pytest.raises(FormatError, match=re.escape("tensor optim/w/step: fragments hold 0 elements, the tensor has 1")):
        dataclasses.replace(m, fragments=frags).validate()


def test_validate_duplicate_fragment_is_too_many_elements(m):
    extra = m.fragments[index_of(m, "model/w", 1)]
    with pytest.raises(FormatError, match=re.escape("tensor model/w: fragments hold 36 elements, the tensor has 24")):
        dataclasses.replace(m, fragments=m.fragments + (extra,)).validate()


def test_small_helper_is_valid():
    small([f(Box((0,), (2,))), f(Box((2,), (2,)), offset=8)]).validate()
    small([f(Box((0,), (4,)), FlatRange(0, 3)), f(Box((0,), (4,)), FlatRange(3, 1), offset=12)]).validate()


def test_validate_same_box_twice():
    with pytest.raises(FormatError, match=re.escape("tensor model/x: fragments in data.bin and data.bin overlap at box [0:2]")):
        small([f(Box((0,), (2,))), f(Box((0,), (2,)), offset=8)]).validate()


def test_validate_overlapping_boxes():
    with pytest.raises(FormatError, match=re.escape("overlap at [1:2]")):
        small([f(Box((0,), (3,))), f(Box((1,), (1,)), offset=12)]).validate()
    # 4 + 4 + 1 == 9 elements, but [1:2,1:2] is held twice (and [2:3,0:1] never)
    with pytest.raises(FormatError, match=re.escape("overlap at [1:2,1:2]")):
        small([f(Box((0, 0), (2, 2))), f(Box((1, 1), (2, 2)), offset=16), f(Box((0, 2), (1, 1)), offset=32)],
              shape=(3, 3)).validate()


def test_validate_overlapping_flat_ranges():
    full = Box((0,), (4,))
    with pytest.raises(FormatError, match=re.escape("tensor model/x: flat ranges {0:2} (data.bin) and {1:3} (data.bin) of box [0:4] overlap")):
        small([f(full, FlatRange(0, 2)), f(full, FlatRange(1, 2), offset=8)]).validate()


def test_validate_flat_and_whole_box_overlap():
    with pytest.raises(FormatError, match=re.escape("overlap at box [0:2]")):
        small([f(Box((0,), (2,)), FlatRange(0, 2)), f(Box((0,), (2,)), offset=8)]).validate()


def test_validate_adjacent_flat_ranges_do_not_overlap():
    full = Box((0,), (4,))
    small([f(full, FlatRange(0, 2)), f(full, FlatRange(2, 0), offset=8), f(full, FlatRange(2, 2), offset=8)]).validate()


def test_every_validation_error_is_a_ucp_error(m):
    for bad in (dataclasses.replace(m, step=-1), with_fragment(m, 0, length=1), with_fragment(m, 0, rank=99)):
        with pytest.raises(UcpError):
            bad.validate()


# --------------------------------------------------------------------------- from_header errors


@pytest.fixture
def header(m) -> dict:
    return json.loads(header_to_json(m.header({"file": "fragments.parquet", "crc32c": 0, "rows": len(m.fragments)})))


@pytest.mark.parametrize("fmt", ["ucp.other", None, ""])
def test_from_header_wrong_format(m, header, fmt):
    header["format"] = fmt
    with pytest.raises(FormatError, match=re.escape(f"not a ucp checkpoint manifest (format is {fmt!r})")):
        Manifest.from_header(header, m.fragments)


def test_from_header_missing_format(m, header):
    del header["format"]
    with pytest.raises(FormatError, match=re.escape("not a ucp checkpoint manifest (format is None)")):
        Manifest.from_header(header, m.fragments)


@pytest.mark.parametrize("header_value", [[1, 2], "ucp.checkpoint", None])
def test_from_header_not_an_object(m, header_value):
    with pytest.raises(FormatError, match=re.escape("not a ucp checkpoint manifest (format is None)")):
        Manifest.from_header(header_value, m.fragments)


def test_from_header_major_version(m, header):
    header["format_version"] = "2.0"
    with pytest.raises(FormatError, match="format_version 2.0 is not supported.*upgrade ucp to read it"):
        Manifest.from_header(header, m.fragments)


def test_from_header_missing_version(m, header):
    del header["format_version"]
    with pytest.raises(FormatError, match=re.escape("format_version None is not of the form")):
        Manifest.from_header(header, m.fragments)


@pytest.mark.parametrize("field", ["step", "layout", "tensors", "files"])
def test_from_header_missing_field(m, header, field):
    del header[field]
    with pytest.raises(FormatError, match=re.escape(f"checkpoint manifest lacks field {field!r}")):
        Manifest.from_header(header, m.fragments)


def test_from_header_malformed_layout(m, header):
    header["layout"]["axes"].append(["dp", 2])
    with pytest.raises(FormatError, match=re.escape("checkpoint manifest is malformed: layout axis 'dp' appears twice")):
        Manifest.from_header(header, m.fragments)


def test_from_header_malformed_tensor(m, header):
    header["tensors"]["model/w"]["shape"] = "big"
    with pytest.raises(FormatError, match=re.escape("tensor 'model/w': malformed entry")):
        Manifest.from_header(header, m.fragments)


def test_from_header_tensors_not_an_object(m, header):
    header["tensors"] = [1]
    with pytest.raises(FormatError, match="checkpoint manifest is malformed"):
        Manifest.from_header(header, m.fragments)


def test_from_header_validates(m, header):
    name = next(iter(header["files"]))
    header["files"][name] -= 1
    with pytest.raises(FormatError, match=re.escape(f"past the end of {name}")):
        Manifest.from_header(header, m.fragments)
    header["files"][name] += 1
    with pytest.raises(FormatError, match="fragments hold"):
        Manifest.from_header(header, m.fragments[1:])


def test_from_header_does_not_mutate_its_input(m, header):
    before = copy.deepcopy(header)
    Manifest.from_header(header, m.fragments)
    assert header == before


# --------------------------------------------------------------------------- header JSON


@pytest.mark.parametrize("data", [b"", b"{", b"garbage", b"\xff\xfe\x00"], ids=["empty", "truncated", "text", "not-utf8"])
def test_header_from_json_garbage(data):
    with pytest.raises(FormatError, match=re.escape("ckpt/manifest.json is not valid JSON")):
        header_from_json(data, "ckpt/manifest.json")


def test_header_to_json_is_utf8_json(m):
    data = header_to_json(m.header({}))
    assert json.loads(data.decode("utf-8"))["format"] == "ucp.checkpoint"


def test_validate_flat_fragment_overlapping_another_box():
    # box [0:4] held by flat ranges, box [2:4] held whole: elements 2..3 twice, 4..5 never
    with pytest.raises(FormatError, match=re.escape("overlap at [2:4]")):
        small([f(Box((0,), (4,)), FlatRange(0, 4)), f(Box((2,), (2,)), offset=16)], shape=(6,)).validate()


def test_validate_flat_ranges_leaving_a_hole_in_their_box():
    # flat ranges hold 3 of box [0:4]'s 4 elements: the element count gives the hole away
    with pytest.raises(FormatError, match=re.escape("fragments hold 4 elements, the tensor has 5")):
        small([f(Box((0,), (4,)), FlatRange(0, 3)), f(Box((4,), (1,)), offset=12)], shape=(5,)).validate()


def test_validate_many_fragments_are_checked():
    # 600 row shards, one shifted onto its neighbour: caught without a pairwise limit
    frags = [f(Box((i,), (1,)), offset=4 * i) for i in range(600)]
    frags[300] = f(Box((299,), (1,)), offset=1200)
    with pytest.raises(FormatError):
        small(frags, shape=(600,)).validate()
