"""Held-out evaluation: sampled and greedy accuracy, completion length, and KL(pi||pi_ref).

Sampled accuracy uses temperature-1 samples from pi (no top-k/top-p), the same distribution the
RL objective is about; greedy accuracy is reported beside it. When a reference is given, the
k1 estimate of KL(pi||pi_ref) = E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] is computed on the
sampled held-out completions (an unbiased estimate of the sequence-level KL).

Rows per generate() call: each call decodes until its longest completion, and a decode step's
cost grows far less than its rows, so fewer, larger calls are faster (one call of the default
job's 180 rows took 0.60-0.79x the time of three of 64, docs/RESULTS.md). ``batch_size=0`` (the
configs' ``eval_batch_size=0``) takes as many rows per call as :data:`AUTO_SAMPLER_BYTES` of
estimated sampler memory hold (:func:`agro.generation.sampler_row_bytes`), a cap never below
the sampler's ``generation_batch_size``, and every row at once for a sampler that schedules its own
memory (vLLM); the calls are then balanced (180 rows
under a cap of 120 rows at 4 samples per prompt: 22 and 23 prompts, 88 + 92 rows, not 120 + 60).

Randomness: the trainer runs every evaluation on its own RNG stream (:func:`eval_seed`, under
``torch.random.fork_rng``), so evaluating (``eval_before``, ``eval_every``, the rows per call)
does not move the training run's samples. (With ``generator=vllm`` and ``vllm_sync_every > 1`` an
evaluation also pushes the current weights into the engine, as the run's log says, and so moves
the lag of the groups sampled after it.) ``agro eval`` at a run's seed draws from the stream of a
one-process run's evaluation.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from typing import Callable

import torch

from .generation import SamplingParams, sampler_row_bytes
from .rollouts import Group, collate, samples_from_pi, split_groups
from .sampler_check import keep_random_state, seed_random_state
from .tasks import Example, render_prompt


@torch.no_grad()
def evaluate(*, tokenizer, generator, grader, examples: list[Example], template: str,
             samples: int, greedy: bool, max_new_tokens: int,
             reference=None, temperature: float = 1.0, batch_size: int = 0,
             on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Accuracy of the generator's model on `examples`. Returns plain floats (and counts).

    Each generate() call holds up to ``batch_size`` sequences (at least one prompt's ``n``), or
    with ``batch_size=0`` as many as :func:`rows_per_call` allows; the prompts are split into
    calls of equal size (``eval_generate_calls`` in the result counts them)."""
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0 (0 = auto), got {batch_size}")
    t0 = time.perf_counter()
    prompt_ids = [tokenizer(render_prompt(tokenizer, ex, template), add_special_tokens=False)
                  ["input_ids"] for ex in examples]
    limit = getattr(generator, "max_model_len", None)   # a sampler with a fixed context (vLLM)
    skipped = 0
    if limit is not None:
        keep = [i for i, p in enumerate(prompt_ids) if len(p) + max_new_tokens <= limit]
        skipped = len(examples) - len(keep)
        examples, prompt_ids = [examples[i] for i in keep], [prompt_ids[i] for i in keep]
    out: dict = {"eval_prompts": len(examples)}
    if skipped:
        out["eval_prompts_too_long"] = skipped
    modes = []
    if samples > 0:
        modes.append(("sampled", samples, SamplingParams(max_new_tokens, temperature=temperature)))
    if greedy:
        modes.append(("greedy", 1, SamplingParams(max_new_tokens, greedy=True)))
    total = len(modes) * len(examples)
    done = calls = 0
    columns = max((len(p) for p in prompt_ids), default=0) + max_new_tokens
    for mode, n, params in modes:
        correct, lengths, kls, timeouts = [], [], [], 0
        cap = batch_size or rows_per_call(generator, columns, n * len(examples))
        for s, e in balanced_calls(len(examples), max(1, cap // n)):
            exs = examples[s:e]
            gens = generator.generate(prompt_ids[s:e], n, params, max_rows=(e - s) * n)
            calls += 1
            texts = [t for g in gens for t in g.texts]
            answers = [ex.answer for ex in exs for _ in range(n)]
            res = grader.grade(texts, answers)
            timeouts += res.timeouts
            correct += [0.0 if r is None else float(r) for r in res.rewards]
            lengths += [len(c) for g in gens for c in g.completion_ids]
            if reference is not None and mode == "sampled":
                kls += _kl_k1(reference, tokenizer, gens, temperature, generator)
            done += len(exs)
            if on_progress:
                on_progress(done, total)
        out[f"{mode}_accuracy"] = sum(correct) / max(1, len(correct))
        out[f"{mode}_len_mean"] = sum(lengths) / max(1, len(lengths))
        out[f"{mode}_samples"] = len(correct)
        out[f"{mode}_grade_timeouts"] = timeouts
        if kls:
            out["kl_pi_ref"] = sum(kls) / len(kls)
    out["eval_generate_calls"] = calls
    out["eval_seconds"] = time.perf_counter() - t0
    return out


AUTO_SAMPLER_BYTES = 1 << 30
"""``batch_size=0``: rows per call such that their estimated sampler memory
(:func:`agro.generation.sampler_row_bytes`) stays within 1 GiB. The default job's evaluation
(SmolLM2-135M, 180 rows of <= ~100 positions): one call in bf16, two (88 + 92 rows) in fp32."""


def rows_per_call(generator, columns: int, rows: int, budget: int | None = None) -> int:
    """The automatic cap on rows per generate() call for ``rows`` rows of ``columns`` positions:
    all of them for a sampler that schedules its own memory (``schedules_memory``, vLLM), else as
    many as ``budget`` bytes (default :data:`AUTO_SAMPLER_BYTES`) hold by
    :func:`agro.generation.sampler_row_bytes`, and never below the generator's own ``batch_size``
    (``generation_batch_size``: the cap on the run's own sampling calls, and what an evaluation's
    calls took before ``eval_batch_size`` existed; without this floor a large model's rows, e.g.
    ~400 MB each for a 32-layer, 8-KV-head, 128-dim model at 1536 positions in bf16, would get
    far fewer rows per call than before), nor above ``rows``. A generator without a model config
    to estimate from keeps its ``batch_size``."""
    budget = AUTO_SAMPLER_BYTES if budget is None else int(budget)
    if getattr(generator, "schedules_memory", False):
        return max(1, rows)
    floor = max(1, int(getattr(generator, "batch_size", 64)))
    model = getattr(generator, "model", None)
    per_row = sampler_row_bytes(model, getattr(generator, "precision", "fp32"), columns) \
        if model is not None else None
    if not per_row:
        return floor
    return max(1, min(rows, max(floor, budget // per_row)))


def balanced_calls(items: int, cap: int) -> list[tuple[int, int]]:
    """``[start, end)`` ranges splitting ``items`` into the fewest calls of at most ``cap``, of
    sizes differing by at most one (each call decodes to its longest completion, so 120 + 60
    would cost about as much as 120 + 120)."""
    if items <= 0:
        return []
    k = math.ceil(items / max(1, cap))
    bounds = [round(i * items / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


@contextlib.contextmanager
def eval_random_stream(device, seed: int, rank: int = 0):
    """Within it, torch's CPU generator (and ``device``'s) draw the evaluation's own stream
    (:func:`eval_seed`); on exit they are as they were, so the caller's stream has not moved.
    Used by the trainer's evaluations and by ``agro eval``."""
    with keep_random_state(device):
        seed_random_state(device, eval_seed(seed, rank))
        yield


def eval_seed(seed: int, rank: int = 0) -> int:
    """The seed of every held-out evaluation of a run (and process): one fixed stream, apart from
    training's (``seed + 1000 * rank``), so evaluating never moves training's samples, and each
    evaluation of a run draws the same random numbers (its before/after comparison is not also a
    comparison of two draws)."""
    digest = hashlib.sha256(f"agro-eval:{int(seed)}:{int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _kl_k1(reference, tokenizer, gens, temperature: float, generator=None) -> list[float]:
    """Per-sample ``log pi(y|x) - log pi_ref(y|x)`` on samples of pi (temperature 1, no
    truncation). Both terms come from the same scoring pass (``logprobs.Reference``, at the
    reference's precision), log pi on the generator's model: the sampler's own behaviour log-probs
    are computed by other kernels, and in bf16 their difference from the scoring pass entered the
    estimate as a bias (measured at step 0, where the KL is 0: +0.079 nats per completion with
    agro's sampler, +0.058 with vLLM). The behaviour log-probs are used for a generator without a
    ``model``, and for agro's own sampler in fp32 (:func:`_fp32_own_sampler`), where they are the
    scoring pass's to round-off."""
    if not samples_from_pi(temperature, 1.0, 0):
        return []
    groups = [Group(prompt_id=str(i), prompt_ids=list(g.prompt_ids),
                    completion_ids=[list(c) for c in g.completion_ids],
                    rewards=[0.0] * len(g.completion_ids)) for i, g in enumerate(gens)]
    model = getattr(generator, "model", None)
    if model is not None and _same_weights(model, reference):
        # the policy *is* the reference (step 0 of a run): the KL is exactly 0 and both passes,
        # ~10 s of the default job's first evaluation, would only measure rounding
        return [0.0] * sum(len(g.completion_ids) for g in gens)
    if _fp32_own_sampler(generator, reference) and all(
            len(g.logprobs) == len(g.completion_ids)
            and all(len(lp) == len(c) for lp, c in zip(g.logprobs, g.completion_ids))
            for g in gens):
        # agro's own fp32 sampler records pi's log-probs to round-off (2e-5 nats per completion
        # from the scoring pass, docs/RESULTS.md): the policy pass, half this estimate's cost
        # (34 s of a 275-prompt evaluation of SmolLM2-135M on 2 cores), would only measure that
        policy = [sum(lp) for g in gens for lp in g.logprobs]
    elif model is not None:
        from .logprobs import Reference

        policy = _seq_logprobs(Reference(model, reference.precision), tokenizer, groups)
    else:
        policy = [sum(lp) for g in gens for lp in g.logprobs]
    ref_sums = _seq_logprobs(reference, tokenizer, groups)
    return [lp - r for lp, r in zip(policy, ref_sums)]


def _fp32_own_sampler(generator, reference) -> bool:
    """agro's own sampler (cached / hf) sampling in fp32 for an fp32 estimate."""
    return (getattr(generator, "name", "") in ("cached", "hf")
            and getattr(generator, "precision", "") == "fp32"
            and getattr(reference, "precision", "") == "fp32")


@torch.no_grad()
def _same_weights(model, reference) -> bool:
    """True if ``model`` scores exactly as ``reference`` would: a plain (non-LoRA) reference of
    the same class and config whose parameters and buffers (non-persistent ones included, e.g.
    RoPE's ``inv_freq``) equal the model's by name, bit for bit, in the same dtypes."""
    ref = getattr(reference, "model", None)
    if ref is None or getattr(reference, "disable_adapter", False) or type(ref) is not type(model):
        return False

    def cfg(m) -> dict:
        c = getattr(m, "config", None)
        d = c.to_dict() if c is not None else {}
        return {k: v for k, v in d.items() if k not in ("_name_or_path", "name_or_path")}

    if cfg(model) != cfg(ref):
        return False
    a = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    b = dict(ref.named_parameters(remove_duplicate=False)) | dict(ref.named_buffers(remove_duplicate=False))
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and a[k].dtype == b[k].dtype and a[k].device == b[k].device
        and torch.equal(a[k], b[k]) for k in a)


def _seq_logprobs(scorer, tokenizer, groups: list[Group]) -> list[float]:
    """Summed completion log-probs of every sample under ``scorer`` (a :class:`Reference`)."""
    sums: list[float] = []
    for mb in split_groups(groups, max(1, 16 // max(1, groups[0].n))):
        b = collate(mb, tokenizer.pad_token_id, current_version=-1, require_ref=False).to(scorer.device)
        lp = scorer.token_logprobs(b.input_ids, b.attention_mask, b.completion_ids,
                                   b.prompt_len, b.group_size)
        sums += (lp.float() * b.completion_mask).sum(-1).tolist()
    return sums
