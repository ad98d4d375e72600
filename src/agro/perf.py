"""Where a step's time goes, measured against what this machine can do.

* :class:`FlopModel`: matmul FLOPs of a causal LM's passes, from its linear layers (the decoder's
  and the LM head's, which agro runs only where logits are needed) plus attention scores.
  Forward = 2 FLOPs per weight per token; backward = 2x forward.
* :func:`batch_flops`: the FLOPs of one log-prob pass over a collated batch as agro runs it
  (each group's prompt once, then its n completions' real tokens; the head on them only).
* :func:`matmul_peak`: this machine's measured GEMM rate per dtype on the model's own layer
  shapes (a short timing at each run's start), the yardstick for "fraction of peak".
* :func:`phase_rates`: per-step rates for metrics.jsonl: learner and reference in TFLOP/s and as
  a fraction of the measured peak of the precision in use; sampling in tokens/s and GB/s of
  weights read (each decode step reads every weight once).

These are estimates of the work done, written down so they can be checked: they count the
padded shapes agro actually computes, not only useful tokens. Departure from the paper: none.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .fileio import CACHE_ENV, cache_root  # noqa: F401  (CACHE_ENV: tests and benches)
from .models import cpu_flags, device_of, hf_model


@dataclass(frozen=True)
class FlopModel:
    """Sizes that set a causal LM's matmul FLOPs.

    decoder_params: weights of the linear layers below the LM head (all layers, all heads).
    head_params:    V x H, the LM head (tied or not).
    layers, hidden: for the attention-score FLOPs (QK^T and AV: 4 * L_q * L_k * d per layer, with
                    d = heads x head_dim, which is the hidden size unless the config sets head_dim).
    frozen_base:    only adapters train (LoRA): the backward pass computes activation gradients
                    but no weight gradients for the base, so it costs ~1x the forward, not 2x.
    weight_bytes:   bytes of all parameters as stored (what a decode step reads).
    packable:       the model takes the padding-free packed pass (a plain LM head:
                    :func:`agro.logprobs._decoder_parts`, no short sliding window); otherwise the
                    padded two-pass one.
    block_attention: its packed passes from :func:`agro.logprobs.block_min_len` on compute
                    attention by blocks (:func:`agro.logprobs.packed_block_attention`), whose
                    query-key pairs are :func:`agro.logprobs.block_dims`'s, not the dense mask's
                    L^2 (as the model was when this was made: a later fallback to the dense
                    mask, which warns, is not seen here).
    device_type:    where the model's passes run ("cpu", "cuda", ...): it sets that threshold.
    """

    decoder_params: int
    head_params: int
    layers: int
    hidden: int
    weight_bytes: int
    frozen_base: bool = False
    packable: bool = True
    block_attention: bool = True
    device_type: str = "cpu"

    @classmethod
    def of(cls, model) -> "FlopModel":
        hf = hf_model(model)
        head = hf.get_output_embeddings()
        head_w = head.weight if head is not None else None
        dec = 0
        for m in hf.modules():
            if isinstance(m, torch.nn.Linear) and m is not head:
                dec += m.weight.numel()
        cfg = hf.config
        layers = int(getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", 0)) or 0)
        hidden = int(getattr(cfg, "hidden_size", getattr(cfg, "n_embd", 0)) or 0)
        heads, head_dim = getattr(cfg, "num_attention_heads", None), getattr(cfg, "head_dim", None)
        if heads and head_dim:
            hidden = int(heads) * int(head_dim)
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        frozen = 0 < trainable < 0.5 * sum(p.numel() for p in model.parameters())
        from .logprobs import _block_attention_usable, _decoder_parts, _short_sliding_window

        parts = _decoder_parts(model)
        windowed = parts is not None and _short_sliding_window(getattr(parts[0], "config", None))
        return cls(dec, head_w.numel() if head_w is not None else 0, layers, hidden, wbytes, frozen,
                   packable=parts is not None and not windowed,
                   block_attention=parts is not None and _block_attention_usable(parts[0]),
                   device_type=device_of(model).type)

    def forward(self, tokens: int, head_tokens: int, attn_pairs: int) -> float:
        """Forward FLOPs: ``tokens`` through the decoder, ``head_tokens`` through the LM head,
        ``attn_pairs`` = sum over sequences of L_q * L_k computed by attention."""
        return (2.0 * self.decoder_params * tokens + 2.0 * self.head_params * head_tokens
                + 4.0 * self.layers * self.hidden * attn_pairs)


def batch_flops(fm: FlopModel, batch, backward: bool, head_all: bool = False) -> float:
    """FLOPs of one log-prob pass over a collated :class:`agro.rollouts.Batch` as agro runs it.

    The padding-free packed pass (:func:`agro.logprobs._packed_group_hidden`) where it applies:
    each group's real prompt tokens once plus its completions' real tokens, the groups padded to
    the longest rounded up to SHAPE_BUCKET, the LM head on the real completion tokens (their
    count rounded up too), never more than the padded layout (:func:`agro.logprobs.packed_width`).
    Otherwise the padded ``[P + n(T-1)]`` layout. ``head_all``: the LM
    head runs on all B x T completion positions (a loss that needs the full logits,
    ``with_logits``). With the backward pass x3 (x2 when only adapters train: no weight
    gradients for the frozen base)."""
    from . import logprobs as lp
    from .logprobs import PACKED_MAX_LEN, packed_group_len, packed_group_lengths, packed_width

    B, T = batch.completion_ids.shape
    n = max(1, batch.group_size)
    G, P = B // n, batch.prompt_len
    lengths = packed_group_lengths(batch.attention_mask, P, T, n) \
        if fm.packable and n > 1 and T > 1 and P >= 1 else None
    if lengths is not None and (int(lengths[0].min()) < 1
                                or int(packed_group_len(*lengths, n).max()) > PACKED_MAX_LEN):
        lengths = None
    if lengths is not None:
        plen, clen = lengths
        glen = packed_group_len(plen, clen, n)                           # [G]
        blocks = (glen >= lp.block_min_len(fm.device_type)) & fm.block_attention  # per group
        tokens = pairs = 0
        for use in (False, True):                                        # one pass per path
            gsel = (blocks == use).nonzero().squeeze(-1)
            if not len(gsel):
                continue
            rsel = (gsel[:, None] * n + torch.arange(n)).reshape(-1)
            L = packed_width(int(glen[gsel].max()), P + n * (T - 1))
            tokens += len(gsel) * L
            if use:
                Pp, Tm = lp.block_dims(plen[gsel], (clen[rsel] - 1).clamp(min=0), L)
                pairs += len(gsel) * Pp * Pp + len(rsel) * Tm * (Pp + Tm)
            else:
                pairs += len(gsel) * L * L
        head = B * T if head_all else packed_width(int(clen.sum()), B * T)
    else:
        L, head = P + n * max(0, T - 1), B * T
        tokens, pairs = G * L, G * L * L
    fwd = fm.forward(tokens=tokens, head_tokens=head, attn_pairs=pairs)
    if not backward:
        return fwd
    return fwd * (2.0 if fm.frozen_base else 3.0)


# --------------------------------------------------------------------------- measured peak
def _cache_path() -> Path:
    return cache_root() / "machine.json"


def machine_key(device: torch.device | str = "cpu") -> str:
    """What a cached measurement is valid for: CPU model and flags (or GPU name), threads, torch."""
    dev = torch.device(device)
    if dev.type == "cuda":
        what = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or ""
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        simd = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx")))
        what = f"{name} [{' '.join(simd)}] threads={torch.get_num_threads()}"
    return f"{dev.type}: {what} | torch {torch.__version__}"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(key: str, sub: str, value) -> None:
    from .fileio import atomic_write_text

    data = _load_cache()
    data.setdefault(key, {})[sub] = value
    try:
        atomic_write_text(_cache_path(), json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass   # a read-only home: measure again next time


def _gemm_rate(m: int, k: int, n: int, dtype: torch.dtype, device, seconds: float,
               onednn: bool = False) -> float:
    """FLOP/s of an [m, k] @ [k, n] product, repeated for ``seconds``: ``a @ b`` (PyTorch's own
    GEMM), or with ``onednn`` oneDNN's (:mod:`agro.onednn_linear`, on a CPU)."""
    g = torch.Generator().manual_seed(0)   # a local generator: the run's RNG streams are untouched
    a = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=g).to(device=device, dtype=dtype)
    if onednn:
        from .onednn_linear import _lp

        bt = b.t().contiguous()                                           # [n, k], as a weight
        prod = lambda: _lp(a, bt, None)                                   # noqa: E731
    else:
        prod = lambda: a @ b                                              # noqa: E731
    for _ in range(2):
        prod()
    reps, t0 = 0, time.perf_counter()
    while True:
        prod()
        reps += 1
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt >= seconds:
            break
    return 2.0 * m * k * n * reps / dt


