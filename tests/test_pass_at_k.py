"""The held-out pass@k estimator, on hand-built tables (the runs that log it: tests/test_first_run.py)."""

from __future__ import annotations

import math

import pytest

from colocate.algorithms.grpo import mean_pass_at_k, pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "want"),
    [
        (4, 0, 4, 0.0),  # nothing correct
        (4, 1, 4, 1.0),  # n = k: 1 as soon as one of the k is correct
        (4, 4, 4, 1.0),
        (4, 1, 1, 0.25),  # pass@1 is the share correct
        (5, 2, 1, 0.4),
        (5, 2, 2, 1 - math.comb(3, 2) / math.comb(5, 2)),  # 0.7: 3 of the 10 pairs hold no correct one
        (10, 3, 4, 1 - math.comb(7, 4) / math.comb(10, 4)),
    ],
)
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 2), (4, -1, 2), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def test_mean_over_prompts_of_k_samples_each():
    correct = [
        [False, False, True],  # one correct of three: counts fully for pass@3, a third for pass@1
        [False, False, False],
        [True, True, True],
        [False, True, False],
    ]
    assert mean_pass_at_k(correct, 3) == pytest.approx(3 / 4)
    assert mean_pass_at_k(correct, 1) == pytest.approx((1 / 3 + 0 + 1 + 1 / 3) / 4)
    assert mean_pass_at_k(correct, 2) == pytest.approx((2 / 3 + 0 + 1 + 2 / 3) / 4)
    # greedy: one completion per prompt, pass@1 is the share of prompts it gets right
    assert mean_pass_at_k([[True], [False], [False], [True]], 1) == 0.5
