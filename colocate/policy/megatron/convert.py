"""HF <-> Megatron-core conversion of the dense Llama / Qwen2 / Qwen3 family, as pure functions over tensors.

One `Mapping` ties one parameter of Megatron-core's `GPTModel` (local layer spec, `get_gpt_layer_local_spec`) to
the HF checkpoint tensors it holds. `shard` turns HF tensors into the slice one tensor-parallel rank keeps;
`unshard` turns every tensor rank's slice back into the HF tensors, bit-exactly (only reshapes, slices and
concatenations: no arithmetic). `megatron_state` / `hf_state` do it for a whole rank / model (load, tests), and
`bucket_sources` says which Megatron tensors, on which stage, make a given ordered list of HF names (a refit
bucket), so a refit can stream in HF names holding one bucket's tensors at a time.

Megatron names, checked against megatron-core 0.19.2 (paths under `megatron/core/`):
- `embedding.word_embeddings.weight`: `models/gpt/gpt_model.py:168` `self.embedding = LanguageModelEmbedding`,
  `models/common/embeddings/language_model_embedding.py:56` `self.word_embeddings = VocabParallelEmbedding`
  (rows split over tp, contiguous: `tensor_parallel/utils.py:114`).
- `decoder.layers.{j}.…`: `gpt_model.py:227` `self.decoder = TransformerBlock`, `transformer/transformer_block.py:363`
  `self.layers = ModuleList(...)`, j counted from 0 on each pipeline stage (`layout.stage_of_layer`).
- `input_layernorm.weight`, `pre_mlp_layernorm.weight`: `transformer/transformer_layer.py:354,406`; the local spec's
  RMSNorm is `torch.nn.RMSNorm` (`transformer/torch_norm.py:63` via `models/backends.py:118-127`), one `weight`.
  (Transformer Engine's spec would fuse them into `linear_qkv.layer_norm_weight` / `linear_fc1.layer_norm_weight`,
  the names Megatron-Bridge's bridges use; the local spec keeps them as modules of their own.)
- `self_attention.linear_qkv.weight` / `.bias`, `self_attention.linear_proj.weight`,
  `self_attention.q_layernorm.weight`, `self_attention.k_layernorm.weight`: `models/gpt/gpt_layer_specs.py:438-452`
  (local spec), `transformer/attention.py:1681` (qkv: ColumnParallelLinear, bias iff add_qkv_bias),
  `attention.py:1721-1737` (q/k norms over head_dim).
- `mlp.linear_fc1.weight` ([gate; up], `transformer/mlp.py:208` doubles the width, `mlp.py:322-327` chunks it
  gate-first) and `mlp.linear_fc2.weight`: `mlp.py:222,242`.
- `decoder.final_layernorm.weight`: `transformer_block.py:376` (last stage only).
- `output_layer.weight`: `gpt_model.py:269` (last stage; with tied embeddings it has no weight of its own when
  pp = 1, `skip_weight_param_allocation`, and is a second copy of the embedding on the last stage when pp > 1,
  kept equal by Megatron: `models/common/language_module/language_module.py:202-260`).

Layouts (after Megatron-Bridge `src/megatron/bridge/models/conversion/param_mapping.py`, commit 067f987: functions
`merge_qkv_weights` / `split_qkv_weights` for the interleaving, `GatedMLPMapping` for fc1's per-rank
[gate_r; up_r], `ColumnParallelMapping` / `RowParallelMapping` for contiguous chunks along dim 0 / dim 1;
written here without Bridge, which needs Python 3.12 and pins transformers / hydra versions colocate does not use,
so this module is what runs; tests/policy/test_megatron_bridge.py runs Bridge 0.6.2's own four QKV functions, out of
its wheel, against it):
- linear_qkv: per query group g, [the g-th block of q heads; k head g; v head g], groups in order; a tensor rank
  keeps a contiguous chunk of that. When tp > num_kv_heads the chunk is part of one group: megatron-core 0.19.2
  gathers and re-slices the activations then (`attention.py:1839-1860`), so the weight layout rule is the same.
- linear_fc1: rank r keeps [gate rows of r; up rows of r] (`mlp.py:206` "each TP rank stores interleaved [gate,
  up] portions").
- column parallel (embedding, output layer): contiguous dim-0 chunks; row parallel (linear_proj, linear_fc2):
  contiguous dim-1 chunks; norms: replicated on every tensor rank.

Shape legend: V = vocabulary, H = hidden size, N = query heads, G = key/value heads (query groups), D = head dim,
F = MLP channels; a trailing `_r` = one tensor rank's slice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass
from typing import Any, Literal

import torch

from colocate.policy.megatron.errors import MegatronModelError
from colocate.policy.megatron.layout import stage_of_layer

Kind = Literal["column", "row", "replicated", "qkv", "fc1"]
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class Dims:
    """The shapes and options of one dense decoder checkpoint that the conversion depends on."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    qkv_bias: bool
    qk_norm: bool
    tied: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def dims_from_hf_config(config: Any) -> Dims:
    """`Dims` of an HF config (a `PretrainedConfig`), or `MegatronModelError` naming what is not covered."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MegatronModelError("model_type", f"{model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise MegatronModelError("hidden_act", f"{act!r}: only SwiGLU (silu) MLPs are converted")
    # Llama's and Qwen3's `attention_bias` puts a bias on o_proj too; Megatron's add_qkv_bias covers only qkv and
    # add_bias_linear would add one to every linear (the MLP's included). Qwen2 has qkv biases and no o_proj bias.
    if getattr(config, "attention_bias", False):
        raise MegatronModelError("attention_bias", "an o_proj bias has no place in Megatron's qkv-only bias")
    if getattr(config, "mlp_bias", False):
        raise MegatronModelError("mlp_bias", "MLP biases are not converted")
    rope_theta(config)  # refuses scaled RoPE variants
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    if num_heads % num_kv_heads:
        raise MegatronModelError("num_key_value_heads", f"{num_kv_heads} does not divide {num_heads} heads")
    return Dims(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
        intermediate_size=config.intermediate_size,
        vocab_size=config.vocab_size,
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def rope_theta(config: Any) -> float:
    """The rotary base of plain RoPE (transformers 5 `rope_parameters`, or 4.x `rope_theta`); any scaled variant
    (Llama-3.1's, YaRN, ...) is refused: the Megatron model is built with plain RoPE only."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    for kind in (params.get("rope_type"), scaling.get("rope_type"), scaling.get("type")):
        if kind not in (None, "default"):
            raise MegatronModelError("rope_scaling", f"rope type {kind!r}: only plain RoPE is converted")
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


@dataclass(frozen=True)
class Mapping:
    """One Megatron parameter and the HF tensors it holds, in the order `unshard` returns them."""

    megatron: str
    """Its name in the owning stage's `GPTModel.named_parameters()` (layer index local to the stage)."""
    stage: int
    kind: Kind
    hf: tuple[str, ...]
    export: bool = True
    """False for the last stage's copy of tied embeddings: loaded, never sent (the engine re-ties lm_head)."""


def mappings(dims: Dims, pp_size: int = 1) -> list[Mapping]:
    """Every Megatron parameter of the model, in HF checkpoint order (embeddings, layers, final norm, lm_head)."""
    last = pp_size - 1
    out = [Mapping("embedding.word_embeddings.weight", 0, "column", ("model.embed_tokens.weight",))]
    for i in range(dims.num_layers):
        stage, j = stage_of_layer(i, num_layers=dims.num_layers, pp_size=pp_size)
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{j}."
        attn = f"{hf}self_attn."
        out.append(Mapping(f"{mg}input_layernorm.weight", stage, "replicated", (f"{hf}input_layernorm.weight",)))
        out.append(Mapping(f"{mg}self_attention.linear_qkv.weight", stage, "qkv",
                           tuple(f"{attn}{p}_proj.weight" for p in "qkv")))
        if dims.qkv_bias:
            out.append(Mapping(f"{mg}self_attention.linear_qkv.bias", stage, "qkv",
                               tuple(f"{attn}{p}_proj.bias" for p in "qkv")))
        if dims.qk_norm:
            out.append(Mapping(f"{mg}self_attention.q_layernorm.weight", stage, "replicated",
                               (f"{attn}q_norm.weight",)))
            out.append(Mapping(f"{mg}self_attention.k_layernorm.weight", stage, "replicated",
                               (f"{attn}k_norm.weight",)))
        out.append(Mapping(f"{mg}self_attention.linear_proj.weight", stage, "row", (f"{attn}o_proj.weight",)))
        out.append(Mapping(f"{mg}pre_mlp_layernorm.weight", stage, "replicated",
                           (f"{hf}post_attention_layernorm.weight",)))
        out.append(Mapping(f"{mg}mlp.linear_fc1.weight", stage, "fc1",
                           (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight")))
        out.append(Mapping(f"{mg}mlp.linear_fc2.weight", stage, "row", (f"{hf}mlp.down_proj.weight",)))
    out.append(Mapping("decoder.final_layernorm.weight", last, "replicated", ("model.norm.weight",)))
    if not dims.tied:
        out.append(Mapping("output_layer.weight", last, "column", ("lm_head.weight",)))
    elif pp_size > 1:
        out.append(Mapping("output_layer.weight", last, "column", ("model.embed_tokens.weight",), export=False))
    return out


def export_order(dims: Dims, pp_size: int = 1) -> list[Mapping]:
    """The mappings a weight export walks (refit, `export_hf`), in the order it walks them; their `hf` names,
    flattened, are `list(hf_shapes(dims))` for every `pp_size` (tests/policy/test_megatron_convert.py), which is
    what lets `weights_manifest` promise the stream's order without gathering anything."""
    return [m for m in mappings(dims, pp_size) if m.export]


def hf_shapes(dims: Dims) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor the conversion exports, in checkpoint order."""
    H, N, G, D, F, V = (dims.hidden_size, dims.num_heads, dims.num_kv_heads, dims.head_dim,
                        dims.intermediate_size, dims.vocab_size)
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    for i in range(dims.num_layers):
        p = f"model.layers.{i}."
        out[f"{p}input_layernorm.weight"] = (H,)
        out |= {f"{p}self_attn.q_proj.weight": (N * D, H), f"{p}self_attn.k_proj.weight": (G * D, H),
                f"{p}self_attn.v_proj.weight": (G * D, H)}
        if dims.qkv_bias:
            out |= {f"{p}self_attn.q_proj.bias": (N * D,), f"{p}self_attn.k_proj.bias": (G * D,),
                    f"{p}self_attn.v_proj.bias": (G * D,)}
        if dims.qk_norm:
            out |= {f"{p}self_attn.q_norm.weight": (D,), f"{p}self_attn.k_norm.weight": (D,)}
        out[f"{p}self_attn.o_proj.weight"] = (H, N * D)
        out[f"{p}post_attention_layernorm.weight"] = (H,)
        out |= {f"{p}mlp.gate_proj.weight": (F, H), f"{p}mlp.up_proj.weight": (F, H),
                f"{p}mlp.down_proj.weight": (H, F)}
    out["model.norm.weight"] = (H,)
    if not dims.tied:
        out["lm_head.weight"] = (V, H)
    return out


# ---------------------------------------------------------------- layouts of one tensor


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: Dims) -> torch.Tensor:
    """HF q [N*D, ...], k and v [G*D, ...] -> Megatron's linear_qkv [G*(N/G+2)*D, ...]: per group g,
    [q heads g*N/G .. (g+1)*N/G - 1; k head g; v head g]. Works for weights ([..., H]) and biases."""
    G, D, tail = dims.num_kv_heads, dims.head_dim, q.shape[1:]
    q_G = q.reshape(G, dims.heads_per_group * D, *tail)
    k_G, v_G = k.reshape(G, D, *tail), v.reshape(G, D, *tail)
    return torch.cat([q_G, k_G, v_G], dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, dims: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `interleave_qkv`."""
    tail = qkv.shape[1:]
    q_G, k_G, v_G = qkv_group_views(qkv, dims)
    return q_G.reshape(-1, *tail), k_G.reshape(-1, *tail), v_G.reshape(-1, *tail)


def qkv_group_views(qkv: torch.Tensor, dims: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a whole (contiguous) linear_qkv: q_G [G, N/G*D, ...], k_G and v_G [G, D, ...], whose elements in
    row-major order are HF's q, k, v (`split_qkv` reshapes them, which copies: the groups are not evenly spaced)."""
    G, D, tail = dims.num_kv_heads, dims.head_dim, qkv.shape[1:]
    return qkv.view(G, (dims.heads_per_group + 2) * D, *tail).split([dims.heads_per_group * D, D, D], dim=1)


def _chunk(tensor: torch.Tensor, tp_size: int, tp_rank: int, dim: int) -> torch.Tensor:
    if tensor.shape[dim] % tp_size:
        raise ValueError(f"dim {dim} of shape {tuple(tensor.shape)} does not split over tp={tp_size}")
    return tensor.chunk(tp_size, dim=dim)[tp_rank].contiguous()


def shard(mapping: Mapping, hf: MappingABC[str, torch.Tensor], dims: Dims, *, tp_size: int = 1,
          tp_rank: int = 0) -> torch.Tensor:
    """Tensor rank `tp_rank`'s slice of `mapping`'s Megatron parameter, from the HF tensors it holds."""
    parts = [hf[name] for name in mapping.hf]
    if mapping.kind == "qkv":
        return _chunk(interleave_qkv(*parts, dims), tp_size, tp_rank, 0)
    if mapping.kind == "fc1":
        gate_r, up_r = (_chunk(t, tp_size, tp_rank, 0) for t in parts)
        return torch.cat([gate_r, up_r], dim=0)
    (tensor,) = parts
    if mapping.kind == "column":
        return _chunk(tensor, tp_size, tp_rank, 0)
    if mapping.kind == "row":
        return _chunk(tensor, tp_size, tp_rank, 1)
    return tensor.clone()  # replicated: every rank's own copy


def unshard(mapping: Mapping, shards: Sequence[torch.Tensor], dims: Dims) -> dict[str, torch.Tensor]:
    """HF name -> full tensor, from every tensor rank's slice of `mapping`'s parameter (in rank order).

    A replicated parameter is taken from the first slice: Megatron keeps the copies equal (the same gradient
    on every tensor rank), so one rank's is the tensor.
    """
    shapes = hf_shapes(dims)
    views = gathered_views(mapping, torch.cat(list(shards), dim=0), dims, len(shards))
    return {name: view.reshape(shapes[name]) for name, view in views.items()}


def gathered_views(mapping: Mapping, gathered: torch.Tensor, dims: Dims, tp_size: int) -> dict[str, torch.Tensor]:
    """HF name -> a view of `gathered` (every tensor rank's slice of `mapping`'s parameter, concatenated along
    dim 0 in rank order: what one all-gather into a tensor gives) whose elements in row-major order are the HF
    tensor's. Where the HF tensor is not a view of it (q, k, v of the interleaved groups; a row-parallel weight
    or fc1's halves over several ranks) the view has another shape (`refit/folded.py`): `.reshape(hf shape)`
    makes the tensor (`unshard`), `out.view(v.shape).copy_(v)` writes it into a contiguous `out` in one copy.
    Shapes: a tensor rank's slice `_r`; [tp, ...] splits `gathered` by rank."""
    tail = gathered.shape[1:]
    if mapping.kind == "qkv":
        return dict(zip(mapping.hf, qkv_group_views(gathered, dims), strict=True))
    if mapping.kind == "fc1":  # rank r holds [gate_r; up_r]: gate = [gate_0; gate_1; ...]
        halves = gathered.chunk(2, dim=0) if tp_size == 1 else gathered.view(tp_size, 2, -1, *tail).unbind(1)
        return dict(zip(mapping.hf, halves, strict=True))
    (name,) = mapping.hf
    if mapping.kind == "row" and tp_size > 1:  # [tp * rows, cols_r] -> [rows, tp, cols_r]: HF's [rows, tp * cols_r]
        return {name: gathered.view(tp_size, gathered.shape[0] // tp_size, *tail).transpose(0, 1)}
    if mapping.kind == "replicated":
        return {name: gathered[: gathered.shape[0] // tp_size]}  # tp rank 0's copy
    return {name: gathered}  # column: the rows in rank order; row with one rank: the weight


# ---------------------------------------------------------------- whole models


def megatron_state(get_hf: Callable[[str], torch.Tensor], dims: Dims, *, tp_size: int = 1, tp_rank: int = 0,
                   pp_size: int = 1, pp_rank: int = 0) -> dict[str, torch.Tensor]:
    """The parameters of the rank at (`tp_rank`, `pp_rank`), by Megatron name; `get_hf(name)` reads one HF
    tensor (e.g. from `safetensors.safe_open`), so only this stage's tensors are read."""
    out = {}
    for m in mappings(dims, pp_size):
        if m.stage == pp_rank:
            out[m.megatron] = shard(m, {name: get_hf(name) for name in m.hf}, dims, tp_size=tp_size,
                                    tp_rank=tp_rank)
    return out


def hf_state(states: Sequence[Sequence[MappingABC[str, torch.Tensor]]], dims: Dims) -> dict[str, torch.Tensor]:
    """The full HF state dict from every rank's Megatron parameters, `states[pp_rank][tp_rank]`."""
    out: dict[str, torch.Tensor] = {}
    for m in export_order(dims, len(states)):
        out |= unshard(m, [tp_state[m.megatron] for tp_state in states[m.stage]], dims)
    return out


def resident_views(params: MappingABC[str, torch.Tensor], dims: Dims) -> list[tuple[str, torch.Tensor]]:
    """With tp = pp = 1: every exported HF tensor, in `export_order`, as a view of the Megatron parameter that
    holds it (`params` by Megatron name), for a one-copy refit that reads them in place. q, k and v are the
    grouped views of `qkv_group_views` (their shape is not HF's; their elements in row-major order are:
    `refit/folded.py`); gate and up the halves of fc1; everything else the parameter itself."""
    return [item for m in export_order(dims, 1) for item in gathered_views(m, params[m.megatron], dims, 1).items()]


def bucket_sources(hf_names: Iterable[str], dims: Dims, pp_size: int = 1) -> list[Mapping]:
    """The Megatron parameters (each with its stage) that make the HF tensors `hf_names`, in the order the names
    first need them, each once. A fused parameter (qkv, fc1) is listed for every bucket holding one of its
    HF tensors, so a bucket never waits on a later one."""
    by_hf = {name: m for m in export_order(dims, pp_size) for name in m.hf}
    out: list[Mapping] = []
    for name in hf_names:
        if name not in by_hf:
            raise KeyError(f"{name!r} is not a tensor of this model's HF checkpoint")
        if by_hf[name] not in out:
            out.append(by_hf[name])
    return out
