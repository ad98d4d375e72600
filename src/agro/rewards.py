r"""Answers of math completions: extraction, normalisation and equivalence (agro_math.md §8).

The paper's reward (§8, "prompt/reward"): the model ends with "The final answer is ...", the text
after that marker is matched against the ground truth with Sympy, and r = 1 on a match, else 0.
This module does the answer side of that; ``agro.grading`` runs it under a time bound and holds
the public ``math_reward`` / ``is_equivalent`` / ``Grader``. Where it departs from the paper:

* Extraction, in order of preference: the rest of the sentence after the last "The final answer
  is"; the last ``\boxed{}`` (also ``\fbox{}``, ``\boxed 5``), joined with the boxes right before
  it when only white space, ``,`` ``;``, math delimiters or "and" separate them ("$\boxed{3}$ and
  $\boxed{7}$" is the list "3, 7"; ``last_boxed`` gives the exact rule, which gold answers follow
  too); what follows GSM8K's ``####``; a
  completion that *is* an answer ("x >= 5", "10, 4, -2", "$\frac12$"). Without any of these,
  math-verify's own extraction reads the last ``MAX_TEXT_CHARS`` of the completion in the sandbox
  (it finds answers in ``$...$``, ``$$...$$``, ``\(...\)``, ``\[...\]``, after "answer", and plain
  numbers/arithmetic); plain text without LaTeX uses its last number in the trainer process.
* Matching: math-verify (LaTeX to Sympy; numeric, symbolic, relation, set, interval and matrix
  comparison) instead of a bare Sympy comparison, with these rules of ours on top:
  plain numbers compare as exact rationals in the trainer process (``15`` == ``15.0`` ==
  ``15,000``/1000, thousands written ``1,000`` ``1{,}000`` ``10,\!080`` ``1 000``); a decimal
  comma (``1,22``) is read as a decimal point when the other side is a decimal; a bare
  comma-separated list (``10, 4, -2``) is *ordered*, as in MATH's reference grader (set braces
  ``\{...\}`` make it a set; ``ordered_lists=False`` gives math-verify's set semantics); a decimal
  equals an exact value when it has at least ``MIN_STATED_DIGITS`` significant digits and is that
  value rounded half-up to the same number of places (``0.3333`` == 1/3, ``0.33`` != 1/3), also
  inside intervals, tuples, sets and matrices; ASCII relations (``>=``, ``<=``, ``!=``) equal their
  LaTeX forms.
* A gold answer that cannot be parsed gives ``None`` (the caller skips and counts the example), as
  in TRL's ``accuracy_reward``.

Safety. Completions are untrusted text and are never evaluated as code. Everything here runs in
linear time on capped input except the ``sandbox_*`` functions, which run only inside the
time-bounded grader process of ``agro.grading``. math-verify's LaTeX mode parses with an ANTLR
grammar. Its plain-expression mode (``ExprExtractionConfig``) would call ``sympy.parse_expr``,
which ``eval``s Python: the sandbox replaces that call by ``_safe_parse_expr``, which admits only a
whitelist of characters (digits, ``.``, ``+ - * / ^ ( ) × ÷``, white space) and hands the text to
the LaTeX parser, and Sympy's ``eval_expr``/``parse_expr`` are disabled while math-verify runs.
At import time this module loads only the standard library (math-verify is imported lazily inside
the sandbox), so the sandbox can load this file by path without importing ``agro`` or torch.

>>> extract_answer("So x = 4. The final answer is $\\frac{3}{4}$. I hope it is correct.")
'\\frac{3}{4}'
>>> last_boxed("so \\boxed{\\frac{1}{2}} and then \\boxed 5$.")
'5'
>>> quick_verdict("\\frac{1}{3}", "0.3333"), quick_verdict("\\frac{1}{3}", "0.33")
(1.0, 0.0)
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any, Iterator, NamedTuple

__all__ = [
    "Extraction", "clean_answer", "extract", "extract_answer", "gold_answer", "last_boxed",
    "quick_verdict", "sandbox_equivalent", "sandbox_grade", "sandbox_warmup", "triage",
]

MAX_COMPLETION_CHARS = 65_536
"""Only the last this-many characters of a completion are searched for an answer (final answers
come at the end). This bounds extraction time on multi-megabyte outputs."""

MAX_TEXT_CHARS = 4096
"""Without an explicit answer, math-verify reads only the last this-many characters (a few ms)."""

MAX_ANSWER_CHARS = 512
"""An extracted answer longer than this scores 0 without ever reaching Sympy. The longest
``answer`` in MATH-500 and in the MATH training slice is 159 characters."""

MAX_NESTING = 24
"""An extracted answer whose brackets nest deeper than this scores 0 without reaching Sympy (its
LaTeX parser needs seconds for a few hundred levels). MATH answers nest at most a few levels."""

MIN_STATED_DIGITS = 4
"""A decimal with fewer significant digits (``0.33``) must equal an exact answer exactly, or to six
places (math-verify's ``float_rounding``); with at least this many (``0.3333``) it may be the exact
value rounded half-up to the places it gives."""

_FLOAT_PLACES = 6  # math-verify's float_rounding: decimals with >= 6 places compare at 6 places
_MARKER_SCAN_CHARS = 4096  # at most this much text after "The final answer is" is scanned

# --------------------------------------------------------------------------------------------
# Extraction. Every regex below is linear: no nested quantifiers and no ambiguous alternation.
# --------------------------------------------------------------------------------------------

_MARKER_RE = re.compile(r"final[ \t]+answer[ \t]+is", re.IGNORECASE)
_ANSWER_RE = re.compile(r"\banswer[ \t]*(?:is\b|:|=)[ \t]*", re.IGNORECASE)  # "the answer is x >= 5"
# One pass over the braces. "\\" (a LaTeX line break) is consumed first so that "\\{" is not read
# as an escaped brace; "\{" and "\}" are literal braces; "\boxed 5" is a box without braces (its
# content: non-space characters, possibly with one level of {...} groups, as in "\boxed \frac{1}{2}").
_BOX_TOKEN_RE = re.compile(
    r"\\\\"
    r"|\\(?:boxed|fbox)[ \t]*\{"
    r"|\\(?:boxed|fbox)[ \t]+([^\s${}]+(?:\{[^{}$]*\}[^\s${}]*)*)"
    r"|\\[{}]|[{}]"
)
_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
_BOX_BARE_RE = re.compile(r"\\(?:boxed|fbox)[ \t]+")
_NUMBER_RE = re.compile(
    r"(?:(?<![\w)\]}])([-\u2212]))?"  # optional sign, not a binary minus as in "5-3"
    r"(?<![0-9.A-Za-z_])"  # not inside a number or a word ("K7RQ" has no number)
    r"([0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+)"  # digits, maybe with separators, maybe decimal
    r"(?:[ \t]*/[ \t]*([0-9][0-9,]*(?:\.[0-9]+)?))?"  # optional "/denominator"
)
_THOUSANDS_RE = re.compile(r"[1-9][0-9]{0,2}(?:,[0-9]{3})+")
_MATH_DELIM_RE = re.compile(r"(?<!\\)\$|\\[(\[]")
_LATEX_RE = re.compile(r"(?<!\\)\$|\\[(\[]|\\[A-Za-z]")  # any sign of LaTeX in a text
_TEXT_GROUP_RE = re.compile(
    r"\\(?:text|textbf|textrm|textnormal|textit|mathrm|mathbf|mathit|mbox|operatorname|begin|end)"
    r"[ \t]*\{[^{}]*\}"
)
_WORD_RE = re.compile(r"(?<![A-Za-z0-9\\{_^])[A-Za-z]{3,}(?![A-Za-z0-9}_^{(])")  # a free-standing word
_MATH_WORDS = frozenset(
    "and or sin cos tan cot sec csc log exp sqrt inf infty arcsin arccos arctan sinh cosh tanh "
    "mod gcd lcm max min det".split()
)


_BOX_JOIN_GAP_CHARS = 40
"""Boxes are joined only if at most this many characters separate them (see ``last_boxed``)."""

_MAX_JOINED_BOXES = 64
"""At most this many boxes are joined into one answer (the last ones; a longer run of boxes is
not an answer, and this keeps the join cheap on hostile text)."""

# What may stand between two boxes that are joined into one answer: white space (at most one line
# break), "," ";" "~", math delimiters ($ \( \) \[ \]), LaTeX spacing (\, \; \quad \qquad), the word
# "and" (also as \text{ and }, \text{, and }), and a one-letter label before the next box ("y_2 ="
# in "$y_1 = \boxed{a}$ and $y_2 = \boxed{b}$"). Not "or" (in solutions "\boxed{28} or \boxed{28_9}"
# gives one answer in two forms), not "." and no other word ("\boxed{4}, wait, \boxed{5}" is a
# self-correction). Only ever matched on at most _BOX_JOIN_GAP_CHARS characters.
_BOX_GAP_RE = re.compile(
    r"(?:[ \t\r\n,;~$]"
    r"|\\[()\[\]]"
    r"|\\[,;:! ]|\\q?quad(?![A-Za-z])"
    r"|\\(?:text|textrm|textnormal|textbf|textit|mathrm|mbox)[ \t]*\{[ \t]*(?:,[ \t]*)?(?:and[ \t]*)?\}"
    r"|(?<![A-Za-z])and(?![A-Za-z])"
    r"|(?<![A-Za-z\\])[A-Za-z](?:_[A-Za-z0-9]|_\{[A-Za-z0-9]{1,3}\})?[ \t]*=(?!=)"
    r")*"
)


def _box_spans(text: str) -> list[tuple[int, int, int, int]]:
    r"""Complete boxes of ``text`` that are not inside another complete box, in order, as
    ``(start, content_start, content_end, end)``; ``start`` is that of ``\boxed``. One pass with a
    stack (each box is appended and removed at most once), so the cost is linear."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return []
    stack: list[tuple[int, int] | None] = []  # per open brace: (box start, content start), or None
    boxes: list[tuple[int, int, int, int]] = []
    for m in _BOX_TOKEN_RE.finditer(text):
        tok = m.group()
        if m.group(1) is not None:  # \boxed 5
            box = (m.start(), m.start(1), m.end(1), m.end(1))
        elif tok[-1] == "{" and tok[0] == "\\" and len(tok) > 2:  # \boxed{ or \fbox{
            stack.append((m.start(), m.end()))
            continue
        elif tok == "{":
            stack.append(None)
            continue
        elif tok == "}" and stack and (top := stack.pop()) is not None:
            box = (top[0], top[1], m.start(), m.end())
        else:  # "\\", "\{" and "\}" are literal text; "}" closes a plain brace or nothing
            continue
        while boxes and boxes[-1][0] >= box[0]:  # boxes inside this one
            boxes.pop()
        boxes.append(box)
    return boxes


def _last_box_span(text: str) -> tuple[int, int] | None:
    """``(start, end)`` of the content of the box that closes last, or None. Linear time (the
    last element of ``_box_spans``, without keeping the list)."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    stack: list[int] = []  # per open brace: start of the box content, or -1 for a plain brace
    best: tuple[int, int] | None = None
    for m in _BOX_TOKEN_RE.finditer(text):
        tok = m.group()
        if m.group(1) is not None:  # \boxed 5
            best = (m.start(1), m.end(1))
        elif tok[-1] == "{" and tok[0] == "\\" and len(tok) > 2:  # \boxed{ or \fbox{
            stack.append(m.end())
        elif tok == "{":
            stack.append(-1)
        elif tok == "}":
            if stack:
                start = stack.pop()
                if start >= 0:
                    best = (start, m.start())
        # "\\", "\{" and "\}" are literal text
    return best


def _joinable(gap: str) -> bool:
    """Whether two boxes with ``gap`` between them belong to one answer (see ``_BOX_GAP_RE``)."""
    return len(gap) <= _BOX_JOIN_GAP_CHARS and gap.count("\n") <= 1 and _BOX_GAP_RE.fullmatch(gap) is not None


def _unwrap_boxed(s: str) -> str:
    r"""Remove ``\boxed{...}`` / ``\boxed x`` wrappers that span the whole string (repeatedly)."""
    for _ in range(8):
        t = s.strip()
        if not t.startswith(("\\boxed", "\\fbox")):
            return t
        span = _last_box_span(t)
        if span is None:
            return t
        head, tail = t[:span[0]], t[span[1]:]
        if not ((_BOX_OPEN_RE.fullmatch(head) and tail == "}") or (_BOX_BARE_RE.fullmatch(head) and not tail)):
            return t
        s = t[span[0]:span[1]]
    return s.strip()


_LABEL_RE = re.compile(r"[A-Za-z](?:_\{?\w{1,8}\}?)?[ \t]*=")  # "y =", "y_2 =", "x_{1}=" before a box


def last_boxed(text: str, join: bool = True) -> str | None:
    r"""The final boxed answer of ``text``: the content of its last complete ``\boxed{...}`` (or
    ``\fbox{...}``, ``\boxed 5``), joined with the boxes right before it that belong to the same
    answer. None if there is no complete box.

    Braces must balance (nesting is fine; ``\{`` and ``\}`` are literal braces, not counted). One
    pass with a stack, so the cost is linear even for thousands of unclosed ``\boxed{``. "Last"
    is the box that closes last; a box wrapping a whole box is unwrapped.

    Joining (``join=True``; this is what predictions, completions and gold answers all go through):
    an answer written as several boxes, "$\boxed{3}$ and $\boxed{7}$", "\boxed{1},\boxed{2}",
    "\boxed{(2, 2)} \quad \text{and} \quad \boxed{(6, 2)}", is one answer, their contents in
    order as a bare list "3, 7" (ordered like any bare list, see ``agro.rewards``; repeated
    neighbours counted once). Boxes are joined only when at most ``_BOX_JOIN_GAP_CHARS``
    characters separate them and these are white space (at most one line break), ``,`` ``;``
    ``~``, math delimiters, LaTeX spacing, "and" (also ``\text{ and }``) or a one-letter label
    ("y_2 ="). Anything else, a word, a full stop or "or", separates answers, so a self-correction
    ("\boxed{4}, wait, actually \boxed{5}"; "\boxed{4}. Hmm, no. The answer is \boxed{5}") and
    alternative forms ("\boxed{28} or \boxed{28_9}") give the last box. math-verify joins more
    loosely (any boxes under 10 characters apart, or under 70 with a ``,`` ``;`` "and" "or"
    between them). ``join=False`` gives the last box alone.

    >>> last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}}.")
    '\\frac{1}{2}'
    >>> last_boxed(r"$\boxed{\{1, 2\}}$")
    '\\{1, 2\\}'
    >>> last_boxed(r"\boxed 5$"), last_boxed(r"\fbox{7}"), last_boxed(r"\boxed{\boxed{3}}")
    ('5', '7', '3')
    >>> last_boxed(r"\boxed{4} then an unclosed \boxed{5"), last_boxed(r"\boxed{5"), last_boxed("no box")
    ('4', None, None)
    >>> last_boxed(r"$\boxed{3}$ and $\boxed{7}$."), last_boxed(r"\boxed{4}, wait, actually \boxed{5}")
    ('3, 7', '5')
    """
    if not isinstance(text, str):
        return None
    boxes = _box_spans(text)
    if not boxes:
        return None
    first = len(boxes) - 1
    while join and first > 0 and len(boxes) - first < _MAX_JOINED_BOXES \
            and _joinable(text[boxes[first - 1][3]:boxes[first][0]]):
        first -= 1
    parts: list[str] = []
    for _, start, end, _ in boxes[first:]:
        content = text[start:end]
        if content.lstrip().startswith(("\\boxed", "\\fbox")):
            content = _unwrap_boxed(content)
        if first == len(boxes) - 1:
            return content
        content = content.strip().rstrip(",;").strip()  # "\boxed 3, \boxed 7": "3," is "3"
        if content:
            parts.append(content)
    # A repeated final answer ("\boxed{5} \boxed{5}") is one answer; labelled boxes
    # ("x = \boxed{3} and y = \boxed{3}") are two values, and "2, 2, 3" keeps its repeats.
    labelled = any(_LABEL_RE.search(text[boxes[i][3]:boxes[i + 1][0]])
                   for i in range(first, len(boxes) - 1))
    if parts and not labelled and all(p == parts[0] for p in parts):
        return parts[0]
    return ", ".join(parts)


def _strip_answer(s: str) -> str:
    """Strip whitespace, markdown bold, trailing full stops and ``$`` / ``\\(`` / ``\\[`` delimiters."""
    for _ in range(4):
        before = s
        s = s.strip().rstrip(".").strip()
        if s.startswith("**") and s.endswith("**") and len(s) >= 4:
            s = s[2:-2]
        if s.startswith("$$") and s.endswith("$$") and len(s) >= 4:
            s = s[2:-2]
        if s.startswith("$") and s.endswith("$") and len(s) >= 2 and not s.endswith("\\$"):
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
    s = _strip_answer(line[:cut].lstrip(" \t:"))
    if "\\boxed" in s or "\\fbox" in s:
        boxed = last_boxed(s)
        if boxed is not None:
            s = boxed
    return _strip_answer(_unwrap_boxed(s))


def _last_number(text: str) -> str | None:
    """The last number in ``text``: int, decimal, negative or ``a/b``, thousands separators removed.

    A single comma that is not a thousands separator is kept ("2,74": a decimal comma or a
    two-item list; ``quick_verdict`` decides); in a longer list ("1,2,3") the last item is taken.
    """
    text = text.replace("{,}", ",").replace(",\\!", ",")
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
            if _THOUSANDS_RE.fullmatch(head):
                head = head.replace(",", "")
            elif head.count(",") == 1 and not dot and den is None:
                return head
            else:
                head = head.rsplit(",", 1)[1]
        return head + dot + frac

    out = ("-" if sign else "") + clean(num)
    if den is not None:
        out += "/" + clean(den)
    return out


def _has_words(s: str) -> bool:
    """Whether ``s`` has a free-standing word of >= 3 letters that is not ``\\text{}`` content or a
    math word (sin, and, ...): then it is a sentence, not an answer ("2xyz" and "\\frac" are not
    words)."""
    s = _TEXT_GROUP_RE.sub(" ", s)
    return any(m.group().lower() not in _MATH_WORDS for m in _WORD_RE.finditer(s))


def _bare_answer(text: str) -> str | None:
    """``text`` itself if it is an answer: short, one line, no inner ``$``, and no sentence words
    (or one word and nothing else, as in "Tuesday")."""
    if len(text) > 2 * MAX_ANSWER_CHARS:
        return None
    s = _strip_answer(text)
    if not s or len(s) > MAX_ANSWER_CHARS or "\n" in s or _MATH_DELIM_RE.search(s) \
            or s.startswith("\\end") or not any(c.isalnum() for c in s):
        return None
    if _has_words(s) and not (s.isalpha() and s.isascii() and len(s) <= 32):
        return None
    return s


class Extraction(NamedTuple):
    """What ``extract`` found in a completion.

    Attributes:
        answer: the answer text ("marker", "boxed", "hashes", "bare"); the last number of the text
            ("number", "text"); None ("none").
        source: where the answer came from: "marker" ("The final answer is"), "boxed", "hashes"
            (GSM8K's ``####``), "bare" (the completion, or its last line, is an answer), "answer"
            (what follows "answer is" / "answer:" is an answer), "number" (plain text without
            LaTeX: its last number), "text" (LaTeX without a marker: math-verify reads ``text``),
            "none" (nothing that could be an answer).
        text: the tail of the completion for math-verify's extraction ("number", "text"), else None.
    """

    answer: str | None
    source: str
    text: str | None


EXPLICIT_SOURCES = ("marker", "boxed", "hashes", "bare", "answer")


def extract(text: Any, max_chars: int = MAX_COMPLETION_CHARS) -> Extraction:
    r"""Find the final answer of a completion (see ``Extraction``). Linear in ``max_chars``.

    >>> extract("Work. The final answer is $7$. I hope it is correct.")
    Extraction(answer='7', source='marker', text=None)
    >>> extract("x >= 5").source, extract("so $x = 1/2$").source, extract("7 + 8 = 15 apples").answer
    ('bare', 'text', '15')
    """
    if not isinstance(text, str) or not text:
        return Extraction(None, "none", None)
    if len(text) > max_chars:
        text = text[-max_chars:]
    marker = None
    for marker in _MARKER_RE.finditer(text):
        pass
    if marker is not None:
        ans = _answer_after_marker(text, marker.end())
        if ans:
            return Extraction(ans, "marker", None)
    boxed = last_boxed(text)
    if boxed is not None:
        ans = _strip_answer(_unwrap_boxed(boxed))
        if ans:
            return Extraction(ans, "boxed", None)
    hashes = text.rfind("####")
    if hashes >= 0:
        end = text.find("\n", hashes)
        ans = _strip_answer(text[hashes + 4:end if end >= 0 else len(text)])
        if ans:
            return Extraction(ans, "hashes", None)
    bare = _bare_answer(text)
    if bare is not None:
        return Extraction(bare, "bare", None)
    tail = text[-MAX_TEXT_CHARS:]
    anchor = None
    for anchor in _ANSWER_RE.finditer(tail):
        pass
    if anchor is not None:  # "... the answer is x >= 5." (only if what follows is an answer)
        bare = _bare_answer(_answer_after_marker(tail, anchor.end()))
        if bare is not None:
            return Extraction(bare, "answer", None)
    last_line = tail.rstrip().rpartition("\n")[2]
    if last_line != tail and (bare := _bare_answer(last_line)) is not None:
        return Extraction(bare, "bare", None)
    number = _last_number(tail)
    if _LATEX_RE.search(tail):
        return Extraction(number, "text", tail)
    if number is not None:
        return Extraction(number, "number", tail)
    if any(c.isdigit() for c in tail):
        return Extraction(None, "text", tail)
    return Extraction(None, "none", None)


def extract_answer(text: str, max_chars: int = MAX_COMPLETION_CHARS) -> str | None:
    r"""The final answer of a completion as a string, or None if it has none.

    In order of preference: the rest of the sentence after "The final answer is" (stripped of a
    trailing full stop, ``$`` and a surrounding ``\boxed{}``); else the content of the last
    ``\boxed{...}`` (with its neighbouring boxes, see ``last_boxed``); else what follows the last GSM8K ``####`` on its line; else the completion
    itself if it is an answer ("x >= 5"); else the last number (int, decimal, negative, fraction
    ``a/b``, thousands separators removed). Only the last ``max_chars`` characters are read, and
    every step is linear in that length. (The grader does more without a marker: math-verify reads
    the text, see ``extract``.)
    """
    return extract(text, max_chars).answer


# --------------------------------------------------------------------------------------------
# Fast comparisons (trainer process): exact rationals and string normalisation.
# --------------------------------------------------------------------------------------------

_NUM = (
    r"(?:[1-9][0-9]{0,2}(?:,[0-9]{3})+|[1-9][0-9]{0,2}(?: [0-9]{3})+|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+"
)
_PLAIN_RE = re.compile(rf"([-+]?)({_NUM})")
_SLASH_RE = re.compile(rf"([-+]?)\(?({_NUM})\)?/\(?({_NUM})\)?")
_FRAC_RE = re.compile(rf"([-+]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}")
_FRAC_SHORT_RE = re.compile(r"([-+]?)\\frac([0-9])([0-9])")
_COMMA_DECIMAL_RE = re.compile(r"[-+]?[0-9]+,[0-9]+")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textrm|textnormal|mathrm|mbox)\{([^{}]*)\}")
_DECOR_RE = re.compile(
    r"\\[$!,;: ]|\\(?:displaystyle|left(?![a-zA-Z])|right(?![a-zA-Z]))|[$\u00b0\u20ac\u00a3\u00a5]"
    r"|\^\{?\\circ\}?|\\degree"
)
_UNIT_TAIL_RE = re.compile(r"(?:[ \t]+[A-Za-z]{2,}(?:\^\{?[23]\}?)?\.?)+$")  # "5 cm", "12 apples"
_LIST_COMMA_RE = re.compile(r",[ \t]")  # "1, 234" is a list, not 1234
_SPACE_RE = re.compile(r"\s+")
_LOOSE_SPACE_RE = re.compile(r"(?<![0-9])\s+|\s+(?![0-9])")  # all white space not between digits
_RELATION_RE = re.compile(r"[<>\u2264\u2265\u2260]|!=|\\(?:le|ge|ne|lt|gt|leq|geq|neq|approx)(?![A-Za-z])")
_CHOICE_RE = re.compile(r"\(([A-Za-z])\)")

_Num = tuple[Fraction, "int | None", int]
"""(value, places, significant digits): places is None for an exact number (int or fraction)."""


def _drop_text_units(s: str) -> str:
    r"""Remove ``\text{...}`` groups without digits ("18 \text{ dollars}" -> "18 ")."""
    return _TEXT_RE.sub(lambda m: m.group(0) if any(c.isdigit() for c in m.group(1)) else " ", s)


def _places_and_digits(literal: str) -> tuple[int, int]:
    """Decimal places and significant digits a decimal literal states, trailing zeros included
    ("0.3330" -> (4, 4), "4.4720" -> (4, 5), "0.0833" -> (4, 3))."""
    head, _, frac = literal.strip().lstrip("+-").partition(".")
    if "e" in frac.lower() or "e" in head.lower():  # "1e-05": what a float's repr may give
        try:
            d = Decimal(literal).normalize()
        except InvalidOperation:
            return 0, 0
        _, digits, exponent = d.as_tuple()
        return (max(0, -exponent) if isinstance(exponent, int) else 0), len(digits)
    return len(frac), len((head + frac).lstrip("0"))


def _as_number(s: str) -> _Num | None:
    r"""``(value, places, digits)`` if ``s`` is a plain number, else None. No Sympy.

    Accepts ints, decimals, thousands separators ("15,000", "15{,}000", "10,\!080", "1 000"),
    ``a/b``, ``\frac{a}{b}`` (also ``\dfrac``, ``\tfrac``, ``\frac34``), a sign, and decorations
    that do not change the value: ``$``, ``\$``, currency signs, ``^\circ``, ``\text{units}``, a
    trailing unit word ("5 cm"), white space that is not between digits. Percentages are left to
    math-verify (is "50%" 50 or 0.5?); "1, 2" (comma and space) is a list.
    """
    if "%" in s or _LIST_COMMA_RE.search(s):
        return None
    s = s.replace("\u2212", "-").replace("{,}", ",").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _UNIT_TAIL_RE.sub("", _DECOR_RE.sub("", _drop_text_units(s)).strip())
    s = _LOOSE_SPACE_RE.sub("", s).rstrip(".")
    try:
        if m := _PLAIN_RE.fullmatch(s):
            literal = m[2].replace(",", "").replace(" ", "")
            value = _signed(m[1], Fraction(literal))
            if "." not in literal:
                return value, None, 0
            places, digits = _places_and_digits(literal)
            return (value, places, digits) if places else (value, None, 0)
        if m := _SLASH_RE.fullmatch(s) or _FRAC_RE.fullmatch(s):
            value = _signed(m[1], _to_fraction(m[2]) / _to_fraction(m[3]))
            return (value, _FLOAT_PLACES, 99) if "." in m[2] + m[3] else (value, None, 0)
        if m := _FRAC_SHORT_RE.fullmatch(s):
            return _signed(m[1], Fraction(int(m[2]), int(m[3]))), None, 0
    except (ZeroDivisionError, ValueError):
        return None
    return None


def _as_comma_decimal(s: str) -> _Num | None:
    """"1,22" read as 1.22 (a decimal comma); None unless ``s`` is digits, one comma, digits."""
    t = s.strip()
    return _as_number(t.replace(",", ".")) if _COMMA_DECIMAL_RE.fullmatch(t) else None


def _rhs_number(s: str) -> _Num | None:
    """The number after the last "=" of an equation chain ("x = 5", "7 + 8 = 15"), else None."""
    if "=" not in s or _RELATION_RE.search(s):
        return None
    head, _, rhs = s.rpartition("=")
    return None if "," in head else _as_number(rhs)


def _to_fraction(n: str) -> Fraction:
    return Fraction(n.replace(",", "").replace(" ", ""))


def _signed(sign: str, x: Fraction) -> Fraction:
    return -x if sign == "-" else x


def _round_half_up(x: Fraction, places: int) -> Fraction:
    """``x`` rounded to ``places`` decimals, halves away from zero (2/3 -> 0.6667)."""
    scaled = abs(x) * 10**places
    r = Fraction(math.floor(scaled + Fraction(1, 2)), 10**places)
    return r if x >= 0 else -r


def _numbers_equal(a: _Num, b: _Num) -> bool:
    """Exact for ints and fractions. Two decimals: equal at 6 places (math-verify's
    ``float_rounding``). A decimal and an exact number: equal at 6 places if the decimal has >= 6;
    else, with >= ``MIN_STATED_DIGITS`` significant digits, the exact value rounded half-up to the
    decimal's places must equal it (1/3 == 0.3333, 2/3 == 0.6667); else exactly (1/2 == 0.5,
    1/3 != 0.33)."""
    if a[1] is None and b[1] is None:
        return a[0] == b[0]
    if a[1] is not None and b[1] is not None:
        return round(a[0], _FLOAT_PLACES) == round(b[0], _FLOAT_PLACES)
    dec, exact = (a, b) if a[1] is not None else (b, a)
    places = dec[1]
    assert places is not None
    if places >= _FLOAT_PLACES:
        return round(a[0], _FLOAT_PLACES) == round(b[0], _FLOAT_PLACES)
    if dec[2] >= MIN_STATED_DIGITS:
        return _round_half_up(exact[0], places) == dec[0]
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
    a full solution keeps its last ``\boxed{}`` (with its neighbouring boxes, as the list "a, b":
    see ``last_boxed``).
    """
    if isinstance(answer, str):
        answer = answer[-MAX_COMPLETION_CHARS:]
        if "####" in answer:
            answer = answer.rsplit("####", 1)[1].strip().split("\n", 1)[0]
        elif (boxed := last_boxed(answer)) is not None:
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

    Decides alone: no answer, an over-long or too deeply nested answer (0); two plain numbers,
    including a decimal comma against a decimal and "x = 5" against a number (exact rational
    comparison, see ``_numbers_equal``); equal normalised strings (1).
    """
    if not pred or len(pred) > max_answer_chars or _nesting(pred) > MAX_NESTING:
        return 0.0
    g, p = _as_number(gold), _as_number(pred)
    if g is None and p is not None and p[1] is not None:
        g = _as_comma_decimal(gold)
    if p is None and g is not None:
        p = (_as_comma_decimal(pred) if g[1] is not None else None) or _rhs_number(pred)
    if g is not None and p is not None:
        return 1.0 if _numbers_equal(g, p) else 0.0
    if _normalise(gold) == _normalise(pred):
        return 1.0
    return None


def triage(gold: str, completion: Any, max_chars: int = MAX_COMPLETION_CHARS,
           max_answer_chars: int = MAX_ANSWER_CHARS) -> tuple[float | None, str | None, str | None]:
    """Everything the trainer process does for one item: ``(verdict, answer, text)``.

    ``verdict`` is 1.0 / 0.0 when decided here (``answer`` and ``text`` are then None); else it is
    None and ``sandbox_grade(gold, answer, text)`` must decide: with an explicit ``answer``, or
    with ``text`` for math-verify's extraction. ``gold`` is a ``gold_answer``. Linear time.
    """
    ex = extract(completion, max_chars)
    if ex.source in EXPLICIT_SOURCES:
        verdict = quick_verdict(gold, ex.answer, max_answer_chars)
        return (verdict, None, None) if verdict is not None else (None, ex.answer, None)
    if ex.source == "number" and _as_number(gold) is not None:
        verdict = quick_verdict(gold, ex.answer, max_answer_chars)
        if verdict is not None:
            return verdict, None, None
    if ex.text is not None:
        return None, None, ex.text
    return 0.0, None, None


# --------------------------------------------------------------------------------------------
# Sympy comparison: runs ONLY inside the sandboxed grader process (agro.grading).
# --------------------------------------------------------------------------------------------

_MV: dict[str, Any] = {}
_PLAIN_EXPR_RE = re.compile(r"[0-9.+\-*/^() \t\u00d7\u00f7]+")
_POWER_RE = re.compile(r"\^[ \t]*(?:\(|[0-9.]{4,})")  # "^(" or a 4+-digit exponent: a tower or huge


def _math_verify() -> dict[str, Any]:
    if not _MV:
        import logging

        import latex2sympy2_extended.latex2sympy2 as l2s
        import math_verify.parser as mvp
        import sympy.parsing.sympy_parser as spp
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
        from math_verify.grader import sympy_expr_eq

        # math-verify warns once that its signal timeout is off; the process deadline replaces it.
        for name in ("math_verify", "latex2sympy2_extended"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        # Its expression mode is used only if its parse_expr call can be replaced (see _no_eval).
        code = getattr(getattr(mvp, "extract_expr", None), "__code__", None)
        expr_ok = callable(getattr(mvp, "parse_expr_cached", None)) and (
            "parse_expr_cached" in getattr(code, "co_names", ()))
        latex = LatexExtractionConfig()
        _MV.update(
            parse=parse, verify=verify, expr_eq=sympy_expr_eq, mvp=mvp, spp=spp, l2s=l2s,
            real_parse_expr=spp.parse_expr,
            parse_latex=mvp.parse_latex_cached, answer=[latex],
            text=[latex, ExprExtractionConfig()] if expr_ok else [latex],
        )
    return _MV


# What Sympy's own code passes to sympify(str): number literals (the LaTeX parser's number tokens)
# and plain names (e.g. unit prefixes at import). A name is only looked up, never called.
_SYMPIFY_OK_RE = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[A-Za-z][A-Za-z0-9]{0,31}")


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise ValueError("agro: evaluating text as Python is disabled while grading")


def _number_only_parse_expr(s: Any, *args: Any, **kwargs: Any) -> Any:
    """Stands in for ``sympy.parse_expr`` (behind ``sympify(str)``, which ``eval``s): the LaTeX
    parser turns number tokens into Sympy numbers with ``sympy.Number("12.5")`` and Sympy modules
    imported lazily sympify plain names, so a number literal or a name (letters and digits, no
    ``_``, no call, no attribute) is let through; anything else is refused."""
    if isinstance(s, str) and len(s) <= 4 * MAX_ANSWER_CHARS and _SYMPIFY_OK_RE.fullmatch(s.strip()):
        return _math_verify()["real_parse_expr"](s, *args, **kwargs)
    return _refuse()


def _safe_parse_expr(expr: str) -> Any:
    """Stands in for math-verify's ``parse_expr_cached`` (which ``eval``s): a whitelisted plain
    arithmetic expression ("2/3", "1 + 2*3", "(9+1)", "2^10") parsed by the LaTeX grammar."""
    s = expr.replace("**", "^")
    if len(s) > 200 or not _PLAIN_EXPR_RE.fullmatch(s) or _nesting(s) > MAX_NESTING or _POWER_RE.search(s) \
            or s.count("^") > 1:
        raise ValueError("not a plain arithmetic expression")
    latex = s.replace("\u00d7", "\\times ").replace("\u00f7", "\\div ").replace("*", "\\cdot ")
    return _math_verify()["parse_latex"](latex)


@contextmanager
def _no_eval() -> Iterator[None]:
    """While math-verify runs, nothing reaches Python's ``eval``: its expression parser is
    ``_safe_parse_expr``, Sympy's ``parse_expr`` (behind ``sympify(str)``) admits number literals
    only (``_number_only_parse_expr``), and the other module-level ``parse_expr`` names refuse."""
    mv = _math_verify()
    mvp, spp, l2s = mv["mvp"], mv["spp"], mv["l2s"]
    saved = (mvp.parse_expr_cached, mvp.parse_expr, spp.parse_expr, l2s.parse_expr)
    mvp.parse_expr_cached, mvp.parse_expr, spp.parse_expr, l2s.parse_expr = (
        _safe_parse_expr, _refuse, _number_only_parse_expr, _refuse)
    try:
        yield
    finally:
        mvp.parse_expr_cached, mvp.parse_expr, spp.parse_expr, l2s.parse_expr = saved


_ASCII_LATEX = (("\u2212", "-"), ("**", "^"), ("\\$", " "), ("$", " "), ("\n", " "), ("\u00d7", "\\times "),
                ("\u00f7", "\\div "), ("\u00b7", "\\cdot "))


def _as_latex(s: str) -> str:
    for a, b in _ASCII_LATEX:
        s = s.replace(a, b)
    return "$" + s + "$"


def _parsed(out: list[Any]) -> bool:
    return any(not isinstance(x, str) for x in out)


def _parse_answer(s: str) -> list[Any]:
    """math-verify's parse of ``s`` as one LaTeX answer; if that fails, of ``s`` as a text."""
    mv = _math_verify()
    out = mv["parse"](_as_latex(s), extraction_config=mv["answer"], parsing_timeout=None)
    if not _parsed(out):
        text = mv["parse"](s, extraction_config=mv["text"], parsing_timeout=None)
        if _parsed(text):
            return text
    return out


def _top_level_comma(s: str) -> bool:
    depth = 0
    for i, ch in enumerate(s):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0 and s[i - 1:i] != "{":
            return True
    return False


def _is_bare_list(gold: str, parsed: Any) -> bool:
    """A gold answer written "a, b, c" (no set braces): an ordered list."""
    return hasattr(parsed, "_unsorted_args") and "\\{" not in gold and _top_level_comma(gold)


def _as_tuple(x: Any) -> Any:
    if hasattr(x, "_unsorted_args"):  # latex2sympy's FiniteSet remembers the written order
        from sympy import Tuple

        return Tuple(*x._unsorted_args)
    return x


def _as_float(x: Any) -> Any:
    from sympy import Float, Mul

    if isinstance(x, Float):
        return x
    if isinstance(x, Mul) and len(x.args) == 2 and x.args[0] == -1 and isinstance(x.args[1], Float):
        return -x.args[1]
    return None


_DECIMAL_LITERAL_RE = re.compile(r"[0-9]*\.[0-9]+")


def _literals(*texts: str) -> dict[Decimal, tuple[int, int]]:
    """Decimal literals written in ``texts``: value -> (places, significant digits) as written.
    A Sympy Float forgets trailing zeros ("4.4720"); this remembers them."""
    out: dict[Decimal, tuple[int, int]] = {}
    for t in texts:
        for lit in _DECIMAL_LITERAL_RE.findall(t or ""):
            out.setdefault(Decimal(lit).normalize(), _places_and_digits(lit))
    return out


def _leaf_at_stated_precision(g: Any, p: Any, lits: dict[Decimal, tuple[int, int]]) -> bool:
    """A decimal leaf against an exact number leaf, under ``_numbers_equal``'s rule; other leaves
    with math-verify's own comparison."""
    for exact, dec in ((g, p), (p, g)):
        f = _as_float(dec)
        if f is None or getattr(exact, "is_number", False) is not True or exact.has(_sympy_float()):
            continue
        r = repr(abs(float(f)))
        places, digits = lits.get(Decimal(r).normalize()) or _places_and_digits(r)
        if 0 < places < _FLOAT_PLACES and digits >= MIN_STATED_DIGITS:
            value = exact.evalf(40)
            if not value.is_real:
                return False
            return _round_half_up(Fraction(str(value)), places) == Fraction(repr(float(f)))
    return bool(_math_verify()["expr_eq"](g, p, _FLOAT_PLACES, 15))


def _sympy_float() -> Any:
    from sympy import Float

    return Float


def _at_stated_precision(g: Any, p: Any, lits: dict[Decimal, tuple[int, int]], depth: int = 0) -> bool:
    """Structure-wise comparison that lets a decimal with a stated precision equal an exact value
    (``_numbers_equal``'s rule), in numbers, intervals, tuples, sets, unions and matrices."""
    from sympy import FiniteSet, Interval, MatrixBase, Tuple, Union
    from sympy.core.relational import Relational

    if depth > 4:
        return False
    if isinstance(p, Relational) and not isinstance(g, Relational):
        p = p.rhs  # "x = 0.3333", "p \approx 0.3333"
    if isinstance(g, Relational) and not isinstance(p, Relational):
        g = g.rhs
    if isinstance(g, MatrixBase) or isinstance(p, MatrixBase):
        return (isinstance(g, MatrixBase) and isinstance(p, MatrixBase) and g.shape == p.shape
                and all(_leaf_at_stated_precision(a, b, lits) for a, b in zip(g, p)))
    if isinstance(g, Interval) and isinstance(p, Interval):
        return (g.left_open == p.left_open and g.right_open == p.right_open
                and _leaf_at_stated_precision(g.start, p.start, lits)
                and _leaf_at_stated_precision(g.end, p.end, lits))
    if isinstance(g, (Tuple, FiniteSet, Union)) and type(g) is type(p) or (
            isinstance(g, FiniteSet) and isinstance(p, FiniteSet)):
        ga, pa = list(g.args), list(p.args)
        if len(ga) != len(pa):
            return False
        if not isinstance(g, Tuple):  # sets: pair the elements in increasing order
            try:
                ga.sort(key=lambda e: float(e.evalf()) if e.is_number else float(e.inf))
                pa.sort(key=lambda e: float(e.evalf()) if e.is_number else float(e.inf))
            except (TypeError, ValueError, AttributeError):
                return False
        return all(_at_stated_precision(a, b, lits, depth + 1) for a, b in zip(ga, pa))
    if getattr(g, "is_number", False) and getattr(p, "is_number", False):
        return _leaf_at_stated_precision(g, p, lits)
    return False


def _text_of(out: list[Any]) -> str:
    return next((x for x in reversed(out) if isinstance(x, str)), "")


def _equal(gold: str, g: list[Any], p: list[Any], pred: str, ordered_lists: bool) -> bool:
    """math-verify's ``verify`` of two parses, with agro's rules: ordered bare lists, explicit
    sets never equal to tuples or intervals, stated precision. ``gold``/``pred``: their texts."""
    from sympy import Interval, Tuple

    mv = _math_verify()
    g0 = next((x for x in g if not isinstance(x, str)), None)
    p0 = next((x for x in p if not isinstance(x, str)), None)
    for a, a_text, b_text in ((g0, gold, pred), (p0, pred, gold)):
        if isinstance(a, (Interval, Tuple)) and "\\{" in b_text and "\\{" not in a_text:
            return False  # "(2, 3)" is an open interval or a pair, never the set {2, 3}
    if ordered_lists and g0 is not None and _is_bare_list(gold, g0):
        g = [_as_tuple(x) for x in g]
        p = [_as_tuple(x) for x in p]
    if mv["verify"](g, p, timeout_seconds=None, allow_set_relation_comp=True):
        return True
    g0 = next((x for x in g if not isinstance(x, str)), None)
    p0 = next((x for x in p if not isinstance(x, str)), None)
    if g0 is None or p0 is None:
        return False
    Float = _sympy_float()
    try:
        if not (g0.has(Float) or p0.has(Float)):
            return False
        return _at_stated_precision(g0, p0, _literals(gold, pred))
    except Exception:  # an odd Sympy object: no stated-precision match
        return False


def sandbox_grade(gold: str, answer: str | None, text: str | None = None, ordered_lists: bool = True) -> bool | None:
    """Whether a completion's answer equals ``gold``; None if ``gold`` does not parse.

    ``answer`` is an explicit answer (from ``triage``), parsed whole as LaTeX (as a text if that
    fails); without one, math-verify's extraction reads ``text``. See the module docstring for the
    matching rules. UNBOUNDED in time and memory on hostile input: call it only through
    ``agro.grading``. math-verify's signal-based timeouts are disabled (``parsing_timeout=None``,
    ``timeout_seconds=None``): they work only in the main thread, and the grader's process
    deadline replaces them.
    """
    mv = _math_verify()
    with _no_eval():
        g = _parse_answer(gold)
        if not g:
            return None
        if answer is not None:
            p = _parse_answer(answer)
            pred = answer
        elif text:
            p = mv["parse"](text[-MAX_TEXT_CHARS:], extraction_config=mv["text"], parsing_timeout=None)
            pred = _text_of(p)
            if quick_verdict(gold, pred) == 1.0:  # "0,25" for 0.25, "58 500" for 58500
                return True
        else:
            return False
        if not p:
            return False
        return _equal(gold, g, p, pred, ordered_lists)


def sandbox_equivalent(gold: str, pred: str) -> bool | None:
    """``sandbox_grade`` for an answer that is already extracted (same caveats)."""
    return sandbox_grade(gold, pred, None)


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
    "\\begin{bmatrix} 0 & 1 \\end{bmatrix}", "\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]",
    "x > 3", "-2 \\le x < 5", "x \\ne 0", "x >= 5", "x != 2", "-3 <= x <= 4", "y = 2x + 3", "x = 5",
    "a = 1, b = 2", "1, 2, \\text{ and } 3", "10, 4, -2", "\\text{(C)}", "\\text{Evelyn}", "30^\\circ",
    "45^{\\circ}", "25\\%", "\\$18.90", "18 \\text{ dollars}", "\\pm 2", "3 \\cdot 4", "2 \\times 10^{3}",
    "\\binom{5}{2}", "|x - 1|", "5!", "\\infty", "2 + 3i", "\\frac{1}{2} + \\frac{\\sqrt{3}}{2} i", "1011_2",
    "\\dfrac{a+b}{c}", "((3)/(4))", "\\left( ((3)/(2)), -13 \\right)", "(\\pi^2)/(8)", "\\frac{11+9a}{20}",
    "x \\in [0, 1]", "0.\\overline{3}", "(0.3333, 2]", "\\begin{pmatrix} 0.3333 \\\\ 0.5 \\end{pmatrix}",
]
_WARMUP_TEXTS = [
    "So the answer is $\\frac{1}{2}$.", "we get \\( 2\\sqrt{3} \\) in the end", "hence \\[ x = 4 \\]",
    "$$\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}$$", "the price is 2,74 euros", "Answer: 1 + 2*3 = 7",
]


def sandbox_warmup() -> None:
    """Import math-verify and exercise its parser and comparisons once, so forked graders start warm."""
    answers = _WARMUP_ANSWERS
    for gold, pred in zip(answers, answers[1:] + answers[:1]):
        sandbox_grade(gold, pred)
    for text in _WARMUP_TEXTS:
        sandbox_grade("1", None, text)

