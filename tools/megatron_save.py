"""A real DeepSpeed save of a small Megatron-style model with tensor (and pipeline) parallelism, for the
import tests and ``tools/bench_import.py``. Runs under torchrun on CPU (DS_ACCELERATOR=cpu, gloo):

    torchrun --nproc-per-node TP*PP*DP tools/megatron_save.py ARCH TP PP ZERO OUT [--hidden H] [--layers L]
        [--steps N] [--no-expected]

ARCH is ``gpt`` (LayerNorm with biases, learned positions, per-head interleaved ``query_key_value``,
a GeLU MLP, the output layer tied to the word embeddings) or ``llama`` (RMSNorm, grouped-query
attention whose ``query_key_value`` fuses ``[q; k; v]`` slices per rank, a SwiGLU MLP whose
``dense_h_to_4h`` fuses ``[gate; up]`` slices per rank, an untied ``lm_head``); parameter names are
Megatron-DeepSpeed's. The vocabulary is padded to a multiple of ``2 * TP`` rows, as Megatron pads it.

PP == 1 trains the model as one module with a model-parallel unit (DeepSpeed writes
``mp_rank_XX_model_states.pt`` and ``zero_pp_rank_D_mp_rank_XX_optim_states.pt``); PP > 1 builds a
``PipelineModule`` (DeepSpeed writes ``layer_XX-model_YY-model_states.pt`` besides them). The
client state carries ``universal_checkpoint_info`` with the pattern lists matching the shipped UCL
spec (``ucp/foreign/specs/megatron_<arch>.ucl``) so that ``ds_to_universal`` converts it, and
Megatron's ``args`` (an ``argparse.Namespace``), as Megatron-DeepSpeed saves them.

Rank 0 of every tensor-parallel group writes ``OUT/expected_tp<r>_pp<s>.safetensors``: each of its
parameters' module weight and, through DeepSpeed's ``safe_get_full_*`` accessors, its fp32 master and
Adam moments (the rank's whole TP slice).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402

SEQ, BATCH, VOCAB = 8, 2, 50


class _Copy(torch.autograd.Function):
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _Reduce(torch.autograd.Function):
    """Leave a tensor-parallel region: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class TP:
    """This rank's tensor-parallel group, rank and size."""

    group = None
    rank = 0
    size = 1


