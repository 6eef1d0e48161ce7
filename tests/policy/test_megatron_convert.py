"""HF <-> Megatron-core conversion (`colocate.policy.megatron.convert`) and layout rules, on CPU, no megatron.

Round trips over tiny checkpoints built here (Llama tied and untied, Qwen2 tied with qkv biases, Qwen3 with
q/k norms), every tensor-parallel and pipeline split simulated as pure tensor functions; the interleaved QKV
layout checked by hand (and against Megatron-Bridge's own functions in test_megatron_bridge.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from colocate.models.tiny import build_tiny_model
from colocate.policy.megatron.convert import (
    Dims,
    bucket_sources,
    dims_from_hf_config,
    export_order,
    hf_shapes,
    hf_state,
    interleave_qkv,
    mappings,
    megatron_state,
    resident_views,
    shard,
    unshard,
)
from colocate.policy.megatron.errors import MegatronLayoutError, MegatronModelError
from colocate.policy.megatron.layout import check_divisible, rank_coords, stage_of_layer

# name -> build_tiny_model kwargs. Every one has fewer key/value heads than query heads (GQA) and 4 layers (two
# per stage at pp=2). qwen3's 4 kv heads split over tp=4 one per rank; the others' 2 kv heads take Megatron's
# rule for tp > num_kv_heads (each group's rows spread over tp / num_kv_heads ranks).
MODELS = {
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama-untied": dict(arch="llama", tie_word_embeddings=False),
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True),  # as Qwen2.5-0.5B/1.5B: qkv bias, tied
    "qwen3": dict(arch="qwen3", hidden_size=256, num_heads=8, num_kv_heads=4),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megatron_convert")
    defaults = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=256,
                    vocab_size=512)
    return {name: build_tiny_model(root / name, **(defaults | kw)) for name, kw in MODELS.items()}


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)


@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("model", list(MODELS))
def test_round_trip_is_bit_exact(checkpoints: dict[str, Path], model: str, tp: int, pp: int) -> None:
    path = checkpoints[model]
    hf = _read(path)
    dims = dims_from_hf_config(AutoConfig.from_pretrained(path))
    assert dims.num_kv_heads < dims.num_heads
    assert dims.qkv_bias == model.startswith("qwen2") and dims.qk_norm == model.startswith("qwen3")
    check_divisible(num_heads=dims.num_heads, num_kv_heads=dims.num_kv_heads,
                    intermediate_size=dims.intermediate_size, vocab_size=dims.vocab_size,
                    num_layers=dims.num_layers, tp_size=tp, pp_size=pp, world_size=tp * pp)

    states = [[megatron_state(hf.__getitem__, dims, tp_size=tp, tp_rank=r, pp_size=pp, pp_rank=s)
               for r in range(tp)] for s in range(pp)]

    # Each rank holds its stage's parameters, sliced by tp as Megatron's modules are.
    for s in range(pp):
        want = {m.megatron for m in mappings(dims, pp) if m.stage == s}
        for r in range(tp):
            assert set(states[s][r]) == want
    first, last = states[0][0], states[-1][0]
    H, V = dims.hidden_size, dims.vocab_size
    qkv_rows = (dims.num_heads + 2 * dims.num_kv_heads) * dims.head_dim
    assert first["embedding.word_embeddings.weight"].shape == (V // tp, H)
    assert first["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (qkv_rows // tp, H)
    proj_in = dims.num_heads * dims.head_dim
    assert first["decoder.layers.0.self_attention.linear_proj.weight"].shape == (H, proj_in // tp)
    assert first["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * dims.intermediate_size // tp, H)
    assert first["decoder.layers.0.mlp.linear_fc2.weight"].shape == (H, dims.intermediate_size // tp)
    assert first["decoder.layers.0.input_layernorm.weight"].shape == (H,)
    assert "decoder.final_layernorm.weight" in last
    assert ("decoder.layers.2.input_layernorm.weight" in first) == (pp == 1)
    if dims.tied and pp == 1:
        assert "output_layer.weight" not in last  # Megatron allocates no weight: it reuses the embedding
    if dims.tied and pp > 1:  # the last stage's own copy of the embedding
        for r in range(tp):
            assert torch.equal(states[-1][r]["output_layer.weight"], states[0][r]["embedding.word_embeddings.weight"])

    back = hf_state(states, dims)
    assert set(back) == set(hf)
    assert list(back) == list(hf_shapes(dims))  # checkpoint order, the one the refit streams in
    for name, tensor in hf.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert torch.equal(back[name], tensor), name
        assert hf_shapes(dims)[name] == tuple(tensor.shape), name


@pytest.mark.parametrize("pp", [1, 2, 4])
@pytest.mark.parametrize("model", list(MODELS))
def test_export_order_is_the_manifest_order(checkpoints: dict[str, Path], model: str, pp: int) -> None:
    """`weights_manifest` promises `iter_weights`'s order without gathering: both walk `export_order`."""
    dims = dims_from_hf_config(AutoConfig.from_pretrained(checkpoints[model]))
    order = export_order(dims, pp)
    assert [n for m in order for n in m.hf] == list(hf_shapes(dims))
    assert [m.stage for m in order] == sorted(m.stage for m in order)  # stage by stage: each pipeline rank in turn
    assert all(m.export for m in order) and len({m.megatron + str(m.stage) for m in order}) == len(order)


