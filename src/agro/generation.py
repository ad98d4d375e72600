"""Generation: the :class:`Generator` interface the trainer talks to, and its Hugging Face
implementation :class:`HFGenerator` (batched ``model.generate`` with a KV cache).

A generator returns, per prompt, ``n`` completions (EOS included when emitted, nothing after
it) and the *behaviour* log-probabilities ``log mu(y_t | x, y_<t)`` of the distribution it
actually sampled from (agro_math.md §0: ``mu`` is the behaviour policy). With temperature 1,
top_p 1 and top_k 0 that distribution is ``pi`` itself; the sampling settings are passed
explicitly so no checkpoint default (e.g. ``top_k=50`` in many generation_config.json files)
can change it.

Implementation note (same numbers as ``output_scores``, far less memory): instead of
``output_scores=True`` (which keeps a [B, V] fp32 tensor per generated token, T*B*V*4 bytes:
6.4 GB at B=64, T=512, V=49k), the temperature / top-k / top-p warpers are applied by our own
logits-processor list, whose last member records the fp32 log-softmax of the processed scores
and gathers the sampled token's entry one step later. Peak extra memory is one [B, V] tensor.
HF samples from the softmax of exactly these processed scores.

Departure from the paper: none (AGRO itself needs no behaviour log-probs; they are logged to
check that sampling is from pi and used by diagnostics).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

from . import fast_decode
from .logprobs import accepts_logits_to_keep, position_ids_from_mask
from .models import autocast_ctx, bf16_copy, hf_model, is_bf16, is_peft, neutral_generation_config
from .rollouts import samples_from_pi


@dataclass
class SamplingParams:
    """How to sample. ``temperature=1, top_p=1, top_k=0, greedy=False`` samples from pi."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def samples_from_pi(self) -> bool:
        """True if samples are drawn from pi itself (on-policy settings)."""
        return samples_from_pi(self.temperature, self.top_p, self.top_k, self.greedy)


@dataclass
class Generation:
    """One prompt's ``n`` completions.

    ``completion_ids[i]`` ends with EOS if one was emitted (nothing after it);
    ``logprobs[i][t]`` is the fp32 behaviour log-prob of token t under the sampling distribution
    actually used (after temperature / top-k / top-p; for greedy, the untempered model's).
    """

    prompt_ids: list[int]
    completion_ids: list[list[int]]   # [n][T_i]
    logprobs: list[list[float]]       # [n][T_i]
    texts: list[str]                  # [n] decoded (special tokens skipped)


@runtime_checkable
class Generator(Protocol):
    """What the trainer needs from a sampler (HF now; a vLLM backend would implement the same)."""

    name: str

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                 max_rows: int | None = None) -> list[Generation]:
        """``n`` completions for each prompt, in prompt order. ``max_rows``: sequences per
        internal batch for this call (default the generator's ``batch_size``; a sampler that
        schedules its own memory, vLLM, ignores it)."""
        ...

    def sync_weights(self, model) -> None:
        """Make the sampler use ``model``'s current weights (a no-op when it shares them)."""
        ...

    # Optional attributes (read with getattr, default in brackets): ``lag`` [0], the policy
    # versions its weights are behind the model last passed to sync_weights; ``exact`` [True],
    # whether its samples count as draws from pi for the on-policy-only terms (set by
    # ``check_against``, agro.sampler_check).


class _BehaviourRecorder:
    """Logits processor placed last: records ``log softmax(processed scores)`` (fp32) and, one
    call later, gathers the entry of the token that was sampled from it."""

    def __init__(self):
        self.steps: list[torch.Tensor] = []     # each [b] fp32: log-prob of token at step k
        self._pending: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self.steps.append(self._pending.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self._pending = torch.log_softmax(scores.float(), dim=-1)  # [b, V]
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """new_tokens [b, Tg] (generated part of the sequences) -> [b, Tg] fp32 log-probs."""
        Tg = new_tokens.shape[1]
        k = len(self.steps)  # the pending entry belongs to step k
        if self._pending is not None and k < Tg:
            self.steps.append(self._pending.gather(-1, new_tokens[:, k:k + 1]).squeeze(-1))
        self._pending = None
        if len(self.steps) < Tg:
            raise RuntimeError(f"behaviour recorder saw {len(self.steps)} steps for {Tg} tokens")
        if Tg == 0:
            return torch.zeros(new_tokens.shape[0], 0)
        return torch.stack(self.steps[:Tg], dim=1)  # extra (undone) steps are dropped


def _warpers(params: SamplingParams) -> list:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    if params.greedy:
        return []
    out = []
    if not math.isclose(params.temperature, 1.0):
        out.append(TemperatureLogitsWarper(float(params.temperature)))
    if params.top_k > 0:
        out.append(TopKLogitsWarper(top_k=int(params.top_k)))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=float(params.top_p)))
    return out


