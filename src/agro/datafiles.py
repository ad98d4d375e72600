"""Reading and writing data files safely: generic rows, and offline group datasets.

Every malformed row raises a :class:`DataError` that names the file, the line (JSONL: the real
line number; JSON list: index + 1; Parquet: row index + 1) and the field, e.g.::

    offline.jsonl:17: field 'ref_logprobs[2]': has 11 values but completion 2 has 12 tokens

With ``skip_bad_rows=True`` the same rows are skipped and counted per reason in a
:class:`SkipReport` (never dropped silently); a file with no usable row left is still an error.
:func:`raw_rows` / :func:`read_rows` read .jsonl / .json / .parquet rows and
:func:`parse_records` validates them with any row parser; what a prompt row means (MATH, GSM8K)
is task logic and lives in :mod:`agro.tasks`, which builds on this module (never the reverse).

Offline group datasets (written by ``agro generate``) hold one :class:`~agro.rollouts.Group` per
row: ``Group.to_dict()`` plus ``format`` (the row-format version, :data:`GROUPS_FORMAT`) and the
file-level ``meta`` (tokenizer name, vocab size, the reference identity of
:mod:`agro.provenance`, ...) merged into the group's ``meta``. Reading validates every row
(shapes, finiteness, ref log-probs <= 0, token ids in range, ...), marks the groups
``source="offline"`` (the stored source is kept in ``meta["stored_source"]``) and records each
group's file and line under ``meta[ORIGIN_KEY]`` (:func:`row_origin`; dropped again on write).

Writes are atomic (:func:`agro.fileio.atomic_write`: a temp file next to the destination, fsync,
``os.replace``).

Departure from the paper: none (the paper does not describe its data files). The per-row reference
log-probs stored here are what lets offline training skip the reference model (DESIGN.md).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from .fileio import atomic_write
from .rollouts import SOURCES, Group

T = TypeVar("T")

GROUPS_FORMAT = 1
"""Version of the offline group row format written by :func:`write_groups`."""

LOGPROB_TOL = 1e-6
"""Stored log-probabilities may exceed 0 by at most this much (float rounding), never more."""

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")

ROW = "<row>"  # field name used for problems with a whole row (bad JSON, not an object)

ORIGIN_KEY = "_origin"
"""``meta`` key where :func:`read_groups` records a group's ``{"file", "line"}``; never written."""


# --------------------------------------------------------------------------- errors and reports
class DataError(ValueError):
    """A problem with a data file, located by file, line and field.

    ``str(err)`` is ``"{path}:{line}: field '{field}': {problem}"`` (file-level problems omit the
    line and field). ``reason`` is a short machine-readable kind (``"bad_json"``,
    ``"missing_field:problem"``, ...) used as the counting key when rows are skipped.
    """

    def __init__(self, path: str | os.PathLike, line: int | None, field: str | None,
                 problem: str, reason: str = "invalid"):
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        self.reason = reason
        if line is not None and field is not None:
            msg = f"{self.path}:{line}: field '{field}': {problem}"
        elif line is not None:
            msg = f"{self.path}:{line}: {problem}"
        else:
            msg = f"{self.path}: {problem}"
        super().__init__(msg)


