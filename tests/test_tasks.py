"""Tasks: arithmetic generator, samplers (resume), MATH/GSM8K loading and bad prompt rows,
build_task, templates."""
from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from agro import tasks
from agro.datafiles import DataError
from agro.rewards import last_boxed
from agro.tasks import (
    ArithmeticTask,
    Example,
    ExamplesTask,
    KeyedPermutation,
    PromptSampler,
    build_task,
    gsm8k_gold,
    load_prompt_rows,
    render_messages,
    render_prompt,
    split_held_out,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
QUESTION = re.compile(r"What is ((?:\d+ [-+*] )+\d+)\?")


def _cfg(**kw):
    base = dict(task="arithmetic", data_path="", eval_data_path="", data_split="train",
                arithmetic_level=1, skip_bad_rows=False, seed=0)
    base.update(kw)
    return SimpleNamespace(**base)


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _independent_value(question: str) -> tuple[int, list[int], list[str]]:
    m = QUESTION.fullmatch(question)
    assert m, question
    expr = m.group(1)
    toks = expr.split(" ")
    # Python's own precedence, on a string made only of digits, spaces and + - *.
    return eval(expr, {"__builtins__": {}}), [int(t) for t in toks[::2]], toks[1::2]  # noqa: S307


# --------------------------------------------------------------------------- arithmetic
@pytest.mark.parametrize("level,n_ops,lo,hi,ops", [
    (1, 2, 0, 9, "+*"), (2, 2, 10, 99, "+*"), (3, 2, 100, 999, "+-*"),
    (4, 3, 10, 99, "+-*"), (6, 5, 10, 99, "+-*"),
])
def test_arithmetic_answers_and_levels(level, n_ops, lo, hi, ops):
    task = ArithmeticTask(level)
    examples = task.train_sampler(seed=1).sample(300) + task.eval_examples(100)
    seen_ops = set()
    for ex in examples:
        value, operands, used = _independent_value(ex.question)
        assert ex.answer == str(value), ex
        assert len(operands) == n_ops
        assert all(lo <= a <= hi for a in operands), ex.question
        seen_ops.update(used)
        assert ex.meta["task"] == "arithmetic"
    assert seen_ops == set(ops)


def test_arithmetic_level1_examples():
    task = ArithmeticTask(1)
    assert task.space_size == 200
    by_q = {task.problem(i).question: task.problem(i).answer for i in range(200)}
    assert by_q["What is 7 + 8?"] == "15"
    assert by_q["What is 7 * 8?"] == "56"
    assert by_q["What is 0 * 9?"] == "0"
    assert len(by_q) == 200


def test_arithmetic_precedence():
    assert tasks.eval_arithmetic([2, 3, 4], ["+", "*"]) == 14
    assert tasks.eval_arithmetic([2, 3, 4, 5], ["-", "*", "-"]) == 2 - 12 - 5
    assert tasks.eval_arithmetic([10, 3, 2], ["-", "-"]) == 5


def test_sampler_deterministic_by_seed():
    task = ArithmeticTask(2)
    a = [e.id for e in task.train_sampler(7).sample(50)]
    b = [e.id for e in ArithmeticTask(2).train_sampler(7).sample(50)]
    c = [e.id for e in task.train_sampler(8).sample(50)]
    assert a == b
    assert a != c


def test_level1_train_and_heldout_partition_the_space():
    task = ArithmeticTask(1)
    sampler = task.train_sampler(0)
    train_size = sum(1 for i in range(200) if task.problem(i).meta["split"] == "train")
    first_epoch = sampler.sample(train_size)
    assert len({e.id for e in first_epoch}) == train_size  # without replacement
    assert sampler.epoch == 0
    second_epoch = sampler.sample(train_size)
    assert {e.id for e in second_epoch} == {e.id for e in first_epoch}
    assert [e.id for e in second_epoch] != [e.id for e in first_epoch]  # reshuffled
    held = task.eval_examples(1000)  # more than the pool: returns the pool
    held_ids = {e.id for e in held}
    assert len(held_ids) == len(held) == 200 - train_size
    assert 25 <= len(held) <= 55  # ~20 % of 200
    assert held_ids.isdisjoint(e.id for e in first_epoch)
    assert held_ids | {e.id for e in first_epoch} == {task.problem(i).id for i in range(200)}


def test_level2_train_and_heldout_disjoint():
    task = ArithmeticTask(2)
    train = {e.question for e in task.train_sampler(3).sample(3000)}
    held = task.eval_examples(600)
    assert len(held) == 600
    assert train.isdisjoint(e.question for e in held)
    frac = sum(e.meta["split"] == "eval" for e in map(task.problem, range(0, 16200, 7))) / 2315
    assert 0.15 < frac < 0.25


def test_eval_examples_fixed_prefix_and_seed_independent():
    a = ArithmeticTask(3).eval_examples(20)
    b = ArithmeticTask(3)
    assert [e.id for e in b.eval_examples(5)] == [e.id for e in a[:5]]
    assert [e.id for e in b.eval_examples(20)] == [e.id for e in a]
    assert len({e.id for e in a}) == 20
    assert b.eval_examples(0) == []


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_keyed_permutation_is_a_permutation(n):
    perm = KeyedPermutation(n, key=12345)
    assert sorted(perm(i) for i in range(n)) == list(range(n))


def test_keyed_permutation_depends_on_key():
    a = [KeyedPermutation(100, 1)(i) for i in range(100)]
    b = [KeyedPermutation(100, 2)(i) for i in range(100)]
    assert a != b
    assert a != list(range(100))


# --------------------------------------------------------------------------- sampler state
def _plain_json(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in x.items())
    if isinstance(x, list):
        return all(map(_plain_json, x))
    return x is None or isinstance(x, (int, str))


@pytest.mark.parametrize("consumed", [0, 3, 9, 10, 23])
def test_sampler_state_round_trip_continues_sequence(consumed):
    exs = [Example(id=f"e{i}", question=f"q{i}", answer=str(i)) for i in range(10)]
    task = ExamplesTask("toy", exs, [])
    s = task.train_sampler(seed=5)
    s.sample(consumed)
    state = s.state_dict()
    assert _plain_json(state)
    state = json.loads(json.dumps(state))
    expected = [e.id for e in s.sample(25)]
    resumed = task.train_sampler(seed=999)
    resumed.load_state_dict(state)
    assert [e.id for e in resumed.sample(25)] == expected
    assert resumed.state_dict() == s.state_dict()


def test_sampler_state_round_trip_arithmetic_with_skips():
    task = ArithmeticTask(1)
    s = task.train_sampler(2)
    s.sample(150)  # close to the end of the first epoch (155 train problems)
    state = json.loads(json.dumps(s.state_dict()))
    expected = [e.id for e in s.sample(40)]
    r = ArithmeticTask(1).train_sampler(0)
    r.load_state_dict(state)
    assert [e.id for e in r.sample(40)] == expected


def test_sampler_epochs_cover_list_without_replacement():
    exs = [Example(id=f"e{i}", question=f"q{i}", answer="0") for i in range(10)]
    out = [e.id for e in PromptSampler.from_examples(exs, seed=0).sample(30)]
    for epoch in range(3):
        assert sorted(out[10 * epoch:10 * epoch + 10]) == sorted(e.id for e in exs)


def test_sampler_state_rejects_other_task():
    s = ArithmeticTask(1).train_sampler(0)
    with pytest.raises(ValueError, match="200 candidates"):
        ArithmeticTask(2).train_sampler(0).load_state_dict(s.state_dict())


# --------------------------------------------------------------------------- gold parsing
def test_last_boxed():
    assert tasks.last_boxed is last_boxed  # one implementation, in agro.rewards
    assert last_boxed(r"a \boxed{1} then \boxed{\frac{1}{2}}.") == r"\frac{1}{2}"
    assert last_boxed(r"$\boxed{\{1, 2\}}$") == r"\{1, 2\}"
    assert last_boxed(r"\boxed 5$") == "5"
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no box") is None
    assert last_boxed(r"\boxed{unbalanced") is None


def test_gsm8k_gold():
    assert gsm8k_gold("work\n#### 1,234") == "1234"
    assert gsm8k_gold("#### -5") == "-5"
    assert gsm8k_gold("#### 2.50") == "2.50"
    assert gsm8k_gold("42") == "42"
    assert gsm8k_gold("#### about ten") is None
    assert gsm8k_gold("no marker here") is None


# --------------------------------------------------------------------------- MATH / GSM8K loaders
def test_math_loader_small_file(tmp_path):
    path = _write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "1+1?", "solution": "It is \\boxed{2}.", "answer": "2", "unique_id": "a"},
        {"problem": "Half?", "solution": "So \\boxed{3} no, \\boxed{\\frac{1}{2}}."},
        {"problem": "Num?", "answer": 7, "level": 3},
    ])
    exs, report = tasks.load_examples(str(path), "math")
    assert [e.answer for e in exs] == ["2", "\\frac{1}{2}", "7"]
    assert [e.id for e in exs] == ["a", "m.jsonl:2", "m.jsonl:3"]
    assert exs[2].meta["level"] == 3 and exs[0].meta["task"] == "math"
    assert report.kept == 3 and report.counts == {}


