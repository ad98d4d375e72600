"""Tasks: prompts with gold answers, seeded training samplers, held-out lists and prompt templates.

* :class:`ArithmeticTask` — the built-in default: generated arithmetic problems ("What is 7 + 8?")
  at increasing levels. Its problem space is enumerable, and a stable hash of each problem's
  canonical string puts ~20 % of it in a held-out split that never overlaps the training split.
* MATH-format and GSM8K-format rows from local .jsonl / .json / .parquet files or a `datasets`
  name (:func:`build_task`): read with :mod:`agro.datafiles` (generic rows, errors naming file,
  line and field) and parsed here (:func:`load_prompt_rows`; gold answers from the last
  ``\\boxed{}`` of a solution, :func:`agro.rewards.last_boxed`, or from ``#### N``).
* :class:`PromptSampler` — draws training examples without replacement, epoch after epoch, from a
  seeded ``random.Random``; its ``state_dict`` holds only JSON types so a resumed run continues the
  exact same sequence.
* Prompt templates: ``bare`` (the question as the user turn), ``paper`` (a system prompt asking for
  a step-by-step solution ending "The final answer is $ANSWER", Sec. 8 / App. A of the paper, see
  agro_math.md §8), ``boxed`` (asks for ``\\boxed{}``), ``number`` (the question followed by
  "Answer with only the number."), ``auto`` (bare for arithmetic, paper otherwise).

Departures from the paper: the paper trains on MATH only; arithmetic and GSM8K are ours (so that a
135M-parameter model on a CPU can learn something in minutes). The paper's exact system prompt is
not in the surviving text; :data:`PAPER_SYSTEM` is our wording of its description.
"""
from __future__ import annotations

import abc
import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from . import datafiles
from .datafiles import DataError, SkipReport, missing_field, present, text_field
from .rewards import last_boxed

TASKS = ("arithmetic", "math", "gsm8k")
TEMPLATES = ("auto", "bare", "paper", "boxed", "number")

PAPER_SYSTEM = (
    "Solve the following math problem step by step. Explain your reasoning, then end your "
    "response with a final sentence of the form \"The final answer is $ANSWER\", where $ANSWER "
    "is the final number or expression that solves the problem."
)
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
NUMBER_INSTRUCTION = "Answer with only the number."


@dataclass
class Example:
    """One prompt: an id unique within its task, the question text and the gold answer."""

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)  # "task" is used by template "auto"


# --------------------------------------------------------------------------- gold answers
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def gsm8k_gold(answer: str) -> str | None:
    """The number after the last ``####`` of a GSM8K answer, commas removed; None if absent.

    A bare number (no ``####``) is accepted as the gold itself.

    >>> gsm8k_gold("She has 3 + 4 = <<3+4=7>>7 apples.\\n#### 1,007")
    '1007'
    """
    tail = answer.rsplit("####", 1)[1] if "####" in answer else answer
    tail = tail.strip().replace(",", "")
    if not _NUMBER.fullmatch(tail):
        return None
    return tail.lstrip("+")