def _rows_per_call(batch_size: int, max_rows: int | None) -> int:
    if max_rows is None:
        return batch_size
    if int(max_rows) < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}")
    return int(max_rows)


def sampler_row_bytes(model, precision: str, columns: int) -> int | None:
    """Estimated bytes one sampled row holds at its peak in a call of agro's samplers
    (:class:`CachedGenerator`, :class:`HFGenerator`): its keys and values over ``columns``
    positions (prompt + new tokens; bf16/fp16 for those precisions, else fp32), counted twice
    (the prefill's cache and the static one it is copied into coexist for a moment, as do a
    growing cache and its concatenation), and four fp32 vocabulary-wide vectors (logits, warped
    scores, log-probs, probabilities). None when the model's config does not say its layers,
    heads and vocabulary. Assumes keys and values of ``hidden_size / num_attention_heads`` (or
    ``head_dim``) per KV head: a model with compressed or differently sized keys and values
    (DeepSeek's latent attention) is estimated from its config's fields as if it had none."""
    cfg = getattr(hf_model(model), "config", None)
    if cfg is None:
        return None
    try:                                   # a multimodal config's decoder (the one sampled)
        cfg = cfg.get_text_config(decoder=True)
    except (AttributeError, TypeError, ValueError):
        pass
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    vocab = getattr(cfg, "vocab_size", None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, heads, hidden, vocab)):
        return None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    width = 2 if precision in ("bf16", "fp16") else 4
    kv = 2 * layers * kv_heads * head_dim * width * int(columns)     # keys and values
    return 2 * kv + 4 * vocab * 4


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [b, P] long, attention mask [b, P] long), left-padded to the longest."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_token_id, dtype=torch.long)
    am = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            am[i, P - len(p):] = 1
    return ids, am


