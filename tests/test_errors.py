"""Error messages' helpers (ucp.errors)."""

from __future__ import annotations

from ucp.errors import few


def test_few_names_the_first_items_and_how_many_more_there_are():
    assert few([]) == "none" and few([1, 2]) == "1, 2"
    assert few(list(range(7))) == "0, 1, 2, 3, 4 and 2 more"
    assert few([0, 1, 2, 3, 4, 5, 6, 7], total=100) == "0, 1, 2, 3, 4 and 95 more"  # (only the first 8 kept)
