"""generator=vllm (agro.vllm_generator).

Two layers:
* without vLLM (the main suite): the clear error when it is missing, and the weights agro pushes
  into an engine (names and values, LoRA merged by computation) against transformers' own merge;
* with vLLM (marker ``vllm``; ``make test-vllm`` runs them in .venv-vllm, skipped elsewhere):
  greedy tokens equal agro's cached generator on the default model, sampled per-token log-probs
  equal a forward of the policy within a stated tolerance, pushed weights change the samples,
  stop-token handling, the trainer for a few steps (with a lagging engine, dated stale), and a
  Ray rollout actor with its own engine (async_generation).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from agro.generation import CachedGenerator, SamplingParams, make_generator
from agro.vllm_generator import _weights_for_engine, vllm_available

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="needs vLLM (make vllm-setup; make test-vllm)")


# ----------------------------------------------------------------------------- without vLLM
@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_missing_vllm_is_a_clear_error(tiny_model_dir):
    from agro.models import load_model, load_tokenizer

    with pytest.raises(RuntimeError, match="make vllm-setup"):
        make_generator("vllm", load_model(tiny_model_dir), load_tokenizer(tiny_model_dir))


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_missing_vllm_is_a_config_error_before_any_model_loads():
    from agro.config import ConfigError, TrainConfig, load_config

    with pytest.raises(ConfigError, match="generator.*make vllm-setup"):
        load_config(TrainConfig, None, ["generator=vllm"])


def test_weights_pushed_full_finetune_are_the_parameters(tiny_model_dir):
    from agro.models import load_model

    model = load_model(tiny_model_dir)
    got = dict(_weights_for_engine(model))
    want = dict(model.named_parameters())
    # the tiny Llama ties its head to the embedding: the shared tensor is also pushed as the head
    assert model.lm_head.weight is model.model.embed_tokens.weight
    want["lm_head.weight"] = model.lm_head.weight
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k].detach())


def test_weights_pushed_for_lora_are_the_merged_model(tiny_model_dir):
    from agro.models import apply_lora, load_model

    model = apply_lora(load_model(tiny_model_dir), r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():   # make the adapters non-zero (B starts at 0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = dict(_weights_for_engine(model))
    merged = copy.deepcopy(model).merge_and_unload()
    want = {**dict(merged.named_parameters()), "lm_head.weight": merged.lm_head.weight}
    assert got.keys() == want.keys()
    base = dict(load_model(tiny_model_dir).named_parameters())
    for k in want:
        assert torch.allclose(got[k].float(), want[k].detach().float(), atol=1e-6), k
    q = [k for k in want if k.endswith("q_proj.weight")]
    assert q and all(not torch.allclose(got[k], base[k]) for k in q)   # the delta is pushed
    after = model.state_dict()               # and the model itself was not merged in place
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- with vLLM

@pytest.fixture(scope="module")
def default_policy():
    from agro.models import DEFAULT_MODEL, default_gguf_path, load_model, load_tokenizer

    try:
        default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(f"needs the embedded default model: {e}")
    return load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def engine(default_policy):
    model, tok = default_policy
    if not vllm_available():
        pytest.skip("needs vLLM")
    gen = make_generator("vllm", model, tok, precision="fp32", max_model_len=256)
    yield gen
    gen.close()


def _prompts(tok, k=6):
    qs = ["What is 7 + 5?", "What is 12 * 3?", "Name a prime number.", "What is 20 - 9?",
          "Say hello.", "What is 6 * 7?"][:k]
    return [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                    tokenize=True, return_dict=False) for q in qs]


@pytest.mark.vllm
@needs_vllm
def test_greedy_tokens_equal_cached_generator(default_policy, engine):
    model, tok = default_policy
    prompts = _prompts(tok)
    params = SamplingParams(24, greedy=True)
    ours = CachedGenerator(model, tok).generate(prompts, 1, params)
    theirs = engine.generate(prompts, 1, params)
    for a, b in zip(ours, theirs):
        assert a.completion_ids == b.completion_ids


@pytest.mark.vllm
@needs_vllm
def test_sampled_logprobs_match_policy_forward(default_policy, engine):
    """Behaviour log-probs of vLLM's samples vs the policy's fp32 forward on the same tokens.
    Tolerance (fp32, CPU): mean per-token |diff| <= 1e-3 nats, max <= 5e-2."""
    from agro.sampler_check import measure_mismatch

    model, tok = default_policy
    torch.manual_seed(0)
    m = measure_mismatch(engine, model, tok, _prompts(tok), 4, SamplingParams(24), "fp32")
    assert m.tokens > 100
    assert m.mean_abs <= 1e-3, m.line()
    assert m.max_abs <= 5e-2, m.line()


@pytest.mark.vllm
@needs_vllm
def test_seeded_sampling_is_reproducible_and_stops_at_eos(default_policy, engine):
    model, tok = default_policy
    prompts = _prompts(tok, 3)
    torch.manual_seed(5)
    a = engine.generate(prompts, 4, SamplingParams(48))
    torch.manual_seed(5)
    b = engine.generate(prompts, 4, SamplingParams(48))
    assert [g.completion_ids for g in a] == [g.completion_ids for g in b]
    ended = 0
    for g in a:
        assert len(g.completion_ids) == 4
        for c, lp in zip(g.completion_ids, g.logprobs):
            assert len(c) == len(lp) and all(x <= 0 for x in lp)
            stops = [i for i, t in enumerate(c) if t in engine.stop_ids]
            assert stops in ([], [len(c) - 1])      # a stop token only as the last token
            ended += bool(stops)
    assert ended > 0


@pytest.mark.vllm
@needs_vllm
def test_pushed_weights_change_samples(default_policy):
    model, tok = default_policy
    model = copy.deepcopy(model)
    gen = make_generator("vllm", model, tok, precision="fp32", max_model_len=256)
    try:
        prompts = _prompts(tok, 3)
        params = SamplingParams(16, greedy=True)
        before = [g.completion_ids for g in gen.generate(prompts, 1, params)]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layers.0.mlp.down_proj" in n:
                    p.mul_(-3.0)
                if "embed_tokens" in n:   # tied with the LM head: both must follow
                    p.add_(0.02 * torch.randn_like(p))
        gen.sync_weights(model)
        after = gen.generate(prompts, 1, params)
        assert [g.completion_ids for g in after] != before
        ours = CachedGenerator(model, tok).generate(prompts, 1, params)
        assert [g.completion_ids for g in after] == [g.completion_ids for g in ours]
    finally:
        gen.close()


@pytest.fixture(scope="module")
def tiny_vllm_model_dir(tokenizer_dir, tmp_path_factory):
    """The tiny Llama with head_dim 64 (vLLM's CPU attention has no kernel for the usual 16)."""
    from transformers import AutoTokenizer

    from agro.models import save_tiny_llama

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama64"), tok, seed=1234,
                           hidden_size=128, num_attention_heads=2, num_key_value_heads=1)


