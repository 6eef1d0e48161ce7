"""`colocate.check`'s reading of a greedy divergence: a near-tie that rounding decides, or a real difference."""

from __future__ import annotations

import math

from colocate.check import _tie_gap


def test_the_gap_is_taken_where_the_outputs_first_part():
    engine, hf = [5, 7, 9, 1], [5, 7, 8, 2]
    hf_lp = [-0.1, -0.2, -1.31, -4.0]  # HF's logprobs of the engine's tokens
    hf_top = [-0.1, -0.2, -1.30, -0.5]  # HF's best at each position
    assert math.isclose(_tie_gap(engine, hf, hf_lp, hf_top), 0.01)


def test_a_length_difference_is_never_a_tie():
    assert _tie_gap([5, 7], [5, 7, 9], [-0.1, -0.2], [-0.1, -0.2]) == math.inf
