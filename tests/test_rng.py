"""RNG states survive the round trip through JSON that checkpoints take (`colocate/rng.py`)."""

from __future__ import annotations

import json
import random

import numpy as np
import torch

from colocate.rng import generator_state, rng_state, set_generator_state, set_rng_state


def _draw() -> tuple:
    return random.random(), float(np.random.normal()), torch.rand(3).tolist()


def test_process_rngs_restore_to_the_same_draws():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # numpy's cached second gaussian is part of its state
    saved = json.loads(json.dumps(rng_state()))
    first = _draw()
    assert _draw() != first
    set_rng_state(saved)
    assert _draw() == first


def test_a_generator_restores_to_the_same_draws():
    gen = torch.Generator().manual_seed(0)
    torch.randint(100, (5,), generator=gen)
    saved = json.loads(json.dumps(generator_state(gen)))
    first = torch.randint(100, (8,), generator=gen).tolist()
    other = torch.Generator().manual_seed(99)
    set_generator_state(other, saved)
    assert torch.randint(100, (8,), generator=other).tolist() == first
