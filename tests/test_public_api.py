"""The public API: everything a user passes in or gets back is importable from ``ucp``, and
``import ucp`` stays light (the CLI's --help must not import torch)."""

from __future__ import annotations

import subprocess
import sys

import ucp


def test_every_public_name_resolves_to_the_object_its_module_defines():
    import importlib

    for name in ucp.__all__:
        obj = getattr(ucp, name)
        assert obj is not None
        if name in ucp._PUBLIC:
            assert obj is getattr(importlib.import_module(ucp._PUBLIC[name]), name)
    assert callable(ucp.export) and ucp.export.__name__ == "export"
    from ucp.convert import convert, export

    assert export is ucp.export and callable(convert)


def test_a_user_describes_plain_tensors_with_public_types_only():
    opts = ucp.CheckpointOptions(layout=ucp.Layout.from_sizes(dp=2, tp=2),
                                 patterns={"*.qkv.weight": ucp.Pattern((ucp.Shard("tp", 0),), fused=ucp.Fused(0, (("q", 4), ("k", 4))))})
    assert opts.patterns[0][1].shards == (ucp.Shard("tp", 0),)
    assert ucp.REPLICATED == ucp.Pattern()


def test_unknown_names_raise_attribute_error():
    try:
        ucp.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("ucp.no_such_thing resolved")


def test_import_ucp_and_the_cli_parser_do_not_import_torch():
    code = "import sys, ucp, ucp.cli.main; ucp.cli.main.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_cli_offers_exactly_the_converters_sources():
    from ucp.cli.main import build_parser
    from ucp.convert.foreign import SOURCES

    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    choices = next(a.choices for a in convert._actions if a.dest == "source")
    assert tuple(choices) == SOURCES
