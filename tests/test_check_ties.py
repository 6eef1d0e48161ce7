"""The verdict on an engine's greedy output against HF's (`colocate/verify.py`, used by `colocate.check` and a
run's `refit.verify_every`): a near-tie that rounding decides, or a real difference."""

from __future__ import annotations

import math

from colocate.verify import compare, tie_gap


def test_the_gap_is_taken_where_the_outputs_first_part():
    engine, hf = [5, 7, 9, 1], [5, 7, 8, 2]
    hf_lp = [-0.1, -0.2, -1.31, -4.0]  # HF's logprobs of the engine's tokens
    hf_top = [-0.1, -0.2, -1.30, -0.5]  # HF's best at each position
    assert math.isclose(tie_gap(engine, hf, hf_lp, hf_top), 0.01)


def test_a_length_difference_is_never_a_tie():
    assert tie_gap([5, 7], [5, 7, 9], [-0.1, -0.2], [-0.1, -0.2]) == math.inf


def test_equal_outputs_and_a_near_tie_pass_a_real_difference_does_not():
    engine = [[5, 7, 9], [3, 3]]
    engine_lp = [[-0.1, -0.2, -1.31], [-0.5, -0.6]]
    hf = [[5, 7, 8], [3, 3]]
    hf_lp = [[-0.1, -0.2, -1.31], [-0.5, -0.6]]
    tie = compare(engine, engine_lp, hf, hf_lp, [[-0.1, -0.2, -1.30], [-0.5, -0.6]], tol=0.1)
    assert tie.ok and (tie.greedy_equal, tie.near_ties, tie.prompts) == (1, 1, 2) and tie.first_difference == ""
    # HF preferred its own token by 0.9 nats: not rounding
    wrong = compare(engine, engine_lp, hf, hf_lp, [[-0.1, -0.2, -0.41], [-0.5, -0.6]], tol=0.1)
    assert not wrong.ok and wrong.near_ties == 0 and "prompt 0" in wrong.first_difference
    assert math.isclose(wrong.max_divergence_gap, 0.9)


def test_equal_tokens_with_logprobs_off_by_more_than_the_tolerance_fail():
    v = compare([[1, 2]], [[-0.5, -0.7]], [[1, 2]], [[-0.5, -0.2]], [[-0.5, -0.2]], tol=2e-3)
    assert not v.ok and v.greedy_equal == 1 and math.isclose(v.max_logprob_diff, 0.5)
    assert v.first_difference.startswith("prompt 0 token 1")
