"""Collect scored groups: prompts -> generation -> grading -> reference log-probs -> Group.

The :class:`Collector` is the one place where fresh data is made; the trainer's fresh, replay
and stale sources call it, and so does ``agro generate`` (which writes the groups to a file).
Reference log-probs are computed here, once per sample, at the same precision as the learner's
policy log-probs, and stored with the group: replayed and offline groups never recompute them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .faults import maybe_crash
from .generation import SamplingParams
from .perf import batch_flops
from .rollouts import Group, collate, split_groups
from .tasks import Example, render_prompt


@dataclass
class CollectStats:
    """Counters accumulated since the last `pop_stats()`."""

    groups: int = 0
    samples: int = 0
    completion_tokens: int = 0
    gen_seconds: float = 0.0
    decode_steps: int = 0              # sampler forward calls (each reads every weight once)
    ref_flops: float = 0.0             # estimated FLOPs of the reference passes (agro.perf)
    grade_seconds: float = 0.0
    ref_seconds: float = 0.0
    grade_timeouts: int = 0
    grade_errors: int = 0
    gold_unparsable: int = 0
    prompts_too_long: int = 0
    extra: dict = field(default_factory=dict)


class Collector:
    """Turns prompts into complete, scored groups with provenance."""

    def __init__(self, *, tokenizer, generator, grader, reference, sampler, template: str,
                 params: SamplingParams, group_size: int, max_prompt_tokens: int,
                 ref_micro_groups: int = 8, ref_micro_tokens: int = 4096, flop_model=None):
        self.tok = tokenizer
        self.generator = generator
        self.grader = grader
        self.reference = reference
        self.sampler = sampler
        self.template = template
        self.params = params
        self.n = group_size
        self.max_prompt_tokens = max_prompt_tokens
        self.ref_micro_groups = ref_micro_groups    # the learner's micro-batch split (split_groups)
        self.ref_micro_tokens = ref_micro_tokens
        self.flop_model = flop_model
        self.stats = CollectStats()

    def pop_stats(self) -> CollectStats:
        s, self.stats = self.stats, CollectStats()
        return s

    # -- the pipeline --------------------------------------------------------------------
    def __call__(self, k: int, version: int) -> list[Group]:
        """Sample k prompts from the training sampler and return their scored groups."""
        examples, prompt_ids = self.prompts(k)
        return self.collect(examples, prompt_ids, version, source="fresh")

    def prompts(self, k: int) -> tuple[list[Example], list[list[int]]]:
        """Draw up to k prompts from the training sampler, with their token ids; prompts too long
        for ``max_prompt_tokens`` (or the sampler's ``max_model_len``) are skipped and counted."""
        examples: list[Example] = []
        ids: list[list[int]] = []
        tries = 0
        while len(examples) < k and tries < 20:
            tries += 1
            for ex in self.sampler.sample(k - len(examples)):
                p = self.encode(ex)
                if len(p) > self.max_prompt_tokens or len(p) + self.params.max_new_tokens > \
                        getattr(self.generator, "max_model_len", float("inf")):
                    self.stats.prompts_too_long += 1
                    continue
                examples.append(ex)
                ids.append(p)
        return examples, ids

    def encode(self, ex: Example) -> list[int]:
        text = render_prompt(self.tok, ex, self.template)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def collect(self, examples: list[Example], prompt_ids: list[list[int]], version: int,
                source: str = "fresh") -> list[Group]:
        if not examples:
            return []
        t0 = time.perf_counter()
        steps0 = getattr(self.generator, "decode_steps", 0)
        gens = self.generator.generate(prompt_ids, self.n, self.params)
        t1 = time.perf_counter()
        self.stats.decode_steps += getattr(self.generator, "decode_steps", 0) - steps0
        maybe_crash("collect")
        texts = [t for g in gens for t in g.texts]
        answers = [ex.answer for ex in examples for _ in range(self.n)]
        graded = self.grader.grade(texts, answers)
        t2 = time.perf_counter()
        self.stats.grade_timeouts += graded.timeouts
        self.stats.grade_errors += graded.errors
        # a sampler that is behind the policy (generator=vllm, vllm_sync_every > 1) dates its
        # groups by the version it held; one whose samples are only close to pi says so
        sampled_at = version - getattr(self.generator, "lag", 0) if version >= 0 else version
        meta = {"sampler": getattr(self.generator, "name", "")}
        if not getattr(self.generator, "exact", True):
            meta["pi_exact"] = False
        groups: list[Group] = []
        for j, (ex, gen) in enumerate(zip(examples, gens)):
            rewards = graded.rewards[j * self.n:(j + 1) * self.n]
            if any(r is None for r in rewards):   # gold answer unparsable: skip, counted
                self.stats.gold_unparsable += 1
                continue
            groups.append(Group(
                prompt_id=ex.id, prompt_ids=list(gen.prompt_ids),
                completion_ids=[list(c) for c in gen.completion_ids],
                rewards=[float(r) for r in rewards], correct=[float(r) for r in rewards],
                behavior_logprobs=[list(map(float, lp)) for lp in gen.logprobs],
                prompt=self.tok.decode(gen.prompt_ids), completions=list(gen.texts),
                answer=ex.answer, source=source, policy_version=sampled_at,
                temperature=self.params.temperature, top_p=self.params.top_p,
                top_k=self.params.top_k, meta=dict(meta),
            ))
        self.stats.ref_flops += self.attach_ref_logprobs(groups)
        t3 = time.perf_counter()
        st = self.stats
        st.groups += len(groups)
        st.samples += len(groups) * self.n
        st.completion_tokens += sum(len(c) for g in groups for c in g.completion_ids)
        st.gen_seconds += t1 - t0
        st.grade_seconds += t2 - t1
        st.ref_seconds += t3 - t2
        return groups

    def attach_ref_logprobs(self, groups: list[Group]) -> float:
        """Fill `ref_logprobs` of each group (computed once, stored with the group); returns the
        estimated FLOPs spent (0 without a flop model)."""
        return attach_ref_logprobs(groups, self.reference, self.tok.pad_token_id,
                                   self.ref_micro_groups, self.flop_model, self.ref_micro_tokens)


@torch.no_grad()
def attach_ref_logprobs(groups: list[Group], reference, pad_token_id: int,
                        groups_per_batch: int, flop_model=None, max_tokens: int = 0) -> float:
    """Set ``g.ref_logprobs`` ([n][T_i] floats) of every group from ``reference``, scoring whole
    groups on the reference's device, at most ``groups_per_batch`` and ``max_tokens`` tokens per
    pass (:func:`agro.rollouts.split_groups`). Returns the passes' estimated FLOPs
    (:func:`agro.perf.batch_flops`; 0 without ``flop_model``)."""
    flops = 0.0
    for mb in split_groups(groups, groups_per_batch, max_tokens):
        batch = collate(mb, pad_token_id, current_version=-1, require_ref=False).to(reference.device)
        if flop_model is not None:
            flops += batch_flops(flop_model, batch, backward=False)
        lp = reference.token_logprobs(batch.input_ids, batch.attention_mask, batch.completion_ids,
                                      batch.prompt_len, batch.group_size).float().cpu()
        b = 0
        for g in mb:
            g.ref_logprobs = []
            for c in g.completion_ids:
                g.ref_logprobs.append(lp[b, :len(c)].tolist())
                b += 1
    return flops