def test_gsm8k_loader_small_file(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [
        {"question": "How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "Big?", "answer": "lots\n#### 1,250,000"},
    ])
    exs, _ = tasks.load_examples(str(path), "gsm8k")
    assert [e.answer for e in exs] == ["7", "1250000"]
    assert exs[0].meta["solution"] == "3 + 4 = <<3+4=7>>7"


@pytest.mark.data
def test_math500_every_row_loads():
    path = DATA / "math500_test.jsonl"
    if not path.is_file():
        pytest.skip("shared data absent")
    exs, report = tasks.load_examples(str(path), "math")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(exs) == len(rows) == 500 and report.counts == {}
    assert [e.answer for e in exs] == [r["answer"].strip() for r in rows]
    assert [e.id for e in exs] == [r["unique_id"] for r in rows]
    # The MATH convention holds on this file: gold == last \boxed{} of the solution.
    assert all(last_boxed(r["solution"]) == r["answer"] for r in rows)


@pytest.mark.data
def test_gsm8k_gold_is_a_number():
    path = DATA / "gsm8k_test.jsonl"
    if not path.is_file():
        pytest.skip("shared data absent")
    exs, _ = tasks.load_examples(str(path), "gsm8k")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(exs) == len(rows) == 1319
    for e, r in zip(exs, rows):
        expected = float(r["answer"].split("####")[-1].strip().replace(",", ""))
        assert float(e.answer) == expected


# --------------------------------------------------------------------------- prompt rows (bad rows)
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


# --------------------------------------------------------------------------- build_task
def test_build_task_arithmetic():
    t = build_task(_cfg(arithmetic_level=3))
    assert isinstance(t, ArithmeticTask) and t.level == 3


def _math_rows(n, start=0):
    return [{"problem": f"What is {i} squared?", "answer": str(i * i)}
            for i in range(start, start + n)]


def test_build_task_held_out_slice_excluded_from_training(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", _math_rows(50))
    t = build_task(_cfg(task="math", data_path=str(path)))
    held = t.eval_examples(100)
    assert len(held) == 5  # 10 % of 50
    sampler = t.train_sampler(0)
    train_ids = {e.id for e in sampler.sample(45)}
    assert len(train_ids) == 45
    assert train_ids.isdisjoint(e.id for e in held)
    assert [e.id for e in t.eval_examples(3)] == [e.id for e in held[:3]]
    # independent of the row order of the file and of the seed
    rev = _write_jsonl(tmp_path / "rev.jsonl", _math_rows(50)[::-1])
    t2 = build_task(_cfg(task="math", data_path=str(rev), seed=3))
    assert {e.question for e in t2.eval_examples(100)} == {e.question for e in held}


def test_build_task_eval_file_and_overlap_removed(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _math_rows(20))
    test = _write_jsonl(tmp_path / "test.jsonl", _math_rows(5, start=18))  # 18, 19 overlap
    t = build_task(_cfg(task="math", data_path=str(train), eval_data_path=str(test)))
    assert [e.answer for e in t.eval_examples(10)] == [str(i * i) for i in range(18, 23)]
    assert len(t.train) == 18
    assert any("dropped 2" in n for n in t.notes)


def test_build_task_datasets_name(monkeypatch):
    calls = []

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": f"{split} q{i}?", "answer": f"#### {i}"} for i in range(30)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    t = build_task(_cfg(task="gsm8k", data_path="openai/gsm8k:main",
                        eval_data_path="openai/gsm8k:main"))
    assert calls == [("openai/gsm8k", "main", "train"), ("openai/gsm8k", "main", "test")]
    assert len(t.eval_examples(100)) == 30
    assert t.eval_examples(1)[0].id == "gsm8k[test]:1"
    assert len(t.train) == 30 and t.train[0].question == "train q0?"


