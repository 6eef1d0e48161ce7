"""The tiny model builder, and the vLLM CPU engine against HF transformers: greedy parity, then a refit.

The refit test loads a different model (seed 1) through begin / several partial buckets / finish, with the
buckets cut so that a fused parameter's shards (q_proj, k_proj, v_proj) land in different buckets, and with
each bucket overwritten after it was loaded, as a receiver reusing its buffer would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from colocate.models import tiny
from tests import hf_reference

PROMPTS = ["Q: 12+7= A:", "Q: 93-40= A:", "The answer is", "what"]
MAX_NEW_TOKENS = 16
EXTENSION = "colocate.engine.testing_ext.WeightUpdateTestExtension"


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_build_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = _files(tiny.build_tiny_model(tmp_path / "a", seed=0))
    b = _files(tiny.build_tiny_model(tmp_path / "b", seed=0))
    c = _files(tiny.build_tiny_model(tmp_path / "c", seed=1))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(a)
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    # The tokenizer depends on the corpus only, so one engine can serve both seeds.
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_head_dim_below_32_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head_dim"):
        tiny.build_tiny_model(tmp_path, hidden_size=64, num_heads=4)
    assert not (tmp_path / "model.safetensors").exists()


def test_tokenizer_matches_model_vocab(tmp_path: Path) -> None:
    path = tiny.build_tiny_model(tmp_path, vocab_size=512)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == json.loads((path / "config.json").read_text())["vocab_size"] == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (tiny.BOS, tiny.EOS, tiny.PAD)
    ids = tok("Q: 12+7= A: 19")["input_ids"]
    assert tok.decode(ids) == "Q: 12+7= A: 19"
    assert [t for t in tok.convert_ids_to_tokens(ids) if t.isdigit()] == ["1", "2", "7", "1", "9"]


@pytest.mark.parametrize("tie", [False, True])
def test_llama_and_tied_variants_load_in_hf(tmp_path: Path, tie: bool) -> None:
    path = tiny.build_tiny_model(tmp_path, arch="llama", tie_word_embeddings=tie)
    assert ("lm_head.weight" in load_file(path / "model.safetensors")) is not tie
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 512)


def test_cli_writes_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["tiny", str(tmp_path / "m"), "--seed", "3"])
    tiny.main()
    assert (tmp_path / "m" / "model.safetensors").exists()


# ---- vLLM (CPU build) ----


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {seed: tiny.build_tiny_model(root / f"seed{seed}", seed=seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def prompt_ids(model_dirs: dict[int, Path]) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(model_dirs[0])
    return [tok(p)["input_ids"] for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_outputs(model_dirs: dict[int, Path], prompt_ids: list[list[int]]) -> dict[int, list[list[int]]]:
    """HF greedy continuations per seed: the reference the engine must reproduce token for token."""
    outputs = {seed: hf_reference.greedy(str(path), prompt_ids, MAX_NEW_TOKENS) for seed, path in model_dirs.items()}
    assert outputs[0] != outputs[1]
    return outputs


@pytest.fixture(scope="module")
def llm(model_dirs: dict[int, Path]):
    from colocate.engine.vllm_engine import make_llm, shutdown_llm

    engine = make_llm(str(model_dirs[0]), dtype="float32", seed=0, worker_extension_cls=EXTENSION)
    yield engine
    shutdown_llm(engine)


def _vllm_greedy(llm, prompt_ids: list[list[int]]) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]


def _refit(llm, buckets: list[list[tuple[str, torch.Tensor]]]) -> None:
    llm.collective_rpc("colocate_begin_weight_update")
    for bucket in buckets:
        llm.collective_rpc("colocate_load_weights", args=(bucket,))
        for _, tensor in bucket:
            tensor.zero_()  # the sender refills its buffer once the load returned
    llm.collective_rpc("colocate_finish_weight_update")
    llm.reset_prefix_cache()


@pytest.mark.slow
def test_engine_parameters_use_vllm_names(llm) -> None:
    (shapes,) = llm.collective_rpc("colocate_parameter_shapes")
    assert "model.layers.0.self_attn.qkv_proj.weight" in shapes
    assert "model.layers.1.mlp.gate_up_proj.weight" in shapes
    assert "model.layers.0.self_attn.q_proj.weight" not in shapes


@pytest.mark.slow
def test_vllm_greedy_matches_hf(llm, prompt_ids, hf_outputs) -> None:
    assert _vllm_greedy(llm, prompt_ids) == hf_outputs[0]


@pytest.mark.slow
def test_refit_in_partial_buckets_matches_hf(llm, model_dirs, prompt_ids, hf_outputs) -> None:
    state = load_file(model_dirs[1] / "model.safetensors")
    names = sorted(state)
    buckets = [[(n, state[n]) for n in names[i::3]] for i in range(3)]
    where = {n: i for i, bucket in enumerate(buckets) for n, _ in bucket}
    prefix = "model.layers.0.self_attn."
    assert len({where[prefix + p + "_proj.weight"] for p in "qkv"}) > 1, "buckets must split qkv_proj"

    _refit(llm, buckets)
    assert _vllm_greedy(llm, prompt_ids) == hf_outputs[1]

    # And back, in one bucket: a second refit on the same engine.
    _refit(llm, [sorted(load_file(model_dirs[0] / "model.safetensors").items())])
    assert _vllm_greedy(llm, prompt_ids) == hf_outputs[0]


@pytest.mark.slow
def test_load_outside_begin_finish_raises(llm) -> None:
    with pytest.raises(RuntimeError, match="outside begin"):
        llm.collective_rpc("colocate_load_weights", args=([],))


@pytest.mark.slow
def test_a_large_batch_of_seeded_prompts_samples_on_cpu(llm) -> None:
    """More prompt tokens than one engine step takes, each request with its own seed (as GRPO samples): on
    vLLM 0.32's CPU runner a chunked prefill of a seeded request raises "CPU Generator does not use offset";
    `make_llm` prefills prompts whole on CPU."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": [3 + (i * 7 + j) % 200 for j in range(200)]} for i in range(64)]
    params = [SamplingParams(temperature=1.0, max_tokens=4, seed=i, ignore_eos=True) for i in range(64)]
    results = llm.generate(prompts, params, use_tqdm=False)
    assert [len(r.outputs[0].token_ids) for r in results] == [4] * 64
