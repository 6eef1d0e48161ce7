"""User reward functions for the tests, named as `reward.fn=tests.reward_fns:NAME` (module:function)."""

from __future__ import annotations

import time
from typing import Any


def mentions_answer(completion: str, row: dict[str, Any]) -> float:
    """1.0 when the completion contains the row's `answer` field anywhere; reads the whole row."""
    return 1.0 if str(row["answer"]) in completion else 0.0


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
