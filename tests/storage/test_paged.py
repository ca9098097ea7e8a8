"""Paged tables (format 1.3): rows stored sorted in checksummed leaves under index pages, read back
whole or by the pages a selection keeps; every page checked, damage named with the file."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ucp.errors import CorruptCheckpointError, FormatError
from ucp.storage import paged
from ucp.storage.paged import PagedFile, write_paged

SCHEMA = pa.schema([("k", pa.int64()), ("v", pa.string())])


def table_of(n: int) -> pa.Table:
    return pa.table({"k": list(range(n)), "v": [f"row {i}" for i in range(n)]}, schema=SCHEMA)


def stored(tmp_path, n: int, leaf_rows: int = 4):
    table = table_of(n)
    keys = table.column("k").to_pylist()
    out = write_paged(table, lambda a, b: {"k": [keys[a], keys[b - 1]]},
                      lambda parts: {"k": [parts[0]["k"][0], parts[-1]["k"][1]]}, leaf_rows)
    path = tmp_path / "t.pages"
    path.write_bytes(out.data)
    return path, out


@pytest.mark.parametrize("n", [0, 1, 4, 5, 64, 1000])
def test_a_stored_table_reads_back_whole(tmp_path, n, monkeypatch):
    monkeypatch.setattr(paged, "FANOUT", 4)  # several index levels
    path, out = stored(tmp_path, n)
    assert out.rows == n and (out.depth >= 3) == (n > 64)
    with PagedFile(path, out.header(path.name), SCHEMA) as pages:
        assert pages.read_all().equals(table_of(n))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), lo=st.integers(0, 300), span=st.integers(0, 20))
def test_a_selection_reads_the_pages_of_its_rows_and_few_others(tmp_path_factory, n, lo, span):
    paged.FANOUT = 4
    try:
        path, out = stored(tmp_path_factory.mktemp("p"), n)
    finally:
        paged.FANOUT = 64
    hi = lo + span

    def keep(summary):
        first, last = summary["k"]
        return first <= hi and last >= lo

    with PagedFile(path, out.header(path.name), SCHEMA) as pages:
        rows = pa.Table.from_batches(pages.select(keep), schema=SCHEMA).column("k").to_pylist()
        wanted = [k for k in range(n) if lo <= k <= hi]
        assert set(wanted) <= set(rows)  # never a row missed
        assert len(rows) <= len(wanted) + 8  # at most a leaf more at either end
        if not wanted:
            assert pages.nbytes < len(out.data) or n <= 4


def test_a_flipped_byte_in_any_page_is_named_with_the_file(tmp_path):
    path, out = stored(tmp_path, 50)
    data = bytearray(out.data)
    for at in (0, len(data) // 2, len(data) - 1):
        damaged = bytearray(data)
        damaged[at] ^= 0x40
        path.write_bytes(bytes(damaged))
        with PagedFile(path, out.header(path.name), SCHEMA) as pages:
            with pytest.raises(CorruptCheckpointError, match=rf"{path}: .*checksum mismatch"):
                pages.read_all()


def test_a_truncated_file_and_a_bad_reference_are_named(tmp_path):
    path, out = stored(tmp_path, 50)
    path.write_bytes(out.data[: len(out.data) // 2])
    with PagedFile(path, out.header(path.name), SCHEMA) as pages:
        with pytest.raises(CorruptCheckpointError, match="past the end of the file"):
            pages.read_all()
    header = out.header(path.name)
    for bad in ({**header, "root": {**header["root"], "offset": -1}}, {**header, "root": "x"},
                {**header, "depth": 0}, {**header, "depth": 99}):
        path.write_bytes(out.data)
        with pytest.raises(FormatError):
            with PagedFile(path, bad, SCHEMA) as pages:
                pages.read_all()


def test_a_page_of_another_schema_or_row_count_is_refused(tmp_path):
    path, out = stored(tmp_path, 10)
    with PagedFile(path, out.header(path.name), pa.schema([("k", pa.string())])) as pages:
        with pytest.raises(FormatError, match="not a readable page"):
            pages.read_all()
    with PagedFile(path, {**out.header(path.name), "rows": 11}, SCHEMA) as pages:
        with pytest.raises(FormatError, match="10 rows in its pages, the manifest says 11"):
            pages.read_all()
