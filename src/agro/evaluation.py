"""Held-out evaluation: sampled and greedy accuracy, completion length, and KL(pi||pi_ref).

Sampled accuracy uses temperature-1 samples from pi (no top-k/top-p), the same distribution the
RL objective is about; greedy accuracy is reported beside it. When a reference is given, the
k1 estimate of KL(pi||pi_ref) = E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] is computed on the
sampled held-out completions (an unbiased estimate of the sequence-level KL).
"""
from __future__ import annotations

import time
from typing import Callable

import torch

from .generation import SamplingParams
from .rollouts import Group, collate, samples_from_pi, split_groups
from .tasks import Example, render_prompt


@torch.no_grad()
def evaluate(*, tokenizer, generator, grader, examples: list[Example], template: str,
             samples: int, greedy: bool, max_new_tokens: int,
             reference=None, temperature: float = 1.0, batch_size: int = 64,
             on_progress: Callable[[int, int], None] | None = None) -> dict:
    """Accuracy of the generator's model on `examples`. Returns plain floats (and counts).

    Each generate() call holds up to ``batch_size`` sequences (``batch_size // n`` prompts): small
    calls are bound by per-token overhead, so one sample per prompt would be slow at 16 prompts."""
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
    done = 0
    for mode, n, params in modes:
        correct, lengths, kls, timeouts = [], [], [], 0
        batch_prompts = max(1, batch_size // n)
        for s in range(0, len(examples), batch_prompts):
            exs = examples[s:s + batch_prompts]
            gens = generator.generate(prompt_ids[s:s + batch_prompts], n, params)
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
    out["eval_seconds"] = time.perf_counter() - t0
    return out


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
