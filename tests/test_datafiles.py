"""Data files: row reading, generic row validation, offline group files (round trip, bad rows)."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from agro.datafiles import (
    GROUPS_FORMAT,
    ORIGIN_KEY,
    DataError,
    SkipReport,
    read_groups,
    read_rows,
    row_origin,
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


# --------------------------------------------------------------------------- group files
def _assert_same_groups(read, written, path=None):
    assert len(read) == len(written)
    for line, (r, w) in enumerate(zip(read, written), start=1):
        rd, wd = r.to_dict(), w.to_dict()
        assert rd.pop("source") == "offline"
        assert wd.pop("source") == "fresh"
        origin = {ORIGIN_KEY: {"file": str(path), "line": line}} if path is not None else {}
        assert rd.pop("meta") == {**w.meta, **META, "stored_source": "fresh", **origin}
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
    _assert_same_groups(got, groups, path)
    assert [row_origin(g) for g in got] == [(str(path), i) for i in range(1, 6)]
    assert report.kept == 5 and report.counts == {}
    assert all(g.source == "offline" and not g.is_on_policy(3) for g in got)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_origin_is_remembered_but_never_written(tmp_path, suffix):
    first = tmp_path / f"a{suffix}"
    write_groups(first, [make_group(i) for i in range(3)], META)
    read, _ = read_groups(first)
    assert [row_origin(g) for g in read] == [(str(first), i) for i in (1, 2, 3)]
    again = tmp_path / f"b{suffix}"
    write_groups(again, read, META)
    for _, row in read_rows(again):
        meta = json.loads(row["meta"]) if isinstance(row["meta"], str) else row["meta"]
        assert ORIGIN_KEY not in meta and meta["task"] == "arithmetic"
    assert [row_origin(g) for g in read_groups(again)[0]] == [(str(again), i) for i in (1, 2, 3)]


def test_datafiles_does_not_import_tasks():
    """Task logic (prompt rows, gold answers) builds on datafiles, never the reverse."""
    import ast

    import agro.datafiles

    tree = ast.parse(Path(agro.datafiles.__file__).read_text())
    imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m.split(".")[-1] in ("tasks", "rewards")], imported


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
    assert g.temperature == 1.0
    assert g.meta == {"stored_source": "fresh", ORIGIN_KEY: {"file": str(path), "line": 1}}
