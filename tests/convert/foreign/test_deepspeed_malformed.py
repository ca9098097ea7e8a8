"""DeepSpeed files whose pickles hold values of the wrong type where DeepSpeed writes others (a string for a
size, a list for a dict) are refused in one CorruptCheckpointError line naming the save, never a Python
TypeError/ValueError/AttributeError (issue 17 item 8)."""

from __future__ import annotations

import pytest
import torch

from ucp.cli.main import main
from ucp.convert.foreign.deepspeed import deepspeed_source
from ucp.errors import CorruptCheckpointError

MODEL = {"param_shapes": [{"w": torch.Size([4])}], "module": {"w": torch.zeros(4)}, "dp_world_size": 1,
         "global_steps": 3, "ds_version": "0.1"}
OPTIM = {"zero_stage": 1, "single_partition_of_fp32_groups": [torch.zeros(4)],
         "base_optimizer_state": {"state": {0: {"exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4), "step": 3}},
                                  "param_groups": [{"lr": 0.1, "params": [0]}]},
         "param_slice_mappings": [{}]}

CASES = {
    "dp_world_size a string": ({"dp_world_size": "abc"}, {}),
    "dp_world_size negative": ({"dp_world_size": -3}, {}),
    "param_shapes a string": ({"param_shapes": "x"}, {}),
    "param_shapes of strings": ({"param_shapes": ["x"]}, {}),
    "module a list": ({"module": [1]}, {}),
    "a shape a string": ({"param_shapes": [{"w": "22"}]}, {}),  # (was read as [2, 2])
    "a shape of floats": ({"param_shapes": [{"w": [4.0]}]}, {}),
    "zero_stage a string": ({}, {"zero_stage": "x"}),
    "flat groups a string": ({}, {"single_partition_of_fp32_groups": "x"}),
    "slice mappings a string": ({}, {"param_slice_mappings": "x"}),
    "a slice address a string": ({}, {"param_slice_mappings": [{"w": "x"}]}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_wrong_types_in_deepspeed_files_are_one_line_naming_the_save(tmp_path, capsys, name):
    model, optim = CASES[name]
    save = tmp_path / "global_step3"
    save.mkdir()
    torch.save({**MODEL, **model}, save / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {**OPTIM, **optim}}, save / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CorruptCheckpointError) as e:
        deepspeed_source(save)
    assert str(e.value).startswith(str(save)) and "\n" not in str(e.value)
    assert main(["convert", "--from", "deepspeed", str(save), str(tmp_path / "u"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ucp: error: {save}") and "internal error" not in err, err
