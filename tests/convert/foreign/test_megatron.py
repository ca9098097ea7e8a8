"""``ucp convert --from deepspeed --spec megatron-...``: real DeepSpeed saves of Megatron-style models with
tensor parallelism (ZeRO-1 without a pipeline: ``mp_rank_XX`` files; with one: ``layer_XX-model_YY`` files too;
ZeRO-3: ``zero_pp_rank_D_mp_rank_XX`` model and optimizer files)
convert tensor for tensor equal to DeepSpeed's own ``ds_to_universal`` (fp32 master, Adam moments, step),
and every tp rank's slice of the result equals what that rank's engine holds, bit for bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.convert.foreign.test_deepspeed import DS_ENV, run_deepspeed, universal
from ucp.cli.main import main
from ucp.convert import convert
from ucp.errors import OptionsError
from ucp.errors import UclError
from ucp.storage.universal_io import read_header

pytestmark = pytest.mark.deepspeed
SAVE = Path(__file__).resolve().parents[3] / "tools" / "megatron_save.py"
SAVES = {  # name: (arch, tp, pp, world, ZeRO stage)
    "gpt-tp2-dp2": ("gpt", 2, 1, 4, 1),
    "llama-tp2-pp2-dp2": ("llama", 2, 2, 8, 1),
    "gpt-tp2-pp2-tied": ("gpt", 2, 2, 4, 1),
    "llama-tp2-dp2-zero3": ("llama", 2, 1, 4, 3),
}


@pytest.fixture(scope="module", params=list(SAVES))
def megatron_save(request, tmp_path_factory):
    """A DeepSpeed ZeRO-1 save of a Megatron-style model (tools/megatron_save.py) and
    ``ds_to_universal``'s conversion of it."""
    pytest.importorskip("deepspeed")
    arch, tp, pp, world, zero = SAVES[request.param]
    out = tmp_path_factory.mktemp(request.param) / "ckpt"
    run_deepspeed(world, SAVE, arch, str(tp), str(pp), str(zero), str(out))
    ds = out.parent / "ds"
    tag = (out / "latest").read_text().strip()
    q = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(out / tag),
                        "--output_folder", str(ds)], capture_output=True, text=True, timeout=600, env=DS_ENV)
    assert q.returncode == 0, q.stderr[-3000:]
    return out, ds, arch, tp, pp


def _convert(save, tmp_path) -> tuple[Path, dict]:
    out, _, arch, _, _ = save
    dst = tmp_path / "u"
    assert main(["convert", "--from", "deepspeed", str(out), str(dst), "--spec", f"megatron-{arch}", "--quiet"]) == 0
    return dst, universal(dst)


def test_megatron_saves_agree_with_ds_to_universal(megatron_save, tmp_path):
    _, ds, _, tp, pp = megatron_save
    dst, got = _convert(megatron_save, tmp_path)
    header = read_header(dst)
    assert (header.source["tp"], header.source["pp"]) == (tp, pp) and header.source["spec"].startswith("megatron-")
    assert header.spec.startswith("ucl 1\nsource layout ") and f"tp={tp} zero={header.source['zero_stage']}" in header.spec
    params = sorted(d.name for d in (ds / "zero").iterdir() if d.is_dir())
    assert {f"optim/{n}/master" for n in params} == {k for k in got if k.endswith("/master")}
    for name in params:
        for ds_name, ours in (("fp32", "master"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), ("step", "step")):
            if ds_name == "step" and header.source["zero_stage"] == 3:
                continue  # (ds_to_universal writes no step for ZeRO-3)
            theirs = torch.load(ds / "zero" / name / f"{ds_name}.pt", weights_only=False)
            theirs = torch.as_tensor(theirs["param"] if isinstance(theirs, dict) else theirs).detach()
            mine = got[f"optim/{name}/{ours}"]
            assert tuple(theirs.shape) == mine.shape and theirs.numpy().dtype == mine.dtype, (name, ds_name)
            assert theirs.numpy().tobytes() == mine.tobytes(), (name, ds_name)
    # the vocabulary padding is stripped (50 real rows of 52), fused parts are in logical order
    embedding = next(k for k in got if k.startswith("model/") and k.endswith("word_embeddings.weight"))
    assert got[embedding].shape[0] == 50


def _tp_slice(array: np.ndarray, pattern, t: int, tp: int) -> tuple[np.ndarray, slice | None]:
    """Tp rank ``t``'s part of a universal array (its fused parts' slices in rank order), and which
    of that rank's rows are real when the dim is padded."""
    if not pattern.shards:
        return array, None
    dim = pattern.shards[0].dim
    if pattern.fused is not None:
        parts, at = [], 0
        for _, size in pattern.fused.parts:
            part = np.take(array, range(at, at + size), axis=dim)
            parts.append(np.array_split(part, tp, axis=dim)[t])
            at += size
        return np.concatenate(parts, axis=dim), None
    if pattern.pad is not None:
        rows = pattern.pad.to // tp
        lo, hi = t * rows, min((t + 1) * rows, pattern.pad.keep)
        return np.take(array, range(lo, max(lo, hi)), axis=dim), slice(0, max(0, hi - lo))
    return np.array_split(array, tp, axis=dim)[t], None


def test_each_tp_rank_slice_equals_its_engine_state(megatron_save, tmp_path):
    from safetensors.torch import load_file

    out, _, _, tp, pp = megatron_save
    dst, got = _convert(megatron_save, tmp_path)
    header = read_header(dst)
    checked = 0
    for t in range(tp):
        seen = set()
        for s in range(pp):
            for key, want in load_file(out / f"expected_tp{t}_pp{s}.safetensors").items():
                if key in seen:
                    continue  # a tied layer's copy on a later stage: the universal value is the first stage's
                seen.add(key)
                mine, real = _tp_slice(got[key], header.tensors[key].pattern, t, tp)
                want = want.numpy()
                if real is not None:
                    want = want[real]
                assert mine.shape == want.shape and mine.tobytes() == want.tobytes(), (key, t, s)
                checked += 1
    assert checked > 40


def test_a_tensor_parallel_save_needs_a_spec_that_fits(megatron_save, tmp_path, capsys):
    out, _, arch, _, _ = megatron_save
    with pytest.raises(OptionsError, match="tensor-parallel DeepSpeed save .tp=2.; pass a UCL spec"):
        convert(out, tmp_path / "a", source="deepspeed")
    # sizes that do not fit: one line naming the spec's rule, no traceback
    code = main(["convert", "--from", "deepspeed", str(out), str(tmp_path / "b"), "--spec", f"megatron-{arch}",
                 "--set", "vocab=60", "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"megatron-{arch}:" in err and "keep=60" in err, err
    other = "llama" if arch == "gpt" else "gpt"
    with pytest.raises(UclError, match="matched by no rule|matches no tensor"):
        convert(out, tmp_path / "c", f"megatron-{other}", source="deepspeed")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_ucp_reads_each_file_as_torch_load_weights_only_does(megatron_save):
    from tests.convert.foreign.test_deepspeed import _same
    from ucp.convert.foreign.deepspeed import STAND_INS, load_pt

    out = megatron_save[0]
    tag = (out / "latest").read_text().strip()
    tensors = 0
    for path in sorted((out / tag).glob("*.pt")):  # (model, optimizer and pipeline layer files)
        with torch.serialization.safe_globals(STAND_INS):
            theirs = torch.load(path, weights_only=True, map_location="cpu")
        tensors += _same(load_pt(path), theirs, path.name)
    assert tensors > 20
