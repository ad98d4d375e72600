"""Builders shared by every entry point: runtime set-up, models, grader, generator and collector.

`agro train` (:class:`agro.trainer.Trainer`), `agro generate` and `agro eval`
(:mod:`agro.workflows`) compose the same parts from their typed configs through these functions,
so a sampling setting or a precision rule lives in one place.

Departure from the paper: none (plumbing).
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from .collect import Collector
from .config import micro_batch_tokens_for
from .generation import SamplingParams, make_generator
from .logprobs import Reference
from .models import DEFAULT_MODEL, apply_lora, load_model, load_tokenizer, resolve_precision


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def default_device() -> torch.device:
    """The device a single-process command runs on: the current CUDA device if any, else CPU
    (the trainer gets its device from :class:`agro.distributed.Distributed`)."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def setup_runtime(cfg, rank: int = 0, device=None):
    """Resolve ``precision='auto'`` for ``device``, set torch's thread count and seed everything
    (``seed + 1000 * rank`` so data-parallel processes draw different samples).

    Returns a copy of ``cfg`` with the concrete precision; ``cfg`` itself is not modified.
    """
    cfg = dataclasses.replace(cfg, precision=resolve_precision(cfg.precision, device))
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed + 1000 * rank)
    return cfg


def follow_train_precision(cfg, requested: str, policy, reference):
    """`agro generate` / `agro eval` with precision=auto on a CPU where the flag rule says bf16:
    take instead what `agro train` measured to be faster for this model here
    (:func:`agro.perf.cached_precision_choice`), so a file generated now passes the training
    run's provenance check. Returns (cfg, note or None); ``reference.precision`` follows."""
    if requested != "auto" or cfg.precision != "bf16" or next(policy.parameters()).device.type != "cpu":
        return cfg, None
    from .perf import cached_precision_choice

    choice = cached_precision_choice(policy)
    if choice is None or choice == cfg.precision:
        return cfg, None
    if reference is not None:
        reference.precision = choice
    return dataclasses.replace(cfg, precision=choice), (
        f"precision: auto -> {choice} (what agro train measured to be faster for this model on "
        f"this machine; the CPU-flag rule alone would say {cfg.precision})")


def choose_linear_backend(cfg, model, *others, bf16: bool, follow: bool = False):
    """ModelFields.linear_backend: resolve 'auto' for ``model`` (:func:`agro.onednn_linear.
    resolve`; ``bf16``: the products will surely run in bf16, so nothing is timed; ``follow``: a
    choice made elsewhere, which falls back to aten where oneDNN cannot run) and install the
    choice on ``model`` and ``others`` (a separate reference model; the same model twice is fine).
    Returns (cfg with the concrete backend, a line for the log)."""
    from . import onednn_linear

    backend, line = onednn_linear.resolve(model, cfg.linear_backend, "bf16" if bf16 else "fp32",
                                          follow=follow)
    onednn_linear.use(backend, model, *others)
    return dataclasses.replace(cfg, linear_backend=backend), line


def build_policy_and_reference(model_spec: str | Path = DEFAULT_MODEL, precision: str = "fp32",
                               lora: bool = False, lora_r: int = 16, lora_alpha: int = 32,
                               lora_dropout: float = 0.0,
                               lora_target_modules: str | list[str] = "all-linear",
                               device: str | torch.device | None = None):
    """Load the policy (fp32 master weights), its tokenizer, and its reference.

    Full fine-tuning: the reference is a frozen deep copy taken before any update.
    LoRA: the policy is a PeftModel and the reference is the same model with adapters disabled.
    Returns ``(policy, tokenizer, reference)``. The policy is left in eval mode: agro scores and
    samples in eval mode only (:func:`agro.logprobs.scoring_mode`), so dropout never enters.
    """
    tok = load_tokenizer(model_spec)
    model = load_model(model_spec, dtype=torch.float32, device=device)
    if lora:
        policy = apply_lora(model, lora_r, lora_alpha, lora_dropout, lora_target_modules)
        ref = Reference.adapters_disabled(policy, precision)
    else:
        policy = model
        ref = Reference.frozen_copy(policy, precision)
    policy.eval()
    return policy, tok, ref


def build_models(cfg, device=None):
    """``(policy, tokenizer, reference)`` for a config with the model (and, for training, LoRA)
    fields; ``cfg.precision`` must already be concrete (:func:`setup_runtime`)."""
    lora = getattr(cfg, "lora", False)
    kw = dict(lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
              lora_target_modules=cfg.lora_target_modules) if lora else {}
    return build_policy_and_reference(cfg.model, precision=cfg.precision, lora=lora,
                                      device=device, **kw)


def build_grader(cfg, grader=None):
    """The run's grader: ``grader`` if given, else a new sandboxed one whose sandbox starts now,
    in the background (so the first hard answer does not wait for it)."""
    if grader is not None:
        return grader
    from .grading import Grader

    g = Grader(timeout=cfg.reward_timeout)
    start = getattr(g, "start", None)
    if start is not None:
        start()
    return g


def sampling_params(cfg) -> SamplingParams:
    """The training/generation sampling settings of a config with :class:`SamplingFields`."""
    return SamplingParams(cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k)


def build_generator(cfg, policy, tokenizer):
    kw = {}
    if cfg.generator == "vllm":
        kw = dict(sync_every=cfg.vllm_sync_every, kv_cache_gib=cfg.vllm_kv_cache_gib,
                  max_model_len=cfg.max_prompt_tokens + cfg.max_new_tokens, seed=cfg.seed,
                  gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    return make_generator(cfg.generator, policy, tokenizer, precision=cfg.precision,
                          batch_size=cfg.generation_batch_size, **kw)


def build_collector(cfg, *, tokenizer, generator, grader, reference, sampler,
                    flop_model=None) -> Collector:
    """The :class:`Collector` that turns the sampler's prompts into scored groups."""
    # the reference pass splits groups as the learner does (agro train); agro generate keeps the
    # Collector's defaults (8 groups, 4096 tokens per pass)
    split = dict(ref_micro_groups=cfg.micro_batch_groups, ref_micro_tokens=micro_batch_tokens_for(cfg)) \
        if hasattr(cfg, "micro_batch_tokens") else {}
    return Collector(tokenizer=tokenizer, generator=generator, grader=grader, reference=reference,
                     sampler=sampler, template=cfg.prompt_template, params=sampling_params(cfg),
                     group_size=cfg.group_size, max_prompt_tokens=cfg.max_prompt_tokens,
                     flop_model=flop_model, **split)