@pytest.mark.vllm
@needs_vllm
def test_trainer_runs_with_vllm_and_dates_lagging_groups(tiny_vllm_model_dir, tmp_path):
    from agro.config import TrainConfig, load_config
    from agro.trainer import Trainer
    from fakes import HashGrader

    cfg = load_config(TrainConfig, None, [
        f"model={tiny_vllm_model_dir}", "generator=vllm", "vllm_sync_every=2", "steps=4",
        "prompts_per_step=4", "group_size=3", "max_new_tokens=6", "eval_prompts=4",
        "eval_samples=2", "tensorboard=false", "progress=false", "plot=false", "lr=1e-3",
        "warmup_steps=0", "save_every=2", "precision=fp32", f"output_dir={tmp_path / 'run'}"])
    res = Trainer(cfg, grader=HashGrader()).train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "staleness_mean" in r]
    assert len(steps) == 4
    # pushes after steps 2 and 4 only: steps 1 and 3 learn at the engine's version, 2 and 4 one behind
    assert [r["staleness_mean"] for r in steps] == [0.0, 1.0, 0.0, 1.0]
    assert res.after is not None


@pytest.mark.vllm
@needs_vllm
def test_lora_policy_pushes_merged_weights(default_policy):
    """LoRA: the engine samples from base + the adapters' delta, before and after an update."""
    from agro.models import apply_lora
    from agro.sampler_check import measure_mismatch

    model, tok = default_policy
    peft = apply_lora(copy.deepcopy(model), r=4, alpha=8, dropout=0.0, target_modules="all-linear")

    def perturb():
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)

    perturb()
    gen = make_generator("vllm", peft, tok, precision="fp32", max_model_len=256)
    try:
        prompts = _prompts(tok, 3)
        m0 = measure_mismatch(gen, peft, tok, prompts, 2, SamplingParams(16), "fp32")
        perturb()
        stale = measure_mismatch(gen, peft, tok, prompts, 2, SamplingParams(16), "fp32")
        gen.sync_weights(peft)
        m1 = measure_mismatch(gen, peft, tok, prompts, 2, SamplingParams(16), "fp32")
    finally:
        gen.close()
    assert m0.mean_abs <= 1e-3 and m1.mean_abs <= 1e-3, (m0.line(), m1.line())
    assert stale.mean_abs > 10 * max(m0.mean_abs, m1.mean_abs)   # the push is what matched them


