"""``ucp convert --from deepspeed``: real DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 saves (DeepSpeed on CPU, 2 ranks)
convert bit for bit, tensor for tensor equal to DeepSpeed's own ``ds_to_universal`` and to the
engine's full fp32 masters and Adam moments; no deepspeed import and no open unpickler in ucp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.world import free_port
from ucp.cli.main import main
from ucp.convert import convert
from ucp.errors import CorruptCheckpointError
from ucp.storage.universal_io import array_reader, read_header

pytestmark = pytest.mark.deepspeed
HERE = Path(__file__).parent


DS_ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def run_deepspeed(nproc: int, script: Path, *args: str) -> None:
    """``script args`` under torchrun on ``nproc`` ranks (DeepSpeed on CPU); DeepSpeed's /dev/shm
    buffers (its CPU all-reduce's) removed after, whatever happened."""
    before = set(os.listdir("/dev/shm"))
    try:
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                            "--master-port", str(free_port()), str(script), *args],
                           capture_output=True, text=True, timeout=600, env=DS_ENV)
    finally:
        for name in set(os.listdir("/dev/shm")) - before:
            if not name.startswith("ucp."):
                try:
                    os.unlink(f"/dev/shm/{name}")
                except OSError:
                    pass
    assert p.returncode == 0, p.stderr[-4000:]


@pytest.fixture(scope="module", params=[(1, ""), (2, ""), (3, ""), (1, "bf16"), (2, "bf16"), (3, "bf16"),
                                        (1, "frozen"), (3, "frozen")],
                ids=["zero1", "zero2", "zero3", "zero1-bf16", "zero2-bf16", "zero3-bf16", "zero1-frozen",
                     "zero3-frozen"])
def ds_save(request, tmp_path_factory):
    """A DeepSpeed save of ZeRO stage 1, 2 or 3 by 2 ranks: fp32, bf16 (its optimizer files named
    ``bf16_zero_pp_rank_*``), or fp32 with a frozen first layer (no optimizer state; ZeRO-3 keeps its
    partitions in the model files)."""
    pytest.importorskip("deepspeed")
    stage, variant = request.param
    out = tmp_path_factory.mktemp(f"ds{stage}{variant}") / "ckpt"
    run_deepspeed(2, HERE / "ds_save.py", str(stage), str(out), *([variant] if variant else []))
    return out, stage


def universal(path: Path) -> dict[str, np.ndarray]:
    header = read_header(path)
    out = {}
    for key, meta in header.tensors.items():
        with array_reader(path, key, meta) as r:
            out[key] = np.asarray(r.read())
    return out


def test_zero_saves_convert_bit_exactly(ds_save, tmp_path):
    from safetensors.torch import load_file

    out, stage = ds_save
    res = convert(out, tmp_path / "u", source="deepspeed", fsync=False)
    header = read_header(tmp_path / "u")
    assert res.step == 2 and header.source["zero_stage"] == stage and header.source["dp"] == 2
    got = universal(tmp_path / "u")
    want = load_file(out / "expected.safetensors")
    for key, t in want.items():
        raw = t.view(torch.uint16) if t.dtype == torch.bfloat16 else t  # (numpy has no bfloat16)
        assert got[key].shape == tuple(t.shape) and got[key].itemsize == t.element_size(), key
        assert got[key].tobytes() == raw.numpy().tobytes(), key
        assert header.tensors[key].dtype == str(t.dtype).removeprefix("torch."), key
    names = {k.split("/")[1] for k in want if k.endswith("/master")}  # (the trained ones)
    for name in names:
        assert got[f"optim/{name}/step"].shape == () and float(got[f"optim/{name}/step"]) == 2.0
    # the optimizer's hyperparameters come along as its param groups
    opt = header.state["shared"]["optimizer"]
    assert opt["param_groups"][0]["lr"] == 0.01 and sorted(opt["param_groups"][0]["params"]) == sorted(names)


