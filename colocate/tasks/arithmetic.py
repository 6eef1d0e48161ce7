"""A synthetic verifiable task: small additions, answer checked exactly.

    prompt:  "Q: 3+4= A:"        completion: " 7<eos>"

The format matches `colocate.models.tiny.default_corpus`, so the tiny tokenizer splits digits one per token.
Held-out prompts are the pairs whose index hashes into the validation split, disjoint from training pairs.
A JSONL dataset ({"prompt": ..., "answer": ...} per line) can replace the generator.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str


def _pairs(max_operand: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_problems(max_operand: int, val_fraction: float, seed: int) -> tuple[list[Problem], list[Problem]]:
    pairs = _pairs(max_operand)
    random.Random(seed).shuffle(pairs)
    n_val = max(1, int(len(pairs) * val_fraction))
    make = [Problem(f"Q: {a}+{b}= A:", str(a + b)) for a, b in pairs]
    return make[n_val:], make[:n_val]


def load_jsonl(path: str) -> list[Problem]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    try:
        return [Problem(str(r["prompt"]), str(r["answer"])) for r in rows]
    except KeyError as e:
        raise ValueError(f"{path}: every line needs 'prompt' and 'answer' (missing {e})") from None


_NUMBER = re.compile(r"-?\d+")


def reward(completion: str, answer: str) -> float:
    """1.0 when the first number in the completion is the answer, else 0.0."""
    m = _NUMBER.search(completion)
    return 1.0 if m is not None and m.group() == answer else 0.0