def stable_hash(text: str) -> int:
    """A 64-bit hash of ``text`` that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _norm_question(q: str) -> str:
    return " ".join(q.split())


# --------------------------------------------------------------------------- sampling
_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a bijective 64-bit integer mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class KeyedPermutation:
    """A keyed pseudo-random permutation of ``range(n)`` evaluated one position at a time.

    A balanced Feistel network over the smallest even-bit power of two >= n, with cycle walking
    to stay inside ``range(n)``. Memory O(1) whatever n is, so a sampler can walk a problem
    space of billions without materialising it; ``perm(i)`` for ``i`` in ``range(n)`` visits
    every index exactly once.
    """

    ROUNDS = 6

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"KeyedPermutation: n must be >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.half = bits // 2
        self.mask = (1 << self.half) - 1
        self.round_keys = [_mix64((key + r * 0x632BE59BD9B4E019) & _M64)
                           for r in range(self.ROUNDS)]

    def _encrypt(self, x: int) -> int:
        left, right = x >> self.half, x & self.mask
        for k in self.round_keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << self.half) | right

    def __call__(self, i: int) -> int:
        x = self._encrypt(i)
        while x >= self.n:
            x = self._encrypt(x)
        return x


class PromptSampler:
    """Draws training examples without replacement, in epochs, from a seeded ``random.Random``.

    The candidates are indices ``0..size-1``; ``get(i)`` returns the Example or None for an index
    that is not a training example (arithmetic: a held-out problem). Each epoch visits every index
    once in the order of a :class:`KeyedPermutation` whose key is drawn from the RNG at the start
    of the epoch. ``sample(k)`` may cross an epoch boundary, so the same example can appear twice
    in one call only when k exceeds what is left of the epoch.

    ``state_dict()`` holds only ints, lists and None (JSON); ``load_state_dict`` restores the
    position exactly, so the continued sequence is identical to an uninterrupted one.
    """

    STATE_FORMAT = 1

    def __init__(self, size: int, get: Callable[[int], Example | None], seed: int,
                 name: str = "task"):
        if size < 1:
            raise ValueError(f"{name}: no training examples to sample from")
        self.size = int(size)
        self.seed = int(seed)
        self.name = name
        self._get = get
        self._rng = random.Random(self.seed)
        self.epoch = 0
        self.pos = 0          # next position in this epoch's permutation
        self._yielded = 0     # examples returned so far in this epoch
        self._new_epoch_key()

    @classmethod
    def from_examples(cls, examples: Sequence[Example], seed: int, name: str = "task"
                      ) -> "PromptSampler":
        examples = list(examples)
        return cls(len(examples), examples.__getitem__, seed, name)

    def _new_epoch_key(self) -> None:
        self._key = self._rng.getrandbits(64)
        self._perm = KeyedPermutation(self.size, self._key)

    def _next(self) -> Example:
        while True:
            if self.pos >= self.size:
                if self._yielded == 0:
                    raise ValueError(f"{self.name}: a whole epoch yielded no training example")
                self.epoch += 1
                self.pos = 0
                self._yielded = 0
                self._new_epoch_key()
            ex = self._get(self._perm(self.pos))
            self.pos += 1
            if ex is not None:
                self._yielded += 1
                return ex

    def sample(self, k: int) -> list[Example]:
        """The next ``k`` training examples."""
        return [self._next() for _ in range(int(k))]

    def __iter__(self) -> Iterator[Example]:
        while True:
            yield self._next()

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {
            "format": self.STATE_FORMAT,
            "size": self.size,
            "seed": self.seed,
            "epoch": self.epoch,
            "pos": self.pos,
            "yielded": self._yielded,
            "key": self._key,
            "rng_state": [version, list(internal), gauss],
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if d.get("format") != self.STATE_FORMAT:
            raise ValueError(f"{self.name}: sampler state format {d.get('format')!r} is not "
                             f"{self.STATE_FORMAT}")
        if d["size"] != self.size:
            raise ValueError(f"{self.name}: sampler state is for {d['size']} candidates but this "
                             f"task has {self.size} (a different data file or level?)")
        version, internal, gauss = d["rng_state"]
        self._rng.setstate((int(version), tuple(int(x) for x in internal), gauss))
        self.seed = int(d["seed"])
        self.epoch = int(d["epoch"])
        self.pos = int(d["pos"])
        self._yielded = int(d["yielded"])
        self._key = int(d["key"])
        self._perm = KeyedPermutation(self.size, self._key)


# --------------------------------------------------------------------------- tasks
class Task(abc.ABC):
    """A source of training prompts (seeded sampler) and a fixed held-out list."""

    name: str
    description: str = ""
    notes: list[str]            # facts a run log should show (held-out slice, overlap removed)
    reports: list[SkipReport]   # one per file read

    @abc.abstractmethod
    def train_sampler(self, seed: int) -> PromptSampler:
        """A fresh sampler over the training split, seeded."""

    @abc.abstractmethod
    def eval_examples(self, k: int) -> list[Example]:
        """The first ``k`` held-out examples (fixed order, independent of any seed)."""


def parse_arith_range(spec: str) -> tuple[int, int, int, str]:
    """``"LO-HI"`` or ``"LO-HI:OPS"`` (two operands; OPS from ``+-*``, default ``+-*``) ->
    (operands, smallest operand, largest operand, operators). Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*(?::\s*([+*-]+))?\s*", spec or "")
    if not m:
        raise ValueError(f"arithmetic_range must look like 'LO-HI' or 'LO-HI:OPS' (e.g. '0-20:+-*'), "
                         f"got {spec!r}")
    lo, hi, ops = int(m.group(1)), int(m.group(2)), m.group(3) or "+-*"
    if hi <= lo:
        raise ValueError(f"arithmetic_range {spec!r}: HI must be > LO")
    if len(set(ops)) != len(ops):
        raise ValueError(f"arithmetic_range {spec!r}: an operator is repeated")
    return 2, lo, hi, "".join(o for o in "+-*" if o in ops)