def matmul_peak(fm: FlopModel, dtype: torch.dtype, device="cpu", seconds: float = 0.1,
                trials: int = 3, onednn: bool = False) -> float:
    """Measured GEMM FLOP/s for ``dtype`` on a decoder-sized layer shape ([512, H] @ [H, 4H]):
    the best of ``trials`` short timings, measured at each run's start (well under a second), so
    it reflects the machine the run has. ``onednn``: fp32 on a CPU whose linear layers run on
    oneDNN (ModelFields.linear_backend): that library's GEMM, else PyTorch's own (MKL on x86),
    so the fraction of peak is against the library in use. Not cached: a figure measured while
    another process shared the cores would understate the peak for every later run."""
    H = max(64, fm.hidden)
    on = onednn and torch.device(device).type == "cpu" and dtype == torch.float32
    with torch.no_grad():
        return max(_gemm_rate(512, H, 4 * H, dtype, device, seconds, onednn=on)
                   for _ in range(trials))


def phase_rates(*, learn_flops: float, learn_seconds: float, ref_flops: float, ref_seconds: float,
                gen_tokens: int, decode_steps: int, gen_seconds: float, weight_bytes: int,
                peak: float | None) -> dict[str, float]:
    """Per-step achieved rates (metrics.jsonl keys): ``learn_tflops``, ``ref_tflops`` (and their
    ``*_peak_frac`` when a measured peak is given), ``gen_tokens_per_second`` and
    ``gen_weight_gbps`` (decode steps x weight bytes / sampling seconds)."""
    out: dict[str, float] = {"learn_tflop": learn_flops / 1e12, "ref_tflop": ref_flops / 1e12}
    if learn_seconds > 0 and learn_flops > 0:
        out["learn_tflops"] = learn_flops / learn_seconds / 1e12
    if ref_seconds > 0 and ref_flops > 0:
        out["ref_tflops"] = ref_flops / ref_seconds / 1e12
    if peak:
        for k in ("learn", "ref"):
            if f"{k}_tflops" in out:
                out[f"{k}_peak_frac"] = out[f"{k}_tflops"] * 1e12 / peak
    if gen_seconds > 0 and gen_tokens > 0:
        out["gen_tokens_per_second"] = gen_tokens / gen_seconds
        out["gen_weight_gbps"] = decode_steps * weight_bytes / gen_seconds / 1e9
    return out


