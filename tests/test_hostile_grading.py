"""Hostile-input tests for the time-bounded grader (agro.grading, agro.rewards).

Every completion below must grade to 0.0 or 1.0 (never raise) within ``_HARD_LIMIT`` seconds of
wall time with ``timeout=1.0``, even when Sympy would run for minutes or exhaust memory, and even
when ``grade`` runs in a non-main thread or a DataLoader worker. Text that would create a file if
it were executed as Python must not create it.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from agro.grading import Grader, GradeResult

TIMEOUT = 1.0
_HARD_LIMIT = 1.5  # seconds per item: the 1.0 s deadline plus measurement slack

_PWNED = Path("/tmp") / f"agro_pwned_{uuid.uuid4().hex}"
_CODE = f"__import__('os').system('touch {_PWNED}')"

# Cases whose comparison in math-verify/Sympy runs far past 1 s (measured in-process without a
# deadline: 6 s to minutes, or memory exhaustion). They must come back as counted timeouts.
SLOW_SYMPY = [
    ("\\boxed{9^{9^{9^{9}}}}", "1"),
    ("The final answer is $10^{10^{10}}$.", "1"),
    ("\\boxed{(10^{10^{10}})!}", "5"),
    ("\\boxed{1000000!}", "5"),
    ("\\boxed{2^{2^{30}}}", "2"),
    ("\\boxed{(x+1)^{100000}}", "x^2"),
    ("\\boxed{\\int_0^1 e^{x^{7}}\\sin(x^{13}) dx}", "1"),
    ("\\boxed{\\prod_{k=1}^{10^{7}} k}", "1"),
    ("\\boxed{\\frac{(10^{100})!}{(10^{99})!}}", "5"),
]

# Everything else: huge, deep, code-like, odd unicode, NaN/inf, matrices, regex bait.
HOSTILE = SLOW_SYMPY + [
    ("The final answer is 10**10**10", "1"),
    ("The final answer is 9^9^9^9.", "1"),
    ("\\boxed{" + "{" * 5000 + "1" + "}" * 5000 + "}", "1"),
    ("\\boxed{" + "{" * 200 + "1" + "}" * 200 + "}", "1"),
    ("\\boxed{" + "\\frac{1}{" * 40 + "2" + "}" * 40 + "}", "2"),
    ("\\boxed{" + "(" * 240 + "1" + ")" * 240 + "}", "1"),
    ("1+" * 1_500_000 + "1", "1"),  # 3 MB
    ("\\boxed{" * 500_000, "1"),  # 3.5 MB of unclosed boxes
    ("{" * 2_000_000 + "The final answer is 3", "3"),
    ("x" * 5_000_000, "1"),
    ("1," * 1_000_000 + "1234", "1234"),  # thousands-separator regex bait
    ("-" * 1_000_000 + "5", "5"),
    ("final answer is " * 200_000, "1"),
    ("#### " * 500_000, "1"),
    ("1/" * 500_000 + "2", "1"),
    (" " * 1_000_000 + "/" + " " * 1_000_000 + "7", "7"),
    (_CODE, "0"),
    (f"The final answer is {_CODE}", "0"),
    (f"\\boxed{{{_CODE}}}", "0"),
    (f"#### ({_CODE})", "0"),
    (f"The final answer is $eval(\"{_CODE}\")$.", "0"),
    (f"The answer: 1 + (__import__('os').system('touch {_PWNED}')) = 2", "2"),
    ("\\boxed{\\text{" + _CODE.replace("'", "") + "}}", "0"),
    ("\\boxed{\uff15}", "5"),  # fullwidth digit
    ("\u202e\\boxed{5}\u200b\u200d", "5"),
    ("\\boxed{5\ud800}", "5"),  # lone surrogate
    ("\u0130" * 10_000 + " The final answer is 5.", "5"),  # lower() changes the length
    ("\x00\\boxed{\x00}\x00", "0"),
    ("\\boxed{nan}", "1"),
    ("\\boxed{NaN}", "\\infty"),
    ("The final answer is inf", "\\infty"),
    ("\\boxed{\\infty - \\infty}", "0"),
    ("\\boxed{0/0}", "0"),
    ("\\boxed{1e999999999}", "1"),
    ("\\boxed{10^{999999999}}", "1"),
    ("\\boxed{" + "9" * 500 + "}", "5"),
    ("\\boxed{\\sum_{k=1}^{10^{9}} k}", "3"),
    ("\\boxed{\\sin(10^{10^{5}})}", "1"),
    ("\\boxed{2^{2^{30}} - 2^{2^{30}} + 2}", "2"),
    ("\\boxed{\\begin{pmatrix}" + " \\\\ ".join(" & ".join(["99999"] * 20) for _ in range(20)) + "\\end{pmatrix}}", "1"),
    ("\\boxed{\\det\\begin{pmatrix} x & 1 & 2 \\\\ 3 & x & 5 \\\\ 6 & 7 & x^{99} \\end{pmatrix}}", "1"),
    ("\\boxed{" + "x^" * 150 + "2}", "1"),
]

# Aimed at the plain-expression path: without a marker, math-verify's own extraction reads the
# text, and its ExprExtractionConfig would hand arithmetic-looking text to sympy.parse_expr (eval).
PLAIN_EXPRESSION = [
    (f"So the answer is {_CODE}", "0"),
    (f"Answer: {_CODE}", "0"),
    (f"the answer is (lambda: {_CODE})()", "0"),
    (f"lambda: {_CODE}", "0"),
    (f"The answer = 7 if {_CODE} else 7", "7"),
    ("answer: ().__class__.__bases__[0].__subclasses__()", "0"),
    ("answer: [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'Popen']"
     f"[0]('touch {_PWNED}', shell=True)", "0"),
    ("(1).__class__.__mro__[-1]", "1"),
    (f"$x$ is the number {_CODE}", "0"),  # LaTeX present: math-verify reads the whole text
    (f"We get $1$ and then eval('{_CODE}') = 1", "1"),
    (f"So the answer is exec(\"{_CODE}\")", "0"),
    ("So the answer is 9**9**9**9.", "1"),
    ("So the answer is 2**2**2**2**2**2.", "1"),
    ("so we get 10^(10^10) in the end", "1"),
    ("so we get (10**10)**(10**10) in the end", "1"),
    ("answer: 9^999999 apples", "1"),
    ("Result: $ 2^{2^{30}} $ apples", "2"),
    ("x is 1e999999999 and more text here", "1"),
    ("so it is " + "(" * 100 + "1" + ")" * 100 + " I think", "1"),
    ("the answer is " + "1+" * 100_000 + "1", "1"),
    ("Hence\n" + "9" * 5000, "9"),
]
HOSTILE += PLAIN_EXPRESSION


def _assert_not_pwned() -> None:
    assert not _PWNED.exists(), "model text was executed as code"


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout=TIMEOUT) as g:
        g.grade(["\\boxed{x+1}"], ["x"])  # start the sandbox: start-up is not charged to items
        yield g
    _assert_not_pwned()


def _grade_timed(g: Grader, completion: str, answer: str) -> tuple[GradeResult, float]:
    t = time.perf_counter()
    res = g.grade([completion], [answer])
    return res, time.perf_counter() - t


def test_corpus_is_large_and_has_multi_megabyte_items():
    assert len(HOSTILE) >= 70
    assert sum(len(c) >= 2_000_000 for c, _ in HOSTILE) >= 3
    # most plain-expression items do reach math-verify in the sandbox (the rest are decided by the
    # trainer-side fast path), and several reach its whole-text extraction
    from agro import rewards

    verdicts = [rewards.triage("0", c) for c, _ in PLAIN_EXPRESSION]
    assert sum(v[0] is None for v in verdicts) >= 12 and sum(v[2] is not None for v in verdicts) >= 8


@pytest.mark.parametrize("text", [
    _CODE, "__import__('os')", "lambda: 1", "(1).__class__", "1; 2", "1 if 1 else 2", "x + 1", "a.b",
    "9**9**9", "2^3^4", "10^(10)", "10^99999", "((" * 30 + "1" + "))" * 30, "1" * 300, "[1]", "{1: 2}",
    "'1'", "1e5", "1_000", "\\frac{1}{2}", "2 ** -1 ** 2",
])
def test_plain_expressions_outside_the_whitelist_are_refused(text):
    from agro import rewards

    with pytest.raises(ValueError):
        rewards._safe_parse_expr(text)
    _assert_not_pwned()


def test_plain_arithmetic_is_parsed_without_eval():
    from agro import rewards

    parsed = [rewards._safe_parse_expr(t) for t in ("1 + 2*3", "(9+1)/2", "2**10", "3\u00d74", "7.5 - .5")]
    assert [float(x.doit()) for x in parsed] == [7, 5, 1024, 12, 7]


def test_no_eval_while_math_verify_runs():
    """Inside the sandbox's guard, sympify of code is refused (numbers and names still work),
    math-verify's expression mode goes through the whitelist, and everything is restored after."""
    import sympy
    import sympy.parsing.sympy_parser as spp
    from math_verify import ExprExtractionConfig, parse
    from math_verify import parser as mvp

    from agro import rewards

    before = (spp.parse_expr, mvp.parse_expr_cached)
    calls = []
    real = rewards._safe_parse_expr

    def spy(text):
        calls.append(text)
        return real(text)

    rewards._safe_parse_expr, saved = spy, rewards._safe_parse_expr
    try:
        with rewards._no_eval():
            with pytest.raises((ValueError, sympy.SympifyError)):
                sympy.sympify(_CODE)
            assert sympy.sympify("12.5") == sympy.Float("12.5") and sympy.sympify("yotta") == sympy.Symbol("yotta")
            assert parse("the answer is 1 + 2*3", [ExprExtractionConfig()], parsing_timeout=None)[0].doit() == 7
            assert parse(f"the answer is 2*(1+{_CODE})", [ExprExtractionConfig()], parsing_timeout=None) != []
    finally:
        rewards._safe_parse_expr = saved
    assert calls and (spp.parse_expr, mvp.parse_expr_cached) == before
    _assert_not_pwned()