def test_build_task_eval_file_covering_all_training_prompts(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", _math_rows(5))
    with pytest.raises(ValueError, match="all 5 training prompts"):
        build_task(_cfg(task="math", data_path=str(train), eval_data_path=str(train)))


def test_build_task_bad_file_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"problem": "ok?", "answer": "1"}) + "\n" + "{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field '<row>'"):
        build_task(_cfg(task="math", data_path=str(path)))


def test_split_held_out_keeps_repeated_questions_together():
    exs = [Example(id=str(i), question=f"q {i % 7}", answer="0") for i in range(70)]
    train, held = split_held_out(exs)
    assert {e.question for e in train}.isdisjoint(e.question for e in held)
    assert len(train) + len(held) == 70 and held


# --------------------------------------------------------------------------- templates
EX_ARITH = ArithmeticTask(1).problem(17)
EX_MATH = Example(id="m", question="Find $x$.", answer="2", meta={"task": "math"})


def test_render_messages_templates():
    assert render_messages(EX_ARITH, "auto") == [{"role": "user", "content": EX_ARITH.question}]
    paper = render_messages(EX_MATH, "auto")
    assert paper == render_messages(EX_MATH, "paper")
    assert [m["role"] for m in paper] == ["system", "user"]
    assert "step by step" in paper[0]["content"]
    assert "The final answer is" in paper[0]["content"]
    assert paper[1]["content"] == "Find $x$."
    boxed = render_messages(EX_MATH, "boxed")
    assert len(boxed) == 1 and "\\boxed{}" in boxed[0]["content"]
    assert boxed[0]["content"].startswith("Find $x$.")
    assert render_messages(EX_MATH, "bare") == [{"role": "user", "content": "Find $x$."}]
    with pytest.raises(ValueError, match="valid: auto, bare, paper, boxed"):
        render_messages(EX_MATH, "fancy")


