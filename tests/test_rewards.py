"""Tests for agro.rewards: answer extraction, equivalence and math_reward (agro_math.md §8)."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path

import pytest

from agro import rewards
from agro.rewards import extract_answer, is_equivalent, math_reward

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _rows(name: str) -> list[dict]:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (shared data is optional)")
    with path.open() as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------ extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        # "The final answer is": rest of the sentence, without "$", full stop, \boxed{}
        ("Work...\nFinal Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac{3}{4}"),
        ("The final answer is 3.5.", "3.5"),
        ("the final answer is: **42**", "42"),
        ("The final answer is $\\boxed{x^2 + 1}$.", "x^2 + 1"),
        ("The final answer is $(1, 2)$. Done", "(1, 2)"),
        ("The final answer is 7.\nLater text 99", "7"),
        ("The final answer is 1. The final answer is 2.", "2"),  # the last marker wins
        ("\\boxed{5} The final answer is 6", "6"),  # the marker beats \boxed
        ("The final answer is\n\\boxed{8}", "8"),  # empty marker sentence: fall back to \boxed
        # last \boxed{}, balanced and nested braces
        ("so \\boxed{\\frac{1}{\\sqrt{2}}} and later \\boxed{\\frac{\\pi}{2}}.", "\\frac{\\pi}{2}"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("$\\boxed{\\{1, 2\\}}$", "\\{1, 2\\}"),
        ("\\boxed{\\begin{pmatrix} 1 \\\\ {2} \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ {2} \\end{pmatrix}"),
        ("\\boxed{4} then an unclosed \\boxed{5", "4"),
        ("\\fbox{12}", "12"),
        # GSM8K
        ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 18", "18"),
        ("#### 1,234\n", "1,234"),
        # last number
        ("x = 3, then 17 apples.", "17"),
        ("It costs -3.25 dollars", "-3.25"),
        ("ratio 3/4", "3/4"),
        ("total 1,234,567 people", "1234567"),
        ("a list 1,2,3", "3"),
        ("from 5-3 we get", "3"),
        ("about .5 of it", ".5"),
        ("wait\u2212 \u22127", "-7"),
        # nothing
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_reads_only_the_tail_of_huge_text():
    text = "The final answer is 1.\n" + "x" * (rewards.MAX_COMPLETION_CHARS + 10) + " 2"
    assert extract_answer(text) == "2"
    assert extract_answer(text, max_chars=len(text)) == "1"


def test_extraction_is_linear_time_on_regex_bait():
    baits = ["1," * 400_000, "\\boxed{" * 200_000, "{" * 1_000_000, "-" * 1_000_000 + "1", "final answer is " * 100_000]
    for bait in baits:
        t = time.perf_counter()
        extract_answer(bait, max_chars=len(bait))  # the whole string, not just the tail
        assert time.perf_counter() - t < 1.0, bait[:20]


# ------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("15", "15"), ("15", "15.0"), ("15000", "15,000"), ("15,000", "15{,}000"), ("\\frac{3}{4}", "0.75"),
        ("\\frac{3}{4}", "3/4"), ("\\dfrac{3}{4}", "\\frac34"), ("-\\frac{1}{2}", "-0.5"), ("\\frac{1}{3}", "0.333333"),
        ("18", "\\$18"), ("18", "18 \\text{ dollars}"), ("30^\\circ", "30"), ("He had 70 + 2. #### 72", "72"),
        ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"), ("2\\sqrt{2}", "\\sqrt{8}"), ("(x+1)^2", "x^2+2x+1"),
        ("\\{1, 2, 3\\}", "\\{3,2,1\\}"), ("[0, 1)", "[0,1)"), ("(-\\infty, 3]", "(-\\infty, 3]"),
        ("\\pi", "3.14159265"), ("x = 5", "5"), ("\\text{(C)}", "C"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ],
)
def test_is_equivalent_true(gold, pred):
    assert is_equivalent(gold, pred)


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("15", "16"), ("15", "1.5"), ("15,000", "15"), ("\\frac{3}{4}", "0.74"), ("\\frac{1}{3}", "0.33"),
        ("-\\frac{1}{2}", "0.5"), ("-\\frac{1}{2}", "\\frac{1}{2}"), ("-7", "7"), ("3/4", "4/3"), ("(x+1)^2", "x^2+1"), ("\\{1, 2\\}", "\\{1, 3\\}"),
        ("[0, 1)", "(0, 1]"), ("\\sqrt{2}", "2"), ("\\text{(C)}", "D"), ("5", ""), ("5", "x"),
    ],
)
def test_is_equivalent_false(gold, pred):
    assert not is_equivalent(gold, pred)


def test_plain_numbers_never_need_sympy():
    cases = {("15", "15.0"): 1.0, ("15,000", "15000"): 1.0, ("\\frac{3}{4}", "0.75"): 1.0, ("-7", "7"): 0.0,
             ("1/3", "0.33"): 0.0, ("1/3", "0.3333333"): 1.0, ("2/4", "\\frac{1}{2}"): 1.0, ("5", "50"): 0.0}
    assert {k: rewards.quick_verdict(*k) for k in cases} == cases


def test_sandbox_comparison_works_outside_the_main_thread():
    """math-verify's default timeout (signal.alarm) raises outside the main thread; ours is off."""
    out = {}
    th = threading.Thread(target=lambda: out.update(v=rewards.sandbox_equivalent("\\frac{1}{\\sqrt{2}}", "\\sqrt{2}/2")))
    th.start()
    th.join(60)
    assert out == {"v": True}