def test_collector_dates_groups_by_the_samplers_version_and_honours_exact(tiny_model_dir, tmp_path):
    """What a lagging, only-close-to-pi sampler (vLLM) changes, checked with agro's own sampler
    given the same attributes: groups are dated by the version the sampler held, and marked not
    drawn from pi when the run's rule says so (then no on-policy-only terms, §4.2)."""
    from agro.config import TrainConfig, load_config
    from agro.trainer import Trainer
    from fakes import HashGrader

    cfg = load_config(TrainConfig, None, [
        f"model={tiny_model_dir}", "steps=1", "prompts_per_step=2", "group_size=3",
        "max_new_tokens=4", "eval_prompts=0", "tensorboard=false", "progress=false",
        "plot=false", "precision=fp32", f"output_dir={tmp_path / 'run'}"])
    tr = Trainer(cfg, grader=HashGrader())
    fresh = tr.collector(2, 5)
    assert all(g.policy_version == 5 and g.is_on_policy(5) for g in fresh)
    assert all(g.meta["sampler"] == "cached" and "pi_exact" not in g.meta for g in fresh)
    tr.generator.lag, tr.generator.exact = 2, True
    lagging = tr.collector(2, 5)
    assert all(g.policy_version == 3 and not g.is_on_policy(5) for g in lagging)
    tr.generator.lag, tr.generator.exact = 0, False
    close = tr.collector(2, 5)
    assert all(g.policy_version == 5 and g.meta["pi_exact"] is False for g in close)
    assert not any(g.is_on_policy(5) or g.samples_from_pi for g in close)
    if tr.grader is not None and hasattr(tr.grader, "close"):
        tr.grader.close()


@pytest.mark.vllm
@needs_vllm
def test_engine_follows_its_push_schedule_and_drops_stale_prefix_cache(default_policy):
    """vllm_sync_every=2: the first sync call leaves the engine on the old weights (lag 1), the
    second pushes. The prompts share a prefix of > 200 tokens, so vLLM's prefix cache (128-token
    blocks on CPU) holds KV computed with the old weights unless the push resets it."""
    model, tok = default_policy
    model = copy.deepcopy(model)
    gen = make_generator("vllm", model, tok, precision="fp32", max_model_len=512, sync_every=2)
    try:
        prefix = "Read the following carefully. " * 40
        prompts = [tok.apply_chat_template([{"role": "user", "content": prefix + q}],
                                           add_generation_prompt=True, tokenize=True, return_dict=False)
                   for q in ("What is 7 + 5?", "What is 12 * 3?")]
        assert min(len(p) for p in prompts) > 200
        greedy = SamplingParams(12, greedy=True)
        v0 = CachedGenerator(copy.deepcopy(model), tok).generate(prompts, 1, greedy)
        assert [g.completion_ids for g in gen.generate(prompts, 1, greedy)] == \
            [g.completion_ids for g in v0]                       # the prefix is now cached
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layers.0." in n and n.endswith("proj.weight"):
                    p.mul_(-2.0)
        gen.sync_weights(model)                                  # 1st call: no push
        assert gen.lag == 1
        assert [g.completion_ids for g in gen.generate(prompts, 1, greedy)] == \
            [g.completion_ids for g in v0]
        gen.sync_weights(model)                                  # 2nd call: push
        assert gen.lag == 0
        now = CachedGenerator(model, tok).generate(prompts, 1, greedy)
        assert [g.completion_ids for g in now] != [g.completion_ids for g in v0]
        assert [g.completion_ids for g in gen.generate(prompts, 1, greedy)] == \
            [g.completion_ids for g in now]
        with pytest.raises(ValueError, match="max_model_len"):
            gen.generate(prompts, 1, SamplingParams(400))
    finally:
        gen.close()