def test_ucp_agrees_with_ds_to_universal_tensor_for_tensor(ds_save, tmp_path):
    out, stage = ds_save
    tag = (out / "latest").read_text().strip()
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    p = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                        str(out / tag), "--output_folder", str(tmp_path / "ds"), "--inject_missing_state"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert main(["convert", "--from", "deepspeed", str(out), str(tmp_path / "u"), "--quiet"]) == 0
    got = universal(tmp_path / "u")
    params = sorted(d.name for d in (tmp_path / "ds" / "zero").iterdir() if d.is_dir())
    trained = [n for n in params if (tmp_path / "ds" / "zero" / n / "exp_avg.pt").is_file()]
    assert trained and {f"optim/{n}/master" for n in trained} == {k for k in got if k.endswith("/master")}
    for name in params:
        written = {f.stem for f in (tmp_path / "ds" / "zero" / name).iterdir()}
        if name not in trained:  # a frozen parameter: ds_to_universal writes its module weight (ZeRO-1/2)
            theirs = torch.load(tmp_path / "ds" / "zero" / name / "fp32.pt", weights_only=True)["param"]
            assert theirs.numpy().tobytes() == got[f"model/{name}"].astype(np.float32).tobytes(), name
            continue
        # (ds_to_universal writes no step.pt for ZeRO-3)
        assert written >= {"fp32", "exp_avg", "exp_avg_sq"} and ("step" in written or stage == 3), written
        for ds_name, ours in (("fp32", "master"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"), ("step", "step")):
            if ds_name not in written:
                continue
            theirs = torch.load(tmp_path / "ds" / "zero" / name / f"{ds_name}.pt", weights_only=True)
            theirs = (theirs["param"] if isinstance(theirs, dict) else theirs).detach()
            mine = got[f"optim/{name}/{ours}"]
            if stage == 3 and theirs.dim() == 1 and theirs.numel() == mine.size:
                theirs = theirs.reshape(mine.shape)  # (ds_to_universal leaves ZeRO-3 tensors flat)
            assert tuple(theirs.shape) == mine.shape and theirs.numpy().dtype == mine.dtype, (name, ds_name)
            assert theirs.numpy().tobytes() == mine.tobytes(), (name, ds_name)


def test_an_optimizer_file_needing_another_class_is_refused_by_name(ds_save, tmp_path, capsys):
    import shutil

    out, _ = ds_save
    tag = (out / "latest").read_text().strip()
    copy = tmp_path / "ckpt"
    shutil.copytree(out, copy)
    victim = next((copy / tag).glob("*zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    sd = torch.load(victim, weights_only=False)

    class Unknown:  # a class no stand-in covers
        pass

    Unknown.__module__, Unknown.__qualname__ = "deepspeed.runtime.other", "Unknown"
    sys.modules.setdefault("deepspeed.runtime.other", type(sys)("deepspeed.runtime.other")).Unknown = Unknown
    sd["optimizer_state_dict"]["extra"] = Unknown()
    torch.save(sd, victim)
    code = main(["convert", "--from", "deepspeed", str(copy), str(tmp_path / "u"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert victim.name in err and "deepspeed.runtime.other.Unknown" in err, err
    victim.unlink()
    with pytest.raises(Exception, match="missing from the DeepSpeed checkpoint"):
        convert(copy, tmp_path / "u2", source="deepspeed")
    for f in (copy / tag).glob("*optim_states.pt"):  # (as a ZeRO stage 0 save has none)
        f.unlink()
    with pytest.raises(CorruptCheckpointError, match="no ZeRO optimizer files.*stage 0"):
        convert(copy, tmp_path / "u4", source="deepspeed")
    (copy / "latest").write_text("global_step99")
    with pytest.raises(CorruptCheckpointError, match="names 'global_step99', which is not a save"):
        convert(copy, tmp_path / "u3", source="deepspeed")


def _same(ours, theirs, where: str) -> int:
    """Compare what ucp's reader and torch.load(weights_only=True) make of one file; the tensors compared."""
    from ucp.convert.foreign.torch_file import StoredTensor

    if isinstance(ours, StoredTensor):
        raw = theirs.detach().contiguous().reshape(-1)
        raw = raw.view(torch.uint16) if raw.dtype == torch.bfloat16 else raw
        assert tuple(theirs.shape) == ours.shape and ours.array().tobytes() == raw.numpy().tobytes(), where
        return 1
    if isinstance(ours, dict):
        assert list(ours) == list(theirs), where
        return sum(_same(v, theirs[k], f"{where}.{k}") for k, v in ours.items())
    if isinstance(ours, (list, tuple)):
        assert len(ours) == len(theirs), where
        return sum(_same(a, b, f"{where}[{i}]") for i, (a, b) in enumerate(zip(ours, theirs)))
    if hasattr(ours, "__dict__") and not isinstance(ours, type):
        return _same(vars(ours), vars(theirs), where)
    assert ours == theirs or str(ours) == str(theirs).removeprefix("torch."), where
    return 0


def test_ucp_reads_each_file_as_torch_load_weights_only_does(ds_save):
    """ucp's torch-free reader and torch.load(weights_only=True), with the same stand-ins, read every file
    of the save alike: the same structure, values and tensor bytes."""
    from ucp.convert.foreign.deepspeed import STAND_INS, load_pt

    out, _ = ds_save
    tag = (out / "latest").read_text().strip()
    tensors = 0
    for path in sorted((out / tag).glob("*.pt")):
        with torch.serialization.safe_globals(STAND_INS):
            theirs = torch.load(path, weights_only=True, map_location="cpu")
        tensors += _same(load_pt(path), theirs, path.name)
    assert tensors > 10
