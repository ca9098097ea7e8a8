"""Bounded JSON parsing: deep nesting, constants and bad bytes are one FormatError line."""

import json

import pytest

from ucp.errors import FormatError
from ucp.format.jsonio import MAX_DEPTH, parse_json, too_deep


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 5_000, 200_000])
def test_deep_nesting_is_refused_without_recursion(depth):
    for opening, closing in ("[]", "{}"):
        doc = "[" * depth + "]" * depth if opening == "[" else '{"a":' * depth + "1" + "}" * depth
        with pytest.raises(FormatError, match=r"manifest\.json: JSON nested deeper than 64 levels") as e:
            parse_json(doc.encode(), "manifest.json")
        assert "\n" not in str(e.value)


def test_mixed_nesting_at_the_limit_parses():
    doc = "[" * 32 + "]" * 32
    assert parse_json(doc, "x") == json.loads(doc)
    mixed = '{"a":' * 32 + "[" * 32 + "]" * 32 + "}" * 32
    assert parse_json(mixed, "x") == json.loads(mixed)
    assert too_deep(("[" * 65 + "]" * 65).encode())


def test_brackets_inside_strings_do_not_count():
    doc = json.dumps({"k": "[" * 1000 + '\\"{{{' + "]" * 3, "list": ["a\\", "[[[["]})
    assert parse_json(doc, "x") == json.loads(doc)


@pytest.mark.parametrize("bad", [b"[NaN]", b"[Infinity]", b"\xff\xfe", b"{", b"[1,]", b"[}"])
def test_invalid_json_is_one_line_naming_the_document(bad):
    with pytest.raises(FormatError, match=r"^hdr\.json is not valid JSON") as e:
        parse_json(bad, "hdr.json")
    assert "\n" not in str(e.value)
