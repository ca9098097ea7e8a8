"""The ranks' non-tensor state as a table (format 1.3, docs/format-checkpoint.md rules 24-26), so
that a loading rank reads its own state, not every rank's.

State equal on every rank stays in the manifest's header (``state.shared``); what differs is split
by name into *values*, each distinct value stored once, and *ranks*, each rank's map from name to
the value it holds. Rows are ``(name, n, json)``: a value is ``(name, id, value)``, a rank is
``("", rank, {name: id})``; they are sorted by ``(name, n)`` and paged
(:mod:`ucp.storage.paged`), so a rank finds its row, then its values, in a few pages. Many ranks
share a value (the optimizer's param groups of one pipeline stage, say): its one copy keeps the
table small, and the optimizer's state of every rank is its few distinct values.
"""

from __future__ import annotations

import bisect
import json

import pyarrow as pa

from ucp.errors import FormatError
from ucp.format.jsonio import parse_json

STATE_SCHEMA = pa.schema([("name", pa.string()), ("n", pa.int64()), ("json", pa.string())])
LEAF_ROWS = 8  # a row may hold a rank's RNG state (kilobytes): small leaves


def state_rows(ranks: dict[str, dict]) -> pa.Table:
    """The sorted table of the per-rank state ``ranks`` (``{"<rank>": {name: value}}``)."""
    ids: dict[str, dict[str, int]] = {}
    values: list[tuple[str, int, str]] = []
    rank_rows: list[tuple[str, int, str]] = []
    texts: dict[int, tuple[object, str]] = {}  # id(value) -> (value, its text): a value many ranks share, once
    for rank in sorted(ranks, key=int):
        held = {}
        for name, value in sorted(ranks[rank].items()):
            known_text = texts.get(id(value))
            if known_text is None or known_text[0] is not value:
                known_text = texts[id(value)] = (value, json.dumps(value, sort_keys=True, separators=(",", ":"),
                                                                   allow_nan=False))
            text = known_text[1]
            known = ids.setdefault(name, {})
            if text not in known:
                known[text] = len(known)
                values.append((name, known[text], text))
            held[name] = known[text]
        rank_rows.append(("", int(rank), json.dumps(held, sort_keys=True, separators=(",", ":"))))
    rows = sorted(rank_rows + values, key=lambda r: (r[0], r[1]))
    return pa.table({"name": [r[0] for r in rows], "n": [r[1] for r in rows], "json": [r[2] for r in rows]},
                    schema=STATE_SCHEMA)


class StateRows:
    """Page summaries of a sorted state table: the first and last ``(name, n)`` of a page."""

    def __init__(self, table: pa.Table):
        self.keys = list(zip(table.column("name").to_pylist(), table.column("n").to_pylist()))

    def summarize(self, start: int, stop: int) -> dict:
        return {"k": [list(self.keys[start]), list(self.keys[stop - 1])]}


def merge_state_summaries(parts: list[dict]) -> dict:
    return {"k": [parts[0]["k"][0], parts[-1]["k"][1]]}


class StateQuery:
    """Rows wanted of a state table: exact ``(name, n)`` keys, and every value of some names."""

    def __init__(self, keys=(), names=()):
        self.keys = sorted(keys)
        self.names = sorted(names)

    def keep(self, summary: dict) -> bool:
        first, last = (tuple(k) for k in summary["k"])
        i = bisect.bisect_left(self.keys, first)
        if i < len(self.keys) and self.keys[i] <= last:
            return True
        return any(first[0] <= name <= last[0] for name in self.names)


def rows_of(batches, where: str) -> dict[tuple[str, int], object]:
    """``(name, n) -> decoded JSON`` of the rows in ``batches`` (the leaves read)."""
    out = {}
    for batch in batches:
        for name, n, text in zip(*(batch.column(c).to_pylist() for c in STATE_SCHEMA.names)):
            if name is None or n is None or text is None:
                raise FormatError(f"{where}: a state row with an empty field")
            out[(name, n)] = parse_json(text, f"{where}: state row ({name!r}, {n})")
    return out


def rank_entries(rows: dict, rank: int, where: str) -> dict:
    """Rank ``rank``'s per-rank state from the rows read (its own row, then the values it names);
    empty when the table has no row for it (all its state is shared)."""
    held = rows.get(("", rank))
    if held is None:
        return {}
    if not isinstance(held, dict):
        raise FormatError(f"{where}: the state row of rank {rank} is not an object")
    out = {}
    for name, vid in held.items():
        if (name, vid) not in rows:
            raise FormatError(f"{where}: rank {rank}'s state names value {vid} of {name!r}, which the table lacks")
        out[name] = rows[(name, vid)]
    return out


def all_ranks(rows: dict, where: str) -> dict[str, dict]:
    """Every rank's per-rank state (``{"<rank>": {name: value}}``) from all rows of the table."""
    return {str(n): entries for (name, n) in sorted(rows) if name == ""
            for entries in [rank_entries(rows, n, where)] if entries}