@pytest.mark.parametrize("idx", range(len(HOSTILE)), ids=[repr(c[:24]) for c, _ in HOSTILE])
def test_hostile_item_grades_within_bound(grader, idx):
    completion, answer = HOSTILE[idx]
    res, seconds = _grade_timed(grader, completion, answer)
    assert res.rewards[0] in (0.0, 1.0)
    assert seconds <= _HARD_LIMIT, f"{seconds:.2f} s"
    assert res.errors == 0
    if res.timeouts:
        assert res.rewards[0] == 0.0
    if idx < len(SLOW_SYMPY):
        # Really slow in Sympy, so the timeout path (kill the grader, fork a new one) runs for real.
        assert (res.timeouts, res.sandboxed) == (1, 1)
        assert seconds >= TIMEOUT - 0.05
    _assert_not_pwned()


def test_grader_works_after_timeouts_and_counts_them_in_a_batch(grader):
    easy = [("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0), ("\\boxed{x^2-1}", "(x-1)(x+1)", 1.0),
            ("\\boxed{x^2+1}", "(x-1)(x+1)", 0.0), ("The final answer is 7.", "7", 1.0)]
    slow = SLOW_SYMPY[:2]
    completions = [c for c, _ in slow] + [c for c, _, _ in easy] + [slow[0][0]] + [easy[0][0]]
    answers = [a for _, a in slow] + [a for _, a, _ in easy] + [slow[0][1]] + [easy[0][1]]
    res = grader.grade(completions, answers)
    assert res.rewards == [0.0] * 2 + [e for _, _, e in easy] + [0.0, 1.0]
    assert res.timeouts == 3 and res.errors == 0
    assert res.seconds <= 3 * _HARD_LIMIT + 1.0
    assert res.max_item_seconds <= _HARD_LIMIT


def test_bound_holds_in_a_non_main_thread(grader):
    out: dict = {}

    def work() -> None:
        out["main"] = threading.current_thread() is threading.main_thread()
        out["slow"] = _grade_timed(grader, *SLOW_SYMPY[0])
        out["easy"] = _grade_timed(grader, "\\boxed{\\sqrt{8}}", "2\\sqrt{2}")

    th = threading.Thread(target=work)
    th.start()
    th.join(30)
    assert out["main"] is False
    (slow, slow_s), (easy, easy_s) = out["slow"], out["easy"]
    assert slow.timeouts == 1 and slow.rewards == [0.0] and slow_s <= _HARD_LIMIT
    assert easy.rewards == [1.0] and easy_s <= _HARD_LIMIT


def test_concurrent_threads_share_one_grader(grader):
    results: list = [None] * 2

    def work(k: int) -> None:
        results[k] = grader.grade(["\\boxed{\\frac{6}{4}}", SLOW_SYMPY[k][0]], ["\\frac{3}{2}", SLOW_SYMPY[k][1]])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert all(r.rewards == [1.0, 0.0] and r.timeouts == 1 for r in results)


def test_a_dead_sandbox_is_restarted_transparently(grader):
    starts = grader.starts
    grader._proc.kill()  # the zygote dies between calls
    grader._proc.wait()
    res = grader.grade(["\\boxed{x+2}"], ["2+x"])
    assert res.rewards == [1.0] and res.errors == 0 and grader.starts == starts + 1


def test_a_crashed_grader_process_counts_as_an_error(grader):
    psutil = pytest.importorskip("psutil")
    zygote = psutil.Process(grader._proc.pid)

    def kill_grader_soon() -> None:
        time.sleep(0.3)
        for child in zygote.children():
            child.kill()

    killer = threading.Thread(target=kill_grader_soon)
    killer.start()
    res, seconds = _grade_timed(grader, *SLOW_SYMPY[3])
    killer.join()
    assert res.rewards == [0.0] and res.errors == 1 and res.timeouts == 0
    assert seconds < TIMEOUT
    assert grader.grade(["\\boxed{\\frac{1}{2}}"], ["0.5"]).rewards == [1.0]


class _GradeInWorker:
    """A map-style dataset whose item grades a pathological completion inside a DataLoader worker,
    with a Grader that the worker inherited from the parent process by fork."""

    def __init__(self, grader: Grader) -> None:
        self.grader = grader

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int):
        import torch

        g = self.grader
        g.grade(["\\boxed{x+1}"], ["x"])  # starts this worker's own sandbox (not charged to items)
        res, seconds = _grade_timed(g, *SLOW_SYMPY[0])
        easy = g.grade(["\\boxed{\\frac{1}{\\sqrt{2}}}"], ["\\frac{\\sqrt{2}}{2}"]).rewards[0]
        return torch.tensor([res.rewards[0], res.timeouts, seconds, easy, os.getpid()], dtype=torch.float64)


def test_bound_holds_in_a_dataloader_worker(grader):
    torch = pytest.importorskip("torch")
    zygote = grader._proc.pid
    loader = torch.utils.data.DataLoader(_GradeInWorker(grader), batch_size=None, num_workers=1)
    reward, timeouts, seconds, easy, pid = next(iter(loader)).tolist()
    assert int(pid) != os.getpid()
    assert (reward, timeouts, easy) == (0.0, 1.0, 1.0)
    assert seconds <= _HARD_LIMIT
    # the parent's sandbox was not touched by the worker
    assert grader._proc.pid == zygote and grader.grade(["\\boxed{x+1}"], ["1+x"]).rewards == [1.0]