def _arith_spec(level: int) -> tuple[int, int, int, str]:
    """(operands, smallest operand, largest operand, operators) for a level."""
    if level < 1:
        raise ValueError(f"arithmetic level must be >= 1, got {level}")
    if level == 1:
        return 2, 0, 9, "+*"
    if level == 2:
        return 2, 10, 99, "+*"
    if level == 3:
        return 2, 100, 999, "+-*"
    return level - 1, 10, 99, "+-*"


def eval_arithmetic(operands: Sequence[int], ops: Sequence[str]) -> int:
    """Value of ``a0 op0 a1 op1 a2 ...`` with the usual precedence (``*`` before ``+``/``-``)."""
    total, sign, prod = 0, 1, operands[0]
    for op, x in zip(ops, operands[1:]):
        if op == "*":
            prod *= x
        else:
            total += sign * prod
            sign, prod = (1 if op == "+" else -1), x
    return total + sign * prod


class ArithmeticTask(Task):
    """Generated arithmetic, seeded, with a disjoint held-out split.

    Levels: 1 = one-digit (0-9) ``+`` and ``*`` (200 problems); 2 = two-digit (10-99) ``+`` and
    ``*``; 3 = three-digit (100-999) ``+ - *``; L >= 4 = L-1 two-digit operands with ``+ - *`` and
    the usual precedence. Problem ``i`` of the space is decoded from ``i`` in mixed radix; it is
    held out iff ``stable_hash("arith:" + canonical) % 100 < HELD_OUT_PERCENT`` (canonical:
    ``"7+8"``), so the split depends neither on the seed nor on the order of drawing.
    Prompts are bare questions ("What is 7 + 8?"): the small default model does better with them.
    """

    HELD_OUT_PERCENT = 20

    def __init__(self, level: int = 1, value_range: str = ""):
        self.level = int(level)
        self.value_range = value_range.strip()
        if self.value_range:   # a custom space: two operands in [lo, hi], the given operators
            self.n_operands, self.lo, self.hi, self.ops = parse_arith_range(self.value_range)
            self.key = f"{self.lo}-{self.hi}:{self.ops}"
        else:
            self.n_operands, self.lo, self.hi, self.ops = _arith_spec(self.level)
            self.key = str(self.level)
        radix = self.hi - self.lo + 1
        self.space_size = radix ** self.n_operands * len(self.ops) ** (self.n_operands - 1)
        self.name = "arithmetic"
        self.description = (
            f"arithmetic {'range ' + self.key if self.value_range else f'level {self.level}'}: "
            f"{self.n_operands} operands in "
            f"[{self.lo}, {self.hi}], operators {' '.join(self.ops)}, {self.space_size} problems, "
            f"~{self.HELD_OUT_PERCENT}% held out by hash")
        self.notes = []
        self.reports = []
        self._eval_order = KeyedPermutation(self.space_size, stable_hash(f"arith-eval:{self.key}"))
        self._eval: list[Example] = []
        self._eval_pos = 0

    @classmethod
    def is_held_out(cls, canonical: str) -> bool:
        return stable_hash("arith:" + canonical) % 100 < cls.HELD_OUT_PERCENT

    def problem(self, i: int) -> Example:
        """Problem ``i`` of the space (0 <= i < space_size)."""
        if not 0 <= i < self.space_size:
            raise IndexError(f"problem index {i} outside [0, {self.space_size})")
        radix = self.hi - self.lo + 1
        operands, ops = [], []
        for _ in range(self.n_operands):
            i, r = divmod(i, radix)
            operands.append(self.lo + r)
        for _ in range(self.n_operands - 1):
            i, r = divmod(i, len(self.ops))
            ops.append(self.ops[r])
        canonical = str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(ops, operands[1:]))
        spaced = str(operands[0]) + "".join(f" {o} {x}" for o, x in zip(ops, operands[1:]))
        held = self.is_held_out(canonical)
        return Example(
            id=f"arith{self.key}:{canonical}",
            question=f"What is {spaced}?",
            answer=str(eval_arithmetic(operands, ops)),
            meta={"task": "arithmetic", "level": self.level, "space": self.key, "expression": canonical,
                  "split": "eval" if held else "train"},
        )

    def _train_problem(self, i: int) -> Example | None:
        ex = self.problem(i)
        return None if ex.meta["split"] == "eval" else ex

    def train_sampler(self, seed: int) -> PromptSampler:
        return PromptSampler(self.space_size, self._train_problem, seed,
                             name=f"arithmetic {self.key}")

    def eval_examples(self, k: int) -> list[Example]:
        """The first ``k`` held-out problems in a fixed pseudo-random order.

        Returns fewer than ``k`` when the held-out pool is smaller (level 1 has about 40); the
        caller reports how many it got.
        """
        while len(self._eval) < k and self._eval_pos < self.space_size:
            ex = self.problem(self._eval_order(self._eval_pos))
            self._eval_pos += 1
            if ex.meta["split"] == "eval":
                self._eval.append(ex)
        return list(self._eval[:max(0, k)])


