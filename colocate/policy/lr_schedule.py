"""Learning-rate multiplier: linear warmup, then constant, linear or cosine decay to `min_lr_ratio`.

A pure function of the step, so that `LambdaLR` checkpoints nothing but the step count and resuming from a
checkpoint reproduces the schedule exactly.
"""

import math
from typing import Literal

LrDecay = Literal["constant", "linear", "cosine"]
LR_DECAYS: tuple[str, ...] = ("constant", "linear", "cosine")


def lr_multiplier(
    step: int, *, warmup_steps: int, total_steps: int, decay: LrDecay = "constant", min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the base learning rate for optimizer step `step` (0-based).

    Warmup starts at 1 / (warmup_steps + 1) rather than 0, so the first step already moves the weights.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"decay must be one of {LR_DECAYS}, got {decay!r}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if decay == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    shape = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape
