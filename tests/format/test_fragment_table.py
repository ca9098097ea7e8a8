"""Fragments, file-name safety, dtypes, and the Arrow/Parquet fragment table."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import FormatError, SpecError
from ucp.format import Box, FlatRange, Fragment
from ucp.format.dtypes import DTYPES, SAFETENSORS_TO_NAME, itemsize
from ucp.format.fragment import (
    FRAGMENT_SCHEMA,
    check_file_name,
    fragments_from_parquet,
    fragments_to_parquet,
    fragments_to_table,
    table_to_fragments,
)


def frag(**kw) -> Fragment:
    d = dict(key="model/w", box=Box((0, 0), (2, 3)), flat=None, dtype="float32", rank=0,
             file="rank0.safetensors", offset=0, length=24, crc32c=0)
    d.update(kw)
    return Fragment(**d)


# --------------------------------------------------------------------------- dtypes


def test_itemsize():
    assert itemsize("float32") == 4
    assert itemsize("bfloat16") == 2
    assert itemsize("int64") == 8
    assert itemsize("bool") == 1
    assert itemsize("complex64") == 8
    assert itemsize("float8_e4m3fn") == 1


def test_itemsize_unknown():
    with pytest.raises(SpecError, match=re.escape("unknown dtype 'float128'")):
        itemsize("float128")


def test_safetensors_codes_are_a_bijection():
    assert len(SAFETENSORS_TO_NAME) == len(DTYPES)
    for name, (_, code) in DTYPES.items():
        assert SAFETENSORS_TO_NAME[code] == name


def test_itemsizes_match_torch():
    import torch

    for name, (size, _) in DTYPES.items():
        assert getattr(torch, name).itemsize == size, name


# --------------------------------------------------------------------------- file names


@pytest.mark.parametrize("name", ["rank0.safetensors", "a", "_x", "0-1_2.bin", "shard.00001-of-00004.safetensors"])
def test_good_file_names(name):
    assert check_file_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["../x.safetensors", "/etc/passwd", "a/b", ".hidden", "..", ".", "", "a\\b", "C:x", "x y", "-rf", "a\nb", None, 3],
)
def test_bad_file_names(name):
    with pytest.raises(FormatError, match=re.escape(f"file name {name!r} is not a plain file name")):
        check_file_name(name)


# --------------------------------------------------------------------------- Fragment


def test_numel_and_region():
    f = frag()
    assert f.numel == 6
    assert f.region == ("model/w", (0, 0), (2, 3), None)
    g = frag(flat=FlatRange(2, 3), length=12)
    assert g.numel == 3
    assert g.region == ("model/w", (0, 0), (2, 3), (2, 3))
    assert frag(box=Box((), ()), length=4).numel == 1


def test_validate_accepts_good_fragments():
    frag().validate()
    frag(flat=FlatRange(4, 2), length=8).validate()
    frag(flat=FlatRange(6, 0), length=0).validate()
    frag(box=Box((), ()), dtype="int64", length=8).validate()
    frag(crc32c=2**32 - 1, offset=10**12, rank=7).validate()


def test_validate_bad_file():
    with pytest.raises(FormatError, match=re.escape("file name '../rank0.safetensors'")):
        frag(file="../rank0.safetensors").validate()


def test_validate_flat_range_past_box():
    with pytest.raises(SpecError, match=re.escape("fragment of model/w: flat range {4:8} exceeds box [0:2,0:3] (6 elements)")):
        frag(flat=FlatRange(4, 4), length=16).validate()


def test_validate_wrong_byte_length():
    with pytest.raises(SpecError, match=re.escape("fragment of model/w in rank0.safetensors: 23 bytes recorded, 24 expected")):
        frag(length=23).validate()
    with pytest.raises(SpecError, match="12 bytes recorded, 24 expected"):
        frag(dtype="float64", length=12, box=Box((0,), (3,))).validate()


def test_validate_unknown_dtype():
    with pytest.raises(SpecError, match="unknown dtype 'f32'"):
        frag(dtype="f32").validate()


@pytest.mark.parametrize("kw", [dict(offset=-1), dict(rank=-1), dict(crc32c=2**32), dict(crc32c=-1)])
def test_validate_negative_or_out_of_range(kw):
    with pytest.raises(SpecError, match="fragment of model/w in rank0.safetensors: negative offset/rank or crc out of range"):
        frag(**kw).validate()


# --------------------------------------------------------------------------- table round trips

KEYS = ["model/w", "optim/w/exp_avg", "extra/step", "model/layers.0.mlp.weight"]
FILES = ["rank0.safetensors", "rank12.safetensors", "x"]


@st.composite
def fragments(draw):
    ndim = draw(st.integers(0, 4))
    box = Box(tuple(draw(st.lists(st.integers(0, 2**40), min_size=ndim, max_size=ndim))),
              tuple(draw(st.lists(st.integers(0, 64), min_size=ndim, max_size=ndim))))
    flat = draw(st.none() | st.builds(FlatRange, st.integers(0, 2**40), st.integers(0, 2**40)))
    return Fragment(
        key=draw(st.sampled_from(KEYS)),
        box=box,
        flat=flat,
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        rank=draw(st.integers(0, 2**31 - 1)),
        file=draw(st.sampled_from(FILES)),
        offset=draw(st.integers(0, 2**62)),
        length=draw(st.integers(0, 2**62)),
        crc32c=draw(st.integers(0, 2**32 - 1)),
        blocks=tuple(draw(st.lists(st.integers(0, 2**32 - 1), max_size=5))),
    )


EXAMPLES = [
    frag(),
    frag(flat=FlatRange(1, 4), length=16, rank=3, crc32c=2**32 - 1),
    frag(key="extra/step", box=Box((), ()), dtype="int64", length=8, file="x", offset=24),
    frag(key="extra/step", box=Box((), ()), flat=FlatRange(0, 1), dtype="int64", length=8),
    frag(box=Box((5, 0), (0, 3)), length=0),
    frag(box=Box((0, 0), (64, 3)), length=768, blocks=(1, 2**32 - 1, 0)),
]


def test_table_schema():
    t = fragments_to_table(EXAMPLES)
    assert t.schema.equals(FRAGMENT_SCHEMA)
    assert t.num_rows == len(EXAMPLES)
    assert t.column("flat_start").to_pylist() == [None, 1, None, 0, None, None]
    assert t.column("block_crc32c").to_pylist()[-2:] == [[], [1, 2**32 - 1, 0]]
    assert t.column("offsets").to_pylist()[2] == []


def test_table_round_trip_examples():
    assert table_to_fragments(fragments_to_table(EXAMPLES)) == EXAMPLES


def test_parquet_round_trip_examples():
    data = fragments_to_parquet(EXAMPLES)
    assert isinstance(data, bytes)
    assert data[:4] == b"PAR1" and data[-4:] == b"PAR1"
    back = fragments_from_parquet(data)
    assert back == EXAMPLES
    assert all(type(f.rank) is int and type(f.crc32c) is int for f in back)


def test_empty_round_trip():
    assert table_to_fragments(fragments_to_table([])) == []
    assert fragments_from_parquet(fragments_to_parquet([])) == []


@settings(max_examples=40, deadline=None)
@given(st.lists(fragments(), max_size=12))
def test_table_and_parquet_round_trip_property(frags):
    assert table_to_fragments(fragments_to_table(frags)) == frags
    assert fragments_from_parquet(fragments_to_parquet(frags)) == frags


# --------------------------------------------------------------------------- malformed tables


@pytest.mark.parametrize("column", [n for n in FRAGMENT_SCHEMA.names if n != "block_crc32c"])
def test_missing_column(column):
    t = fragments_to_table(EXAMPLES).drop_columns([column])
    with pytest.raises(FormatError, match=re.escape(f"fragment table lacks column {column!r}")):
        table_to_fragments(t)


@pytest.mark.parametrize(
    "column, new_type",
    [("rank", pa.int64()), ("crc32c", pa.int64()), ("key", pa.large_string()), ("offsets", pa.list_(pa.int32())),
     ("byte_length", pa.int32())],
)
def test_wrong_column_type(column, new_type):
    t = fragments_to_table(EXAMPLES)
    i = t.schema.get_field_index(column)
    t = t.set_column(i, pa.field(column, new_type), t.column(column).cast(new_type))
    with pytest.raises(FormatError, match=re.escape(f"fragment table column {column!r} has type {new_type}, expected")):
        table_to_fragments(t)


def test_wrong_column_type_survives_parquet():
    t = fragments_to_table(EXAMPLES)
    i = t.schema.get_field_index("rank")
    t = t.set_column(i, pa.field("rank", pa.string()), pa.array([str(f.rank) for f in EXAMPLES]))
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink)
    with pytest.raises(FormatError, match="column 'rank' has type string, expected int32"):
        fragments_from_parquet(sink.getvalue().to_pybytes())


def test_half_null_flat_range():
    t = fragments_to_table(EXAMPLES)
    i = t.schema.get_field_index("flat_numel")
    t = t.set_column(i, FRAGMENT_SCHEMA.field("flat_numel"), pa.array([None] * len(EXAMPLES), pa.int64()))
    with pytest.raises(FormatError, match="fragment table row 1: flat_start and flat_numel must both be set or both null"):
        table_to_fragments(t)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"PAR1", b"PAR1" + b"\x00" * 64 + b"PAR1"],
    ids=["empty", "garbage", "magic-only", "zeros"],
)
def test_garbage_parquet(data):
    with pytest.raises(FormatError, match="fragment table is not a readable Parquet file"):
        fragments_from_parquet(data)


def test_truncated_parquet():
    data = fragments_to_parquet(EXAMPLES)
    with pytest.raises(FormatError, match="not a readable Parquet file"):
        fragments_from_parquet(data[: len(data) // 2])


def test_a_format_1_0_table_without_block_checksums_reads_with_none():
    t = fragments_to_table(EXAMPLES).drop_columns(["block_crc32c"])
    assert table_to_fragments(t) == [Fragment(**{**f.__dict__, "blocks": ()}) for f in EXAMPLES]


def test_block_checksums_must_cover_the_fragment_in_blocks():
    frag(length=768, box=Box((0, 0), (64, 3)), blocks=(1, 2, 3)).check_blocks(256)
    frag().check_blocks(256)  # none: one block or less
    for blocks, size in (((1, 2), 256), ((1, 2, 3), 512), ((1,), 1024), ((1, 2, 3), 0)):
        with pytest.raises(SpecError, match="block checksums for 768 bytes"):
            frag(length=768, box=Box((0, 0), (64, 3)), blocks=blocks).check_blocks(size)


def test_null_in_a_required_column_is_a_format_error():
    import pyarrow as pa

    from ucp.format.fragment import FRAGMENT_SCHEMA, table_to_fragments

    cols = {n: [None] if n in ("flat_start", "flat_numel", "rank") else None for n in FRAGMENT_SCHEMA.names}
    cols.update(key=["model/x"], offsets=[[0]], sizes=[[1]], dtype=["float32"], file=["f"], byte_offset=[0],
                byte_length=[4], crc32c=[0], block_crc32c=[[]])
    with pytest.raises(FormatError, match="'rank' has empty"):
        table_to_fragments(pa.table(cols, schema=FRAGMENT_SCHEMA))


def test_file_name_with_a_trailing_newline_is_rejected():
    from ucp.format.fragment import check_file_name

    with pytest.raises(FormatError, match="plain file name"):
        check_file_name("rank_00000.safetensors\n")


def test_a_table_built_column_by_column_is_the_table_of_its_fragments():
    from ucp.format.fragment import fixed_columns, with_checksums

    frags = [frag(),
             frag(key="optim/w/exp_avg", flat=FlatRange(1, 4), rank=1, file="rank_00001.safetensors", offset=96,
                  length=16, crc32c=0xFFFFFFFF, blocks=(1, 2, 3)),
             frag(key="model/s", box=Box((), ()), length=4, offset=8, crc32c=9)]
    fixed = fixed_columns((f.key, f.box, f.flat, f.dtype, f.rank, f.file, f.length) for f in frags)
    table = with_checksums(fixed, [f.offset for f in frags], [f.crc32c for f in frags],
                           [len(f.blocks) for f in frags], [b for f in frags for b in f.blocks])
    assert table.equals(fragments_to_table(frags))
    assert table_to_fragments(table) == frags