class ExamplesTask(Task):
    """A task over fixed lists of examples (MATH / GSM8K rows, or an in-memory list in tests)."""

    def __init__(self, name: str, train: Sequence[Example], eval: Sequence[Example],
                 description: str = "", notes: list[str] | None = None,
                 reports: list[SkipReport] | None = None):
        if not train:
            raise ValueError(f"task {name}: no training examples")
        self.name = name
        self.train = list(train)
        self.eval = list(eval)
        self.description = description or f"{name}: {len(self.train)} train, {len(self.eval)} eval"
        self.notes = list(notes or [])
        self.reports = list(reports or [])

    def train_sampler(self, seed: int) -> PromptSampler:
        return PromptSampler.from_examples(self.train, seed, name=f"task {self.name}")

    def eval_examples(self, k: int) -> list[Example]:
        """The first ``k`` held-out examples (at most the whole held-out list)."""
        return list(self.eval[:max(0, k)])


# --------------------------------------------------------------------------- prompt rows
def _row_id(path, line, row: dict, label: str) -> tuple[str, str | None]:
    """(example id, name of the id field or None when the id is made up from file and line)."""
    for key in ("unique_id", "id"):
        if present(row, key):
            v = row[key]
            if isinstance(v, bool) or not isinstance(v, (str, int)):
                raise DataError(path, line, key, "expected a string or integer id, got "
                                f"{type(v).__name__}", f"bad_type:{key}")
            if str(v).strip():
                return str(v), key
    return f"{label}:{line}", None