def _check_request(prompt_ids: list[list[int]], n: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("empty prompt: every prompt needs at least one token")


@contextlib.contextmanager
def _generation_mode(model, gen_config):
    """Eval mode and a clean ``generation_config`` (nothing inherited) for the duration."""
    hf = hf_model(model)
    was_training = model.training
    old_gc = hf.generation_config
    model.eval()
    hf.generation_config = gen_config
    try:
        yield
    finally:
        hf.generation_config = old_gc
        model.train(was_training)


class HFGenerator:
    """Batched sampling with ``model.generate`` (KV cache, left padding).

    Args:
        model: a causal LM or PeftModel (the policy itself: weights are shared, not copied).
        tokenizer: its tokenizer (EOS and pad ids; decoding).
        precision: 'fp32' (default) or 'bf16' (forward passes under bf16 autocast: the sampling
            distribution is then the bf16 model's, only approximately pi; the log-softmax of the
            processed scores is fp32 either way). Measured on the 2-core AVX2 CPU (SmolLM2-135M,
            8 prompts x 4 samples x 64 tokens): fp32 15.6 s, bf16 50.9 s, because bf16 matmuls
            are emulated there; on GPUs bf16 is the faster choice.
        batch_size: maximum sequences (prompts x n) per ``generate`` call.

    Randomness comes from torch's global RNG: ``torch.manual_seed(s)`` before :meth:`generate`
    reproduces the samples (same device and thread count).
    """

    name = "hf"

    def __init__(self, model, tokenizer, precision: str = "fp32", batch_size: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        autocast_ctx(precision)  # validates the name
        self.tokenizer = tokenizer
        self.precision = precision
        self.exact = True        # do its samples count as draws from pi? (check_against decides)
        self.mismatch = None     # agro.sampler_check.Mismatch, once measured
        self.record: dict | None = None   # the run's decision and its figures (checkpointed)
        self.model = None
        self.sync_weights(model)
        self.batch_size = int(batch_size)
        self.decode_steps = 0   # model forward calls made while sampling (each reads every weight)
        eos = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        self._eos = [eos] if eos is not None else []
        stop = neutral_generation_config(model, self._eos, self.pad_token_id).eos_token_id
        self.stop_ids: set[int] = set(stop if isinstance(stop, list) else ([stop] if stop is not None else []))
        if not self.stop_ids:
            raise ValueError("tokenizer/model define no EOS token: generation could not stop")

    def check_against(self, model, precision: str, prompt_ids: list[list[int]], n: int,
                      params: SamplingParams, rule: str, tol: float,
                      previous: dict | None = None) -> list[str]:
        """Measure this sampler against the learner ``model`` and apply the run's rule
        (:func:`agro.sampler_check.decide`)."""
        from .sampler_check import decide

        return decide(self, model, self.tokenizer, precision, prompt_ids, n, params, rule, tol,
                      previous)

    def sync_weights(self, model) -> None:
        """Sample from ``model``'s current weights. fp32, LoRA, or a model already in bf16 (the
        trainer passes its bf16 working copy, agro.models.MasterWeights, refreshed in place after
        each optimizer step): the object itself. bf16 with fp32 weights (`agro generate`, `agro
        eval`, a library user): a bf16 copy, made once and refreshed here, so each decode step
        reads half the bytes and autocast does not recast every weight at every token (measured
        on SmolLM2-135M, 2 cores, 32 x 32 tokens: 4.2 s with autocast on fp32 weights, 3.0 s on
        the bf16 copy; docs/RESULTS.md)."""
        if self.precision != "bf16" or is_peft(model) or is_bf16(model):
            # LoRA: a bf16 copy would duplicate the frozen base (memory is why LoRA is chosen);
            # such runs sample under autocast from the policy itself. A model already in bf16
            # (the trainer's working copy, agro.models.MasterWeights) is sampled from as it is.
            self.model = model
            return
        if self.model is None or getattr(self, "_source", None) is not model:
            self.model = bf16_copy(model)
            self._source = model
            return
        with torch.no_grad():
            for dst, src in zip(self.model.parameters(), model.parameters()):
                if src.requires_grad:
                    dst.copy_(src)

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams):
        """prompts: b token lists -> (new_tokens [b, Tg] long, logprobs [b, Tg] fp32) on CPU."""
        from transformers import LogitsProcessorList

        dev = next(self.model.parameters()).device
        ids, am = left_pad(prompts, self.pad_token_id)                   # [b, P] each
        P = ids.shape[1]
        recorder = _BehaviourRecorder()
        procs = LogitsProcessorList([*_warpers(params), recorder])
        # HF itself adds no warper (temperature 1, top_k 0, top_p 1): ours are in `procs`.
        gc = neutral_generation_config(self.model, self._eos, self.pad_token_id, greedy=params.greedy)
        gc.max_new_tokens = int(params.max_new_tokens)
        gc.num_beams = 1
        gc.num_return_sequences = 1
        gc.use_cache = True
        with _generation_mode(self.model, gc), autocast_ctx(self.precision, dev), torch.no_grad():
            seqs = self.model.generate(input_ids=ids.to(dev), attention_mask=am.to(dev),
                                       generation_config=gc, logits_processor=procs)
        new = seqs[:, P:]                                                # [b, Tg]
        self.decode_steps += int(new.shape[1])
        lps = recorder.finish(new)                                       # [b, Tg] fp32
        return new.cpu(), lps.float().cpu()

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                 max_rows: int | None = None) -> list[Generation]:
        """``n`` completions per prompt; rows ``prompts x n`` are batched ``max_rows`` (default
        ``batch_size``) at a time."""
        _check_request(prompt_ids, n)
        per_call = _rows_per_call(self.batch_size, max_rows)
        flat = [i for i in range(len(prompt_ids)) for _ in range(n)]    # prompt index per row
        comp: list[list[int]] = []
        lps: list[list[float]] = []
        for s in range(0, len(flat), per_call):
            rows = flat[s:s + per_call]
            new, lp = self._generate_batch([list(prompt_ids[i]) for i in rows], params)
            for r in range(new.shape[0]):
                toks = new[r].tolist()
                end = len(toks)
                for t, tok in enumerate(toks):
                    if tok in self.stop_ids:
                        end = t + 1  # keep EOS, drop what follows (padding)
                        break
                comp.append(toks[:end])
                lps.append(lp[r, :end].tolist())
        out = []
        for i, p in enumerate(prompt_ids):
            c = comp[i * n:(i + 1) * n]
            out.append(Generation(
                prompt_ids=list(p), completion_ids=c, logprobs=lps[i * n:(i + 1) * n],
                texts=[self.tokenizer.decode(x, skip_special_tokens=True) for x in c],
            ))
        return out


