"""The plain built-in rewards: (completion, gold answer) -> 1.0 or 0.0."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+")


def exact_number(completion: str, answer: str) -> float:
    """1.0 when the first integer in the completion is the answer, else 0.0 (the arithmetic task's reward:
    a completion that reasons before answering never scores; use `math` for those)."""
    m = _NUMBER.search(completion)
    return 1.0 if m is not None and m.group() == answer.strip() else 0.0


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion, stripped, is the answer, stripped."""
    return 1.0 if completion.strip() == answer.strip() else 0.0
