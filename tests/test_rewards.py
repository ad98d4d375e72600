"""Tests for agro.rewards and agro.grading's reward API: answer extraction, equivalence and
math_reward (agro_math.md §8)."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from pathlib import Path

import pytest

from agro import grading, rewards
from agro.grading import Grader, default_grader, is_equivalent, math_reward
from agro.rewards import extract_answer, last_boxed

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
    res = default_grader().grade(completions, answers)
    expected = [1.0 if c.endswith(f"{int(a):,}.") else 0.0 for c, a in zip(completions, answers)]
    assert res.rewards == expected
    assert res.sandboxed == 0  # plain numbers are compared in the trainer process
    assert res.seconds < 2.0


@pytest.mark.data
def test_math500_solutions_match_their_answers():
    rows = _rows("math500_test.jsonl")
    res = default_grader().grade([r["solution"] for r in rows], [r["answer"] for r in rows])
    assert sum(v == 1.0 for v in res.rewards) >= 0.99 * len(rows)
    assert res.timeouts == 0 and res.errors == 0


@pytest.mark.data
def test_math500_solutions_do_not_match_other_answers():
    """Guards against a grader that says yes too easily (each solution vs the next row's answer)."""
    rows = _rows("math500_test.jsonl")[:200]
    others = rows[1:] + rows[:1]
    res = default_grader().grade([r["solution"] for r in rows], [o["answer"] for o in others])
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
    res = default_grader().equivalent(golds, preds)
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


# ------------------------------------------------------------------------------ last_boxed


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"a \boxed{1} then \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"$\boxed{\{1, 2\}}$", r"\{1, 2\}"),  # \{ and \} are literal braces
        (r"\boxed{\{1, 2\} \cup \{3\}}", r"\{1, 2\} \cup \{3\}"),
        (r"\boxed{\}}", r"\}"),
        (r"\boxed 5$", "5"),  # the brace-less form
        (r"so \boxed 5. Done", "5."),
        (r"\boxed \frac{1}{2} is it", r"\frac{1}{2}"),
        (r"\boxed {7}", "7"),
        (r"\fbox{7}", "7"),
        (r"\boxed{\boxed{3}}", "3"),
        (r"\boxed{\begin{pmatrix} 1 \\ {2} \end{pmatrix}}", r"\begin{pmatrix} 1 \\ {2} \end{pmatrix}"),
        (r"\boxed{4} then an unclosed \boxed{5", "4"),
        (r"\boxed{unbalanced", None),
        ("no box", None),
        (r"\boxed{}", ""),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_is_linear_time():
    baits = ["\\boxed{" * 200_000, "\\boxed " * 200_000, "\\boxed a{" * 200_000, "{" * 500_000 + "\\boxed{1}",
             "\\{" * 500_000, "\\boxed{" + "\\}" * 500_000,
             # joining: every box joins its neighbour, or every gap is just over the rule
             "\\boxed{1}, " * 200_000, "\\boxed{1} and " * 100_000, "\\boxed{1}$ \\quad \\text{and} \\quad $" * 50_000,
             ("\\boxed{1}" + " " * 39 + "x") * 50_000, "\\boxed{\\boxed{1}, \\boxed{2}}" * 50_000,
             "\\boxed{" * 50_000 + "\\boxed{1}, \\boxed{2}" + "}" * 50_000]
    for bait in baits:
        t = time.perf_counter()
        last_boxed(bait)
        assert time.perf_counter() - t < 1.0, bait[:20]


# ------------------------------------------------------------------------------ several boxes, one answer


@pytest.mark.parametrize(
    "text, expected",
    [
        # neighbouring boxes are one answer: their contents as the bare list "a, b"
        (r"\boxed{3} and \boxed{7}", "3, 7"),
        (r"The solutions are $\boxed{3}$ and $\boxed{7}$.", "3, 7"),
        (r"$\boxed{1}\boxed{2}$", "1, 2"),
        (r"\boxed{1},\boxed{2},\boxed{3}", "1, 2, 3"),
        (r"\boxed{1} and \boxed{2} and \boxed{3}", "1, 2, 3"),
        (r"$$\boxed{2}, \boxed{3}, \boxed{5}$$", "2, 3, 5"),
        (r"\(\boxed{1}\) and \(\boxed{-2}\).", "1, -2"),
        (r"$\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}$", "(2, 2), (6, 2)"),
        (r"$\boxed{1}$\text{, and }$\boxed{2}$; $\boxed{3}$", "1, 2, 3"),
        ("so\n\\[\n\\boxed{(1, 2)},\n\\boxed{(2, 1)}\n\\]", "(1, 2), (2, 1)"),  # one line break
        (r"$y_1 = \boxed{x+1}$ and $y_2 = \boxed{x-1}$", "x+1, x-1"),  # a one-letter label
        (r"\boxed 3, \boxed 7", "3, 7"),  # brace-less boxes: the comma is not part of the content
        (r"\boxed{5}, \boxed{5}", "5"),  # a repeated neighbour counts once
        (r"\boxed{1} then \boxed{2} and \boxed{3}", "2, 3"),  # only the boxes next to the last one
        # self-corrections, alternative forms and separate statements: the last box alone
        (r"\boxed{4}, wait, actually \boxed{5}", "5"),
        (r"\boxed{4}. Hmm, no. The answer is \boxed{5}", "5"),
        (r"\boxed{4}, no, \boxed{5}", "5"),
        (r"\boxed{4}. \boxed{5}", "5"),
        (r"So \boxed{3} no, \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"$\boxed{15\frac{39}{40}},$ or $\boxed{\frac{639}{40}}$ inches.", r"\frac{639}{40}"),  # MATH-500
        (r"$\boxed{28}$ or $\boxed{28_9}$", "28_9"),
        ("\\boxed{4}\n\n\\boxed{5}", "5"),  # a blank line
        (r"\boxed{1} papers and \boxed{2} bins", "2"),  # words
        (r"$a = \boxed{3}$, $b = \boxed{4}$, so $a+b=\boxed{7}$", "7"),
        (r"$a = \boxed{3}$, $a+b=\boxed{7}$", "7"),  # "a+b =" is not a one-letter label
        (r"\boxed{1}" + " " * 41 + r"\boxed{2}", "2"),  # too far apart
        (r"\boxed{1} \\ \boxed{2}", "2"),  # a LaTeX line break
        (r"{\boxed{1}}, {\boxed{2}}", "2"),  # braces between them
    ],
)
def test_neighbouring_boxes_are_one_answer(text, expected):
    assert last_boxed(text) == expected
    assert extract_answer(text) == expected  # completions and predictions
    assert rewards.gold_answer(text) == expected  # gold answers: the same rule


def test_at_most_max_joined_boxes_are_joined():
    n = rewards._MAX_JOINED_BOXES
    text = ", ".join(f"\\boxed{{{i}}}" for i in range(n + 6))
    assert last_boxed(text) == ", ".join(str(i) for i in range(6, n + 6))


def test_box_spans_and_last_box_span_agree():
    """``_last_box_span`` (used to unwrap boxes) is the last of ``_box_spans`` (used to join)."""
    rng = random.Random(0)
    tokens = ["\\boxed{", "\\fbox{", "\\boxed ", "{", "}", "\\{", "\\}", "\\\\", "1", "x", " ", ", ", " and "]
    for _ in range(3000):
        text = "".join(rng.choice(tokens) for _ in range(rng.randint(0, 14)))
        spans = rewards._box_spans(text)
        assert rewards._last_box_span(text) == ((spans[-1][1], spans[-1][2]) if spans else None), text
        assert all(a[3] <= b[0] for a, b in zip(spans, spans[1:])), text  # disjoint, in order


def test_last_boxed_without_joining():
    assert last_boxed(r"\boxed{3} and \boxed{7}", join=False) == "7"
    assert last_boxed(r"\boxed{3} and \boxed{\boxed{7}}", join=False) == "7"


def test_several_boxes_are_graded_as_one_answer():
    """A gold written as several boxes is not matched by part of it (with only the last box kept,
    "7" scored 1: a reward for an incomplete answer); a completion that writes each solution in its
    own box matches the set; a self-correction is graded on its last box."""
    completions = [
        "7", "The answer is $\\boxed{7}$.", "\\boxed{3} and \\boxed{7}",  # against the two-box gold
        "The solutions are \\boxed{3} and \\boxed{7}.", "The solutions are \\boxed{7} and \\boxed{3}.",
        "The solution is \\boxed{7}.",  # against {3, 7}
        "\\boxed{4}, wait, actually \\boxed{5}", "\\boxed{4}. Hmm, no. The answer is \\boxed{5}",
        "\\boxed{5}, wait, actually \\boxed{4}",  # against 5
    ]
    golds = ["\\boxed{3} and \\boxed{7}"] * 3 + ["\\{3, 7\\}"] * 3 + ["5"] * 3
    assert math_reward(completions, golds) == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    assert not is_equivalent("\\boxed{3} and \\boxed{7}", "7")
    assert is_equivalent("\\{3, 7\\}", "\\boxed{3} and \\boxed{7}")
    assert is_equivalent("5", "\\boxed{4}, wait, actually \\boxed{5}")
    assert not is_equivalent("4", "\\boxed{4}, wait, actually \\boxed{5}")
    # Boxes are a bare list, ordered like any other (Grader(ordered_lists=False) for sets).
    assert not is_equivalent("3, 7", "\\boxed{7} and \\boxed{3}")
    with Grader(ordered_lists=False) as g:
        assert g.equivalent(["3, 7"], ["\\boxed{7} and \\boxed{3}"]).rewards == [1.0]


# ------------------------------------------------------------------------------ module layout


def test_doctests():
    import doctest

    for module in (rewards, grading):
        assert doctest.testmod(module).failed == 0, module.__name__


def test_rewards_module_is_standalone():
    """The sandbox loads rewards.py by path: it must not import agro, grading, torch or Sympy at
    import time, and it must not reach for agro.grading at all (no import circle)."""
    import ast
    import subprocess
    import sys

    source = Path(rewards.__file__).read_text()
    tree = ast.parse(source)
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.startswith("agro") or "grading" in m]
    assert not any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body)
    code = (
        "import importlib.util as u, sys\n"
        f"s = u.spec_from_file_location('_r', {rewards.__file__!r}); m = u.module_from_spec(s)\n"
        "s.loader.exec_module(m)\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('agro', 'torch', 'sympy', 'math_verify')]\n"
        "assert not bad, bad\n"
        "assert m.extract_answer('The final answer is 7.') == '7'\n"
    )
    subprocess.run([sys.executable, "-I", "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------ extraction sources


@pytest.mark.parametrize(
    "text, answer, source",
    [
        ("Work. The final answer is $x \\geq 5$. I hope it is correct.", "x \\geq 5", "marker"),
        ("so $\\boxed{12}$", "12", "boxed"),
        ("3 + 4 = <<3+4=7>>7\n#### 7", "7", "hashes"),
        ("x >= 5", "x >= 5", "bare"),
        ("10, 4, -2", "10, 4, -2", "bare"),  # not the last number
        ("$\\frac{1}{2}$", "\\frac{1}{2}", "bare"),
        ("\\(x \\neq 3\\)", "x \\neq 3", "bare"),
        ("Tuesday", "Tuesday", "bare"),
        ("We add the numbers.\n7 + 8 = 15", "7 + 8 = 15", "bare"),  # the last line is an answer
        ("So the answer is x != 3.", "x != 3", "answer"),
        ("Answer: (1, 0.3333)", "(1, 0.3333)", "answer"),
        ("We multiply and get 15 apples in total.", "15", "number"),
        ("It costs 2,74 euros in total.", "2,74", "number"),  # maybe a decimal comma: decided later
        ("The probability is $\\frac{1}{3}$ overall.", "3", "text"),  # math-verify reads the text
        ("the cat sat on the mat", None, "none"),
    ],
)
def test_extract_sources(text, answer, source):
    ex = rewards.extract(text)
    assert (ex.answer, ex.source) == (answer, source)
    assert (ex.text is not None) == (source in ("number", "text"))


# ------------------------------------------------------------------------------ numbers in-process


@pytest.mark.parametrize(
    "gold, pred, expected",
    [
        # stated precision: >= 4 significant digits, rounded half-up to the places given
        ("\\frac{1}{3}", "0.3333", 1.0), ("\\frac{2}{3}", "0.6667", 1.0), ("\\frac{2}{3}", "0.6666", 0.0),
        ("\\frac{1}{3}", "0.333", 0.0), ("\\frac{1}{3}", "0.33", 0.0), ("\\frac{1}{2}", "0.5", 1.0),
        ("-\\frac{2}{3}", "-0.6667", 1.0), ("\\frac{1}{12}", "0.08333", 1.0), ("\\frac{1}{12}", "0.0833", 0.0),
        ("\\frac{100}{3}", "33.33", 1.0), ("15", "15.00", 1.0), ("15", "15.01", 0.0), ("0.3333", "1/3", 1.0),
        ("\\frac{1}{3}", "0.333333", 1.0), ("\\frac{1}{3}", "0.3333333333", 1.0), ("0.3333", "0.333333", 0.0),
        # decimal commas (against a decimal only) and thousands separators
        ("1.45", "1,45", 1.0), ("0.222", "0,222", 1.0), ("145", "1,45", None), ("1.234", "1,234", 0.0),
        ("1234", "1,234", 1.0), ("2000", "2 000", 1.0), ("10080", "10,\\!080", 1.0), ("1008016", "1{,}008{,}016", 1.0),
        ("1234", "1, 234", None), ("2250.49", "2,250.49\u20ac", 1.0), ("24000", "\\$24,000", 1.0),
        # units, equations whose right-hand side is the number
        ("5", "5 cm", 1.0), ("5", "5 cm^2", 1.0), ("5", "x = 5", 1.0), ("15", "7 + 8 = 15", 1.0),
        ("15", "7 + 8 = 16", 0.0), ("2", "a = 1, b = 2", None), ("5", "x \\geq 5", None),
    ],
)
def test_quick_verdict_numbers(gold, pred, expected):
    assert rewards.quick_verdict(gold, pred) == expected


def test_round_half_up():
    assert rewards._round_half_up(rewards.Fraction(2, 3), 4) == rewards.Fraction("0.6667")
    assert rewards._round_half_up(rewards.Fraction(-5, 1000), 2) == rewards.Fraction("-0.01")
    assert rewards._round_half_up(rewards.Fraction(1, 8), 2) == rewards.Fraction("0.13")


# ------------------------------------------------------------------------------ sandbox rules


@pytest.mark.parametrize(
    "gold, pred, expected",
    [
        ("x \\geq 6", "x >= 6", True), ("x \\neq 3", "x != 3", True), ("x \\neq 3", "x = 3", False),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}", True),
        ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]", True),
        ("\\left(\\frac{1}{3}, 2\\right]", "(0.3333, 2]", True), ("\\left(\\frac{1}{3}, 2\\right]", "(0.33, 2]", False),
        ("(1, \\frac{1}{3})", "(1, 0.3333)", True), ("2\\sqrt{5}", "4.4721", True), ("2\\sqrt{5}", "4.4720", False),
        ("\\begin{pmatrix} \\frac{2}{3} \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix} 0.6667 \\\\ 1 \\end{pmatrix}", True),
        ("10, 4, -2", "4, 10, -2", False), ("10, 4, -2", "10,4,-2", True), ("\\{1, 2\\}", "\\{2, 1\\}", True),
        ("(2, 3)", "\\{2, 3\\}", False),
    ],
)
def test_sandbox_rules(gold, pred, expected):
    """The comparison rules of the sandbox, called in-process on trusted input."""
    assert rewards.sandbox_grade(gold, pred, None) is expected


