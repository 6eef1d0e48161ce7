"""A synthetic verifiable task: small additions, answer checked exactly (`reward.fn=exact_number`).

    prompt:  "Q: 3+4= A:"        completion: " 7<eos>"

The format matches `colocate.models.tiny.default_corpus`, so the tiny tokenizer splits digits one per token.
Held-out prompts are the pairs whose index hashes into the validation split, disjoint from training pairs.
A data file (`data.path`, `colocate.data`) replaces the generator.
"""

from __future__ import annotations

import random

from colocate.data.problem import Problem


def _pairs(max_operand: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]


def split_problems(max_operand: int, val_fraction: float, seed: int) -> tuple[list[Problem], list[Problem]]:
    pairs = _pairs(max_operand)
    random.Random(seed).shuffle(pairs)
    n_val = max(1, int(len(pairs) * val_fraction))
    make = [Problem(f"Q: {a}+{b}= A:", str(a + b), {"prompt": f"Q: {a}+{b}= A:", "answer": str(a + b)}, i)
            for i, (a, b) in enumerate(pairs)]
    return make[n_val:], make[:n_val]