def padded_vocab(tp: int) -> int:
    multiple = 2 * tp
    return -(-VOCAB // multiple) * multiple


class RMSNorm(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(h))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def _linear(rows, cols, bias):
    lin = torch.nn.Linear(cols, rows, bias=bias)
    return lin


class Embedding(torch.nn.Module):
    """Vocabulary-parallel word embeddings (rows ``[r * V/tp, (r+1) * V/tp)`` on tp rank ``r``)."""

    def __init__(self, arch, hidden):
        super().__init__()
        self.rows = padded_vocab(TP.size) // TP.size
        self.word_embeddings = torch.nn.Embedding(self.rows, hidden)
        if arch == "gpt":
            self.position_embeddings = torch.nn.Embedding(SEQ, hidden)
        self.arch = arch

    def forward(self, ids):
        lo = TP.rank * self.rows
        local = ids - lo
        outside = (local < 0) | (local >= self.rows)
        x = self.word_embeddings(local.clamp(0, self.rows - 1)) * (~outside).unsqueeze(-1)
        x = _Reduce.apply(x, TP.group)
        if self.arch == "gpt":
            x = x + self.position_embeddings(torch.arange(ids.shape[1]))
        return x


class Block(torch.nn.Module):
    def __init__(self, arch, hidden, heads, kv_heads, ffn):
        super().__init__()
        self.arch, self.hd = arch, hidden // heads
        self.heads, self.kv = heads // TP.size, kv_heads // TP.size
        norm = (lambda: torch.nn.LayerNorm(hidden)) if arch == "gpt" else (lambda: RMSNorm(hidden))
        bias = arch == "gpt"
        self.input_layernorm = norm()
        attn = torch.nn.Module()
        attn.query_key_value = _linear((self.heads + 2 * self.kv) * self.hd, hidden, bias)
        attn.dense = _linear(hidden, self.heads * self.hd, bias)
        self.self_attention = attn
        self.post_attention_layernorm = norm()
        mlp = torch.nn.Module()
        mlp.dense_h_to_4h = _linear((1 if arch == "gpt" else 2) * ffn // TP.size, hidden, bias)
        mlp.dense_4h_to_h = _linear(hidden, ffn // TP.size, bias)
        self.mlp = mlp

    def _row(self, lin, x):
        """A row-parallel linear: partial products summed over tp, then the (replicated) bias."""
        y = _Reduce.apply(F.linear(x, lin.weight), TP.group)
        return y + lin.bias if lin.bias is not None else y

    def forward(self, x):
        b, s, _ = x.shape
        h = _Copy.apply(self.input_layernorm(x), TP.group)
        qkv = self.self_attention.query_key_value(h)
        if self.arch == "gpt":  # Megatron's per-head interleaving: [heads, 3, head_dim]
            q, k, v = qkv.view(b, s, self.heads, 3, self.hd).unbind(3)
        else:  # [q; k; v] slices of this rank
            q, k, v = qkv.split([self.heads * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
            q, k, v = (t.reshape(b, s, -1, self.hd) for t in (q, k, v))
            k, v = (t.repeat_interleave(self.heads // self.kv, dim=2) for t in (k, v))
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self._row(self.self_attention.dense, att.transpose(1, 2).reshape(b, s, -1))
        h = _Copy.apply(self.post_attention_layernorm(x), TP.group)
        up = self.mlp.dense_h_to_4h(h)
        if self.arch == "gpt":
            up = F.gelu(up)
        else:
            gate, up = up.chunk(2, dim=-1)
            up = F.silu(gate) * up
        return x + self._row(self.mlp.dense_4h_to_h, up)


class FinalNorm(torch.nn.Module):
    def __init__(self, arch, hidden):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden) if arch == "gpt" else RMSNorm(hidden)
        # (Megatron's pipeline names the final norm's parameters "<index>.weight" / "<index>.bias")
        self.weight = self.norm.weight
        self.bias = getattr(self.norm, "bias", None)
        del self.norm

    def forward(self, x):
        if self.bias is not None:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def logits_loss(logits_local, labels):
    """A loss every tp rank agrees on: the mean square of the (vocab-parallel) logits."""
    total = _Reduce.apply(logits_local.float().pow(2).sum(), TP.group)
    return total / (labels.numel() * padded_vocab(TP.size))


class Model(torch.nn.Module):
    """The whole model as one module (PP == 1), Megatron-DeepSpeed's non-pipeline names."""

    def __init__(self, arch, hidden, heads, kv_heads, ffn, layers):
        super().__init__()
        self.arch = arch
        self.embedding = Embedding(arch, hidden)
        self.layers = torch.nn.ModuleList(Block(arch, hidden, heads, kv_heads, ffn) for _ in range(layers))
        self.final_layernorm = FinalNorm(arch, hidden)
        if arch != "gpt":
            self.lm_head = torch.nn.Linear(hidden, self.embedding.rows, bias=False)

    def forward(self, ids, labels):
        x = self.embedding(ids)
        for layer in self.layers:
            x = layer(x)
        x = _Copy.apply(self.final_layernorm(x), TP.group)
        head = self.embedding.word_embeddings.weight if self.arch == "gpt" else self.lm_head.weight
        return logits_loss(F.linear(x, head), labels)


class MPU:
    """The minimal model-parallel unit DeepSpeed needs: tp innermost, dp outside (rank = d * tp + t)."""

    def __init__(self, tp):
        world, rank = dist.get_world_size(), dist.get_rank()
        self.tp, self.dp = tp, world // tp
        for d in range(self.dp):
            g = dist.new_group(list(range(d * tp, (d + 1) * tp)))
            if rank // tp == d:
                self.tp_group = g
        for t in range(tp):
            g = dist.new_group(list(range(t, world, tp)))
            if rank % tp == t:
                self.dp_group = g

    def get_model_parallel_rank(self):
        return dist.get_rank() % self.tp

    def get_model_parallel_world_size(self):
        return self.tp

    def get_model_parallel_group(self):
        return self.tp_group

    def get_data_parallel_rank(self):
        return dist.get_rank() // self.tp

    def get_data_parallel_world_size(self):
        return self.dp

    def get_data_parallel_group(self):
        return self.dp_group

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group


class Head(torch.nn.Module):
    """Llama's untied, vocabulary-parallel output layer (a pipeline's last layer)."""

    def __init__(self, hidden):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, padded_vocab(TP.size) // TP.size, bias=False)

    def forward(self, x):
        return F.linear(_Copy.apply(x, TP.group), self.lm_head.weight)


def _tied_head(embedding, x):
    return F.linear(_Copy.apply(x, TP.group), embedding.word_embeddings.weight)


def pipeline_model(arch, tp, pp, hidden, heads, kv_heads, ffn, layers):
    """A ``PipelineModule`` of ``[embedding, blocks..., final norm, head]`` (GPT: the head is the embedding,
    tied). Ranks are ``[pipe][data][model]``; the tensor-parallel groups are made here, before the layers."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    world, rank = dist.get_world_size(), dist.get_rank()
    dp = world // (tp * pp)
    for first in range(0, world, tp):
        g = dist.new_group(list(range(first, first + tp)))
        if rank // tp == first // tp:
            TP.group, TP.rank, TP.size = g, rank % tp, tp
    torch.manual_seed(1 + TP.rank)
    if arch == "gpt":
        specs = [TiedLayerSpec("embed", Embedding, arch, hidden, tied_weight_attr="word_embeddings.weight")]
    else:
        specs = [LayerSpec(Embedding, arch, hidden)]
    specs += [LayerSpec(Block, arch, hidden, heads, kv_heads, ffn) for _ in range(layers)]
    specs.append(LayerSpec(FinalNorm, arch, hidden))
    if arch == "gpt":
        specs.append(TiedLayerSpec("embed", Embedding, arch, hidden, forward_fn=_tied_head,
                                   tied_weight_attr="word_embeddings.weight"))
    else:
        specs.append(LayerSpec(Head, hidden))
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    module = PipelineModule(specs, topology=topo, loss_fn=logits_loss, partition_method="uniform")
    _sync_replicated(module)
    return module


def universal_info(arch: str, pp: int, hidden: int, heads: int, kv_heads: int, ffn: int, tp: int) -> dict:
    """The pattern lists ``ds_to_universal`` needs (Megatron-DeepSpeed's, for these names)."""
    pre = r"\d+\." if pp > 1 else r"layers\.\d+\."
    emb = r"(tied_modules\.embed|\d+)\." if pp > 1 else r"embedding\."
    norms = [pre + r"input_layernorm\.weight", pre + r"post_attention_layernorm\.weight",
             (r"\d+\.weight" if pp > 1 else r"final_layernorm\.weight")]
    info = {"universal_checkpoint_version": 0.4, "original_vocab_size": VOCAB, "padded_vocab_size": padded_vocab(tp),
            "vocabulary_parameter_patterns": [emb + r"word_embeddings\.weight"],
            "parameter_with_row_parallelism_patterns": [pre + r"self_attention\.dense\.weight",
                                                        pre + r"mlp\.dense_4h_to_h\.weight"]}
    if arch == "gpt":
        info["parameter_to_average_patterns"] = norms + [
            pre + r"input_layernorm\.bias", pre + r"post_attention_layernorm\.bias",
            (r"\d+\.bias" if pp > 1 else r"final_layernorm\.bias"),
            pre + r"self_attention\.dense\.bias", pre + r"mlp\.dense_4h_to_h\.bias",
            emb + r"position_embeddings\.weight"]
        if pp > 1:
            # (the last stage's copy of the tied layer: its word embeddings are kept in sync, its position
            # embeddings are not used there, so stage 0's copy is the model's, as Megatron-DeepSpeed says)
            info["pipeline_replicated_parameter_patterns"] = [r"tied_modules\.embed\.word_embeddings\.weight",
                                                              r"tied_modules\.embed\.position_embeddings\.weight"]
    else:
        hd = hidden // heads
        q, kv = heads * hd, kv_heads * hd
        qkv = pre + r"self_attention\.query_key_value\.weight"
        info["parameter_to_average_patterns"] = norms
        info["vocabulary_parameter_patterns"].append(r"(\d+\.)?lm_head\.weight")
        info["parameter_with_2_sub_params_cat_dim_0"] = [pre + r"mlp\.dense_h_to_4h\.weight"]
        info["parameter_with_sub_params"] = [{"patterns": [qkv], "shape": [(q, kv, kv), hidden], "partition_dim": 0}]
        info["sub_param_shard_widths"] = {qkv: [[q // tp] * tp, [kv // tp] * tp, [kv // tp] * tp]}
    return info


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("arch", choices=["gpt", "llama"])
    p.add_argument("tp", type=int)
    p.add_argument("pp", type=int)
    p.add_argument("zero", type=int)
    p.add_argument("out")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--no-expected", action="store_true", help="write no expected_*.safetensors (benchmarks)")
    a = p.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    world = dist.get_world_size()
    heads, kv_heads = 4, (4 if a.arch == "gpt" else 2)
    ffn = 4 * a.hidden if a.arch == "gpt" else 3 * a.hidden
    dp = world // (a.tp * a.pp)
    cfg = {"train_batch_size": BATCH * dp, "train_micro_batch_size_per_gpu": BATCH,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
           "zero_optimization": {"stage": a.zero}, "steps_per_print": 10**6}
    torch.manual_seed(0)
    if a.pp == 1:
        mpu = MPU(a.tp)
        TP.group, TP.rank, TP.size = mpu.tp_group, mpu.get_model_parallel_rank(), a.tp
        torch.manual_seed(1 + TP.rank)  # each tp rank its own slices; replicated parameters agree below
        model = Model(a.arch, a.hidden, heads, kv_heads, ffn, a.layers)
        _sync_replicated(model)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg, mpu=mpu)
        dp_rank = mpu.get_data_parallel_rank()
        for s in range(a.steps):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(100 + 10 * s + dp_rank))
            engine.backward(engine(ids, ids))
            engine.step()
        tp_rank, pp_rank = TP.rank, 0
        module = engine.module
    else:
        module = pipeline_model(a.arch, a.tp, a.pp, a.hidden, heads, kv_heads, ffn, a.layers)
        engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=[p for p in module.parameters()],
                                               config=cfg)
        grid = module._grid
        for s in range(a.steps):
            ids = torch.randint(0, VOCAB, (BATCH, SEQ),
                                generator=torch.Generator().manual_seed(100 + 10 * s + grid.data_parallel_id))
            engine.train_batch(iter([(ids, ids)]))
        tp_rank, pp_rank, dp_rank = TP.rank, grid.get_stage_id(), grid.data_parallel_id
    args = argparse.Namespace(hidden_size=a.hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                              ffn_hidden_size=ffn, num_layers=a.layers, padded_vocab_size=padded_vocab(a.tp),
                              tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp)
    client = {"universal_checkpoint_info": universal_info(a.arch, a.pp, a.hidden, heads, kv_heads, ffn, a.tp),
              "args": args, "iteration": a.steps}
    engine.save_checkpoint(a.out, client_state=client)
    if a.no_expected:
        dist.barrier()
        return
    expected = {}
    for name, param in module.named_parameters():
        # (ZeRO-3 partitions the module's own parameters: in fp32 training the weight is the master)
        expected[f"model/{name}"] = (safe_get_full_fp32_param(param) if a.zero == 3 else param.detach()).clone()
        expected[f"optim/{name}/master"] = safe_get_full_fp32_param(param).clone()
        for state in ("exp_avg", "exp_avg_sq"):
            expected[f"optim/{name}/{state}"] = safe_get_full_optimizer_state(param, state).clone()
    if dp_rank == 0:
        from safetensors.torch import save_file

        save_file(expected, os.path.join(a.out, f"expected_tp{tp_rank}_pp{pp_rank}.safetensors"))
    dist.barrier()


def _sync_replicated(model: torch.nn.Module) -> None:
    """Parameters every tp rank holds whole (norms, biases after a row-parallel product, positions) start
    equal: tp rank 0's values."""
    for name, param in model.named_parameters():
        if _replicated(name):
            with torch.no_grad():
                dist.broadcast(param.data, src=dist.get_rank() - TP.rank, group=TP.group)


def _replicated(name: str) -> bool:
    return any(part in name for part in ("layernorm", "position_embeddings", "dense.bias", "dense_4h_to_h.bias")) \
        or name.startswith("final_layernorm") or re.fullmatch(r"\d+\.(weight|bias)", name) is not None


if __name__ == "__main__":
    main()
    # Everything is written and closed. Leave without running C++ static destructors: one of
    # DeepSpeed's background threads, still joinable then, can abort the process ("terminate called
    # without an active exception") after a successful save.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