def test_sandbox_reads_the_text_when_there_is_no_marker():
    assert rewards.sandbox_grade("\\frac{1}{2}", None, "The probability is $\\frac{1}{2}$, as we saw.") is True
    assert rewards.sandbox_grade("0.25", None, "Therefore the result is\n\\[ 0,25 \\]") is True
    assert rewards.sandbox_grade("\\frac{1}{2}", None, "The probability is $\\frac{1}{3}$.") is False
    assert rewards.sandbox_grade("\\frac{1}{2}", None, "") is False


def test_hot_path_styles_stay_in_process():
    """Plain-number completions in every common style are decided without the sandbox."""
    completions = ["The final answer is 1,234.", "1234", "1234.", "617 * 2 = 1234", "We get 1234 apples.",
                   "So \\boxed{1234}", "#### 1,234", "The answer is 1234.", "Work:\n617 + 617 = 1234", "1233"]
    res = Grader().grade(completions, ["1234"] * len(completions))
    assert res.rewards == [1.0] * 9 + [0.0]
    assert res.sandboxed == 0


# ------------------------------------------------------------------------------ start-up


def test_start_returns_at_once_and_grade_uses_that_sandbox():
    with Grader() as g:
        t = time.perf_counter()
        assert g.start() is g
        assert time.perf_counter() - t < 0.5  # fork + exec only; math-verify loads in the background
        assert g.starts == 1 and not g.ready()
        g.start()  # idempotent
        assert g.starts == 1
        deadline = time.monotonic() + 120
        while not g.ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert g.ready()
        t = time.perf_counter()
        res = g.grade(["\\boxed{\\frac{1}{\\sqrt{2}}}"], ["\\frac{\\sqrt{2}}{2}"])
        assert res.rewards == [1.0] and res.sandboxed == 1 and g.starts == 1
        assert time.perf_counter() - t < 0.5  # no start-up wait left


def test_grade_right_after_start_waits_for_the_sandbox():
    with Grader() as g:
        g.start()
        res = g.grade(["\\boxed{x^2-1}"], ["(x-1)(x+1)"])
        assert res.rewards == [1.0] and g.starts == 1 and g.ready()


def test_joined_boxes_keep_repeats_unless_one_answer_is_repeated():
    from agro.rewards import last_boxed

    assert last_boxed(r"$x=\boxed{3}$ and $y=\boxed{3}$") == "3, 3"     # two labelled values
    assert last_boxed(r"\boxed{2}, \boxed{2}, \boxed{3}") == "2, 2, 3"
    assert last_boxed(r"so \boxed{5} \boxed{5}") == "5"                   # a repeated final answer
