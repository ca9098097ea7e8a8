"""Packaging: the UCL grammar ships in the wheel and loads; ``import ucp`` stays light."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE = "ucl 1\nsource layout tp=2 dp=4 zero=1\n"


def _layout_settings(tree) -> list[tuple[str, str]]:
    (layout,) = list(tree.find_data("source_layout"))
    return [(str(a.children[0]), str(a.children[1].children[0])) for a in layout.find_data("setting")]


def test_grammar_loads_and_parses():
    from ucp.lang.grammar import GRAMMAR_FILE, grammar_dir, parser

    assert (grammar_dir() / GRAMMAR_FILE).is_file()
    tree = parser().parse(SOURCE)
    assert tree.data == "start"
    (version,) = list(tree.find_data("version"))
    assert int(version.children[0]) == 1
    assert _layout_settings(tree) == [("tp", "2"), ("dp", "4"), ("zero", "1")]
    assert parser() is parser()  # cached


def test_grammar_rejects_garbage():
    from lark.exceptions import LarkError

    from ucp.lang.grammar import parser

    with pytest.raises(LarkError):
        parser().parse("ucl 1\nsource layout tp=\n")


def _run(code: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("ucp-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def test_wheel_contains_the_grammar(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "ucp/grammar/ucl.lark" in names
        assert z.read("ucp/grammar/ucl.lark") == (REPO / "grammar" / "ucl.lark").read_bytes()
        assert "ucp/lang/grammar.py" in names
        assert "ucp/format/manifest.py" in names
        assert "ucp/lang/specs/megatron_gpt.ucl" in names  # packaged specs are package data


def test_grammar_loads_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = (
        "import ucp, ucp.lang.grammar as g; "
        f"assert ucp.__file__.startswith({str(site)!r}), ucp.__file__; "
        f"print(g.grammar_dir()); print(g.parser().parse({SOURCE!r}).data)"
    )
    proc = _run(code, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    grammar_dir, data = proc.stdout.split()
    assert Path(grammar_dir) == site / "ucp" / "grammar"
    assert data == "start"


def test_import_ucp_does_not_import_torch():
    proc = _run("import sys, ucp; print(ucp.__version__); print('torch' in sys.modules)", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [__import__("ucp").__version__, "False"]


def test_import_ucp_spec_does_not_import_torch():
    proc = _run("import sys, ucp.format, ucp.errors; print('torch' in sys.modules)", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_missing_dependency_fails_under_ci_and_skips_otherwise(tmp_path):
    """conftest.require(): a test needing an absent module skips locally and fails under CI=true."""
    import os
    import subprocess
    import sys
    import textwrap

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "test_needs.py").write_text(textwrap.dedent("""
        from tests.conftest import require

        def test_needs_missing():
            require("no_such_module_ucp_test")
    """))
    for ci, want in (("true", "1 failed"), ("", "1 skipped")):
        env = {**os.environ, "CI": ci, "PYTHONPATH": str(root)}
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                            str(tmp_path / "test_needs.py")], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert want in p.stdout, p.stdout + p.stderr