class FakeChatTokenizer:
    chat_template = "fake"

    def __init__(self, reject_system=False):
        self.reject_system = reject_system
        self.calls = []

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=False):
        from jinja2 import TemplateError

        self.calls.append((messages, tokenize, add_generation_prompt))
        if self.reject_system and messages[0]["role"] == "system":
            raise TemplateError("System role not supported")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_render_prompt_uses_chat_template():
    tok = FakeChatTokenizer()
    out = render_prompt(tok, EX_ARITH, "auto")
    assert out == f"<user>{EX_ARITH.question}<assistant>"
    assert tok.calls[0][1:] == (False, True)


def test_render_prompt_merges_system_when_template_rejects_it():
    tok = FakeChatTokenizer(reject_system=True)
    out = render_prompt(tok, EX_MATH, "paper")
    assert out.startswith("<user>" + tasks.PAPER_SYSTEM + "\n\nFind $x$.")


def test_render_prompt_plain_without_chat_template():
    tok = SimpleNamespace(chat_template=None)
    assert render_prompt(tok, EX_ARITH, "bare") == f"Question: {EX_ARITH.question}\nAnswer:"
    paper = render_prompt(tok, EX_MATH, "paper")
    assert paper == f"{tasks.PAPER_SYSTEM}\n\nQuestion: Find $x$.\nAnswer:"


def test_render_prompt_real_fast_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    model = tokenizers.models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    out = render_prompt(tok, EX_ARITH, "auto")
    assert out == f"<|user|>{EX_ARITH.question}\n<|assistant|>"


# --------------------------------------------------------------------------- custom arithmetic range
def test_arithmetic_range_space_answers_and_split():
    t = ArithmeticTask(value_range="0-20:+-*")
    assert (t.n_operands, t.lo, t.hi, t.ops) == (2, 0, 20, "+-*")
    assert t.space_size == 21 * 21 * 3
    seen, held = set(), 0
    for i in range(t.space_size):
        ex = t.problem(i)
        seen.add(ex.meta["expression"])
        held += ex.meta["split"] == "eval"
        assert int(ex.answer) == eval(ex.meta["expression"])   # the gold is the expression's value
    assert len(seen) == t.space_size
    assert 0.15 < held / t.space_size < 0.25          # ~20 % held out by hash
    ev = t.eval_examples(10_000)
    assert len(ev) == held and all(e.meta["split"] == "eval" for e in ev)
    assert t.problem(0).id.startswith("arith0-20:+-*:")
    # the held-out rule is the problem's, not the space's: 7+8 is held out in every space or none
    l1 = {ArithmeticTask(1).problem(i).meta["expression"]: ArithmeticTask(1).problem(i).meta["split"]
          for i in range(200)}
    both = [e for e in l1 if e in seen]
    assert len(both) == 200                            # level 1 (one-digit + and *) lies inside
    assert all(l1[e] == ("eval" if ArithmeticTask.is_held_out(e) else "train") for e in both)


@pytest.mark.parametrize("spec", ["", "20-0", "0-20:/", "0-20:++", "a-b", "0-20:+-*x"])
def test_arithmetic_range_rejects_bad_specs(spec):
    from agro.tasks import parse_arith_range

    with pytest.raises(ValueError):
        parse_arith_range(spec)


def test_arithmetic_range_config_error_names_the_field():
    from agro.config import ConfigError, TrainConfig, load_config

    with pytest.raises(ConfigError, match="arithmetic_range"):
        load_config(TrainConfig, None, ["arithmetic_range=9-3"])
    cfg = load_config(TrainConfig, None, ["arithmetic_range=0-20:+*", "prompt_template=number"])
    task = build_task(cfg)
    assert task.ops == "+*" and task.hi == 20


def test_number_template_asks_for_only_the_number():
    ex = ArithmeticTask(1).problem(3)
    msgs = render_messages(ex, "number")
    assert msgs == [{"role": "user", "content": f"{ex.question} Answer with only the number."}]
