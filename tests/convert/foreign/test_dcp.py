"""``ucp convert --from dcp``: checkpoints saved by torch.distributed.checkpoint itself (FSDP2 and
DTensor TP, optimizer state included) become universal checkpoints bit for bit, which load onto
other layouts; the metadata pickle is read by an unpickler that allows only DCP's classes."""

from __future__ import annotations

import io
import math
import os
import pickle
import warnings

import pytest
import torch

import ucp
from tests.convert.foreign import dcp_workloads as w
from tests.helpers import MLP, bit_diffs, full_state, mlp_step
from ucp.cli.main import main
from ucp.convert import convert
from ucp.errors import CheckpointNotFoundError, CorruptCheckpointError
from ucp.convert.foreign.dcp import MetadataUnpickler, read_metadata


def single_process_save(root, steps: int = 2, wrap: bool = True) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    for s in range(steps):
        mlp_step(model, opt, s)
    msd, osd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed ... assuming ... a single process"
        dcp.save({"model": msd, "optim": osd, "step": steps} if wrap else msd, checkpoint_id=str(root))
    return {k: v.detach().clone() for k, v in full_state(model, opt).items()}


def fresh():
    torch.manual_seed(5)
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.5)
    mlp_step(model, opt, 9)
    return model, opt


def test_a_single_process_dcp_checkpoint_converts_and_loads_bit_exactly(tmp_path):
    want = single_process_save(tmp_path / "dcp")
    res = convert(tmp_path / "dcp", tmp_path / "u", source="dcp", fsync=False)
    assert res.step == 2 and res.tensors == len(want)
    model, opt = fresh()
    loaded = ucp.Checkpointer(tmp_path / "u", model=model, optimizer=opt).load()
    assert loaded.source == "universal" and loaded.step == 2
    assert bit_diffs(want, full_state(model, opt)) == []
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["weight_decay"] == 0.1
    assert math.isfinite(mlp_step(model, opt, 2))


def test_a_bare_model_state_dict_is_a_model(tmp_path):
    want = single_process_save(tmp_path / "dcp", wrap=False)
    assert main(["convert", "--from", "dcp", str(tmp_path / "dcp"), str(tmp_path / "u"), "--quiet"]) == 0
    model = MLP()
    ucp.Checkpointer(tmp_path / "u", model=model).load()
    assert bit_diffs({k: v for k, v in want.items() if k.startswith("model/")},
                     {f"model/{n}": p.detach() for n, p in model.named_parameters()}) == []


@pytest.mark.dist
@pytest.mark.parametrize("kind", ["fsdp", "tp"])
def test_dcp_from_fsdp2_and_tp_converts_bit_exactly_and_loads_onto_other_layouts(world4, world2, tmp_path, kind):
    want = world4.run(w.dcp_save, kind, str(tmp_path / "dcp"))[0]
    res = convert(tmp_path / "dcp", tmp_path / "u", source="dcp", fsync=False)
    assert res.step == 2 and res.tensors == len(want)
    # one process, no parallelism
    model, opt = fresh()
    ucp.Checkpointer(tmp_path / "u", model=model, optimizer=opt).load()
    assert bit_diffs(want, full_state(model, opt)) == []
    # 2 ranks, the other parallelism
    other = "tp" if kind == "fsdp" else "fsdp"
    for r in world2.run(w.load_universal, other, str(tmp_path / "u"), want):
        assert r["diffs"] == [] and r["step"] == 2 and r["lr"] == 1e-2 and math.isfinite(r["loss"]), r


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_the_metadata_unpickler_refuses_any_other_global(tmp_path):
    single_process_save(tmp_path / "dcp")
    md = read_metadata(tmp_path / "dcp")
    assert md.state_dict_metadata["model.fc1.weight"].size == torch.Size([10, 6])
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CorruptCheckpointError, match=r"names (posix|os)\.system, which is not one of DCP's metadata"):
        read_metadata(tmp_path / "dcp")
    with pytest.raises(CorruptCheckpointError, match="names builtins.eval"):
        MetadataUnpickler(io.BytesIO(pickle.dumps(eval)), "x").load()


def test_malformed_dcp_inputs_get_one_clear_error_each(tmp_path, capsys):
    def error(*argv) -> str:
        code = main(["convert", "--from", "dcp", *map(str, argv), "--quiet"])
        err = capsys.readouterr().err
        assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    assert "no such directory" in error(tmp_path / "none", tmp_path / "u")
    (tmp_path / "empty").mkdir()
    assert "no .metadata file" in error(tmp_path / "empty", tmp_path / "u")
    single_process_save(tmp_path / "dcp")
    data = tmp_path / "dcp" / "__0_0.distcp"
    whole = data.read_bytes()
    data.write_bytes(whole[: len(whole) // 2])
    assert "past the end of __0_0.distcp" in error(tmp_path / "dcp", tmp_path / "u")
    data.unlink()
    assert "data file is missing" in error(tmp_path / "dcp", tmp_path / "u")
    # a blob that needs a global weights_only does not allow
    evil = pickle.dumps(Evil())
    data.write_bytes(whole)
    md = read_metadata(tmp_path / "dcp")
    (index, info), = [(i, s) for i, s in md.storage_data.items() if i.fqn == "optim.param_groups.0.lr"]
    patched = whole[:info.offset] + evil + whole[info.offset + info.length:]
    data.write_bytes(patched)
    info.length = len(evil)
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(md))
    assert "torch.load(weights_only=True)" in error(tmp_path / "dcp", tmp_path / "u")
    assert not (tmp_path / "u").exists()
    with pytest.raises(CheckpointNotFoundError):
        convert(tmp_path / "nothing", tmp_path / "u2", source="dcp")
