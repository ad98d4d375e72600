"""Does a sampler draw from pi? Measured at the start of a run, for every sampler.

§4.2's on-policy-only loss terms (agro_on's likelihood-ratio term, the causal / local
regularization estimators) hold for samples of pi, the distribution the learner scores. A sampler
whose numerics are not the learner's draws from a distribution close to pi, not pi: vLLM (other
kernels), and agro's own sampler in bf16 (the same bf16 weights, but another layout of the
computation, whose bf16 rounding differs: measured 0.2-0.35 nats per completion on the default
model, against 2e-5 in fp32; docs/RESULTS.md, `bench/sampler_mismatch.py`). :func:`measure_mismatch`
samples with the run's generator and compares the behaviour log-probs it recorded with the
learner's scoring of the same tokens at the run's precision (the collector's scoring pass, the
one the reference log-probs use; the loss's pass is the same kernel with gradients);
:func:`decide` applies the run's rule (``sampler_on_policy``: auto / yes / no, against
``sampler_mismatch_tol`` nats per completion) and records the decision on the generator
(``exact``, ``record``). The collector marks the groups of a sampler with ``exact = False`` as not
drawn from pi, so the on-policy-only terms are off for them (agro's off-policy loss is valid for
any sampler and unaffected). A resumed run keeps the decision its checkpoint recorded.

Departure from the paper: none (the paper does not say how its samples were drawn or scored).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from .generation import SamplingParams


@dataclass
class Mismatch:
    """``log pi_sampler - log pi_learner`` on sampled completions: per token and per completion
    (the sequence-level log-ratio is what §4.2's on-policy terms depend on)."""

    tokens: int
    mean_abs: float        # per token: mean |diff|
    max_abs: float         # per token: max |diff|
    mean_signed: float     # per token: mean of (sampler - learner): a systematic offset shows here
    sequences: int
    seq_mean_abs: float    # per completion: mean |sum_t diff|
    seq_max_abs: float     # per completion: max |sum_t diff|
    seconds: float

    def line(self) -> str:
        return (f"sampler vs learner log-probs on {self.sequences} completions ({self.tokens} tokens): "
                f"per completion mean |diff| {self.seq_mean_abs:.2e}, max {self.seq_max_abs:.2e}; "
                f"per token mean |diff| {self.mean_abs:.2e}, max {self.max_abs:.2e}, mean diff "
                f"{self.mean_signed:+.2e} nats ({self.seconds:.1f} s)")


@torch.no_grad()
def measure_mismatch(generator, model, tokenizer, prompt_ids: list[list[int]], n: int,
                     params: SamplingParams, precision: str) -> Mismatch:
    """Sample ``n`` completions per prompt with ``generator`` and compare its per-token behaviour
    log-probs with ``model``'s log-probs of the same tokens at the learner's ``precision`` (the
    numbers the loss would use: the collector's scoring pass, which the reference log-probs
    also use). ``params`` should sample from pi (temperature 1, no truncation)."""
    from .collect import attach_ref_logprobs
    from .logprobs import Reference
    from .rollouts import Group

    t0 = time.perf_counter()
    gens = generator.generate(prompt_ids, n, params)
    groups = [Group(prompt_id=str(i), prompt_ids=g.prompt_ids, completion_ids=g.completion_ids,
                    rewards=[0.0] * n, behavior_logprobs=g.logprobs) for i, g in enumerate(gens)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # the learner's per-token log-probs, by the collector's own scoring path (into ref_logprobs)
    attach_ref_logprobs(groups, Reference(model, precision), pad, max(1, 16 // n))
    diffs = [torch.tensor(beh) - torch.tensor(lp) for g in groups
             for beh, lp in zip(g.behavior_logprobs, g.ref_logprobs) if beh]
    if not diffs:
        nan = math.nan
        return Mismatch(0, nan, nan, nan, 0, nan, nan, time.perf_counter() - t0)
    d = torch.cat(diffs)
    seq = torch.stack([x.sum() for x in diffs]).abs()
    return Mismatch(int(d.numel()), float(d.abs().mean()), float(d.abs().max()), float(d.mean()),
                    int(seq.numel()), float(seq.mean()), float(seq.max()), time.perf_counter() - t0)


def decide(generator, model, tokenizer, precision: str, prompt_ids: list[list[int]], n: int,
           params: SamplingParams, rule: str, tol: float, previous: dict | None = None) -> list[str]:
    """Measure ``generator`` against ``model`` (:func:`measure_mismatch`, sampling from pi with
    ``params``' length) and decide whether its samples count as draws from pi: ``rule`` 'yes' /
    'no', or 'auto' (mean per-completion |log pi_sampler(y) - log pi_learner(y)| <= ``tol``: §4.2's
    terms depend on the sequence ratio). Sets ``generator.exact``, ``generator.mismatch`` and
    ``generator.record`` (what the checkpoint keeps). A resumed run passes the decision it
    recorded (``previous``), so the rule is not re-applied to trained weights mid-run. Returns
    the lines for the run log."""
    name = getattr(generator, "name", "sampler")
    if previous is not None and (previous.get("rule"), previous.get("tol"),
                                 previous.get("sampler", name), previous.get("precision")) \
            == (rule, tol, name, precision):
        generator.exact = bool(previous["exact"])
        generator.record = dict(previous)
        return [f"the run's decision is kept from its checkpoint: {name} samples "
                f"{'count' if generator.exact else 'do not count'} as draws from pi"]
    pi = SamplingParams(params.max_new_tokens)          # temperature 1, no truncation
    m = measure_mismatch(generator, model, tokenizer, prompt_ids, n, pi, precision)
    generator.mismatch = m
    if rule == "auto":
        exact = bool(m.sequences > 0 and m.seq_mean_abs <= tol)
        why = (f"per-completion mean |diff| {m.seq_mean_abs:.2e} "
               f"{'<=' if exact else '>'} sampler_mismatch_tol {tol:.0e}")
    else:
        exact = rule == "yes"
        why = f"sampler_on_policy={rule}"
    generator.exact = exact
    generator.record = {"exact": exact, "rule": rule, "tol": tol, "precision": precision,
                        "sampler": name, **vars(m)}
    verdict = ("count as draws from pi (on-policy-only terms apply to fresh groups)" if exact
               else "do not count as draws from pi (on-policy-only terms off; AGRO's "
               "off-policy loss is unaffected)")
    return [f"{name}: " + m.line(), f"{name} samples {verdict}: {why}"]


def seed_random_state(device, seed: int) -> None:
    """Seed the CPU generator, and ``device``'s when it is an accelerator: the generators
    :func:`keep_random_state` restores (``torch.manual_seed`` would reseed every GPU)."""
    device = torch.device(device)
    torch.default_generator.manual_seed(int(seed))
    if device.type != "cpu":
        mod = getattr(torch, device.type)
        select = getattr(mod, "device", None)       # CUDA/XPU: the given device's generator
        if device.index is not None and select is not None:
            with select(device.index):
                mod.manual_seed(int(seed))
        else:
            mod.manual_seed(int(seed))              # the current device's (MPS: its only one)


def keep_random_state(device) -> contextlib.AbstractContextManager:
    """Restore the CPU random state, and the accelerator's when ``device`` is one, on exit: a
    measurement samples, and must not move the run's own samples."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    index = device.index
    if index is None:
        index = getattr(torch, device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)