@pytest.mark.parametrize("model", list(MODELS))
def test_resident_views_are_the_hf_tensors_in_place(checkpoints: dict[str, Path], model: str) -> None:
    """The one-copy refit's sources at tp = pp = 1: every HF tensor, in manifest order, as a view of the Megatron
    parameter holding it (no copy), whose elements in row-major order are the HF tensor's: what the engine
    unfolds them as (`refit/folded.py`). q, k and v are views of other shapes (GQA: the groups interleave)."""
    path = checkpoints[model]
    hf = _read(path)
    dims = dims_from_hf_config(AutoConfig.from_pretrained(path))
    params = megatron_state(hf.__getitem__, dims)
    storages = {t.untyped_storage().data_ptr() for t in params.values()}
    views = resident_views(params, dims)
    assert [n for n, _ in views] == list(hf_shapes(dims))
    for name, view in views:
        assert view.untyped_storage().data_ptr() in storages, name  # read in place, not copied
        assert view.dtype == hf[name].dtype and torch.equal(view.reshape(hf[name].shape), hf[name]), name
        grouped = any(f"self_attn.{p}_proj." in name for p in "qkv")  # [G, rows of a group, ...]
        assert view.dim() == hf[name].dim() + grouped, name
    q = dict(views)["model.layers.0.self_attn.q_proj.weight"]
    assert not q.is_contiguous() and q.shape == (dims.num_kv_heads, dims.heads_per_group * dims.head_dim,
                                                 dims.hidden_size)


def _toy_dims(n: int, g: int, d: int, h: int) -> Dims:
    return Dims(num_layers=1, hidden_size=h, num_heads=n, num_kv_heads=g, head_dim=d, intermediate_size=4,
                vocab_size=8, qkv_bias=True, qk_norm=False, tied=False)


def test_qkv_interleaving_by_hand() -> None:
    # 4 query heads, 2 groups, head_dim 1, one input channel: the rows are the head labels.
    dims = _toy_dims(4, 2, 1, 1)
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    qkv = interleave_qkv(q, k, v, dims)
    assert qkv.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]  # [q0 q1 k0 v0 | q2 q3 k1 v1]
    # tp=2: one group per rank; tp=4 (> 2 groups): rank r holds half of group r // 2, as attention.py slices it.
    m = next(m for m in mappings(dims) if m.megatron.endswith("linear_qkv.weight"))
    hf = {m.hf[0]: q, m.hf[1]: k, m.hf[2]: v}
    assert [shard(m, hf, dims, tp_size=2, tp_rank=r).flatten().tolist() for r in range(2)] == [
        [0, 1, 10, 20], [2, 3, 11, 21]]
    assert [shard(m, hf, dims, tp_size=4, tp_rank=r).flatten().tolist() for r in range(4)] == [
        [0, 1], [10, 20], [2, 3], [11, 21]]
    # biases (1-D) take the same layout
    assert interleave_qkv(q.flatten(), k.flatten(), v.flatten(), dims).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_fc1_is_gate_then_up_per_rank() -> None:
    dims = _toy_dims(2, 1, 1, 1)
    m = next(m for m in mappings(dims) if m.kind == "fc1")
    gate, up = torch.arange(4.0).reshape(4, 1), torch.arange(10.0, 14.0).reshape(4, 1)
    hf = dict(zip(m.hf, (gate, up), strict=True))
    shards = [shard(m, hf, dims, tp_size=2, tp_rank=r) for r in range(2)]
    assert [s.flatten().tolist() for s in shards] == [[0, 1, 10, 11], [2, 3, 12, 13]]
    back = unshard(m, shards, dims)
    assert torch.equal(back[m.hf[0]], gate) and torch.equal(back[m.hf[1]], up)


