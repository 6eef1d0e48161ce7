"""The `math` reward: is the completion's final answer mathematically the gold one? Built on HF math-verify.

The gold answer may be a bare value ("72", "\\frac{3}{4}", "x^2+1"), a \\boxed{} expression, or a GSM8K
rationale ending "#### 72" (the part after the last "####" is the answer). The completion's answer is what
follows its last "####" if it has one, else what math-verify extracts (\\boxed{} first, then LaTeX, then a
final number or expression); comparison is symbolic and numeric (1/2 = 0.5 = \\frac{1}{2}).

Time: math-verify bounds parsing and comparison with SIGALRM, which works only on a process's main thread;
on any other thread it is switched off here, and `RewardPool` bounds every call from outside (it kills the
process), which also covers what an alarm cannot interrupt.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

# Per parse or comparison, for math-verify's own alarm (whole seconds: signal.alarm takes an int).
ALARM_S = 5


def _after_hashes(text: str) -> str | None:
    """The text after the last "####", commas dropped (GSM8K writes 1,234), or None without one."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "")


def _parse(text: str, *, alarm: int | None) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]
    return parse(text, extraction_config=configs, parsing_timeout=alarm)


def _parse_gold(answer: str, *, alarm: int | None) -> list[Any]:
    text = _after_hashes(answer)
    if text is None:
        text = answer.strip()
    if "\\boxed" in text or "$" in text:
        return _parse(text, alarm=alarm)
    # A bare value: as LaTeX math first ("x^2+1", "\\frac{3}{4}"), then as a plain expression.
    return _parse(f"${text}$", alarm=alarm) or _parse(text, alarm=alarm)


def math_reward(completion: str, answer: str) -> float:
    """1.0 when the completion's final answer equals the gold `answer` (see the module docstring), else 0.0."""
    from math_verify import verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # a timed-out parse is a 0, not a warning each
    alarm = ALARM_S if threading.current_thread() is threading.main_thread() else None
    gold = _parse_gold(answer, alarm=alarm)
    if not gold:
        return 0.0
    text = _after_hashes(completion)
    pred = _parse(text if text is not None else completion, alarm=alarm)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=alarm) else 0.0

