"""`reward.fn` to a function: a built-in's name, or `module:function` imported like any module."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

from colocate.errors import InputError

BUILTINS = ("exact_number", "exact_match", "math")
# (completion, gold answer, row) -> reward: built-ins read the answer, a user's function the whole row.
Reward = Callable[[str, str, dict[str, Any]], float]


class RewardSpecError(InputError):
    """`reward.fn` names nothing callable."""


def load_reward(spec: str) -> Reward:
    """The function `spec` names, as a `Reward`; `RewardSpecError` (one line) if it cannot be had."""
    if spec in BUILTINS:
        return _builtin(spec)
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise RewardSpecError(f"reward.fn: {spec!r} is neither a built-in ({', '.join(BUILTINS)}) nor "
                              "'module:function'", subject="reward.fn")
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        raise RewardSpecError(f"reward.fn: cannot import {module!r} ({type(e).__name__}: {e})",
                              subject="reward.fn") from None
    fn = getattr(mod, name, None)
    if fn is None:
        raise RewardSpecError(f"reward.fn: module {module!r} has no {name!r}", subject="reward.fn")
    if not callable(fn):
        raise RewardSpecError(f"reward.fn: {spec} is a {type(fn).__name__}, not a function", subject="reward.fn")
    return lambda completion, answer, row: fn(completion, row)


def _builtin(name: str) -> Reward:
    if name == "math":
        if importlib.util.find_spec("math_verify") is None:
            raise RewardSpecError("reward.fn=math needs the math-verify package (pip install math-verify)",
                                  subject="reward.fn")
        from colocate.rewards.math_answer import math_reward as fn
    else:
        from colocate.rewards import builtin

        fn = getattr(builtin, name)
    return lambda completion, answer, row: fn(completion, answer)