# --------------------------------------------------------------------------- precision=auto
def _model_key(model, linear: bool = True) -> str:
    """The model's shape for precision=auto's cache, and (``linear``) its fp32 linear layers' GEMM
    library as installed now (:mod:`agro.onednn_linear`)."""
    from .onednn_linear import CLASSES

    hf = hf_model(model)
    c = hf.config
    key = (f"{type(hf).__name__} H={getattr(c, 'hidden_size', '?')} "
           f"L={getattr(c, 'num_hidden_layers', '?')} V={getattr(c, 'vocab_size', '?')} "
           f"lora={hasattr(model, 'disable_adapter')}")
    if linear:
        libs = {b for b, cls in CLASSES.items() for m in hf.modules() if type(m) is cls}
        key += " linear=" + (",".join(sorted(libs)) or "aten")
    return key


def _time_precision(model, precision: str, *, group_size: int, prompt_len: int,
                    completion_len: int, groups: int, decode_batch: int, decode_steps: int,
                    reps: int) -> dict[str, float]:
    """Seconds of one learner pass (forward + backward over ``groups`` packed groups), one
    reference pass (forward, no grad), ``decode_steps`` sampling steps at ``decode_batch`` rows
    (``sample``, on weights packed beforehand) and the packing of the decode weights (``pack``,
    once per sampling call: :class:`agro.fast_decode.PackedWeights`; 0 where it does not apply),
    on random tokens, with the kernels agro uses, best of ``reps``."""
    from .logprobs import (accepts_logits_to_keep, completion_logprobs, position_ids_from_mask,
                           scoring_mode)
    from . import fast_decode
    from .models import MasterWeights, autocast_ctx, bf16_copy, device_of, is_peft

    dev = device_of(model)
    V = int(hf_model(model).config.vocab_size)
    g = torch.Generator().manual_seed(0)
    B, P, T = groups * group_size, prompt_len, completion_len
    prompt = torch.randint(0, V, (groups, P), generator=g).repeat_interleave(group_size, 0)
    comp = torch.randint(0, V, (B, T), generator=g)
    ids = torch.cat([prompt, comp], 1).to(dev)
    am = torch.ones_like(ids)
    comp = comp.to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    keep1 = {"logits_to_keep": 1} if accepts_logits_to_keep(type(hf_model(model))) else {}

    # bf16 as the trainer runs it (agro.models.MasterWeights): the learner, the reference and the
    # sampler on bf16 weights, gradients accumulated into fp32 masters; LoRA: autocast
    mixed = MasterWeights(model) if precision == "bf16" and not is_peft(model) else None
    work = mixed.work if mixed else model
    ref_model = bf16_copy(model) if mixed else model

    def learner():
        lp = completion_logprobs(work, ids, am, comp, P, precision, group_size=group_size)
        lp.sum().backward()
        for p in work.parameters():
            p.grad = None

    def update():
        """bf16 working copy: its gradients into the fp32 masters, then masters -> copy."""
        if mixed is None:
            return
        for w in mixed.work.parameters():
            if w.requires_grad:
                w.grad = torch.zeros_like(w)
        mixed.accumulate_grads()
        mixed.refresh()
        for p in params:
            p.grad = None

    def reference():
        with torch.no_grad():
            completion_logprobs(ref_model, ids, am, comp, P, precision, group_size=group_size)

    sampler = work

    static = fast_decode.applies(sampler, precision)
    # as CachedGenerator.generate packs: once per call, for calls of enough new tokens
    packing = static and completion_len >= fast_decode.PACK_MIN_NEW_TOKENS
    packed = None          # built just before the sampling phase and dropped after it (below)

    def pack():
        """Once per sampling call (CachedGenerator.generate): the decode weights packed."""
        if packing:
            fast_decode.PackedWeights.of(sampler)

    def sample():
        """As CachedGenerator decodes: agro.fast_decode's static cache where it applies."""
        x = torch.randint(0, V, (decode_batch, P), generator=g).to(dev)
        m = torch.ones_like(x)
        with torch.no_grad(), autocast_ctx(precision, dev):
            out = sampler(input_ids=x, attention_mask=m, position_ids=position_ids_from_mask(m),
                          use_cache=True, **keep1)
        cache, pos = out.past_key_values, m.sum(-1)
        if static:      # outside autocast, as CachedGenerator runs it (a stale ``packed`` raises)
            dec = fast_decode.StaticDecoder.from_prefill(sampler, cache, m, decode_steps, packed)
            with torch.no_grad():
                for _ in range(decode_steps):
                    dec.step(x[:, -1], pos)
                    pos = pos + 1
            return
        with torch.no_grad(), autocast_ctx(precision, dev):
            for _ in range(decode_steps):
                m = torch.cat([m, m.new_ones(m.shape[0], 1)], 1)
                out = sampler(input_ids=x[:, -1:], attention_mask=m, position_ids=pos[:, None],
                              past_key_values=cache, use_cache=True, **keep1)
                pos = pos + 1

    out = {}
    with scoring_mode(model), scoring_mode(work), scoring_mode(ref_model):
        for name, fn in (("learner", learner), ("reference", reference), ("sample", sample),
                         ("pack", pack), ("update", update)):
            # the packed copy exists only around the sampling phase, as in a sampling call (not
            # beside the learner's activations), and is made outside the timed calls
            packed = fast_decode.PackedWeights.of(sampler) if name == "sample" and packing else None
            best = float("inf")
            for _ in range(reps + 1):          # the first call warms up (allocations, kernels)
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            out[name] = best
    return out