@pytest.mark.vllm
@needs_vllm
def test_vllm_run_resumed_after_a_checkpoint_equals_the_uninterrupted_run(tiny_vllm_model_dir, tmp_path,
                                                                        monkeypatch):
    """vllm_sync_every=2 with a checkpoint after step 3, between two scheduled pushes: weights are
    also pushed at every checkpoint (else the uninterrupted run's step 4 would sample version 2
    and the resumed run's version 3), and the run's on-policy decision is kept in the
    checkpoint (the resumed run does not measure again)."""
    from agro import sampler_check
    from agro.config import TrainConfig, load_config
    from agro.trainer import Trainer
    from fakes import HashGrader

    def cfg(out, steps):
        return load_config(TrainConfig, None, [
            f"model={tiny_vllm_model_dir}", "generator=vllm", "vllm_sync_every=2", f"steps={steps}",
            "prompts_per_step=4", "group_size=3", "max_new_tokens=6", "eval_prompts=0",
            "tensorboard=false", "progress=false", "plot=false", "lr=1e-3", "warmup_steps=0",
            "save_every=3", "precision=fp32", "save_final=false", f"output_dir={out}"])

    def rows(out):
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in x]

    Trainer(cfg(tmp_path / "a", 5), grader=HashGrader()).train()
    first = Trainer(cfg(tmp_path / "b", 3), grader=HashGrader())
    record = dict(first.generator.record)
    first.train()

    def no_second_measure(*a, **k):
        raise AssertionError("the resumed run measured the mismatch again")

    monkeypatch.setattr(sampler_check, "measure_mismatch", no_second_measure)
    resumed = Trainer(cfg(tmp_path / "b", 5), resume=True, grader=HashGrader())
    assert resumed.generator.record == record
    resumed.train()
    a, b = rows(tmp_path / "a"), rows(tmp_path / "b")
    keys = ("loss", "reward_mean", "completion_len_mean", "staleness_mean")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]
    # pushes after steps 2 and 4 (schedule) and 3 (checkpoint)
    assert [r["staleness_mean"] for r in a] == [0.0, 1.0, 0.0, 0.0, 1.0]


def test_evaluation_skips_and_counts_prompts_a_fixed_context_sampler_cannot_hold(tiny_model_dir):
    """A sampler with a fixed context (vLLM's max_model_len) must not crash the held-out
    evaluation on a long prompt: it is skipped and counted (checked with agro's own sampler
    given that attribute)."""
    from agro.evaluation import evaluate
    from agro.models import load_model, load_tokenizer
    from agro.tasks import Example
    from fakes import HashGrader

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    gen = CachedGenerator(model, tok)
    exs = [Example(id="short", question="1+1?", answer="2"),
           Example(id="long", question="word " * 300 + "1+1?", answer="2")]
    gen.max_model_len = 200
    res = evaluate(tokenizer=tok, generator=gen, grader=HashGrader(), examples=exs,
                   template="number", samples=2, greedy=False, max_new_tokens=4)
    assert res["eval_prompts"] == 1 and res["eval_prompts_too_long"] == 1
    assert res["sampled_samples"] == 2


def test_measure_mismatch_of_agros_own_fp32_sampler_is_round_off(tiny_model_dir):
    """measure_mismatch is generic: agro's own fp32 sampler against its model's scoring pass
    differs only by float round-off (incremental KV-cache decoding vs one packed pass)."""
    from agro.models import load_model, load_tokenizer
    from agro.sampler_check import measure_mismatch

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    prompts = [tok("What is 2 + 2?")["input_ids"], tok("Name a colour.")["input_ids"]]
    m = measure_mismatch(CachedGenerator(model, tok), model, tok, prompts, 3, SamplingParams(8), "fp32")
    assert m.tokens > 6 and m.sequences == 6
    assert m.mean_abs < 1e-4 and m.seq_max_abs < 1e-3, m.line()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(1.5)          # a different model must show up
    m2 = measure_mismatch(CachedGenerator(model, tok), other, tok, prompts, 3, SamplingParams(8), "fp32")
    assert m2.mean_abs > 100 * max(m.mean_abs, 1e-7)


@pytest.mark.vllm
@needs_vllm
def test_async_actor_samples_with_its_own_vllm_engine(tiny_vllm_model_dir, tmp_path):
    """async_generation with generator=vllm: the Ray actor holds its own engine, loads the pushed
    weights into it, and its groups are dated by the version it sampled with (k = 1)."""
    ray = pytest.importorskip("ray")
    import fakes
    from agro.async_actors import init_ray
    from agro.config import TrainConfig, load_config
    from agro.trainer import Trainer

    ray.cloudpickle.register_pickle_by_value(fakes)
    init_ray("", 2)
    try:
        cfg = load_config(TrainConfig, None, [
            f"model={tiny_vllm_model_dir}", "generator=vllm", "async_generation=true",
            "max_staleness=1", "steps=3", "prompts_per_step=4", "group_size=3",
            "max_new_tokens=6", "eval_prompts=0", "tensorboard=false", "progress=false",
            "plot=false", "lr=1e-3", "warmup_steps=0", "save_every=0", "precision=fp32",
            "async_timeout=300", f"output_dir={tmp_path / 'run'}"])
        tr = Trainer(cfg, grader=fakes.HashGrader())
        res = tr.train()
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert res.steps_done == 3
    assert [r["staleness_mean"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(r["async_actor_tokens_per_second"] > 0 for r in rows)
    assert any(abs(r["loss"]) > 0 for r in rows)