def _math_row(path, line, row: dict, label: str) -> Example:
    question = text_field(path, line, row, "problem")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        if isinstance(answer, bool) or not isinstance(answer, (int, float)):
            raise DataError(path, line, "answer", "expected a string or number, got "
                            f"{type(answer).__name__}", "bad_type:answer")
        if isinstance(answer, float) and not math.isfinite(answer):
            raise DataError(path, line, "answer", f"is {answer}", "bad_gold")
        answer = str(answer)
    if answer is None or not answer.strip():
        # MATH convention: the gold answer is the last \boxed{} of the solution.
        if not present(row, "solution"):
            have = ", ".join(sorted(map(str, row))) or "none"
            raise DataError(path, line, "answer", "missing, and there is no 'solution' to take "
                            f"the last \\boxed{{}} from (row has fields: {have})",
                            "missing_field:answer")
        solution = row["solution"]
        if not isinstance(solution, str):
            raise DataError(path, line, "solution", "expected a string, got "
                            f"{type(solution).__name__}", "bad_type:solution")
        answer = last_boxed(solution)
        if answer is None or not answer.strip():
            raise DataError(path, line, "solution", "no 'answer' field and no non-empty "
                            "\\boxed{} in the solution to take the gold answer from", "bad_gold")
    ex_id, _ = _row_id(path, line, row, label)
    meta = {k: v for k, v in row.items() if k not in ("problem", "answer", "unique_id", "id")}
    meta.update(task="math", source_file=label, line=line)
    return Example(id=ex_id, question=question, answer=answer.strip(), meta=meta)


def _gsm8k_row(path, line, row: dict, label: str) -> Example:
    question = text_field(path, line, row, "question")
    if not present(row, "answer"):
        raise missing_field(path, line, row, "answer")
    raw = row["answer"]
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise DataError(path, line, "answer", f"expected a string, got {type(raw).__name__}",
                        "bad_type:answer")
    gold = gsm8k_gold(str(raw))
    if gold is None:
        tail = str(raw).strip().splitlines()[-1:] or [""]
        raise DataError(path, line, "answer", "no number after '####' (GSM8K answers end with "
                        f"'#### N'); last line is {tail[0][:60]!r}", "bad_gold")
    ex_id, _ = _row_id(path, line, row, label)
    meta = {k: v for k, v in row.items() if k not in ("question", "answer", "id", "unique_id")}
    if isinstance(raw, str) and "####" in raw:
        meta["solution"] = raw.rsplit("####", 1)[0].strip()
    meta.update(task="gsm8k", source_file=label, line=line)
    return Example(id=ex_id, question=question, answer=gold, meta=meta)


_PROMPT_PARSERS = {"math": _math_row, "gsm8k": _gsm8k_row}


def prompt_rows_from_records(
    rows: Iterable[tuple[int, dict | DataError]], path: str, kind: str, skip_bad_rows: bool,
    report: SkipReport | None = None,
) -> tuple[list[Example], SkipReport]:
    """Validate ``(line, row)`` records (from a file or a `datasets` object) into Examples.

    ``path`` is the label used in messages and made-up ids (``"{name}:{line}"``). Duplicate ids
    (from a ``unique_id`` / ``id`` field) are an error like any other bad row.
    """
    if kind not in _PROMPT_PARSERS:
        raise ValueError(f"unknown prompt-row kind {kind!r}; valid: {', '.join(_PROMPT_PARSERS)}")
    parse = _PROMPT_PARSERS[kind]
    label = Path(str(path)).name or str(path)
    return datafiles.parse_records(
        rows, path, lambda line, row: parse(path, line, row, label), skip_bad_rows=skip_bad_rows,
        what="rows", key=lambda ex: ex.id,
        key_field=lambda row: _row_id(path, 0, row, label)[1] or "id", key_label="id",
        report=report)


