"""agro.evaluation's call plan: rows per generate() call (explicit, or from the sampler's
estimated memory), calls of equal size, and the evaluation's own seed."""
from __future__ import annotations

import pytest
import torch

from agro import fast_decode
from agro.evaluation import balanced_calls, eval_seed, evaluate, rows_per_call
from agro.generation import CachedGenerator, SamplingParams, sampler_row_bytes
from agro.models import load_model, load_tokenizer
from agro.tasks import Example
from fakes import HashGrader


@pytest.mark.parametrize("items,cap", [(45, 48), (45, 45), (45, 44), (45, 16), (7, 1), (10, 3),
                                       (1, 100), (180, 120)])
def test_balanced_calls_cover_every_item_once_in_the_fewest_calls_of_near_equal_size(items, cap):
    calls = balanced_calls(items, cap)
    assert [i for s, e in calls for i in range(s, e)] == list(range(items))
    sizes = [e - s for s, e in calls]
    assert max(sizes) <= cap and max(sizes) - min(sizes) <= 1
    assert len(calls) == -(-items // cap)          # ceil: no more calls than the cap needs


def test_balanced_calls_of_nothing_is_no_call():
    assert balanced_calls(0, 8) == []


def test_eval_seed_is_fixed_per_run_and_rank_and_apart_from_training():
    assert eval_seed(0) == eval_seed(0, 0)
    seeds = {eval_seed(s, r) for s in range(50) for r in range(4)}
    assert len(seeds) == 200                       # distinct over seeds and ranks
    assert all(0 <= s < 2**63 for s in seeds)


class _Fake:
    """A generator-shaped object for rows_per_call (no sampling)."""

    def __init__(self, model=None, precision="fp32", batch_size=1, schedules_memory=False):
        self.model, self.precision, self.batch_size = model, precision, batch_size
        if schedules_memory:
            self.schedules_memory = True


def test_rows_per_call_follows_the_budget_and_the_model(tiny_model_dir):
    model = load_model(tiny_model_dir)
    per32 = sampler_row_bytes(model, "fp32", 100)
    per16 = sampler_row_bytes(model, "bf16", 100)
    # tiny Llama: 2 layers, 2 KV heads of 16, vocab 49152: KV doubled plus four fp32 vocab rows
    assert per32 == 2 * (2 * 2 * 2 * 16 * 4 * 100) + 4 * model.config.vocab_size * 4
    assert per16 < per32
    assert rows_per_call(_Fake(model), 100, 1000, budget=10 * per32) == 10
    assert rows_per_call(_Fake(model), 100, 6, budget=10 * per32) == 6       # never above the rows
    assert rows_per_call(_Fake(model), 100, 1000, budget=per32 - 1) == 1     # at least one
    long32 = sampler_row_bytes(model, "fp32", 4000)     # where the cache outweighs the logits
    assert rows_per_call(_Fake(model, "bf16"), 4000, 1000, budget=10 * long32) > 15
    assert rows_per_call(_Fake(schedules_memory=True), 100, 1000) == 1000   # vLLM: all at once
    # never fewer rows than the run's own sampling calls hold (generation_batch_size) ...
    assert rows_per_call(_Fake(model, batch_size=64), 100, 1000, budget=10 * per32) == 64
    assert rows_per_call(_Fake(model, batch_size=64), 100, 1000, budget=100 * per32) == 100
    assert rows_per_call(_Fake(model, batch_size=64), 100, 40, budget=10 * per32) == 40  # ... nor rows
    assert rows_per_call(_Fake(None, batch_size=24), 100, 1000) == 24        # nothing to estimate


def test_the_row_estimate_reads_other_config_layouts(tiny_gpt2_dir):
    """GPT-2 names its fields n_layer / n_head / n_embd (transformers maps them): estimated as
    multi-head attention, keys and values of n_embd per layer."""
    model = load_model(tiny_gpt2_dir)
    c = model.config
    assert sampler_row_bytes(model, "fp32", 10) == \
        2 * (2 * c.n_layer * c.n_embd * 4 * 10) + 4 * c.vocab_size * 4


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_row_estimate_covers_the_static_cache_it_stands_for(tiny_model_dir, precision,
                                                                monkeypatch):
    """The estimate's KV term is the real cache's: its layers, KV heads, head size, columns and
    dtype as the static decode cache allocates them, counted twice (the estimate's margin for
    the prefill's cache beside it), plus four fp32 vocabulary-wide rows."""
    model = load_model(tiny_model_dir)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    assert fast_decode.applies(model, precision)
    tok = load_tokenizer(tiny_model_dir)
    seen = []
    real = fast_decode.StaticDecoder.from_prefill.__func__
    monkeypatch.setattr(fast_decode.StaticDecoder, "from_prefill",
                        classmethod(lambda cls, *a: seen.append(real(cls, *a)) or seen[-1]))
    gen = CachedGenerator(model, tok, precision=precision)
    prompts = [[1, 520, 3310, 77, 9001], [1, 4040, 12]]
    torch.manual_seed(0)
    gen.generate(prompts, 3, SamplingParams(7))
    dec = seen[0]
    rows, columns = int(dec.v.shape[1]), int(dec.v.shape[3])
    cache = (dec.k.numel() * dec.k.element_size() + dec.v.numel() * dec.v.element_size()) / rows
    vocab_row = model.config.vocab_size * 4
    est = sampler_row_bytes(model, precision, columns)
    assert est == 2 * cache + 4 * vocab_row      # the KV term is exactly the cache's bytes


def _examples(k):
    return [Example(id=f"e{i}", question=f"{i} + {i} =", answer=str(2 * i)) for i in range(k)]


@pytest.mark.parametrize("batch_size,calls", [(0, 1), (2, 10), (6, 5), (9, 4), (100, 1)])
def test_evaluate_splits_its_rows_into_calls_of_at_most_batch_size(tiny_model_dir, batch_size,
                                                                   calls, monkeypatch):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    gen = CachedGenerator(model, tok, precision="fp32", batch_size=2)   # auto's floor: not binding
    sizes = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda p, n, params, max_rows=None:
                        sizes.append((len(p) * n, max_rows)) or real(p, n, params, max_rows))
    torch.manual_seed(0)
    res = evaluate(tokenizer=tok, generator=gen, grader=HashGrader(), examples=_examples(10),
                   template="bare", samples=3, greedy=False, max_new_tokens=4,
                   batch_size=batch_size)
    assert res["eval_generate_calls"] == calls == len(sizes)
    assert sum(r for r, _ in sizes) == 30 and res["sampled_samples"] == 30
    assert all(r == m and r <= max(batch_size or 30, 3) for r, m in sizes)
    assert max(r for r, _ in sizes) - min(r for r, _ in sizes) <= 3    # one prompt's rows


def test_evaluate_refuses_a_negative_batch_size(tiny_model_dir):
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(tokenizer=tok, generator=CachedGenerator(model, tok), grader=HashGrader(),
                 examples=_examples(2), template="bare", samples=2, greedy=False,
                 max_new_tokens=4, batch_size=-1)


def test_auto_never_caps_below_the_samplers_batch_size(tiny_model_dir, monkeypatch):
    """With a budget too small for one row, auto still takes generation_batch_size rows per call
    (6 here: two prompts of 3 samples), as the evaluation did before eval_batch_size."""
    import agro.evaluation as ev

    monkeypatch.setattr(ev, "AUTO_SAMPLER_BYTES", 1)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    gen = CachedGenerator(model, tok, precision="fp32", batch_size=6)
    sizes = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda p, n, params, max_rows=None:
                        sizes.append(len(p) * n) or real(p, n, params, max_rows))
    torch.manual_seed(0)
    res = evaluate(tokenizer=tok, generator=gen, grader=HashGrader(), examples=_examples(10),
                   template="bare", samples=3, greedy=False, max_new_tokens=4, batch_size=0)
    assert sizes == [6] * 5 and res["eval_generate_calls"] == 5