def test_pipeline_stages_for_pp2() -> None:
    assert [stage_of_layer(i, num_layers=4, pp_size=2) for i in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(MegatronLayoutError, match="num_hidden_layers"):
        stage_of_layer(0, num_layers=5, pp_size=2)
    for tied in (False, True):
        dims = Dims(num_layers=4, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=8,
                    vocab_size=16, qkv_bias=False, qk_norm=False, tied=tied)
        stage = {m.megatron if m.stage == 0 else f"1:{m.megatron}": m for m in mappings(dims, 2)}
        assert stage["embedding.word_embeddings.weight"].stage == 0
        assert stage["1:decoder.final_layernorm.weight"].hf == ("model.norm.weight",)
        assert stage["1:decoder.layers.0.mlp.linear_fc1.weight"].hf[0] == "model.layers.2.mlp.gate_proj.weight"
        out = stage["1:output_layer.weight"]
        # tied: the last stage keeps a copy of the embedding, loaded from it and never exported
        want = (("model.embed_tokens.weight",), False) if tied else (("lm_head.weight",), True)
        assert (out.hf, out.export) == want


def test_bucket_sources_name_the_megatron_tensors_and_stages() -> None:
    dims = Dims(num_layers=4, hidden_size=8, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=8,
                vocab_size=16, qkv_bias=True, qk_norm=False, tied=True)
    bucket = ["model.layers.1.self_attn.k_proj.bias", "model.layers.1.self_attn.q_proj.bias",
              "model.layers.3.mlp.up_proj.weight", "model.embed_tokens.weight"]
    got = [(m.megatron, m.stage) for m in bucket_sources(bucket, dims, pp_size=2)]
    assert got == [("decoder.layers.1.self_attention.linear_qkv.bias", 0),
                   ("decoder.layers.1.mlp.linear_fc1.weight", 1), ("embedding.word_embeddings.weight", 0)]
    with pytest.raises(KeyError, match="lm_head"):
        bucket_sources(["lm_head.weight"], dims, pp_size=2)  # tied: there is none to send
    # every exported name has exactly one source, and the sources cover the manifest
    assert {n for m in bucket_sources(hf_shapes(dims), dims, 2) for n in m.hf} == set(hf_shapes(dims))


@pytest.mark.parametrize(("change", "field"), [
    ({}, None),
    ({"tp_size": 4}, None),                          # 2 kv heads over 4 ranks: Megatron's tp > groups rule
    ({"world_size": 3}, "policy_workers"),
    ({"tp_size": 3, "world_size": 3}, "num_attention_heads"),
    ({"num_heads": 12, "tp_size": 3, "world_size": 3}, "num_key_value_heads"),  # 2 groups, tp 3
    ({"num_kv_heads": 6, "num_heads": 12, "tp_size": 4}, "num_key_value_heads"),  # 6 groups over 4
    ({"intermediate_size": 250, "tp_size": 4}, "intermediate_size"),
    ({"vocab_size": 511}, "vocab_size"),
    ({"num_layers": 3, "pp_size": 2}, "num_hidden_layers"),
])
def test_divisibility_checks(change: dict, field: str | None) -> None:
    kw = dict(num_heads=4, num_kv_heads=2, intermediate_size=256, vocab_size=512, num_layers=4, tp_size=2,
              pp_size=1, world_size=4) | change
    if field is None:
        check_divisible(**kw)
        return
    with pytest.raises(MegatronLayoutError) as err:
        check_divisible(**kw)
    assert err.value.field == field


def test_rank_coords_follow_megatron_order() -> None:
    # tp=2, pp=2, 8 ranks -> dp=2; order tp-cp-ep-dp-pp: tp fastest, pp slowest.
    got = [rank_coords(r, tp_size=2, pp_size=2, world_size=8) for r in range(8)]
    assert [(c.tp, c.dp, c.pp) for c in got] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0),
                                                 (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]


def test_unsupported_checkpoints_are_named(tmp_path: Path) -> None:
    gemma = AutoConfig.for_model("gemma")
    with pytest.raises(MegatronModelError) as err:
        dims_from_hf_config(gemma)
    assert err.value.field == "model_type"
    llama = AutoConfig.for_model("llama", attention_bias=True)
    with pytest.raises(MegatronModelError) as err:
        dims_from_hf_config(llama)
    assert err.value.field == "attention_bias"