def load_prompt_rows(path: str | os.PathLike, kind: str, skip_bad_rows: bool = False
                     ) -> tuple[list[Example], SkipReport]:
    """Load MATH-format (``kind="math"``) or GSM8K-format (``kind="gsm8k"``) prompt rows.

    MATH rows: ``problem``, ``answer`` (if missing or empty: the last ``\\boxed{}`` of
    ``solution``); id from ``unique_id`` / ``id`` or ``"{file name}:{line}"``. GSM8K rows:
    ``question`` and ``answer`` ending in ``#### N``; the gold is N with commas removed. Bad rows
    raise :class:`~agro.datafiles.DataError` (file, line, field) unless ``skip_bad_rows``; an
    empty file, or one with nothing left after skipping, always raises.
    """
    return prompt_rows_from_records(datafiles.raw_rows(path), str(path), kind, skip_bad_rows)


# --------------------------------------------------------------------------- loading
HELD_OUT_FRACTION = 0.1
HELD_OUT_MAX = 500


def split_held_out(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """Deterministic (train, held-out) split of one list.

    The held-out slice is the ``m = clamp(round(0.1 * N), 1, 500)`` examples with the smallest
    ``stable_hash`` of their whitespace-normalised question (ties with the m-th included, so a
    repeated question never lands on both sides), in hash order; train keeps the input order.
    """
    if len(examples) < 2:
        raise ValueError(f"need at least 2 examples to hold some out, got {len(examples)}")
    hashes = [stable_hash(_norm_question(e.question)) for e in examples]
    m = min(HELD_OUT_MAX, max(1, round(HELD_OUT_FRACTION * len(examples))))
    cutoff = sorted(hashes)[m - 1]
    held = sorted((h, i) for i, h in enumerate(hashes) if h <= cutoff)
    return ([e for e, h in zip(examples, hashes) if h > cutoff],
            [examples[i] for _, i in held])


def _is_local(spec: str) -> bool:
    p = Path(spec)
    suffixes = datafiles.JSONL_SUFFIXES + datafiles.JSON_SUFFIXES + datafiles.PARQUET_SUFFIXES
    return p.is_file() or p.suffix.lower() in suffixes


def parse_hub_spec(spec: str, default_split: str) -> tuple[str, str | None, str]:
    """``"name[:config][@split]"`` -> (name, config or None, split).

    >>> parse_hub_spec("openai/gsm8k:main@test", "train")
    ('openai/gsm8k', 'main', 'test')
    """
    rest, _, split = spec.partition("@")
    name, _, config = rest.partition(":")
    return name, (config or None), (split or default_split)


def load_examples(spec: str, kind: str, skip_bad_rows: bool = False, split: str = "train"
                  ) -> tuple[list[Example], SkipReport]:
    """Examples from a local .jsonl/.json/.parquet file, or from ``datasets.load_dataset``.

    A ``spec`` that is not a local file (and does not end in a data-file suffix) is a `datasets`
    name or directory, optionally ``name:config@split`` (``split`` is the default split). Rows
    are validated identically in both cases (see :func:`load_prompt_rows`).
    """
    if _is_local(spec):
        return load_prompt_rows(spec, kind, skip_bad_rows)
    import datasets  # only imported for hub names

    name, config, split = parse_hub_spec(spec, split)
    ds = datasets.load_dataset(name, config, split=split)
    records = ((i + 1, dict(row)) for i, row in enumerate(ds))
    return prompt_rows_from_records(records, f"{name}[{split}]", kind, skip_bad_rows)


def build_task(cfg: Any) -> Task:
    """The task a config asks for (``cfg``: any object with the fields of ``TaskFields``).

    ``arithmetic``: :class:`ArithmeticTask` at ``arithmetic_level``. ``math`` / ``gsm8k``: train
    examples from ``data_path`` (split ``data_split`` for `datasets` names). Held-out examples come
    from ``eval_data_path`` (split ``test`` for `datasets` names) if given, and training examples
    whose question also appears there are dropped (noted in ``task.notes``); otherwise a
    deterministic held-out slice of ``data_path`` (:func:`split_held_out`), excluded from training.
    The split never depends on ``cfg.seed``; the seed goes to ``task.train_sampler(seed)``.
    """
    kind = getattr(cfg, "task", "arithmetic")
    if kind == "arithmetic":
        return ArithmeticTask(level=getattr(cfg, "arithmetic_level", 1),
                              value_range=getattr(cfg, "arithmetic_range", ""))
    if kind not in TASKS:
        raise ValueError(f"unknown task {kind!r}; valid: {', '.join(TASKS)}")
    data_path = getattr(cfg, "data_path", "")
    if not data_path:
        raise ValueError(f"task {kind} needs data_path (a .jsonl/.json/.parquet file or a "
                         "`datasets` name)")
    skip = bool(getattr(cfg, "skip_bad_rows", False))
    train, report = load_examples(data_path, kind, skip, getattr(cfg, "data_split", "train"))
    reports, notes = [report], []
    eval_path = getattr(cfg, "eval_data_path", "")
    if eval_path:
        held, eval_report = load_examples(eval_path, kind, skip, "test")
        reports.append(eval_report)
        held_q = {_norm_question(e.question) for e in held}
        before = len(train)
        train = [e for e in train if _norm_question(e.question) not in held_q]
        if not train:
            raise ValueError(f"task {kind}: all {before} training prompts from {data_path} also "
                             f"appear in eval_data_path {eval_path}")
        if len(train) < before:
            notes.append(f"dropped {before - len(train)} training prompts that also appear in "
                         f"{eval_path}")
        eval_from = eval_path
    else:
        train, held = split_held_out(train)
        eval_from = f"a hash-selected slice of {data_path} (excluded from training)"
    for r in reports:
        if r.counts:
            notes.append(r.summary())
    desc = (f"{kind}: {len(train)} train prompts from {data_path}; {len(held)} held out from "
            f"{eval_from}")
    return ExamplesTask(kind, train, held, description=desc, notes=notes, reports=reports)


# --------------------------------------------------------------------------- templates
def resolve_template(template: str, task: str) -> str:
    """``auto`` -> ``bare`` for arithmetic, ``paper`` otherwise; others pass through."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}")
    if template == "auto":
        return "bare" if task == "arithmetic" else "paper"
    return template


def render_messages(example: Example, template: str = "auto") -> list[dict[str, str]]:
    """Chat messages for one example (``auto`` reads the task from ``example.meta["task"]``)."""
    t = resolve_template(template, example.meta.get("task", ""))
    if t == "bare":
        return [{"role": "user", "content": example.question}]
    if t == "paper":
        return [{"role": "system", "content": PAPER_SYSTEM},
                {"role": "user", "content": example.question}]
    if t == "number":
        return [{"role": "user", "content": f"{example.question} {NUMBER_INSTRUCTION}"}]
    return [{"role": "user", "content": f"{example.question}\n\n{BOXED_INSTRUCTION}"}]


def render_prompt(tokenizer: Any, example: Example, template: str = "auto") -> str:
    """The prompt text the model sees.

    With a chat template: ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=True)`` (a template that rejects the system role gets the system text
    prepended to the user turn instead). Without one: ``"Question: ...\\nAnswer:"``, preceded by
    the system text, if any, and a blank line.
    """
    messages = render_messages(example, template)
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except TemplateError:
            if messages[0]["role"] != "system":
                raise
            merged = [{"role": "user",
                       "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}]
            return tokenizer.apply_chat_template(merged, tokenize=False,
                                                 add_generation_prompt=True)
    system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
    user = "\n\n".join(m["content"] for m in messages if m["role"] == "user")
    return f"{system}Question: {user}\nAnswer:"
