"""Every trainer layout converts to the universal form: the same state gives the same arrays
whatever the layout, and a trained checkpoint's arrays are its gathered full tensors, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.helpers import same_bits
from tests.trainer import convert_workloads
from tests.trainer.test_layouts import LAYOUTS, MANUAL_TP, _id
from ucp.convert import convert
from ucp.storage.universal_io import array_reader, read_header
from ucp.trainer.model import GPTConfig, init_gpt

pytestmark = pytest.mark.dist

STEPS = 3
SEED = 0
ALL = LAYOUTS + MANUAL_TP


def read_arrays(path):
    """Every array of the universal checkpoint at ``path`` in its stored dtype (bfloat16 as uint16),
    and its header."""
    header = read_header(path)
    out = {}
    for key, meta in header.tensors.items():
        a = array_reader(path, key, meta).read()
        assert a.shape == tuple(meta.shape), f"{key}: read {a.shape}, the header says {meta.shape}"
        out[key] = a
    return out, header


def aliases(state: dict) -> dict[str, str]:
    """The tied-parameter aliases a header's state records (shared, or per rank under pipelines)."""
    out = {}
    for part in [state.get("shared", {}), *state.get("ranks", {}).values()]:
        out.update(part.get("model", {}).get("aliases", {}))
    return out


@pytest.fixture(scope="module")
def converted(worlds, tmp_path_factory):
    """``converted(size, lay)``: the layout's step-0 and trained checkpoints, converted and read
    back (``{step: (arrays, header)}``), and every rank's gathered full tensors; each layout runs once."""
    cache: dict = {}

    def get(size: int, lay: dict):
        name = _id(lay)
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            gathered = worlds(size).run(convert_workloads.save_and_gather, lay, str(root / "ck"), STEPS, SEED)
            universal = {}
            for step in (0, STEPS):
                dst = root / f"universal-{step}"
                convert(root / "ck", dst, step=step, workers=2, fsync=False)
                universal[step] = read_arrays(dst)
            cache[name] = universal, gathered
        return cache[name]

    return get


def differing(a: dict[str, np.ndarray], b: dict[str, np.ndarray], keys) -> list[str]:
    """Keys among ``keys`` whose arrays differ in dtype, shape or any bit."""
    return sorted(k for k in keys if not same_bits(a[k], b[k]))


def bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()


def whole_model(manual_tp: bool) -> dict[str, np.ndarray]:
    """``init_gpt``'s parameters as the universal checkpoint must hold them: the tied head once (as
    ``wte.weight``); under manual TP in bf16 with each block's q, k, v fused into ``attn.qkv`` as
    ``[q; k; v]`` (``ManualTPGPT.from_whole``'s order before it splits by rank)."""
    whole = dict(init_gpt(GPTConfig(), SEED).named_parameters())  # head.weight is wte.weight: named once
    if not manual_tp:
        return {f"model/{n}": bits(p) for n, p in whole.items()}
    out = {}
    for n, p in whole.items():
        prefix, proj, leaf = n.rsplit(".", 2) if ".attn." in n else (None, None, None)
        if proj in ("q", "k", "v"):
            if proj == "q":
                fused = torch.cat([whole[f"{prefix}.{x}.{leaf}"] for x in "qkv"])
                out[f"model/{prefix}.qkv.{leaf}"] = bits(fused.to(torch.bfloat16))
            continue
        out[f"model/{n}"] = bits(p.to(torch.bfloat16))
    return out


def check_same_state(group: list, manual_tp: bool, converted) -> None:
    """The step-0 checkpoints of ``group`` convert to the same model keys and bit-identical arrays
    for every key they share, and their model arrays are ``whole_model(manual_tp)``."""
    want = whole_model(manual_tp)
    runs = {_id(lay): converted(size, lay)[0][0] for size, lay in group}
    for name, (arrays, header) in runs.items():
        model = {k for k in arrays if k.startswith("model/")}
        assert model == set(want), f"{name}: model keys {sorted(model ^ set(want))} differ from the whole model's"
        assert aliases(header.state) == {"head.weight": "wte.weight"}, f"{name}: the tied head is not an alias"
        assert differing(arrays, want, want) == [], f"{name}: model arrays differ from init_gpt(seed={SEED})"
        assert {header.tensors[k].dtype for k in model} == {"bfloat16" if manual_tp else "float32"}, name
        if manual_tp:  # the fp32 masters start as the bf16 parameters, the moments at zero
            for k in model:
                fqn = k.split("/", 1)[1]
                master = arrays[f"optim/{fqn}/master"]
                assert master.dtype == np.float32 and master.tobytes() == (want[k].astype(np.uint32) << 16).tobytes(), \
                    f"{name}: optim/{fqn}/master is not the bf16 parameter in fp32"
                for s in ("exp_avg", "exp_avg_sq"):
                    assert not arrays[f"optim/{fqn}/{s}"].any(), f"{name}: optim/{fqn}/{s} is not zero at step 0"
    first: dict[str, tuple[str, np.ndarray]] = {}  # key -> the first layout with it, and its array
    for name, (arrays, _) in runs.items():
        for key, a in arrays.items():
            other, b = first.setdefault(key, (name, a))
            assert same_bits(a, b), f"{key}: {name} and {other} convert the same state differently"


def test_same_state_in_every_fp32_layout_converts_identically(converted):
    check_same_state(LAYOUTS, manual_tp=False, converted=converted)


def test_same_state_in_every_manual_tp_layout_converts_identically(converted):
    check_same_state(MANUAL_TP, manual_tp=True, converted=converted)


@pytest.mark.parametrize("size, lay", ALL, ids=[_id(lay) for _, lay in ALL])
def test_trained_checkpoint_converts_to_the_gathered_tensors(converted, size, lay):
    runs, gathered = converted(size, lay)
    arrays, _ = runs[STEPS]
    held = set().union(*gathered)  # together the ranks gather every key, and nothing else
    assert held == set(arrays), f"converted but never gathered, or the reverse: {sorted(held ^ set(arrays))}"
    assert any(k.startswith("optim/") for k in held), "the trained checkpoint has no optimizer state"
    for rank, state in enumerate(gathered):
        bad = differing(arrays, state, state)
        assert bad == [], f"rank {rank}: converted arrays differ from the gathered full tensors: {bad}"
