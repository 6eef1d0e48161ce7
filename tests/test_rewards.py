"""The rewards: the math reward on a table of cases (each call bounded in time, a pathological one included),
the built-ins, `module:function` user rewards by name, their errors naming the row, the parallel pool."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from colocate.rewards import exact_match, exact_number, math_reward
from colocate.rewards.pool import Item, RewardFnError, RewardPool
from colocate.rewards.spec import RewardSpecError, load_reward

GSM8K_GOLD = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
PATHOLOGICAL = "\\boxed{9^{9^{9^{9^{9}}}}}"  # sympy would evaluate the power tower forever

MATH_CASES = [  # (completion, gold answer, reward)
    ("The answer is \\boxed{42}.", "42", 1.0),
    ("First 48/2 = 24, then 48 + 24 = 72.\n#### 72", GSM8K_GOLD, 1.0),
    ("She sold 72 clips in total.", GSM8K_GOLD, 1.0),  # a final number, against a rationale
    ("#### 1,234", "#### 1234", 1.0),
    ("So she has 3/4 of the cake left", "\\frac{3}{4}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so it is $\\frac{\\sqrt{2}}{2}$", "\\boxed{\\frac{1}{\\sqrt{2}}}", 1.0),  # symbolic
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("\\boxed{41}", "42", 0.0),
    ("#### 71", GSM8K_GOLD, 0.0),
    ("\\boxed{\\frac{2}{3}}", "\\frac{3}{4}", 0.0),
    ("", "42", 0.0),
    ("lorem ipsum dolor", "42", 0.0),
    ("\\boxed{", "42", 0.0),
    ("}}{{\\frac{", "1", 0.0),
    ("\\boxed{42}", "", 0.0),  # no gold answer scores nothing
]


def _items(cases):
    return [Item(c, a, {"answer": a}, i) for i, (c, a, _) in enumerate(cases)]


@pytest.mark.parametrize("completion, answer, expected", MATH_CASES)
def test_math_reward_on_the_main_thread(completion, answer, expected):
    assert math_reward(completion, answer) == expected


def test_math_reward_table_in_parallel_each_call_bounded():
    """The whole table plus a pathological input through the pool: the pathological call is killed at the
    bound and scores 0, every other case scores as on the main thread."""
    cases = [*MATH_CASES, (PATHOLOGICAL, "3", 0.0)]
    pool = RewardPool("math", workers=2, timeout_s=3.0)
    try:
        pool.score(_items(MATH_CASES[:2]))  # start-up (spawn, import sympy) is not part of the bound
        start = time.monotonic()
        got = pool.score(_items(cases))
        elapsed = time.monotonic() - start
    finally:
        pool.close()
    assert got == [e for _, _, e in cases]
    assert pool.timeouts == 1
    assert elapsed < 3.0 + 5.0  # the bound, plus a replacement process's start and the other cases


def test_pathological_input_hangs_without_the_bound():
    """What the bound is for: math-verify with its alarms off is still comparing after 8 s."""
    code = textwrap.dedent(f"""
        from math_verify import parse, verify
        verify(parse("\\\\boxed{{3}}", parsing_timeout=None),
               parse({PATHOLOGICAL!r}, parsing_timeout=None), timeout_seconds=None)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=8)
    finally:
        proc.kill()
        proc.wait()


def test_math_reward_off_the_main_thread():
    """math-verify's own alarm cannot run off the main thread: it is switched off there, not an error."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(math_reward, "\\boxed{42}", "42").result(timeout=30) == 1.0


@pytest.mark.parametrize("fn, completion, answer, expected", [
    (exact_number, " 7", "7", 1.0),
    (exact_number, "3 + 4 = 7", "7", 0.0),  # the first number only: why reasoning never scores with it
    (exact_number, "-3", "-3", 1.0),
    (exact_match, "  yes\n", "yes", 1.0),
    (exact_match, "yes.", "yes", 0.0),
])
def test_builtins(fn, completion, answer, expected):
    assert fn(completion, answer) == expected


def test_user_reward_by_dotted_path_gets_the_row():
    pool = RewardPool("tests.reward_fns:mentions_answer", workers=2, timeout_s=30)
    try:
        got = pool.score([Item("it is 12", "ignored", {"answer": 12}, 0), Item("no", "x", {"answer": 5}, 1)])
    finally:
        pool.close()
    assert got == [1.0, 0.0]


@pytest.mark.parametrize("workers", [0, 2])
def test_user_reward_exception_names_the_row(workers):
    pool = RewardPool("tests.reward_fns:fails_on_seven", workers=workers, timeout_s=30)
    items = [Item("a", "1", {"answer": "1"}, 10), Item("b", "7", {"answer": "7"}, 11)]
    try:
        with pytest.raises(RewardFnError, match="failed on row 11: ValueError: seven is unlucky") as info:
            pool.score(items)
    finally:
        pool.close()
    assert info.value.row_index == 11
    assert "fails_on_seven" in info.value.remote_traceback


def test_user_reward_not_a_number_names_the_row():
    pool = RewardPool("tests.reward_fns:not_a_number", workers=1, timeout_s=30)
    try:
        with pytest.raises(RewardFnError, match="returned 'high' for row 4: not a finite number"):
            pool.score([Item("a", "1", {}, 4)])
    finally:
        pool.close()


def test_slow_user_reward_is_killed_and_scores_zero():
    pool = RewardPool("tests.reward_fns:never_returns", workers=2, timeout_s=1.0)
    try:
        start = time.monotonic()
        assert pool.score([Item("a", "1", {}, 0), Item("b", "2", {}, 1)]) == [0.0, 0.0]
        assert time.monotonic() - start < 1.0 + 10.0  # both in parallel, each killed at the bound
    finally:
        pool.close()
    assert pool.timeouts == 2


@pytest.mark.parametrize("spec, match", [
    ("nope", "neither a built-in"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("tests.reward_fns:missing", "has no 'missing'"),
    ("tests.reward_fns:NOT_CALLABLE", "is a int, not a function"),
])
def test_bad_reward_spec_is_one_named_error(spec, match):
    with pytest.raises(RewardSpecError, match=match) as info:
        load_reward(spec)
    assert "\n" not in str(info.value)
