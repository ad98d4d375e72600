r"""Verifiable math rewards: answer extraction, answer equivalence and the 0/1 reward r(x, y).

This is the reward of shared/docs/agro_math.md §8 ("prompt/reward"): the model ends its solution
with "The final answer is ...", that answer is matched against the ground truth, and
r = 1 on a match, else 0. Where this departs from the paper:

* extraction falls back to the last ``\boxed{}``, then GSM8K's ``#### N``, then the last number,
  so models that do not follow the prompt format exactly can still earn reward;
* matching uses math-verify (LaTeX to Sympy, with numeric, symbolic, set and interval comparison)
  instead of a bare Sympy comparison. Plain numbers first go through an exact rational fast path,
  and a string normalisation is the last fallback;
* a gold answer that cannot be parsed gives ``None`` (the caller skips and counts the example),
  as in TRL's ``accuracy_reward``.

Safety. Completions are untrusted text. Everything in this module runs in linear time on capped
input, except ``sandbox_equivalent``. That function only runs inside the time-bounded grader
process of ``agro.grading``, and ``is_equivalent`` and ``math_reward`` route through that process.
Nothing is evaluated as Python code. math-verify is used only with ``LatexExtractionConfig``,
which parses LaTeX with an ANTLR grammar (latex2sympy2). Its ``ExprExtractionConfig`` is not
used, because it passes text to ``sympy.parse_expr``, which calls ``eval``. At import time this
module loads only the standard library (math-verify is imported inside the sandbox), so the sandbox
can load this file by path without importing ``agro`` or torch.

>>> extract_answer("So x = 4. The final answer is $\\frac{3}{4}$. I hope it is correct.")
'\\frac{3}{4}'
>>> math_reward(["... so the answer is \\boxed{0.75}."], ["\\frac{3}{4}"])
[1.0]
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from agro.grading import Grader, GradeResult  # noqa: F401

__all__ = ["extract_answer", "is_equivalent", "math_reward", "Grader", "GradeResult", "default_grader"]

MAX_COMPLETION_CHARS = 65_536
"""Only the last this-many characters of a completion are searched for an answer (final answers
come at the end). This bounds extraction time on multi-megabyte outputs."""

MAX_ANSWER_CHARS = 512
"""An extracted answer longer than this scores 0 without ever reaching Sympy. The longest
``answer`` in MATH-500 and in the MATH training slice is 159 characters."""

MAX_NESTING = 24
"""An extracted answer whose brackets nest deeper than this scores 0 without reaching Sympy (its
LaTeX parser needs seconds for a few hundred levels). MATH answers nest at most a few levels."""

_MARKER_SCAN_CHARS = 4096  # at most this much text after "The final answer is" is scanned

# --------------------------------------------------------------------------------------------
# Extraction. Every regex below is linear: no nested quantifiers and no ambiguous alternation.
# --------------------------------------------------------------------------------------------

_MARKER_RE = re.compile(r"final[ \t]+answer[ \t]+is", re.IGNORECASE)
# \\ (a LaTeX line break) is consumed first so that "\\{" is not read as an escaped brace.
_BRACE_TOKEN_RE = re.compile(r"\\\\|\\(?:boxed|fbox)[ \t]*\{|\\[{}]|[{}]")
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])([-\u2212]))?"  # optional sign, not a binary minus as in "5-3"
    r"(?<![0-9.])"
    r"([0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)"  # digits, maybe with separators, maybe decimal
    r"(?:[ \t]*/[ \t]*([0-9][0-9,]*(?:\.[0-9]+)?))?"  # optional "/denominator"
)
_THOUSANDS_RE = re.compile(r"[0-9]{1,3}(?:,[0-9]{3})+")


def _last_boxed(text: str) -> str | None:
    r"""Content of the last complete ``\boxed{...}`` (or ``\fbox{...}``) in ``text``, or None.

    Braces must balance (nesting is fine, ``\{`` and ``\}`` do not count). One pass with a stack,
    so the cost is linear even for thousands of unclosed ``\boxed{``. "Last" means the one that
    closes last, so ``\boxed{\boxed{3}}`` gives ``\boxed{3}`` (callers unwrap it again).
    """
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    stack: list[int] = []  # per open brace: start of the boxed content, or -1 for a plain brace
    best: tuple[int, int] | None = None
    for m in _BRACE_TOKEN_RE.finditer(text):
        tok = m.group()
        if tok[-1] == "{" and len(tok) > 2:  # \boxed{ or \fbox{
            stack.append(m.end())
        elif tok == "{":
            stack.append(-1)
        elif tok == "}":
            if stack:
                start = stack.pop()
                if start >= 0:
                    best = (start, m.start())
        # "\\", "\{" and "\}" are literal text
    return None if best is None else text[best[0]:best[1]]


def _unwrap_boxed(s: str) -> str:
    r"""Remove ``\boxed{...}`` wrappers that span the whole string (repeatedly)."""
    for _ in range(8):
        t = s.strip()
        if not (t.startswith("\\boxed") or t.startswith("\\fbox")) or not t.endswith("}"):
            return t
        inner = _last_boxed(t)
        if inner is None or not t.endswith(inner + "}") or t.index("{") + 1 + len(inner) + 1 != len(t):
            return t
        s = inner
    return s.strip()


def _strip_answer(s: str) -> str:
    """Strip whitespace, markdown bold, trailing full stops and ``$`` / ``\\(`` delimiters."""
    for _ in range(4):
        before = s
        s = s.strip().rstrip(".").strip()
        if s.startswith("**") and s.endswith("**") and len(s) >= 4:
            s = s[2:-2]
        if s.startswith("$$") and s.endswith("$$") and len(s) >= 4:
            s = s[2:-2]
        if s.startswith("$") and s.endswith("$") and len(s) >= 2:
            s = s[1:-1]
        if s.startswith("\\(") and s.endswith("\\)"):
            s = s[2:-2]
        if s.startswith("\\[") and s.endswith("\\]"):
            s = s[2:-2]
        s = s.strip()
        if s == before:
            break
    return s


def _answer_after_marker(text: str, start: int) -> str:
    """The rest of the sentence after "The final answer is" (at ``text[start]``).

    The sentence ends at a newline, or at a full stop followed by white space (or the end) that
    is outside ``$...$`` and outside braces, so "$3.5$." gives "3.5" and "5. I hope" gives "5".
    """
    end = text.find("\n", start, start + _MARKER_SCAN_CHARS)
    line = text[start:end if end >= 0 else start + _MARKER_SCAN_CHARS]
    in_math, depth, cut = False, 0, len(line)
    for i, ch in enumerate(line):
        if ch == "$" and (i == 0 or line[i - 1] != "\\"):
            in_math = not in_math
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth = max(0, depth - 1)
        elif ch == "." and not in_math and depth == 0 and (i + 1 == len(line) or line[i + 1].isspace()):
            cut = i
            break
    s = line[:cut].lstrip(" \t:")
    s = _strip_answer(s)
    if "\\boxed" in s or "\\fbox" in s:
        boxed = _last_boxed(s)
        if boxed is not None:
            s = boxed
    return _strip_answer(_unwrap_boxed(s))


def _last_number(text: str) -> str | None:
    """The last number in ``text``: int, decimal, negative or ``a/b``, thousands separators removed."""
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    if last is None:
        return None
    sign, num, den = last.group(1), last.group(2), last.group(3)

    def clean(n: str) -> str:
        head, dot, frac = n.partition(".")
        head = head.rstrip(",")
        if "," in head:
            # "1,234,567" is one number; "1,2,3" is a list whose last item is "3".
            head = head.replace(",", "") if _THOUSANDS_RE.fullmatch(head) else head.rsplit(",", 1)[1]
        return head + dot + frac

    num = clean(num)
    out = ("-" if sign else "") + num
    if den is not None:
        out += "/" + clean(den)
    return out


def extract_answer(text: str, max_chars: int = MAX_COMPLETION_CHARS) -> str | None:
    r"""The final answer of a completion, or None if it has none.

    In order of preference: the rest of the sentence after "The final answer is" (stripped of a
    trailing full stop, ``$`` and a surrounding ``\boxed{}``); else the content of the last
    ``\boxed{...}`` (balanced, nested braces allowed); else what follows the last GSM8K ``####``
    on its line; else the last number (int, decimal, negative, fraction ``a/b``, thousands
    separators removed). Only the last ``max_chars`` characters are read, and every step is
    linear in that length.
    """
    if not isinstance(text, str) or not text:
        return None
    if len(text) > max_chars:
        text = text[-max_chars:]
    marker = None
    for marker in _MARKER_RE.finditer(text):
        pass
    if marker is not None:
        ans = _answer_after_marker(text, marker.end())
        if ans:
            return ans
    boxed = _last_boxed(text)
    if boxed is not None:
        ans = _strip_answer(_unwrap_boxed(boxed))
        if ans:
            return ans
    hashes = text.rfind("####")
    if hashes >= 0:
        end = text.find("\n", hashes)
        ans = _strip_answer(text[hashes + 4:end if end >= 0 else len(text)])
        if ans:
            return ans
    return _last_number(text)


# --------------------------------------------------------------------------------------------
# Fast comparisons (trainer process): exact rationals and string normalisation.
# --------------------------------------------------------------------------------------------

_NUM = r"(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+"
_PLAIN_RE = re.compile(rf"([-+]?)({_NUM})")
_SLASH_RE = re.compile(rf"([-+]?)\(?({_NUM})\)?/\(?({_NUM})\)?")
_FRAC_RE = re.compile(rf"([-+]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_FRAC_SHORT_RE = re.compile(r"([-+]?)\\frac([0-9])([0-9])")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\{([^{}]*)\}")
_DECOR_RE = re.compile(
    r"\\[$!,;: ]|\\(?:displaystyle|left(?![a-zA-Z])|right(?![a-zA-Z]))|[$\u00b0]"
    r"|\^\{?\\circ\}?|\\degree"
)
_SPACE_RE = re.compile(r"\s+")
_LOOSE_SPACE_RE = re.compile(r"(?<![0-9])\s+|\s+(?![0-9])")  # all white space not between digits
_CHOICE_RE = re.compile(r"\(([A-Za-z])\)")
_ROUND_DIGITS = 6  # decimals are compared after rounding to 6 places, as math-verify does


def _drop_text_units(s: str) -> str:
    r"""Remove ``\text{...}`` groups without digits ("18 \text{ dollars}" -> "18 ")."""
    return _TEXT_RE.sub(lambda m: m.group(0) if any(c.isdigit() for c in m.group(1)) else " ", s)


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    r"""``(value, is_decimal)`` if ``s`` is a plain number, else None. No Sympy.

    Accepts ints, decimals, thousands separators ("15,000", "15{,}000"), ``a/b``, ``\frac{a}{b}``
    (also ``\dfrac``, ``\tfrac``, ``\frac34``), a sign, and decorations that do not change the
    value: ``$``, ``\$``, ``^\circ``, ``\text{units}``, white space that is not between digits.
    Percentages are left to math-verify (is "50%" 50 or 0.5?).
    """
    if "%" in s:
        return None
    s = s.replace("\u2212", "-").replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LOOSE_SPACE_RE.sub("", _DECOR_RE.sub("", _drop_text_units(s))).rstrip(".")
    try:
        if m := _PLAIN_RE.fullmatch(s):
            return _signed(m[1], _to_fraction(m[2])), "." in m[2]
        if m := _SLASH_RE.fullmatch(s) or _FRAC_RE.fullmatch(s):
            return _signed(m[1], _to_fraction(m[2]) / _to_fraction(m[3])), "." in m[2] + m[3]
        if m := _FRAC_SHORT_RE.fullmatch(s):
            return _signed(m[1], Fraction(int(m[2]), int(m[3]))), False
    except (ZeroDivisionError, ValueError):
        return None
    return None


def _to_fraction(n: str) -> Fraction:
    return Fraction(n.replace(",", ""))


def _signed(sign: str, x: Fraction) -> Fraction:
    return -x if sign == "-" else x


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    """Exact for integers and fractions; if either side is a decimal, equal after rounding both
    to 6 places (math-verify's ``float_rounding``), so 1/3 == 0.333333 but 1/3 != 0.33."""
    if a[1] or b[1]:
        return round(a[0], _ROUND_DIGITS) == round(b[0], _ROUND_DIGITS)
    return a[0] == b[0]


def _normalise(s: str) -> str:
    r"""Presentation-free form of an answer for string comparison: no spaces, ``\left``,
    ``\!``, ``$``, ``\text{}`` wrappers, degree signs; ``\dfrac`` -> ``\frac``; "(C)" -> "C"."""
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\u2212", "-")
    s = _TEXT_RE.sub(lambda m: m.group(1), s)
    s = _SPACE_RE.sub("", _DECOR_RE.sub("", s).replace("\\%", "%")).rstrip(".")
    m = _CHOICE_RE.fullmatch(s)
    return m.group(1) if m else s


def clean_answer(answer: Any) -> str:
    """An answer string stripped of ``$``, trailing full stops and a surrounding ``\\boxed{}``."""
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float, Fraction)):
        return ""
    s = answer if isinstance(answer, str) else str(answer)
    return _strip_answer(_unwrap_boxed(_strip_answer(s)))


def gold_answer(answer: Any, max_chars: int = MAX_ANSWER_CHARS) -> str | None:
    r"""The comparable gold answer, or None if it is unusable (empty, too long, not text).

    Raw answers ("\frac{1}{2}", "10") are kept; a GSM8K answer field keeps what follows "####";
    a full solution keeps its last ``\boxed{}``.
    """
    if isinstance(answer, str):
        answer = answer[-MAX_COMPLETION_CHARS:]
        if "####" in answer:
            answer = answer.rsplit("####", 1)[1].strip().split("\n", 1)[0]
        elif (boxed := _last_boxed(answer)) is not None:
            answer = boxed
    s = clean_answer(answer)
    return s if s and len(s) <= max_chars else None


def _nesting(s: str) -> int:
    """Deepest nesting of (), [] and {} in ``s`` (closers of any kind close one level)."""
    depth = deepest = 0
    for ch in s:
        if ch in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")]}" and depth:
            depth -= 1
    return deepest


def quick_verdict(gold: str, pred: str | None, max_answer_chars: int = MAX_ANSWER_CHARS) -> float | None:
    """1.0 / 0.0 when the trainer process can decide alone, None when Sympy is needed.

    Decides alone: no answer, an over-long or too deeply nested answer (0), two plain numbers
    (exact rational comparison), equal normalised strings (1).
    """
    if not pred or len(pred) > max_answer_chars or _nesting(pred) > MAX_NESTING:
        return 0.0
    g, p = _as_number(gold), _as_number(pred)
    if g is not None and p is not None:
        return 1.0 if _numbers_equal(g, p) else 0.0
    if _normalise(gold) == _normalise(pred):
        return 1.0
    return None


# --------------------------------------------------------------------------------------------
# Sympy comparison: runs ONLY inside the sandboxed grader process (agro.grading).
# --------------------------------------------------------------------------------------------

_MV: dict[str, Any] = {}


def _math_verify() -> dict[str, Any]:
    if not _MV:
        import logging

        from math_verify import LatexExtractionConfig, parse, verify

        # math-verify warns once that its signal timeout is off; the process deadline replaces it.
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _MV.update(parse=parse, verify=verify, config=[LatexExtractionConfig()])
    return _MV


def _as_latex(s: str) -> str:
    return "$" + s.replace("\\$", " ").replace("$", " ").replace("\n", " ") + "$"


def sandbox_equivalent(gold: str, pred: str) -> bool | None:
    """math-verify equivalence of two answers; None if the gold answer does not parse.

    UNBOUNDED in time and memory on hostile input: call it only through ``agro.grading``. Its
    signal-based timeouts are disabled (``parsing_timeout=None``, ``timeout_seconds=None``):
    they work only in the main thread, and the grader's process deadline replaces them.
    """
    mv = _math_verify()
    g = mv["parse"](_as_latex(gold), extraction_config=mv["config"], parsing_timeout=None)
    if not g:
        return None
    p = mv["parse"](_as_latex(pred), extraction_config=mv["config"], parsing_timeout=None)
    if not p:
        return False
    return bool(mv["verify"](g, p, timeout_seconds=None))


# Answers in the shapes MATH and GSM8K use. ANTLR (the LaTeX parser) builds its prediction cache
# lazily: an unseen shape can cost 0.1-0.8 s the first time and ~1 ms afterwards, so the zygote
# parses these once and every forked grader inherits the warm cache.
_WARMUP_ANSWERS = [
    "42", "-7", "3.25", "0.5", "1,000", "\\frac{3}{4}", "-\\dfrac{5}{2}", "2\\frac{1}{2}", "\\tfrac12",
    "\\sqrt{2}", "3\\sqrt{5}", "\\frac{\\sqrt{3}}{2}", "\\sqrt[3]{4}", "\\frac{1+\\sqrt{5}}{2}", "2\\pi",
    "\\frac{\\pi}{6}", "e^{2}", "x^2 + 2x + 1", "(x+1)^2(x-2)", "a^{3}b^{-2}", "x_1 + x_2", "\\log_2 8",
    "\\ln 2", "\\sin \\theta", "\\cos^2(x)", "\\tan^{-1}(1)", "\\arcsin\\left(\\frac{1}{2}\\right)",
    "(0, 1]", "[2, \\infty)", "(-\\infty, -1) \\cup (1, \\infty)", "\\left[ \\frac{\\pi}{8}, \\frac{\\pi}{4} \\right]",
    "\\left( 3, \\frac{\\pi}{2} \\right)", "(1, -2, 3)", "\\{1, 2, 3\\}", "\\left\\{ -1, 1 \\right\\}", "\\emptyset",
    "\\mathbb{R}", "\\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}",
    "\\begin{bmatrix} 0 & 1 \\end{bmatrix}", "x > 3", "-2 \\le x < 5", "x \\ne 0", "y = 2x + 3", "x = 5",
    "a = 1, b = 2", "1, 2, \\text{ and } 3", "\\text{(C)}", "\\text{Evelyn}", "30^\\circ", "45^{\\circ}", "25\\%",
    "\\$18.90", "18 \\text{ dollars}", "\\pm 2", "3 \\cdot 4", "2 \\times 10^{3}", "\\binom{5}{2}", "|x - 1|",
    "5!", "\\infty", "2 + 3i", "\\frac{1}{2} + \\frac{\\sqrt{3}}{2} i", "1011_2", "\\dfrac{a+b}{c}", "((3)/(4))",
    "\\left( ((3)/(2)), -13 \\right)", "(\\pi^2)/(8)", "\\frac{11+9a}{20}", "x \\in [0, 1]", "0.\\overline{3}",
]


def sandbox_warmup() -> None:
    """Import math-verify and exercise its parser and comparisons once, so forked graders start warm."""
    answers = _WARMUP_ANSWERS
    for gold, pred in zip(answers, answers[1:] + answers[:1]):
        sandbox_equivalent(gold, pred)


# --------------------------------------------------------------------------------------------
# Public, time-bounded API.
# --------------------------------------------------------------------------------------------


def is_equivalent(gold: str, pred: str) -> bool:
    r"""Whether answer ``pred`` equals answer ``gold`` (both already extracted).

    Plain numbers compare as exact rationals ("15" == "15.0", "15,000" == "15000",
    "\frac{3}{4}" == "0.75"); everything else goes through math-verify in the time-bounded grader
    process (a timeout counts as not equivalent), and equal normalised strings also match.
    """
    gold_s = gold_answer(gold)
    if gold_s is None:
        return False
    pred_s = clean_answer(pred)
    verdict = quick_verdict(gold_s, pred_s)
    if verdict is not None:
        return verdict == 1.0
    return default_grader().equivalent([gold], [pred]).rewards[0] == 1.0


def math_reward(completions: list[str], answers: list[str]) -> list[float | None]:
    r"""Binary reward per completion: 1.0 if its extracted answer equals the gold answer, else 0.0.

    ``None`` where the gold answer cannot be parsed (skip the example and count it). Gold answers
    may be raw ("\frac{1}{2}", "10") or a GSM8K answer field ("... #### 72"). Each completion is
    graded in at most about 1 s of wall time by the module's default ``Grader``.

    Shapes: ``completions`` and ``answers`` are [N]; returns [N].
    """
    return default_grader().grade(completions, answers).rewards


def default_grader() -> Grader:
    """The process-wide ``Grader`` used by ``math_reward`` and ``is_equivalent`` (created lazily)."""
    from agro.grading import default_grader as _default

    return _default()


def __getattr__(name: str) -> Any:
    # Re-export the grader lazily: agro.grading imports this module, and the sandbox loads this
    # file on its own, without agro.grading.
    if name in ("Grader", "GradeResult"):
        from agro import grading

        return getattr(grading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
