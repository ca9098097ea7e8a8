"""``ucp convert --spec`` with ``expert()`` and ``stage()`` rules: local indices become global ones in the
universal checkpoint, and a rule that does not fit exits non-zero with file:line:column."""

from __future__ import annotations

import numpy as np
import pytest

from tests.cli.test_convert_cli import converted, one_error_line, run
from tests.synthetic import write_checkpoint
from ucp.format import Layout, Pattern, Shard
from ucp.storage.universal_io import array_reader, read_header

RNG = np.random.default_rng(7)


def local_checkpoint(root, axis: str, name: str, count: int, extra=None):
    """Two ranks on ``axis``, each holding ``name.0 .. name.{count-1}`` by a local index (the tensors
    sharded over ``axis`` on dim 0, each rank's shard its own local tensor), plus a replicated router."""
    sharded = Pattern((Shard(axis, 0),))
    tensors = {}
    for j in range(count):
        tensors[f"model/{name}.{j}.w"] = (RNG.standard_normal((4, 3)).astype(np.float32), "float32", sharded)
        tensors[f"optim/{name}.{j}.w/exp_avg"] = (RNG.standard_normal((4, 3)).astype(np.float32), "float32", sharded)
    tensors["model/router.w"] = (RNG.standard_normal((2, 3)).astype(np.float32), "float32", Pattern())
    tensors.update(extra or {})
    write_checkpoint(root, 1, tensors, Layout.from_sizes(**{axis: 2}))
    return tensors


def read(universal, key):
    meta = read_header(universal).tensors[key]
    with array_reader(universal, key, meta) as r:
        return r.read().view(np.float32).reshape(meta.shape)


@pytest.mark.parametrize("axis, name, rule", [
    ("ep", "experts", 'expert(ep, experts=4)'),
    ("pp", "layers", 'stage(pp, layers=4)'),
])
def test_local_indices_become_global_in_the_universal_checkpoint(tmp_path, capsys, axis, name, rule):
    tensors = local_checkpoint(tmp_path / "c", axis, name, 2)
    spec = tmp_path / "s.ucl"
    spec.write_text(f'ucl 1\n"{name}.{{i}}.*" : {rule}\n"*" : replicate({axis})\n')
    converted(capsys, tmp_path / "c", tmp_path / "u", "--spec", spec)
    header = read_header(tmp_path / "u")
    assert sorted(k for k in header.tensors if k.startswith("model/")) == \
        [f"model/{name}.{g}.w" for g in range(4)] + ["model/router.w"]
    for rank in range(2):
        for j in range(2):
            g = rank * 2 + j  # contiguous: rank 1's local 0 is global 2
            for key in (f"model/{name}.{{}}.w", f"optim/{name}.{{}}.w/exp_avg"):
                local = tensors[key.format(j)][0][rank * 2:(rank + 1) * 2]
                np.testing.assert_array_equal(read(tmp_path / "u", key.format(g)), local)
    np.testing.assert_array_equal(read(tmp_path / "u", "model/router.w"), tensors["model/router.w"][0])


def test_strided_experts_interleave(tmp_path, capsys):
    tensors = local_checkpoint(tmp_path / "c", "ep", "experts", 2)
    spec = tmp_path / "s.ucl"
    spec.write_text('ucl 1\n"experts.{e}.*" : expert(ep, experts=4, placement=strided)\n"*" : replicate(ep)\n')
    converted(capsys, tmp_path / "c", tmp_path / "u", "--spec", spec)
    # rank 1's local 0 is global 0 * 2 + 1
    np.testing.assert_array_equal(read(tmp_path / "u", "model/experts.1.w"), tensors["model/experts.0.w"][0][2:4])


@pytest.mark.parametrize("axis, rule, message", [
    ("ep", 'expert(ep, experts=3)', "3 experts do not split evenly over ep=2"),
    ("ep", 'expert(ep, experts=2)', "local expert index 1 is out of range"),
    ("ep", 'expert(tp, experts=4)', "names axis 'tp', which the checkpoint's layout ep=2 zero=0 lacks"),
    ("pp", 'stage(pp, layers=3)', "3 layers do not split evenly over pp=2"),
    ("pp", 'stage(pp, layers=2)', "local layer index 1 is out of range"),
])
def test_a_rule_that_does_not_fit_exits_non_zero_at_its_line(tmp_path, capsys, axis, rule, message):
    name = "experts" if axis == "ep" else "layers"
    local_checkpoint(tmp_path / "c", axis, name, 2)
    spec = tmp_path / "s.ucl"
    head = f'"{name}.{{i}}.*" : '
    spec.write_text(f'ucl 1\n{head}{rule}\n"*" : replicate({axis})\n')
    where = f"2:{len(head) + 1}"  # (the transform's column)
    code, _, err = run(capsys, "convert", tmp_path / "c", tmp_path / "u", "--quiet", "--spec", spec)
    line = one_error_line(err)
    assert code == 1 and f"{spec}:{where}: " in line and message in line, line
    assert not (tmp_path / "u").exists()


def test_a_rule_without_a_capture_or_with_global_indices_out_of_range_is_refused(tmp_path, capsys):
    """The issue's case: eight experts named globally, a rule saying three."""
    sizes = Layout.from_sizes(dp=1)
    tensors = {f"model/experts.{g}.w": (RNG.standard_normal((2, 2)).astype(np.float32), "float32", Pattern())
               for g in range(8)}
    write_checkpoint(tmp_path / "c", 1, tensors, sizes)
    spec = tmp_path / "s.ucl"
    for text, where, message in [('ucl 1\n"experts.{e}.*" : expert(dp, experts=3)\n', "2:19",
                                  "expert index 3 is out of range for experts=3"),
                                 ('ucl 1\n"experts.*" : expert(dp, experts=8)\n', "2:1",
                                  "captures 0 index(es) but expert() map(s) 1")]:
        spec.write_text(text)
        code, _, err = run(capsys, "convert", tmp_path / "c", tmp_path / "u", "--quiet", "--spec", spec)
        line = one_error_line(err)
        assert code == 1 and f"{spec}:{where}: " in line and message in line, line
    spec.write_text('ucl 1\n"experts.{e}.*" : expert(dp, experts=8)\n')
    converted(capsys, tmp_path / "c", tmp_path / "u", "--spec", spec)  # global names that fit: kept
    np.testing.assert_array_equal(read(tmp_path / "u", "model/experts.7.w"), tensors["model/experts.7.w"][0])
