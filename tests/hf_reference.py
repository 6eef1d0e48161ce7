"""What HF transformers (float32, on CPU) says a model does: the reference the engines are checked against.

Shape legend: P = prompt tokens, R = response tokens.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from colocate.models.tiny import build_tiny_model


@cache
def load(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def greedy(path: str, prompt_ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy responses, one prompt at a time (no padding), stopping at EOS as vLLM does."""
    model = load(path)
    out = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_tokens)
        out.append(y[0, len(ids):].tolist())
    return out


@torch.no_grad()
def token_logprobs(path: str, prompt_ids_P: list[int], response_ids_R: list[int]) -> torch.Tensor:
    """Teacher-forced log-probabilities of the response tokens given the prompt: [R]."""
    ids = torch.tensor([prompt_ids_P + response_ids_R])
    logits = load(path)(ids).logits[0, len(prompt_ids_P) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(response_ids_R)[:, None])[:, 0]


def two_models(root: Path) -> dict[int, str]:
    """Tiny models from seeds 0 and 1 under `root`: an engine's "before" and "after" a refit."""
    return {seed: str(build_tiny_model(root / f"seed{seed}", seed=seed)) for seed in (0, 1)}


def greedy_of_each(models: dict[int, str], prompts: list[str], max_tokens: int
                   ) -> tuple[list[list[int]], dict[int, list[list[int]]]]:
    """The prompts' token ids and each model's greedy responses, which must differ between the models."""
    tok = AutoTokenizer.from_pretrained(models[0])
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    out = {seed: greedy(path, prompt_ids, max_tokens) for seed, path in models.items()}
    assert out[0] != out[1], "the two models decode alike: a refit between them would prove nothing"
    return prompt_ids, out


CPU_KV_BLOCK = 128  # vLLM's KV block size on CPU: only whole blocks are cached


def long_prompt_ids(model_path: str) -> list[int]:
    """160 token ids: one whole CPU KV block (so a prefix-cached request serves it from the cache) and some."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)("Q: 12+7= A: 19. " * 40)["input_ids"][:CPU_KV_BLOCK + 32]