@dataclass
class SkipReport:
    """What was kept and what was skipped (per reason) when reading one file with skipping on."""

    path: str = ""
    kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)   # reason -> rows skipped
    first_errors: list[str] = field(default_factory=list)  # up to MAX_EXAMPLES full messages

    MAX_EXAMPLES = 3

    def add(self, err: DataError) -> None:
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        if len(self.first_errors) < self.MAX_EXAMPLES:
            self.first_errors.append(str(err))

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line, e.g. ``data.jsonl: kept 97 rows, skipped 3 (bad_json: 2, ...); first: ...``."""
        head = f"{self.path}: kept {self.kept} rows"
        if not self.counts:
            return head + ", skipped none"
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
        return f"{head}, skipped {self.skipped} ({kinds}); first: {self.first_errors[0]}"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "kept": self.kept, "skipped": self.skipped,
                "counts": dict(self.counts), "first_errors": list(self.first_errors)}


# --------------------------------------------------------------------------- reading rows
def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return "jsonl"
    if suffix in JSON_SUFFIXES:
        return "json"
    if suffix in PARQUET_SUFFIXES:
        return "parquet"
    raise DataError(path, None, None, f"unsupported file type '{path.suffix}' (expected "
                    ".jsonl, .json or .parquet)", "unsupported_file")


def raw_rows(path: str | os.PathLike) -> Iterator[tuple[int, dict | DataError]]:
    """Yield ``(line, row)`` or ``(line, DataError)`` for row-level problems.

    File-level problems (missing file, unreadable JSON list, unreadable Parquet) raise at once:
    there is no row to skip to.
    """
    p = Path(path)
    kind = _file_kind(p)
    if not p.is_file():
        raise DataError(p, None, None, "file not found", "missing_file")
    if kind == "jsonl":
        with open(p, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield line_no, DataError(p, line_no, ROW, f"not valid UTF-8 ({e.reason})",
                                             "bad_json")
                    continue
                if not text.strip():
                    continue  # blank lines are not rows
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    yield line_no, DataError(p, line_no, ROW,
                                             f"invalid JSON ({e.msg} at column {e.colno})",
                                             "bad_json")
                    continue
                if not isinstance(obj, dict):
                    yield line_no, DataError(p, line_no, ROW, "expected a JSON object, got "
                                             f"{type(obj).__name__}", "not_object")
                    continue
                yield line_no, obj
    elif kind == "json":
        try:
            with open(p, encoding="utf-8-sig") as fh:
                data = json.load(fh)
        except json.JSONDecodeError as e:
            raise DataError(p, e.lineno, ROW, f"invalid JSON ({e.msg} at column {e.colno}); a "
                            ".json file must be one JSON list of objects", "bad_json") from None
        except UnicodeDecodeError as e:
            raise DataError(p, None, None, f"not valid UTF-8 ({e.reason})", "bad_json") from None
        if not isinstance(data, list):
            raise DataError(p, None, None, "a .json file must hold a list of objects, got "
                            f"{type(data).__name__} (use .jsonl for one object per line)",
                            "not_list")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                yield i + 1, DataError(p, i + 1, ROW, "expected a JSON object, got "
                                       f"{type(obj).__name__}", "not_object")
            else:
                yield i + 1, obj
    else:
        import pyarrow.parquet as pq  # pyarrow comes with `datasets`

        try:
            pf = pq.ParquetFile(p)
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses
            raise DataError(p, None, None, f"not a readable Parquet file ({e})",
                            "bad_parquet") from None
        index = 0
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                index += 1
                yield index, obj


def read_rows(path: str | os.PathLike, report: SkipReport | None = None
              ) -> Iterator[tuple[int, dict]]:
    """Iterate ``(line_no, row_dict)`` over a .jsonl / .json (list) / .parquet file.

    Line numbers: JSONL the real line (blank lines are skipped, not counted as rows); JSON list
    index + 1; Parquet row index + 1. Unparsable rows raise :class:`DataError`, or are counted
    in ``report`` and skipped when a report is given.
    """
    for line_no, row in raw_rows(path):
        if isinstance(row, DataError):
            if report is None:
                raise row
            report.add(row)
            continue
        yield line_no, row


# --------------------------------------------------------------------------- writing
def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomically write rows as JSONL (NaN / inf are refused: they are not JSON)."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")

    atomic_write(path, write)


# --------------------------------------------------------------------------- validating rows
def present(row: dict, key: str) -> bool:
    """True if ``row`` has ``key`` with a value other than None."""
    return key in row and row[key] is not None


def missing_field(path, line, row: dict, key: str) -> DataError:
    """The error for a required field that is absent (lists the fields the row does have)."""
    have = ", ".join(sorted(map(str, row))) or "none"
    return DataError(path, line, key, f"missing (row has fields: {have})", f"missing_field:{key}")


def text_field(path, line, row: dict, key: str) -> str:
    """``row[key]`` as a non-empty string, or a DataError (missing / not a string / empty)."""
    if not present(row, key):
        raise missing_field(path, line, row, key)
    v = row[key]
    if not isinstance(v, str):
        raise DataError(path, line, key, f"expected a string, got {type(v).__name__}",
                        f"bad_type:{key}")
    if not v.strip():
        raise DataError(path, line, key, "is empty", f"empty_field:{key}")
    return v


def parse_records(
    records: Iterable[tuple[int, dict | DataError]], path: str,
    parse: Callable[[int, dict], T], *, skip_bad_rows: bool, what: str = "rows",
    key: Callable[[T], str] | None = None, key_field: str | Callable[[dict], str] = "id",
    key_label: str = "id", report: SkipReport | None = None,
) -> tuple[list[T], SkipReport]:
    """Validate ``(line, row)`` records into items with ``parse(line, row)``.

    ``records`` come from :func:`raw_rows` (where a row that is not even an object is already a
    DataError) or from any iterable of dicts (a `datasets` object). With ``key``, two items with
    the same key are an error at the second one's ``key_field`` (a name, or a function of the
    row). Bad rows raise, or are counted in the returned :class:`SkipReport` and skipped with
    ``skip_bad_rows``; an empty input, or one with nothing left, always raises (``what`` names
    the rows in that message).
    """
    report = report if report is not None else SkipReport(path=str(path))
    out: list[T] = []
    seen: dict[str, int] = {}
    n_rows = 0
    for line, row in records:
        n_rows += 1
        k = None
        try:
            if isinstance(row, DataError):
                raise row
            item = parse(line, row)
            k = key(item) if key is not None else None
            if k is not None and k in seen:
                name = key_field(row) if callable(key_field) else key_field
                raise DataError(path, line, name, f"duplicate {key_label} {k!r} (first seen on "
                                f"line {seen[k]})", "duplicate_id")
        except DataError as err:
            if not skip_bad_rows:
                raise
            report.add(err)
            continue
        if k is not None:
            seen[k] = line
        out.append(item)
    report.kept = len(out)
    if n_rows == 0:
        raise DataError(path, None, None, f"no {what} (the file is empty)", "empty_file")
    if report.kept == 0:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(report.counts.items()))
        raise DataError(path, None, None, f"nothing left: all {report.skipped} {what} were bad "
                        f"and skipped ({kinds}); first: {report.first_errors[0]}", "no_rows_left")
    return out, report


# --------------------------------------------------------------------------- group rows
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _GroupRowChecker:
    """Validates one stored group row; every failure is a DataError at (path, line)."""

    def __init__(self, path: str, line: int, row: dict, vocab_size: int | None):
        self.path, self.line, self.row, self.vocab_size = path, line, row, vocab_size

    def fail(self, field_: str, problem: str, reason: str) -> DataError:
        return DataError(self.path, self.line, field_, problem, reason)

    def required(self, key: str) -> Any:
        if not present(self.row, key):
            raise missing_field(self.path, self.line, self.row, key)
        return self.row[key]

    def type_error(self, key: str, expected: str, v: Any) -> DataError:
        return self.fail(key, f"expected {expected}, got {type(v).__name__}", f"bad_type:{key}")

    def token_list(self, key: str, v: Any) -> list[int]:
        base = key.split("[")[0]
        if not isinstance(v, list):
            raise self.type_error(key, "a list of token ids", v)
        for t, tok in enumerate(v):
            if not _is_int(tok):
                raise self.fail(f"{key}[{t}]", f"token id must be an integer, got {tok!r}",
                                f"bad_type:{base}")
            if tok < 0 or (self.vocab_size is not None and tok >= self.vocab_size):
                rng = f"[0, {self.vocab_size})" if self.vocab_size is not None else ">= 0"
                raise self.fail(f"{key}[{t}]", f"token id {tok} is outside {rng}",
                                "bad_token_id")
        return list(v)

    def per_token_logprobs(self, key: str, completions: list[list[int]],
                           required: bool) -> list[list[float]] | None:
        v = self.row.get(key)
        if v is None:
            if required:
                raise self.fail(key, "missing: offline groups need the reference log-probs "
                                "computed when they were scored", f"missing_field:{key}")
            return None
        if not isinstance(v, list):
            raise self.type_error(key, "a list of per-token log-prob lists", v)
        if len(v) != len(completions):
            raise self.fail(key, f"has {len(v)} entries but there are {len(completions)} "
                            "completions", f"n_mismatch:{key}")
        out = []
        for i, (lp, comp) in enumerate(zip(v, completions)):
            name = f"{key}[{i}]"
            if not isinstance(lp, list):
                raise self.type_error(name, "a list of floats", lp)
            if len(lp) != len(comp):
                raise self.fail(name, f"has {len(lp)} values but completion {i} has "
                                f"{len(comp)} tokens", f"length_mismatch:{key}")
            for t, x in enumerate(lp):
                if not _is_num(x) or not math.isfinite(x):
                    raise self.fail(f"{name}[{t}]", f"log-prob must be a finite number, got "
                                    f"{x!r}", f"bad_value:{key}")
                if x > LOGPROB_TOL:
                    raise self.fail(f"{name}[{t}]", f"log-prob {x!r} is > 0 (not a "
                                    "log-probability)", f"bad_value:{key}")
            out.append([float(x) for x in lp])
        return out

    def per_sample_numbers(self, key: str, n: int, required: bool, reason: str
                           ) -> list[float] | None:
        v = self.row.get(key)
        if v is None:
            if required:
                raise missing_field(self.path, self.line, self.row, key)
            return None
        if not isinstance(v, list):
            raise self.type_error(key, "a list of numbers", v)
        if len(v) != n:
            raise self.fail(key, f"has {len(v)} values but there are {n} completions",
                            f"n_mismatch:{key}")
        for i, x in enumerate(v):
            if not _is_num(x) or not math.isfinite(x):
                raise self.fail(f"{key}[{i}]", f"must be a finite number, got {x!r}", reason)
        return [float(x) for x in v]

    def optional(self, key: str, default: Any, check: Callable[[Any], bool], expected: str
                 ) -> Any:
        v = self.row.get(key)
        if v is None:
            return default
        if not check(v):
            raise self.fail(key, f"expected {expected}, got {v!r}", f"bad_value:{key}")
        return v

    def group(self) -> Group:
        row = self.row
        fmt = row.get("format")
        if fmt is not None and fmt != GROUPS_FORMAT:
            raise self.fail("format", f"unsupported row format {fmt!r} (this version of agro "
                            f"reads format {GROUPS_FORMAT})", "bad_format")
        prompt_id = self.required("prompt_id")
        if not isinstance(prompt_id, str):
            raise self.type_error("prompt_id", "a string", prompt_id)
        if not prompt_id.strip():
            raise self.fail("prompt_id", "is empty", "empty_field:prompt_id")
        prompt_ids = self.token_list("prompt_ids", self.required("prompt_ids"))
        if not prompt_ids:
            raise self.fail("prompt_ids", "is empty (a prompt needs at least one token)",
                            "empty_field:prompt_ids")
        comps_raw = self.required("completion_ids")
        if not isinstance(comps_raw, list):
            raise self.type_error("completion_ids", "a list of token-id lists", comps_raw)
        completions = []
        for i, c in enumerate(comps_raw):
            c = self.token_list(f"completion_ids[{i}]", c)
            if not c:
                raise self.fail(f"completion_ids[{i}]", "is empty (a completion has zero "
                                "tokens; EOS counts as a token)", "empty_completion")
            completions.append(c)
        n = len(completions)
        if n < 2:
            raise self.fail("completion_ids", f"group has {n} completion(s); every group loss "
                            "needs n >= 2", "small_group")
        rewards = self.per_sample_numbers("rewards", n, True, "bad_reward")
        ref = self.per_token_logprobs("ref_logprobs", completions, required=True)
        behavior = self.per_token_logprobs("behavior_logprobs", completions, required=False)
        correct = self.per_sample_numbers("correct", n, False, "bad_value:correct")
        texts = row.get("completions")
        if texts is None:
            texts = []
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise self.type_error("completions", "a list of strings", texts)
        if texts and len(texts) != n:
            raise self.fail("completions", f"has {len(texts)} texts but there are {n} "
                            "completions", "n_mismatch:completions")
        source = self.optional("source", "fresh", lambda s: isinstance(s, str), "a string")
        if source not in SOURCES:
            raise self.fail("source", f"unknown source {source!r}; valid: {', '.join(SOURCES)}",
                            "unknown_source")
        meta = row.get("meta")
        if meta is None:
            meta = {}
        if isinstance(meta, str):  # Parquet files store meta as a JSON string
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError as e:
                raise self.fail("meta", f"invalid JSON ({e.msg})", "bad_type:meta") from None
        if not isinstance(meta, dict):
            raise self.type_error("meta", "an object", meta)
        meta = {**meta, "stored_source": source}
        return Group(
            prompt_id=prompt_id,
            prompt_ids=prompt_ids,
            completion_ids=completions,
            rewards=rewards,
            ref_logprobs=ref,
            behavior_logprobs=behavior,
            prompt=self.optional("prompt", "", lambda s: isinstance(s, str), "a string"),
            completions=list(texts),
            answer=self.optional("answer", "", lambda s: isinstance(s, str), "a string"),
            source="offline",
            policy_version=self.optional("policy_version", -1, _is_int, "an integer"),
            temperature=float(self.optional(
                "temperature", 1.0, lambda x: _is_num(x) and math.isfinite(x) and x > 0,
                "a finite number > 0")),
            top_p=float(self.optional("top_p", 1.0, lambda x: _is_num(x) and 0 < x <= 1,
                                      "a number in (0, 1]")),
            top_k=self.optional("top_k", 0, lambda x: _is_int(x) and x >= 0, "an integer >= 0"),
            correct=correct,
            meta=meta,
        )


def validate_group_row(row: dict, path: str = "<groups>", line: int = 0,
                       vocab_size: int | None = None) -> Group:
    """Check one stored group row and build its Group (``source="offline"``); raises DataError."""
    return _GroupRowChecker(str(path), line, row, vocab_size).group()


def row_origin(group: Group) -> tuple[str, int] | None:
    """``(file, line)`` a group was read from by :func:`read_groups`, else None."""
    o = group.meta.get(ORIGIN_KEY)
    return (o["file"], o["line"]) if isinstance(o, dict) else None


def read_groups(path: str | os.PathLike, skip_bad_rows: bool = False,
                vocab_size: int | None = None) -> tuple[list[Group], SkipReport]:
    """Read an offline group dataset (.jsonl or .parquet written by :func:`write_groups`).

    Every row is validated (see :func:`validate_group_row` and the module docstring); duplicate
    ``prompt_id`` values are errors. With ``vocab_size`` every token id must lie in
    ``[0, vocab_size)``. Each group remembers its file and line (:func:`row_origin`, for later
    errors such as :mod:`agro.provenance`'s). Returns the groups (``source="offline"``) and the
    skip report.
    """
    p = str(path)

    def parse(line: int, row: dict) -> Group:
        g = validate_group_row(row, p, line, vocab_size)
        g.meta[ORIGIN_KEY] = {"file": p, "line": line}
        return g

    return parse_records(raw_rows(path), p, parse, skip_bad_rows=skip_bad_rows, what="groups",
                         key=lambda g: g.prompt_id, key_field="prompt_id",
                         key_label="prompt id")


def _parquet_schema():
    import pyarrow as pa

    ints, floats = pa.list_(pa.int64()), pa.list_(pa.float64())
    return pa.schema([
        ("format", pa.int64()), ("prompt_id", pa.string()), ("prompt_ids", ints),
        ("completion_ids", pa.list_(ints)), ("rewards", floats),
        ("ref_logprobs", pa.list_(floats)), ("behavior_logprobs", pa.list_(floats)),
        ("prompt", pa.string()), ("completions", pa.list_(pa.string())),
        ("answer", pa.string()), ("source", pa.string()), ("policy_version", pa.int64()),
        ("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int64()),
        ("correct", floats), ("meta", pa.string()),
    ])


def write_groups(path: str | os.PathLike, groups: list[Group], meta: dict | None = None) -> None:
    """Atomically write groups, one per row, as .jsonl or .parquet.

    Each row is ``Group.to_dict()`` plus ``format`` (:data:`GROUPS_FORMAT`), with ``meta`` (the
    file-level facts, e.g. ``{"tokenizer": name, "vocab_size": V, "model": ...,
    "reference": agro.provenance.reference_identity(...)}``) merged over the group's own ``meta``
    (minus :data:`ORIGIN_KEY`, which describes where a group was read from, not the group).
    Rows are validated before anything is written (a group that could not
    be read back raises DataError naming its index as the line). Parquet stores ``meta`` as a
    JSON string and floats as float64, so values round-trip exactly in both formats.
    """
    p = Path(path)
    kind = _file_kind(p)
    if kind == "json":
        raise DataError(p, None, None, "offline groups are written as .jsonl or .parquet",
                        "unsupported_file")
    meta = dict(meta or {})
    vocab = meta.get("vocab_size")
    vocab = vocab if _is_int(vocab) else None
    rows = []
    for i, g in enumerate(groups):
        row = g.to_dict()
        row["rewards"] = [float(r) for r in row["rewards"]]
        if row["correct"] is not None:
            row["correct"] = [float(c) for c in row["correct"]]
        row["meta"] = {k: v for k, v in {**row["meta"], **meta}.items() if k != ORIGIN_KEY}
        row = {"format": GROUPS_FORMAT, **row}
        validate_group_row(row, str(p), i + 1, vocab)
        try:
            json.dumps(row["meta"], allow_nan=False)
        except (TypeError, ValueError) as e:
            raise DataError(p, i + 1, "meta", f"is not JSON-serialisable ({e})",
                            "bad_type:meta") from None
        rows.append(row)
    if not rows:
        raise ValueError(f"write_groups({p}): no groups to write")
    if kind == "jsonl":
        write_jsonl(p, rows)
        return

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _parquet_schema()
    cols = {name: [r.get(name) for r in rows] for name in schema.names}
    cols["meta"] = [json.dumps(m, ensure_ascii=False, allow_nan=False) for m in cols["meta"]]
    table = pa.table(cols, schema=schema)
    atomic_write(p, lambda tmp: pq.write_table(table, tmp))

