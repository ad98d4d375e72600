"""Agreement of agro's graders with expected verdicts on answer-equivalence cases (written for agro).

The cases (tests/equivalence_cases.py, hand-written for this project) cover every kind of answer
that issue 8 found scored wrong: answers in ``$...$`` / ``$$...$$`` / ``\\(...\\)`` without "The
final answer is", decimal commas and thousands separators, ASCII relations, matrices, decimals at a
stated precision (also in intervals, tuples and vectors), ordered lists, plus ordinary answers.

Three graders are measured on them: ``is_equivalent(gold, prediction)``; ``math_reward`` on a
realistic completion that ends with the prediction (``equivalence_cases.completion_for``); and
math-verify called directly, ``verify(parse(gold), parse(prediction))``, for reference. The
agreement table is printed (``pytest -s`` or ``-rP``). Measured on this code: is_equivalent 1.000,
math_reward 1.000, raw math-verify 0.609; the code before issue 8 reached 0.758 and 0.640, so the
thresholds below fail on it.
"""

from __future__ import annotations

import collections
import logging

import pytest

from agro.grading import Grader, is_equivalent, math_reward
from equivalence_cases import CASES, completion_for

KINDS = ("delim", "comma", "relation", "matrix", "precision", "order", "ordinary")
THRESHOLDS = {"is_equivalent": 0.96, "math_reward": 0.95}
KIND_THRESHOLD = 0.9  # per kind, for both graders


@pytest.fixture(scope="module")
def verdicts() -> dict[str, list[float]]:
    out = {
        "is_equivalent": [float(is_equivalent(g, p)) for g, p, _, _ in CASES],
        "math_reward": [0.0 if r is None else r for r in
                        math_reward([completion_for(p, i) for i, (_, p, _, _) in enumerate(CASES)],
                                    [g for g, _, _, _ in CASES])],
    }
    try:  # math-verify used directly, as a reference (trusted, hand-written input only)
        from math_verify import parse, verify

        logging.disable(logging.CRITICAL)
        try:
            out["raw math-verify"] = [float(verify(parse(g), parse(p))) for g, p, _, _ in CASES]
        finally:
            logging.disable(logging.NOTSET)
    except ImportError:  # pragma: no cover
        pass
    return out


def _agreement(values: list[float], idx: list[int]) -> float:
    return sum(values[i] == CASES[i][2] for i in idx) / len(idx)


def _table(verdicts: dict[str, list[float]]) -> str:
    by_kind = collections.defaultdict(list)
    for i, case in enumerate(CASES):
        by_kind[case[3]].append(i)
    rows = [("kind", "n", *verdicts)]
    for kind in KINDS:
        rows.append((kind, str(len(by_kind[kind])), *(f"{_agreement(v, by_kind[kind]):.3f}" for v in verdicts.values())))
    rows.append(("all", str(len(CASES)), *(f"{_agreement(v, list(range(len(CASES)))):.3f}" for v in verdicts.values())))
    return "\n".join("  ".join(f"{c:>15}" for c in r) for r in rows)


def test_cases_cover_every_kind_with_both_verdicts():
    assert len(CASES) >= 200
    assert len({(g, p) for g, p, _, _ in CASES}) == len(CASES)
    for kind in KINDS:
        expected = [e for _, _, e, k in CASES if k == kind]
        assert len(expected) >= 20 and 0 in expected and 1 in expected, kind
    assert {k for *_, k in CASES} == set(KINDS)


@pytest.mark.parametrize("grader", list(THRESHOLDS))
def test_agreement_with_expected_verdicts(verdicts, grader):
    print("\nagreement with the expected verdicts\n" + _table(verdicts))
    everything = list(range(len(CASES)))
    agreement = _agreement(verdicts[grader], everything)
    wrong = [(CASES[i][0], CASES[i][1], CASES[i][2]) for i in everything if verdicts[grader][i] != CASES[i][2]]
    assert agreement >= THRESHOLDS[grader], f"{grader}: {agreement:.3f}; wrong: {wrong[:20]}"
    for kind in KINDS:
        idx = [i for i in everything if CASES[i][3] == kind]
        assert _agreement(verdicts[grader], idx) >= KIND_THRESHOLD, (grader, kind)


def test_agro_agrees_more_than_math_verify_alone(verdicts):
    if "raw math-verify" not in verdicts:  # pragma: no cover
        pytest.skip("math-verify is not importable here")
    everything = list(range(len(CASES)))
    raw = _agreement(verdicts["raw math-verify"], everything)
    assert _agreement(verdicts["is_equivalent"], everything) > raw + 0.2


def test_correct_answers_are_not_scored_wrong_and_permutations_are(verdicts):
    """The two failure modes of issue 8, counted separately: correct answers scored 0 (noise in
    every gradient) and wrong answers scored 1 (permuted ordered lists among them)."""
    for grader in THRESHOLDS:
        v = verdicts[grader]
        false_neg = [CASES[i][:2] for i in range(len(CASES)) if CASES[i][2] == 1 and v[i] != 1.0]
        false_pos = [CASES[i][:2] for i in range(len(CASES)) if CASES[i][2] == 0 and v[i] != 0.0]
        assert len(false_neg) <= 0.03 * len(CASES), (grader, false_neg)
        assert len(false_pos) <= 0.02 * len(CASES), (grader, false_pos)
        order_wrong = [i for i in range(len(CASES)) if CASES[i][3] == "order" and CASES[i][2] == 0]
        assert all(v[i] == 0.0 for i in order_wrong), grader


def test_the_order_example_of_the_issue():
    """``10, 4, -2`` is not ``4, 10, -2`` (a bare list is ordered); sets and ``ordered_lists=False``
    compare without order."""
    assert not is_equivalent("10, 4, -2", "4, 10, -2")
    assert is_equivalent("10, 4, -2", "10,4,-2")
    assert math_reward(["So the three values, in order, are\n\\[ 4, 10, -2 \\]",
                        "The final answer is $10, 4, -2$. I hope it is correct."], ["10, 4, -2"] * 2) == [0.0, 1.0]
    assert is_equivalent("\\{10, 4, -2\\}", "\\{4, 10, -2\\}")
    with Grader(ordered_lists=False) as g:
        assert g.equivalent(["10, 4, -2", "(1, 2)"], ["4, 10, -2", "(2, 1)"]).rewards == [1.0, 0.0]
