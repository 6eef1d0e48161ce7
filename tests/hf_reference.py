"""What HF transformers (float32, on CPU) says a model does: the reference the engines are checked against.

Shape legend: P = prompt tokens, R = response tokens.
"""

from __future__ import annotations

from functools import cache

import torch
from transformers import AutoModelForCausalLM


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
