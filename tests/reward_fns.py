"""User reward functions for the tests, named as `reward.fn=tests.reward_fns:NAME` (module:function)."""

from __future__ import annotations

import time
from typing import Any


def mentions_answer(completion: str, row: dict[str, Any]) -> float:
    """1.0 when the completion contains the row's `answer` field anywhere; reads the whole row."""
    return 1.0 if str(row["answer"]) in completion else 0.0


def text_length(completion: str, row: dict[str, Any]) -> float:
    """The completion's length in characters, over 8 and capped at 1: a reward that varies between a
    random-weight model's samples (the task's own reward is 0 for all of them), so that GPU system runs take
    real optimizer steps and every refit carries changed weights. On a real model's shapes with the tiny
    tokenizer, the length counts the sampled ids that fall in its 512-token vocabulary (the rest decode to
    nothing): ~0.9 per 256-token sample, so nearly every group of 8 samples differs. (The share of digits,
    used before, was 0 for every sample in most steps.)"""
    return min(len(completion) / 8, 1.0)


def fails_on_seven(completion: str, row: dict[str, Any]) -> float:
    if row["answer"] == "7":
        raise ValueError("seven is unlucky")
    return 0.0


def never_returns(completion: str, row: dict[str, Any]) -> float:
    while True:
        time.sleep(1)


def not_a_number(completion: str, row: dict[str, Any]) -> Any:
    return "high"


NOT_CALLABLE = 3