# Version of what precision=auto times: 2 = bf16 on a working copy over fp32 masters (entries of
# version 1 timed autocast over fp32 weights and are ignored); 3 = sampling on agro.fast_decode's
# static cache and SDPA's math kernel for the scoring passes on a CPU; 4 = the two-level
# inverse-CDF sampler and the 2 MB-chunk log-prob kernel; 5 = the LM head fused with the log-prob
# kernel (logits recomputed in the backward); 6 = agro.lean's RMSNorm / SwiGLU modules, the
# fused head in bf16 only, fp32 writing the logits' gradient in place; 7 = bf16 scoring passes on
# SDPA's flash kernel (fp32 keeps math); 8 = agro.lean's SwiGLU backward on autograd's own kernels
# in the input's dtype (bf16 learner ~0.8x); 9 = on a CPU the bf16 LM head unfused, its logits'
# gradient written in place; 10 = the static decode cache in bf16 for bf16 weights, attention over
# the written columns only; 11 = the packed scoring passes' attention on agro.cpu_attention's
# kernel on a CPU (bf16 learner ~0.88x, fp32 ~0.94x); 12 = the static decoder's matmuls on weights
# packed for oneDNN once per sampling call (a default-job sampling call 0.71x fp32, 0.89x bf16),
# the packing timed inside each sampling call and so scaled with it (4x per default step); 13 =
# the packing timed on its own and counted once per step; 14 = keyed by the fp32 linear layers'
# GEMM library (ModelFields.linear_backend: the fp32 passes on oneDNN where it was chosen); 15 =
# the oneDNN LM head's backward in vocabulary slices (agro.onednn_linear.BACKWARD_SLICE_MIN_N).
CACHE_PREFIX = "precision/15:"