# ------------------------------------------------------------------------------ math_reward


def test_math_reward_values_and_unparsable_gold():
    completions = ["The final answer is 10.", "\\boxed{\\frac{1}{2}}", "So 71.", "#### 72", "The final answer is 3.", "nothing"]
    answers = ["10", "0.5", "He ate ... #### 72", "72", "", "4"]
    assert math_reward(completions, answers) == [1.0, 1.0, 0.0, 1.0, None, 0.0]
    assert math_reward(["5"] * 4, [None, "   ", "#### ", "9" * 600]) == [None] * 4  # type: ignore[list-item]


def test_math_reward_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        math_reward(["1", "2"], ["1"])


def test_arithmetic_hot_path_is_cheap():
    rng = random.Random(0)
    completions, answers = [], []
    for _ in range(1000):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        guess = a * b + rng.choice([0, 0, 1, -10])
        completions.append(f"{a} * {b}: first {a} * {b // 10 * 10} = {a * (b // 10 * 10)}. The final answer is {guess:,}.")
        answers.append(str(a * b))
    res = rewards.default_grader().grade(completions, answers)
    expected = [1.0 if c.endswith(f"{int(a):,}.") else 0.0 for c, a in zip(completions, answers)]
    assert res.rewards == expected
    assert res.sandboxed == 0  # plain numbers are compared in the trainer process
    assert res.seconds < 2.0


@pytest.mark.data
def test_math500_solutions_match_their_answers():
    rows = _rows("math500_test.jsonl")
    res = rewards.default_grader().grade([r["solution"] for r in rows], [r["answer"] for r in rows])
    assert sum(v == 1.0 for v in res.rewards) >= 0.99 * len(rows)
    assert res.timeouts == 0 and res.errors == 0


@pytest.mark.data
def test_math500_solutions_do_not_match_other_answers():
    """Guards against a grader that says yes too easily (each solution vs the next row's answer)."""
    rows = _rows("math500_test.jsonl")[:200]
    others = rows[1:] + rows[:1]
    res = rewards.default_grader().grade([r["solution"] for r in rows], [o["answer"] for o in others])
    same = sum(rewards._normalise(r["answer"]) == rewards._normalise(o["answer"]) for r, o in zip(rows, others))
    assert sum(v == 1.0 for v in res.rewards) <= same + 2
    assert res.sandboxed > 50  # this test does exercise the Sympy path


_INNER_FRAC = re.compile(r"\\d?frac\{([^{}]*)\}\{([^{}]*)\}")


@pytest.mark.data
def test_math500_rewritten_answers_need_sympy_and_match():
    """Gold answers with every \\frac{a}{b} rewritten as ((a)/(b)): only Sympy can equate them."""
    golds, preds = [], []
    for r in _rows("math500_test.jsonl"):
        pred = r["answer"]
        while (new := _INNER_FRAC.sub(r"((\1)/(\2))", pred)) != pred:
            pred = new
        if pred != r["answer"] and rewards.quick_verdict(r["answer"], pred) is None:
            golds.append(r["answer"])
            preds.append(pred)
    assert len(preds) >= 20
    res = rewards.default_grader().equivalent(golds, preds)
    assert res.sandboxed == len(preds)
    assert sum(v == 1.0 for v in res.rewards) >= 0.95 * len(preds)


@pytest.mark.data
def test_gsm8k_answer_fields_match_themselves():
    rows = _rows("gsm8k_test.jsonl")
    fields = [r["answer"] for r in rows]
    rewards_ = math_reward(fields, fields)
    assert sum(v == 1.0 for v in rewards_) >= 0.995 * len(rows)
    # and a wrong final number is caught
    wrong = [f.rsplit("####", 1)[0] + "#### " + str(int(f.rsplit("####", 1)[1].replace(",", "")) + 1) for f in fields[:200]]
    assert all(v == 0.0 for v in math_reward(wrong, fields[:200]))
