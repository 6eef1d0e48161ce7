"""What scores a completion (`reward.fn`): a built-in by name or a user's `module:function`.

    exact_number   the first integer in the completion equals the answer (the arithmetic task's)
    exact_match    the stripped completion equals the stripped answer
    math           math-verify's symbolic comparison (`math_answer.py`): \\boxed{}, "#### 42", a final number,
                   fractions, LaTeX; the gold answer may be a GSM8K rationale ending "#### 72"

A user's function takes (completion: str, row: dict) and returns a float. `pool.RewardPool` calls it in
worker processes, each call bounded in time.
"""

from colocate.rewards.builtin import exact_match, exact_number
from colocate.rewards.math_answer import math_reward

__all__ = ["exact_match", "exact_number", "math_reward"]
