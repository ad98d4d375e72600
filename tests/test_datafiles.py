"""Data files: row reading, prompt-row validation, offline group files (round trip, bad rows)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from agro.datafiles import (
    GROUPS_FORMAT,
    DataError,
    SkipReport,
    load_prompt_rows,
    read_groups,
    read_rows,
    write_groups,
    write_jsonl,
)
from agro.rollouts import Group

VOCAB = 100
META = {"tokenizer": "tiny-test", "vocab_size": VOCAB}


def make_group(i: int, lengths=(3, 5, 4), seed=0) -> Group:
    rng = random.Random(seed * 1000 + i)
    comps = [[rng.randrange(VOCAB) for _ in range(t)] for t in lengths]
    return Group(
        prompt_id=f"p{i}",
        prompt_ids=[rng.randrange(VOCAB) for _ in range(4)],
        completion_ids=comps,
        rewards=[float(rng.random() > 0.5) for _ in comps],
        ref_logprobs=[[-rng.random() * 5 for _ in c] for c in comps],
        prompt=f"What is {i}?",
        completions=[f"c{j}" for j in range(len(comps))],
        answer=str(i),
        source="fresh",
        policy_version=3,
        temperature=0.7,
        top_p=0.9,
        top_k=5,
        correct=[1.0, 0.0, 1.0][:len(comps)],
        meta={"task": "arithmetic"},
    )


def _rows(groups):
    return [{"format": GROUPS_FORMAT, **g.to_dict(), "meta": {**g.meta, **META}} for g in groups]


# --------------------------------------------------------------------------- basics
def test_data_error_message_format():
    err = DataError("offline.jsonl", 17, "ref_logprobs[2]", "has 11 values")
    assert str(err) == "offline.jsonl:17: field 'ref_logprobs[2]': has 11 values"
    assert (err.path, err.line, err.field) == ("offline.jsonl", 17, "ref_logprobs[2]")
    assert isinstance(err, ValueError)
    assert str(DataError("a.jsonl", None, None, "no rows")) == "a.jsonl: no rows"


def test_skip_report_summary_is_one_line():
    r = SkipReport(path="d.jsonl", kept=5)
    assert r.summary() == "d.jsonl: kept 5 rows, skipped none"
    r.add(DataError("d.jsonl", 2, "<row>", "invalid JSON", "bad_json"))
    r.add(DataError("d.jsonl", 4, "<row>", "invalid JSON", "bad_json"))
    r.add(DataError("d.jsonl", 7, "problem", "missing", "missing_field:problem"))
    s = r.summary()
    assert "\n" not in s
    assert "skipped 3 (bad_json: 2, missing_field:problem: 1)" in s
    assert "d.jsonl:2: field '<row>'" in s
    assert r.counts == {"bad_json": 2, "missing_field:problem": 1}


def test_read_rows_line_numbers(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert list(read_rows(p)) == [(1, {"a": 1}), (3, {"a": 2})]
    j = tmp_path / "r.json"
    j.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert list(read_rows(j)) == [(1, {"a": 1}), (2, {"a": 2})]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    q = tmp_path / "r.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3]}), q)
    assert list(read_rows(q)) == [(1, {"a": 1}), (2, {"a": 2}), (3, {"a": 3})]


def test_read_rows_bad_json_raises_or_counts(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n{"a": \n[1]\n')
    with pytest.raises(DataError, match=r"r.jsonl:2: field '<row>': invalid JSON"):
        list(read_rows(p))
    report = SkipReport()
    assert list(read_rows(p, report)) == [(1, {"a": 1})]
    assert report.counts == {"bad_json": 1, "not_object": 1}


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        list(read_rows(tmp_path / "x.csv"))
    with pytest.raises(DataError, match="file not found"):
        list(read_rows(tmp_path / "missing.jsonl"))
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(DataError, match="must hold a list of objects"):
        list(read_rows(tmp_path / "obj.json"))


# --------------------------------------------------------------------------- prompt rows
GOOD_MATH = {"problem": "What is 1+1?", "solution": "\\boxed{2}", "answer": "2"}
GOOD_GSM = {"question": "How many?", "answer": "It is 3.\n#### 3"}

# (name, kind, bad line text, field, reason)
PROMPT_CASES = [
    ("bad_json", "math", '{"problem": "x", ', "<row>", "bad_json"),
    ("not_object", "math", '["problem"]', "<row>", "not_object"),
    ("missing_problem", "math", json.dumps({"solution": "\\boxed{1}"}), "problem",
     "missing_field:problem"),
    ("mistyped_problem", "math", json.dumps({"problem": 12, "answer": "1"}), "problem",
     "bad_type:problem"),
    ("empty_problem", "math", json.dumps({"problem": "  ", "answer": "1"}), "problem",
     "empty_field:problem"),
    ("no_gold", "math", json.dumps({"problem": "x?", "solution": "no box"}), "solution",
     "bad_gold"),
    ("no_answer_no_solution", "math", json.dumps({"problem": "x?"}), "answer",
     "missing_field:answer"),
    ("mistyped_answer", "math", json.dumps({"problem": "x?", "answer": ["1"]}), "answer",
     "bad_type:answer"),
    ("duplicate_id", "math", json.dumps({**GOOD_MATH, "unique_id": "u1"}), "unique_id",
     "duplicate_id"),
    ("gsm_missing_answer", "gsm8k", json.dumps({"question": "q?"}), "answer",
     "missing_field:answer"),
    ("gsm_unparsable", "gsm8k", json.dumps({"question": "q?", "answer": "#### lots"}), "answer",
     "bad_gold"),
    ("gsm_empty_question", "gsm8k", json.dumps({"question": "", "answer": "#### 1"}), "question",
     "empty_field:question"),
]


def _prompt_file(tmp_path: Path, kind: str, bad_line: str) -> Path:
    good = GOOD_MATH if kind == "math" else GOOD_GSM
    first = {**good, "unique_id": "u1"} if kind == "math" else good
    lines = [json.dumps(first), "", json.dumps(good), bad_line, json.dumps(good)]
    p = tmp_path / f"{kind}.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p  # the bad row is on line 4


@pytest.mark.parametrize("name,kind,bad,field,reason", PROMPT_CASES,
                         ids=[c[0] for c in PROMPT_CASES])
def test_prompt_rows_bad_row_names_file_line_field(tmp_path, name, kind, bad, field, reason):
    p = _prompt_file(tmp_path, kind, bad)
    with pytest.raises(DataError) as ei:
        load_prompt_rows(p, kind, skip_bad_rows=False)
    err = ei.value
    assert (err.line, err.field, err.reason) == (4, field, reason)
    assert str(err).startswith(f"{p}:4: field '{field}': ")


@pytest.mark.parametrize("name,kind,bad,field,reason", PROMPT_CASES,
                         ids=[c[0] for c in PROMPT_CASES])
def test_prompt_rows_skipping_counts_each_kind(tmp_path, name, kind, bad, field, reason):
    p = _prompt_file(tmp_path, kind, bad)
    exs, report = load_prompt_rows(p, kind, skip_bad_rows=True)
    assert len(exs) == 3
    assert report.counts == {reason: 1}
    assert report.kept == 3
    assert [e.meta["line"] for e in exs] == [1, 3, 5]


def test_prompt_rows_json_list_line_is_index(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps([GOOD_MATH, GOOD_MATH, {"problem": 3}]))
    with pytest.raises(DataError, match=r"m.json:3: field 'problem'"):
        load_prompt_rows(p, "math")


def test_prompt_rows_empty_and_all_bad(tmp_path):
    p = tmp_path / "e.jsonl"
    p.write_text("")
    for skip in (False, True):
        with pytest.raises(DataError, match="no rows"):
            load_prompt_rows(p, "math", skip_bad_rows=skip)
    p.write_text("{bad\n" + json.dumps({"question": "wrong format"}) + "\n")
    with pytest.raises(DataError, match=r"nothing left: all 2 rows were bad.*bad_json: 1"):
        load_prompt_rows(p, "math", skip_bad_rows=True)


def test_prompt_rows_wrong_kind_hint(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps(GOOD_GSM) + "\n")
    with pytest.raises(DataError, match=r"row has fields: answer, question"):
        load_prompt_rows(p, "math")


# --------------------------------------------------------------------------- group files
def _assert_same_groups(read, written):
    assert len(read) == len(written)
    for r, w in zip(read, written):
        rd, wd = r.to_dict(), w.to_dict()
        assert rd.pop("source") == "offline"
        assert wd.pop("source") == "fresh"
        assert rd.pop("meta") == {**w.meta, **META, "stored_source": "fresh"}
        wd.pop("meta")
        assert rd == wd  # floats bit-identical


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_groups_round_trip(tmp_path, suffix):
    groups = [make_group(i) for i in range(5)]
    groups[1].ref_logprobs[0][0] = -1e-300
    groups[2].behavior_logprobs = [[-0.5] * len(c) for c in groups[2].completion_ids]
    groups[3].correct = None
    path = tmp_path / f"sub/offline{suffix}"
    write_groups(path, groups, META)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    got, report = read_groups(path, vocab_size=VOCAB)
    _assert_same_groups(got, groups)
    assert report.kept == 5 and report.counts == {}
    assert all(g.source == "offline" and not g.is_on_policy(3) for g in got)


def test_write_groups_refuses_bad_group_and_keeps_old_file(tmp_path):
    path = tmp_path / "o.jsonl"
    write_groups(path, [make_group(0), make_group(1)], META)
    before = path.read_bytes()
    bad = make_group(2)
    bad.rewards[1] = float("nan")
    with pytest.raises(DataError, match=r"o.jsonl:2: field 'rewards\[1\]'"):
        write_groups(path, [make_group(0), bad], META)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]


def _set(path_, value):
    def f(row):
        obj = row
        for k in path_[:-1]:
            obj = obj[k]
        obj[path_[-1]] = value
    return f


def _del(key):
    return lambda row: row.pop(key)


def _n1(row):
    for k in ("completion_ids", "rewards", "ref_logprobs", "correct", "completions"):
        row[k] = row[k][:1]


def _drop_last_ref_value(row):
    row["ref_logprobs"][2] = row["ref_logprobs"][2][:-1]


def _empty_completion(row):
    row["completion_ids"][1] = []
    row["ref_logprobs"][1] = []


# (name, mutation of a good row dict or raw line text, field, reason)
GROUP_CASES = [
    ("bad_json", '{"prompt_id": "x", ', "<row>", "bad_json"),
    ("not_object", "[1, 2, 3]", "<row>", "not_object"),
    ("missing_rewards", _del("rewards"), "rewards", "missing_field:rewards"),
    ("missing_prompt_ids", _del("prompt_ids"), "prompt_ids", "missing_field:prompt_ids"),
    ("mistyped_rewards", _set(["rewards"], "1,0,1"), "rewards", "bad_type:rewards"),
    ("mistyped_prompt_id", _set(["prompt_id"], 7), "prompt_id", "bad_type:prompt_id"),
    ("mistyped_token", _set(["completion_ids", 0, 1], 2.5), "completion_ids[0][1]",
     "bad_type:completion_ids"),
    ("mistyped_meta", _set(["meta"], [1]), "meta", "bad_type:meta"),
    ("empty_completion", _empty_completion, "completion_ids[1]", "empty_completion"),
    ("group_of_one", _n1, "completion_ids", "small_group"),
    ("reward_nan", _set(["rewards", 2], float("nan")), "rewards[2]", "bad_reward"),
    ("reward_inf", _set(["rewards", 0], float("inf")), "rewards[0]", "bad_reward"),
    ("reward_string", _set(["rewards", 1], "one"), "rewards[1]", "bad_reward"),
    ("reward_bool", _set(["rewards", 1], True), "rewards[1]", "bad_reward"),
    ("duplicate_prompt_id", _set(["prompt_id"], "p0"), "prompt_id", "duplicate_id"),
    ("ref_missing", _del("ref_logprobs"), "ref_logprobs", "missing_field:ref_logprobs"),
    ("ref_wrong_length", _drop_last_ref_value, "ref_logprobs[2]", "length_mismatch:ref_logprobs"),
    ("ref_positive", _set(["ref_logprobs", 0, 1], 0.5), "ref_logprobs[0][1]",
     "bad_value:ref_logprobs"),
    ("ref_nan", _set(["ref_logprobs", 1, 0], float("nan")), "ref_logprobs[1][0]",
     "bad_value:ref_logprobs"),
    ("ref_n_mismatch", lambda r: r["ref_logprobs"].pop(), "ref_logprobs",
     "n_mismatch:ref_logprobs"),
    ("rewards_n_mismatch", lambda r: r["rewards"].pop(), "rewards", "n_mismatch:rewards"),
    ("completions_n_mismatch", lambda r: r["completions"].pop(), "completions",
     "n_mismatch:completions"),
    ("token_out_of_vocab", _set(["completion_ids", 2, 3], VOCAB), "completion_ids[2][3]",
     "bad_token_id"),
    ("prompt_token_negative", _set(["prompt_ids", 0], -1), "prompt_ids[0]", "bad_token_id"),
    ("unknown_source", _set(["source"], "imagined"), "source", "unknown_source"),
    ("future_format", _set(["format"], 99), "format", "bad_format"),
    ("bad_temperature", _set(["temperature"], 0), "temperature", "bad_value:temperature"),
]


def _group_file(tmp_path: Path, mutate) -> Path:
    """Good rows on lines 1, 3, 4 (line 2 is blank), the bad row on line 5."""
    rows = _rows([make_group(i, lengths=(3, 5, 12)) for i in range(4)])
    lines = [json.dumps(r) for r in rows]
    if isinstance(mutate, str):
        lines[3] = mutate
    else:
        mutate(rows[3])
        lines[3] = json.dumps(rows[3])  # NaN / Infinity are written as JSON's extension tokens
    lines.insert(1, "")
    path = tmp_path / "offline.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _with_last_good(path: Path) -> None:
    path.write_text(path.read_text() + json.dumps(_rows([make_group(9, (3, 5, 12))])[0]) + "\n")


@pytest.mark.parametrize("name,mutate,field,reason", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_group_bad_row_names_file_line_field(tmp_path, name, mutate, field, reason):
    path = _group_file(tmp_path, mutate)
    with pytest.raises(DataError) as ei:
        read_groups(path, skip_bad_rows=False, vocab_size=VOCAB)
    err = ei.value
    assert (err.path, err.line, err.field, err.reason) == (str(path), 5, field, reason)
    assert str(err).startswith(f"{path}:5: field '{field}': ")


@pytest.mark.parametrize("name,mutate,field,reason", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_group_bad_row_skipped_and_counted(tmp_path, name, mutate, field, reason):
    path = _group_file(tmp_path, mutate)
    _with_last_good(path)
    groups, report = read_groups(path, skip_bad_rows=True, vocab_size=VOCAB)
    assert [g.prompt_id for g in groups] == ["p0", "p1", "p2", "p9"]
    assert report.counts == {reason: 1}
    assert report.kept == 4
    assert f"{path}:5:" in report.summary()


def test_ref_length_message_is_specific(tmp_path):
    path = _group_file(tmp_path, _drop_last_ref_value)
    with pytest.raises(DataError) as ei:
        read_groups(path)
    assert str(ei.value) == (f"{path}:5: field 'ref_logprobs[2]': has 11 values but "
                             "completion 2 has 12 tokens")


def test_vocab_check_only_when_given(tmp_path):
    path = _group_file(tmp_path, _set(["completion_ids", 2, 3], VOCAB))
    groups, _ = read_groups(path)  # no vocab_size: ids >= 0 are accepted
    assert len(groups) == 4
    with pytest.raises(DataError, match=r"token id 100 is outside \[0, 100\)"):
        read_groups(path, vocab_size=VOCAB)


def test_group_parquet_bad_row_line_is_row_index(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _rows([make_group(i) for i in range(3)])
    rows[2]["rewards"][1] = math.nan
    for r in rows:
        r["meta"] = json.dumps(r["meta"])
    path = tmp_path / "o.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=rf"{path}:3: field 'rewards\[1\]': must be a finite"):
        read_groups(path)
    groups, report = read_groups(path, skip_bad_rows=True)
    assert len(groups) == 2 and report.counts == {"bad_reward": 1}


def test_groups_empty_file_and_only_bad_rows(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text("\n")
    for skip in (False, True):
        with pytest.raises(DataError, match=r"o.jsonl: no groups \(the file is empty\)"):
            read_groups(path, skip_bad_rows=skip)
    rows = _rows([make_group(i) for i in range(2)])
    rows[0]["rewards"] = [1.0]
    path.write_text(json.dumps(rows[0]) + "\n{oops\n")
    with pytest.raises(DataError) as ei:
        read_groups(path, skip_bad_rows=True)
    msg = str(ei.value)
    assert "nothing left: all 2 groups were bad and skipped" in msg
    assert "bad_json: 1" in msg and "n_mismatch:rewards: 1" in msg


def test_rows_without_optional_fields_load(tmp_path):
    row = {"prompt_id": "x", "prompt_ids": [1, 2], "completion_ids": [[3], [4, 5]],
           "rewards": [1, 0], "ref_logprobs": [[-0.1], [-0.2, 0.0]]}
    path = tmp_path / "min.jsonl"
    write_jsonl(path, [row])
    (g,), _ = read_groups(path)
    assert g.rewards == [1.0, 0.0] and g.source == "offline" and g.policy_version == -1
    assert g.temperature == 1.0 and g.meta == {"stored_source": "fresh"}