def cached_precision_choice(model) -> str | None:
    """What ``agro train``'s precision=auto chose for this model on this machine, if it has timed
    it here (any batch shape): "fp32" or "bf16"; None if never timed, or if timings of different
    batch shapes chose differently; timings with the model's fp32 linear layers on the library
    installed now count first, others only where there are none. `agro generate` / `agro eval`
    follow it so that an offline file is written in the precision the training run will check
    it in."""
    key = machine_key(next(model.parameters()).device)
    entries = _load_cache().get(key, {}).items()
    # timings with the fp32 linear layers' library installed now; else with either library
    for head in (f"{CACHE_PREFIX}{_model_key(model)} ", f"{CACHE_PREFIX}{_model_key(model, linear=False)} "):
        choices = {v.get("choice") for k, v in entries if k.startswith(head) and isinstance(v, dict)}
        if choices:
            return choices.pop() if len(choices) == 1 and choices <= {"fp32", "bf16"} else None
    return None


CALIBRATION_PROMPT_LEN = 32
"""Prompt tokens of the groups :func:`calibrate_precision` times."""


def calibrate_precision(model, *, prompts_per_step: int, group_size: int, max_new_tokens: int,
                        prompt_len: int = CALIBRATION_PROMPT_LEN, use_cache: bool = True, reps: int = 2,
                        micro_batches: int = 1, accum_fp32: bool = False) -> dict:
    """precision=auto on a machine with native bf16: time this model's learner pass, reference
    pass and sampling steps in fp32 and in bf16 (as the trainer runs bf16: a working copy over
    fp32 masters, or autocast for LoRA), estimate one training step of each
    (``prompts_per_step`` groups of ``group_size``, ``max_new_tokens`` decode steps) and choose
    the faster. Cached per machine and model shape in ``~/.cache/agro/machine.json``.

    bf16's step includes moving the working copy's gradients into the fp32 masters and casting the
    masters back (``update``): once per step, or once per micro-batch with ``accum_fp32``.
    Each phase is timed once after a warm-up call; when the two estimated steps are within 25 %
    of each other, both precisions are timed ``reps`` more times and each phase keeps its best.

    Returns {"choice": "fp32"|"bf16", "fp32": {...seconds..., "step": s}, "bf16": {...}}.
    """
    key = machine_key(next(model.parameters()).device)
    sub = (f"{CACHE_PREFIX}{_model_key(model)} G={prompts_per_step} n={group_size} "
           f"T={max_new_tokens} P={prompt_len} mb={micro_batches} accum={'fp32' if accum_fp32 else 'bf16'}")
    if use_cache:
        hit = _load_cache().get(key, {}).get(sub)
        if isinstance(hit, dict) and hit.get("choice") in ("fp32", "bf16"):
            return dict(hit, cached=True)
    groups, steps = 2, 8
    scale = prompts_per_step / groups

    def timed(prec: str, r: int) -> dict:
        return _time_precision(model, prec, group_size=group_size, prompt_len=prompt_len,
                               completion_len=max_new_tokens, groups=groups,
                               decode_batch=prompts_per_step * group_size, decode_steps=steps,
                               reps=r)

    def step(t: dict) -> float:
        return ((t["learner"] + t["reference"]) * scale + t["sample"] * max_new_tokens / steps
                + t.get("pack", 0.0) + t["update"] * (micro_batches if accum_fp32 else 1))

    # one timed call per phase first; only a close call (estimates within 25 %) is timed again,
    # ``reps`` more times, keeping each phase's best (a clear margin is not worth ~10 s more)
    times = {prec: timed(prec, 1) for prec in ("fp32", "bf16")}
    if max(step(t) for t in times.values()) < 1.25 * min(step(t) for t in times.values()):
        for prec in ("fp32", "bf16"):
            again = timed(prec, reps)
            times[prec] = {k: min(v, again[k]) for k, v in times[prec].items()}
    res: dict = {}
    for prec, t in times.items():
        t["step"] = step(t)
        res[prec] = {k: round(v, 4) for k, v in t.items()}
    res["choice"] = "bf16" if res["bf16"]["step"] < res["fp32"]["step"] else "fp32"
    if use_cache:
        _store_cache(key, sub, res)
    return dict(res, cached=False)