_CDF_BLOCK = 1024
"""Vocabulary entries per block of :func:`inverse_cdf`'s two-level search."""

_CDF_SUM_ELEMS = 1 << 19
""":func:`inverse_cdf` sums its blocks in float64 this many probabilities (4 MiB of float64) at
a time, not as one float64 copy of all of them (12.6 MB at a [32, 49,152] decode step). Under
jemalloc (which ``agro train`` runs on: agro.allocator) every block of that size came back from
the system with its pages faulted in again. The 4 MiB blocks were not free either: in the bench's
processes the draw took 2.98-3.28 ms in rows against 3.61-3.98 ms with one copy,
and a default-job sampling call 0.90-0.97x as long,
noisy (2 cores, AMD EPYC Zen 5; ``bench/sampler_draw_ab.py``, two runs of each precision;
docs/RESULTS.md, "AMD EPYC (Zen 5), 2026-12-05 (second)")."""


def inverse_cdf(p: torch.Tensor, r: torch.Tensor, block: int = _CDF_BLOCK) -> torch.Tensor:
    """Per row, the smallest index ``k`` with ``cumsum(p)[k] > u``, ``u = r * sum(p)``:
    p [b, V] >= 0 (fp32 or fp64, unnormalised), r [b, 1] float64 in [0, 1) -> [b] long.

    Two levels, both summed in float64: the sums of blocks of ``block`` entries, their cumulative
    sum and a search for the block; then the cumulative sum of that one block. Same index as one
    float64 cumulative sum over all V entries (up to the order of float64 additions), at a
    fraction of its cost. Flat stretches (zero probabilities) are skipped (``right=True``).
    """
    b, V = p.shape
    nb = -(-V // block)
    if nb * block != V:
        p = torch.nn.functional.pad(p, (0, nb * block - V))
    pb = p.view(b, nb, block)                                           # [b, nb, block]
    rows = max(1, _CDF_SUM_ELEMS // (nb * block))       # no [b, V] float64 copy (_CDF_SUM_ELEMS)
    starts = range(0, max(b, 1), rows)                  # b = 0: one empty chunk, an empty result
    bcdf = torch.cat([pb[s:s + rows].sum(-1, dtype=torch.float64) for s in starts]).cumsum(-1)  # [b, nb]
    u = r * bcdf[:, -1:]                                                # [b, 1]
    j = torch.searchsorted(bcdf, u, right=True).clamp_(max=nb - 1)      # [b, 1] block
    before = torch.where(j > 0, bcdf.gather(-1, (j - 1).clamp(min=0)), torch.zeros_like(u))
    inner = pb[torch.arange(b, device=p.device), j.squeeze(-1)].double().cumsum(-1)  # [b, block]
    k = torch.searchsorted(inner, u - before, right=True).clamp_(max=block - 1)     # [b, 1]
    return (j * block + k).squeeze(-1).clamp_(max=V - 1)


def sample_from_logprobs(logp: torch.Tensor) -> torch.Tensor:
    """One draw per row from ``softmax = exp(logp)``: [b, V] fp32 log-probs -> [b] token ids.

    Inverse CDF (:func:`inverse_cdf`, float64 sums) with one uniform per row (``torch.rand``,
    the global generator). ``torch.multinomial`` draws an exponential variate per vocabulary
    entry (measured 35 ms per step at b=32, V=49152 here, a fifth of all sampling time); one
    float64 cumulative sum over V took 13.6 ms, the two-level search 4.6 ms (2 cores, AMD EPYC
    Zen 4). A token of probability 0 (masked by top-k/top-p) is never drawn: flat stretches of
    the CDF are skipped, and a draw that rounding puts on one is redrawn by ``multinomial``.
    """
    p = logp.float().exp()                                              # [b, V]
    r = torch.rand(p.shape[0], 1, dtype=torch.float64, device=p.device)  # [b, 1]
    tok = inverse_cdf(p, r)                                             # [b]
    bad = p.gather(-1, tok[:, None]).squeeze(-1) <= 0                   # rounding at the edge
    if bool(bad.any()):
        tok[bad] = torch.multinomial(p[bad], 1).squeeze(-1)
    return tok


class CachedGenerator(HFGenerator):
    """agro's own sampling loop on the model's KV cache (the default; ``generator=hf`` is the
    plain ``model.generate`` path). Same distribution, same outputs' format, less work:

    * each prompt is prefilled once and its cache repeated for its ``n`` samples
      (``generate`` prefills all ``prompts x n`` rows);
    * rows that emitted EOS leave the batch (their cache rows are dropped), so the cost of a
      step follows the number of unfinished samples, not the longest one (on the static cache
      they are dropped once a quarter of the rows are done, ``compact_at``: each drop copies the
      cache, and a small-batch decode step costs about the same at 24 rows as at 32);
    * one uniform per row and an inverse-CDF draw (:func:`sample_from_logprobs`) instead of
      ``torch.multinomial``'s exponential variate per vocabulary entry;
    * for Llama-family models on a CPU (:func:`agro.fast_decode.applies`), the decode steps run
      on a preallocated KV cache (bf16 for bf16 weights, else fp32; scores soft-maxed in fp32)
      (:class:`agro.fast_decode.StaticDecoder`), its weight matmuls, where
      :func:`agro.fast_decode.packing_applies` and at least ``PACK_MIN_NEW_TOKENS`` new tokens
      are asked for, on a copy of the weights packed for oneDNN once per :meth:`generate` call
      and freed when it returns (:class:`agro.fast_decode.PackedWeights`); other models, LoRA
      and GPUs keep transformers' forward and cache (``static_cache = False`` forces that
      path).

    Temperature / top-k / top-p use the same transformers warpers as :class:`HFGenerator`; the
    recorded behaviour log-probs are the fp32 log-softmax of the warped scores, of the token drawn.
    Measured on the default job (SmolLM2-135M, 8 prompts x 4 samples x 32 tokens, fp32, 2 cores):
    see docs/RESULTS.md.
    """

    name = "cached"
    static_cache = True
    compact_at = 0.75
    """Static cache: drop finished rows once the live ones are at most this fraction of its rows
    (1.0: at every finish)."""

    def generate(self, prompt_ids: list[list[int]], n: int, params: SamplingParams,
                 max_rows: int | None = None) -> list[Generation]:
        _check_request(prompt_ids, n)
        per_call = max(1, _rows_per_call(self.batch_size, max_rows) // n)  # prompts per batch
        out: list[Generation] = []
        # the static decoder's weights packed once for all of this call's chunks, then freed (a
        # copy of the weights: it must not outlive sampling, or it would sit beside the learner's
        # activations at the step's peak)
        packed = None
        if self.static_cache and fast_decode.applies(self.model, self.precision) \
                and int(params.max_new_tokens) >= fast_decode.PACK_MIN_NEW_TOKENS:
            packed = fast_decode.PackedWeights.of(self.model)
        for s in range(0, len(prompt_ids), per_call):
            chunk = [list(p) for p in prompt_ids[s:s + per_call]]
            comps, lps = self._sample(chunk, n, params, packed)
            for i, p in enumerate(chunk):
                c = comps[i * n:(i + 1) * n]
                out.append(Generation(
                    prompt_ids=p, completion_ids=c, logprobs=lps[i * n:(i + 1) * n],
                    texts=[self.tokenizer.decode(x, skip_special_tokens=True) for x in c]))
        return out

    @torch.no_grad()
    def _sample(self, prompts: list[list[int]], n: int, params: SamplingParams,
                packed: "fast_decode.PackedWeights | None" = None):
        """G prompts -> (G*n completions, G*n behaviour log-prob lists), row g*n+i = sample i of g.
        ``packed``: the model's packed weights for the static decoder (None: its modules')."""

        model = self.model
        dev = next(model.parameters()).device
        G = len(prompts)
        ids, am = left_pad(prompts, self.pad_token_id)                   # [G, P] each
        ids, am = ids.to(dev), am.to(dev)
        keep1 = {"logits_to_keep": 1} if accepts_logits_to_keep(type(hf_model(model))) else {}
        warpers = _warpers(params)
        stop = torch.tensor(sorted(self.stop_ids), dtype=torch.long, device=dev)
        B, T = G * n, int(params.max_new_tokens)
        tokens = torch.full((B, T), self.pad_token_id, dtype=torch.long)  # [B, T]
        logps = torch.zeros((B, T), dtype=torch.float32)                 # [B, T]
        length = torch.zeros(B, dtype=torch.long)                        # [B]
        was_training = model.training
        model.eval()
        try:
            with autocast_ctx(self.precision, dev):
                out = model(input_ids=ids, attention_mask=am, position_ids=position_ids_from_mask(am),
                            use_cache=True, **keep1)
            self.decode_steps += 1
            logits = out.logits[:, -1].float().repeat_interleave(n, dim=0)  # [B, V]
            cache = out.past_key_values
            cache.batch_repeat_interleave(n)
            am = am.repeat_interleave(n, dim=0)                          # [B, P]
            pos = am.sum(-1)                                             # [B] next position
            rows = torch.arange(B)                                       # output row of each live row
            static = slot = None
            if self.static_cache and fast_decode.applies(model, self.precision):
                static = fast_decode.StaticDecoder.from_prefill(model, cache, am, T, packed)
                out = cache = None          # the prefill's cache now lives in the static one
                slot = torch.arange(B, device=dev)                       # static row of each live row
            for t in range(T):
                scores = logits
                for w in warpers:
                    scores = w(None, scores)
                logp = torch.log_softmax(scores.float(), dim=-1)         # [b, V]
                tok = logp.argmax(-1) if params.greedy else sample_from_logprobs(logp)  # [b]
                tokens[rows, t] = tok.cpu()
                logps[rows, t] = logp.gather(-1, tok[:, None]).squeeze(-1).cpu()
                length[rows] = t + 1
                live = ~torch.isin(tok, stop)                            # [b]
                if t == T - 1 or not bool(live.any()):
                    break
                if not bool(live.all()):
                    idx = live.nonzero().squeeze(-1)
                    if static is not None:
                        slot = slot[idx]
                        if len(slot) <= self.compact_at * static.rows:
                            static.select(slot)
                            slot = torch.arange(len(slot), device=dev)
                    else:
                        cache.batch_select_indices(idx)
                    am, pos, tok, rows = am[idx], pos[idx], tok[idx], rows[idx.cpu()]
                if static is not None:
                    logits = static.step_rows(slot, tok, pos).float()    # [b, V]
                else:
                    am = torch.cat([am, am.new_ones(am.shape[0], 1)], dim=1)
                    with autocast_ctx(self.precision, dev):
                        out = model(input_ids=tok[:, None], attention_mask=am, position_ids=pos[:, None],
                                    past_key_values=cache, use_cache=True, **keep1)
                    logits = out.logits[:, -1].float()                   # [b, V]
                self.decode_steps += 1
                pos = pos + 1
        finally:
            model.train(was_training)
        comps = [tokens[r, :length[r]].tolist() for r in range(B)]
        lps = [logps[r, :length[r]].tolist() for r in range(B)]
        return comps, lps


def _vllm_generator(model, tokenizer, **kw) -> Generator:
    from .vllm_generator import VLLMGenerator   # optional dependency: imported only when asked

    return VLLMGenerator(model, tokenizer, **kw)


_GENERATORS: dict[str, Callable[..., Generator]] = {"hf": HFGenerator, "cached": CachedGenerator,
                                                    "vllm": _vllm_generator}


def available_generators() -> list[str]:
    return sorted(_GENERATORS)


def make_generator(name: str, model, tokenizer, **kw) -> Generator:
    """Build a registered generator by name ('cached': agro's KV-cache loop; 'hf': generate();
    'vllm': agro.vllm_generator, an optional dependency)."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown generator {name!r}; valid: {', '.join(available_generators())}")
    return _GENERATORS[name](model, tokenizer, **kw)
