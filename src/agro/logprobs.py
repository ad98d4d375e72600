"""Per-token log-probabilities of completions, the quantity every loss consumes, and the
reference policy pi_ref that is scored with the same kernels.

:func:`completion_logprobs` returns ``log pi(y_t | x, y_<t)`` for the completion tokens of a batch
laid out as ``[left-padded prompt | right-padded completion]`` (:class:`agro.rollouts.Batch`).
These are the ``log pi_t`` of agro_math.md §0 ("Notation"); their sum over ``t`` is
``log pi(y|x)``, and ``l_t = log pi_t - log pi_ref_t`` (§0, §5). Three rules keep it consistent
with sampling and cheap:

* positions come from the attention mask (``cumsum - 1``), exactly as ``generate`` computes
  them, so a left-padded prompt sees the same rotary positions when scored as when sampled;
* the LM head runs only on the completion positions (``logits_to_keep``), and in the packed
  path (:func:`_packed_group_hidden`, every group of rows sharing a prompt) only on real tokens:
  each prompt runs once and no padded completion position is computed; from
  :func:`block_min_len` packed tokens on, its attention runs by blocks (each prompt over
  itself, each completion over its prompt and itself: :func:`packed_block_attention`) instead
  of over the dense [L, L] block mask; on a CPU both compute attention on agro's kernel
  (:mod:`agro.cpu_attention`: batched matmuls, an fp32 softmax, a hand-written backward),
  elsewhere on SDPA;
* the log-softmax is taken in fp32 over chunks of ~10 rows at a time and only the chosen token's
  entry kept (a custom autograd function that saves only the logits; its backward recomputes
  the chunk's softmax), also when the matmuls run in bf16; in the packed path a plain linear
  head writes the logits' gradient over the logits on a CPU, and on other devices, where its
  GEMM runs in bf16, is fused into that kernel (:class:`_HeadChosenLogProb`), so not even the
  logits are kept (:func:`head_chosen_logprobs`).

Old and new log-probabilities of the same sample (reference vs policy) must be computed with the
same ``precision``; :class:`Reference` uses the precision it was built with. Measured on
SmolLM2-135M (64-token completions): bf16 autocast moves per-token log-probs by 0.026 on average
(0.19 per sequence), and after a +-1e-5 weight step the sequence log-ratio is 0.003 in fp32 but
0.28 in bf16: bf16 noise swamps small log-ratios, so prefer fp32 unless bf16 is needed for speed.

Every log-prob pass (policy in the loss, reference, sampling) runs with the model in eval mode,
so dropout never makes the scored log-probs differ from the sampled ones (:func:`scoring_mode`).

Departure from the paper: none.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .models import (PRECISIONS, autocast_ctx, device_of, hf_model, is_peft, load_model,
                     plain_linear)


# --------------------------------------------------------------------------- log-prob kernel
PACKED_MAX_LEN = 4096
"""Longest packed group sequence ``p + sum_i (l_i - 1)`` (:func:`_packed_group_hidden`); a
micro-batch with a longer group takes the two-pass path (a prompt pass, then its KV cache
repeated n times). Over the dense block mask the attention grows with the square of the length
(n times the two-pass path's); by blocks (from :func:`block_min_len` on) it does not. Models with
a local window shorter than this take the two-pass path whatever the lengths
(:func:`_short_sliding_window`); raising it would send Mistral-7B-v0.1 (window 4096) there
too."""

SHAPE_BUCKET = 16
"""The padding-free pass rounds its packed length L and its count of real completion tokens up
to a multiple of this. Every distinct matmul shape gets its own oneDNN primitive, created (JIT)
and cached per shape; without rounding nearly every micro-batch had new shapes and the default
job's resident memory crept 0.3 GiB higher (4.1 GiB after 60 steps; SmolLM2-135M bf16, Zen 4
EPYC). The extra positions are padding (masked, their log-probs discarded): < 16 positions per
group beyond the micro-batch's longest group, < 16 duplicated LM-head rows per pass, and never
more than the padded layout computes (:func:`packed_width`)."""

PACKED_BLOCK_MIN_LEN = 256
"""A group whose packed length ``L_g`` is at least this has its attention computed by blocks
(:func:`packed_block_attention`) instead of over the dense [L, L] block mask: each prompt
causally over itself, each completion over its prompt and itself, so a micro-batch scores
``G Pp^2 + B Tm (Pp + Tm)`` query-key pairs (Pp, Tm: its longest prompt and completion, rounded
up) instead of ``G L^2`` with ``L ~ p + n l``. Measured per attention layer, forward + backward,
blocks / dense, both on agro's CPU kernel (:mod:`agro.cpu_attention`, what every packed pass on
a CPU runs since 2026-12-05; ``bench/probe_block_attention.py``, SmolLM2-135M's 9 heads of 64,
2 cores, AMD EPYC Zen 4), bf16 / fp32: 0.99 / 1.12 at L = 160 (the default job's L is ~170),
0.99 / 0.99 at 240, 0.78 / 0.81 at 272, 0.40 / 0.49 at 448, 0.29 / 0.49 at 464, 0.27-0.38 /
0.30-0.34 at 816-1120 (docs/bench/cpu_attention/probe_block_attention.txt; nothing was measured
between 240, where they are even, and 272). Where the packed passes run SDPA (other devices,
``CPU_ATTENTION`` off) the threshold is :data:`SDPA_BLOCK_MIN_LEN` (:func:`block_min_len`)."""

SDPA_BLOCK_MIN_LEN = 384
"""PACKED_BLOCK_MIN_LEN where both paths run SDPA: chosen on a CPU before 2026-12-05, when the
packed passes there ran SDPA (``bench/probe_block_attention.py``'s SDPA columns, blocks / dense,
bf16 on the flash kernel / fp32 on the math one: 1.21-1.41 / 1.24-1.57 at L = 160, 1.34-1.38 /
1.00-1.28 at 240, 1.01-1.08 / 0.83-0.87 at 272, 0.92-0.93 / 0.56-0.69 at 448); never measured on a GPU."""


def block_min_len(device) -> int:
    """The packed length from which a group's attention runs by blocks on ``device``'s passes:
    PACKED_BLOCK_MIN_LEN on agro's CPU kernel, SDPA_BLOCK_MIN_LEN where they run SDPA."""
    return PACKED_BLOCK_MIN_LEN if _on_cpu_kernel(device) else SDPA_BLOCK_MIN_LEN


def _on_cpu_kernel(device) -> bool:
    """Whether packed passes on ``device`` compute attention with agro's CPU kernel (on a CPU,
    with ``CPU_ATTENTION`` on); the one test behind the threshold and both attention paths."""
    return torch.device(device).type == "cpu" and CPU_ATTENTION

_ROW_CHUNK_ELEMS = 1 << 19
"""fp32 elements per chunk of rows in the log-prob kernel (2 MB: ~10 rows of a 49152-token
vocabulary). Small enough to stay in cache between the cast and the (log-)softmax: on
[1250, 49152] bf16 logits the forward + backward took 357 ms with 64 MB chunks, 107 ms with
2 MB ones (2 cores, AMD EPYC Zen 4; 4 MB: 123 ms, 1 MB: 130 ms)."""


class _ChosenLogProb(torch.autograd.Function):
    """``log_softmax(logits)[r, ids[r]]`` in fp32, chunked over rows.

    Saves only the logits (in their own dtype), so neither the forward nor the backward holds an
    fp32 [N, V] log-softmax for all rows at once. Per chunk of rows, the forward runs the fused
    ``log_softmax`` kernel on an fp32 copy and the backward the fused ``softmax`` one:
    d/dlogits = g * (onehot(ids) - softmax(logits)). (Measured 1.25-1.5x faster than a
    ``logsumexp`` forward and an ``exp(logits - lse)`` backward on [1250, 49152] bf16 logits,
    2 cores, AMD EPYC Zen 4.)
    Shapes: logits [N, V] (any float dtype), ids [N] long -> [N] fp32.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, chunk: int,
                inplace_grad: bool = False) -> torch.Tensor:
        N = logits.shape[0]
        out = torch.empty(N, dtype=torch.float32, device=logits.device)  # [N]
        for s in range(0, N, chunk):
            ls = torch.log_softmax(logits[s:s + chunk].float(), dim=-1)   # [c, V] fp32
            out[s:s + chunk] = ls.gather(-1, ids[s:s + chunk, None]).squeeze(-1)
            del ls
        ctx.save_for_backward(logits, ids)
        ctx.chunk = chunk
        ctx.inplace_grad = inplace_grad
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        logits, ids = ctx.saved_tensors
        chunk = ctx.chunk
        # inplace_grad: the gradient overwrites the saved logits chunk by chunk (each chunk is
        # read before it is written), so no second [N, V] buffer is allocated. Only for logits
        # no other node keeps (a second backward then fails loudly on their version counter).
        grad = logits if ctx.inplace_grad else torch.empty_like(logits)   # [N, V]
        g = g.float()
        for s in range(0, logits.shape[0], chunk):
            gs = g[s:s + chunk, None]                                     # [c, 1]
            gl = torch.softmax(logits[s:s + chunk].float(), dim=-1).mul_(-gs)  # -p * g
            gl.scatter_add_(-1, ids[s:s + chunk, None], gs)               # + onehot * g
            grad[s:s + chunk] = gl.to(grad.dtype)
        return grad, None, None, None


def chosen_logprobs(logits: torch.Tensor, ids: torch.Tensor, inplace_grad: bool = False) -> torch.Tensor:
    """``log softmax(logits)[..., ids]`` in fp32 without a full log-softmax copy.

    logits [..., V] (any float dtype), ids [...] long -> [...] fp32, differentiable.
    ``inplace_grad``: the backward writes the logits' gradient over the logits themselves (one
    [N, V] buffer fewer at the start of the backward pass); only for contiguous logits that
    nothing else keeps or reads after the forward (a plain linear head's fresh output).
    """
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    chunk = max(1, _ROW_CHUNK_ELEMS // V)
    # only a fresh, contiguous autograd output (the head's): never a leaf or a view of a tensor
    # someone else holds, whose values the in-place gradient would overwrite
    inplace_grad = (inplace_grad and logits.grad_fn is not None and logits._base is None
                    and logits.is_contiguous())          # then flat is a view of the same memory
    out = _ChosenLogProb.apply(flat, ids.reshape(-1).long(), chunk, inplace_grad)
    return out.view(ids.shape)


_HEAD_ROW_CHUNK = 256
"""Rows of hidden states per LM-head GEMM in :class:`_HeadChosenLogProb`'s forward: each chunk
reads the whole [V, H] head once (54 MB in bf16 on SmolLM2-135M), so chunks are large for the
GEMM and its [256, V] output (25-50 MB) is then reduced ~10 rows at a time as in
:class:`_ChosenLogProb`."""

_HEAD_VOCAB_ELEMS = 1 << 22
"""Elements of one [N, Vc] block of recomputed logits in :class:`_HeadChosenLogProb`'s backward
(16 MB in fp32): the vocabulary slice Vc is the power of two at most ``_HEAD_VOCAB_ELEMS // N``
columns, at least 256 (few distinct GEMM shapes: each costs a cached oneDNN primitive, see
SHAPE_BUCKET; 49,152 = 3 x 2^14 splits into equal slices)."""


class _HeadChosenLogProb(torch.autograd.Function):
    """``log_softmax(h @ W.T)[r, ids[r]]`` in fp32, a linear LM head fused with the log-prob
    kernel so that no [N, V] logits are kept for the backward pass (agro_math.md §0's
    ``log pi_t``; the same numbers as ``chosen_logprobs(F.linear(h, W), ids)``).

    Forward: the head's GEMM in chunks of _HEAD_ROW_CHUNK rows in ``dtype`` (bf16 under bf16, as
    autocast would run it), each chunk's fp32 log-softmax taken ~10 rows at a time; it keeps
    ``h``, ``W`` (both already alive: the last hidden state and the head's weight) and the
    per-row ``lse`` = log-sum-exp of the logits [N] fp32.
    Backward: for each slice of Vc vocabulary columns, the logits ``z = h @ W[v].T`` [N, Vc] are
    recomputed and ``dz = g * (onehot(ids) - exp(z - lse))``; then ``dW[v] = dz.T @ h`` (one
    GEMM over all N rows: one rounding, as the unfused head) and ``dh += dz @ W[v]`` (each
    slice's product in ``dtype``, summed in fp32, cast to h's dtype at the end: in bf16 one
    rounding per slice, where the unfused head's one GEMM rounds once).

    Why: the unfused head keeps the [N, V] logits for its backward and allocates their [N, V]
    gradient at the start of the backward pass, when every activation is still alive: on the
    default job (SmolLM2-135M, ~930 completion positions a step, V = 49,152) 2 x 91 MB in bf16
    and 2 x 183 MB in fp32 at the start of the backward pass (measured peak RSS of the default
    job's learner step, 2026-12-04 in docs/RESULTS.md: -0.07 GiB in bf16; -0.22 GiB in fp32). On
    a CPU :func:`head_chosen_logprobs` takes the in-place path instead, in both precisions. The
    cost is one more head GEMM per position (2 N H V FLOP: +33 % of the head's 6 N H V, a few % of a
    SmolLM2-135M learner pass), which agro.perf's learner FLOP count does not include (model
    FLOP, as MFU counts them). Not twice-differentiable (``once_differentiable``).
    Shapes: h [N, H], W [V, H], ids [N] long -> [N] fp32.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, W: torch.Tensor, ids: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
        N, V = h.shape[0], W.shape[0]
        hc, Wc = h.to(dtype), W.to(dtype)
        out = torch.empty(N, dtype=torch.float32, device=h.device)      # [N]
        lse = torch.empty(N, dtype=torch.float32, device=h.device)      # [N]
        sub = max(1, _ROW_CHUNK_ELEMS // V)
        for s in range(0, N, _HEAD_ROW_CHUNK):
            z = F.linear(hc[s:s + _HEAD_ROW_CHUNK], Wc)                   # [r, V] dtype
            for t in range(0, z.shape[0], sub):
                zf = z[t:t + sub].float()                                 # [c, V] fp32
                a, b = s + t, s + t + zf.shape[0]
                i = ids[a:b, None]                                        # [c, 1]
                ls = torch.log_softmax(zf, dim=-1)
                out[a:b] = ls.gather(-1, i).squeeze(-1)
                top, j = zf.max(dim=-1, keepdim=True)                     # [c, 1]
                lse[a:b] = (top - ls.gather(-1, j)).squeeze(-1)           # ls is ~0 there
                del zf, ls
            del z
        ctx.save_for_backward(h, W, ids, lse)
        ctx.dtype = dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        h, W, ids, lse = ctx.saved_tensors
        need_h, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        hc, Wc = h.to(ctx.dtype), W.to(ctx.dtype)
        N, V = h.shape[0], W.shape[0]
        g = g.float()
        gh = torch.zeros(N, h.shape[1], dtype=torch.float32, device=h.device) if need_h else None
        gW = torch.empty(W.shape, dtype=ctx.dtype, device=W.device) if need_W else None
        vc = min(V, 1 << max(8, (_HEAD_VOCAB_ELEMS // max(N, 1)).bit_length() - 1))  # 2^k
        for v0 in range(0, V, vc):
            v1 = min(V, v0 + vc)
            dz = torch.exp_(F.linear(hc, Wc[v0:v1]).float().sub_(lse[:, None]))  # p [N, Vc]
            dz.mul_(-g[:, None])                                          # -p * g
            r = ((ids >= v0) & (ids < v1)).nonzero().squeeze(-1)             # + onehot * g
            c = ids[r] - v0                                               # one entry per row
            dz[r, c] = dz[r, c] + g[r]
            dz = dz.to(ctx.dtype)
            if need_W:
                gW[v0:v1] = dz.t() @ hc                                   # [Vc, H]
            if need_h:
                gh += dz @ Wc[v0:v1]                                      # [N, H]
        return (gh.to(h.dtype) if need_h else None, gW.to(W.dtype) if need_W else None,
                None, None)


def fused_head_dtype(device_type: str, precision: str, weight_dtype: torch.dtype):
    """The dtype a plain head's GEMM runs in under the fused kernel, or None where the head runs
    as a module (see :func:`head_chosen_logprobs`): bf16 off the CPU, else None."""
    dtype = torch.bfloat16 if precision == "bf16" else weight_dtype
    return dtype if device_type != "cpu" and dtype == torch.bfloat16 else None


def head_chosen_logprobs(head, h: torch.Tensor, ids: torch.Tensor, precision: str) -> torch.Tensor:
    """``log softmax(head(h))[r, ids[r]]`` in fp32 [N] for hidden states h [N, H] and ids [N].

    A plain ``nn.Linear`` head without bias or forward hooks runs as a module, then
    :func:`chosen_logprobs` writes the logits' gradient over the logits (``inplace_grad``) -- on
    a CPU in either precision. On other devices, where its GEMM runs in bf16 (``precision`` bf16,
    as autocast runs a linear layer, or bf16 weights), it takes the fused kernel
    (:class:`_HeadChosenLogProb`: no [N, V] logits kept for the backward pass, the logits
    recomputed in vocabulary slices).

    Why by device: on the CPU it was measured on (Zen 4, 2026-12-04, ``bench/lean_ab.py`` with
    jemalloc preloaded as ``agro train`` does) the bf16 learner step took 1.09x and 1.155x as
    long with the fused kernel as with an unfused head with its own gradient buffer, and the
    in-place head 0.936x as long as the fused one; in fp32 the fused kernel took 1.15x earlier.
    The memory it saves on the default job is one [N, V] bf16 buffer (+90 MiB of saved tensors
    without it). On older code with the system allocator it had measured 0.905x, which is why
    bf16 used it until then. On a GPU the fused kernel is chosen for memory, as fused
    linear-cross-entropy kernels are, and its speed there was never measured (no GPU). Any other
    head (a LoRA wrapper, a bias, forward hooks, a replaced ``forward`` such as accelerate's
    offloading) runs as a module and then :func:`chosen_logprobs`, its logits kept and a
    gradient allocated.
    """
    W = getattr(head, "weight", None)
    plain = plain_linear(head) and head.bias is None
    dtype = fused_head_dtype(h.device.type, precision, W.dtype) if plain else None
    if dtype is not None:
        return _HeadChosenLogProb.apply(h, W, ids.long(), dtype)
    with autocast_ctx(precision, h.device):
        logits = head(h)                                                  # [N, V]
    return chosen_logprobs(logits, ids, inplace_grad=plain)


@functools.lru_cache(maxsize=None)
def accepts_logits_to_keep(cls: type) -> bool:
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


def attention_backend(dev, precision: str):
    """The scaled-dot-product-attention kernel for every scoring pass on ``dev`` in ``precision``
    that runs SDPA (policy and reference alike): on a CPU in fp32, PyTorch's math backend (plain
    matmuls and softmax); in bf16, and on other devices, PyTorch's own choice (on a CPU its
    flash kernel). Since 2026-12-05 the packed passes on a CPU run agro's own kernel instead
    (:mod:`agro.cpu_attention`, :func:`_cpu_kernel_applies`); this choice is left to the plain
    and shared-prompt passes there, to models that do not route attention through transformers'
    registry, and to other devices. The measurements below predate that.

    Why by precision: every pass here has an explicit mask (left padding, the packed groups'
    block mask), with which the flash kernel's backward was slow on 2026-12-02
    (``bench/phases.py``, 5 interleaved rounds): the default job's learner step was 1.15x faster
    in bf16 and 1.05x in fp32 with the math backend (2 groups per micro-batch then). On
    2026-12-04, with the default token budgets (bf16: the step's 8 groups in one micro-batch;
    fp32: 3 groups), the lean modules and the fused LM head, the same bench (7 rounds, AMD EPYC
    Zen 4) gave: bf16 learner 0.92x with flash (faster in 7 of 7 rounds), reference 0.96x; fp32
    learner 1.03x (math faster in 5 of 7), reference 0.98x. So bf16 takes flash and fp32 keeps
    math. Passes scored before this choice changed (bf16 offline files' reference log-probs, a
    replay buffer from an older version) used the math kernel: ~5e-4 nats per sequence apart at
    equal weights, far below bf16's own rounding of a sequence log-prob. The reference pass
    takes the learner's kernel even where the other would be faster for it alone: with different
    kernels log pi - log pi_ref is not exactly 0 where the
    weights are equal (at step 0: 5.5e-4 per sequence in a bf16 run, -4.8e-7 in fp32: tests
    test_a_bf16_run_learns_on_bf16_weights_with_fp32_masters and
    test_dropout_never_enters_the_scored_logprobs), and every loss reads that ratio.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if torch.device(dev).type != "cpu" or precision == "bf16":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def _forward(model, precision: str, dev, **kw):
    with autocast_ctx(precision, dev), attention_backend(dev, precision):
        return model(**kw)


def completion_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, T: int,
                      prompt_len: int, precision: str = "fp32",
                      group_size: int = 1) -> torch.Tensor:
    """Logits predicting completion tokens 0..T-1: columns ``prompt_len-1 .. prompt_len+T-2``.

    input_ids, attention_mask [B, L] (L >= prompt_len + T - 1; later columns are ignored).
    Returns [B, T, V] in the model's compute dtype (bf16 under autocast), not yet fp32.

    ``group_size`` n > 1 with each group's n rows sharing their prompt (the
    :func:`agro.rollouts.collate` layout, checked): the prompt is run once per group, in one
    padding-free packed pass per group (:func:`_packed_group_hidden`) or, when T == 1, a
    completion mask has holes, a group is longer than PACKED_MAX_LEN, the model has a short
    sliding window or the head is not a plain linear map, by repeating its KV cache n times (:func:`_shared_prompt_logits`). Same numbers up to float rounding, gradients included;
    on the default job the prompt is more than half of every sequence, so this removes ~40 % of
    the tokens of every pass.
    """
    P = int(prompt_len)
    if P < 1:
        raise ValueError(f"prompt_len must be >= 1 (the first completion token is predicted from "
                         f"the last prompt token), got {P}")
    if input_ids.shape[1] < P + T - 1:
        raise ValueError(f"input_ids has {input_ids.shape[1]} columns; need prompt_len + T - 1 = {P + T - 1}")
    lengths = _packed_lengths_if_usable(model, input_ids, attention_mask, T, P, group_size)
    if lengths is not None:
        return _packed_group_logits(model, input_ids, attention_mask, T, P, group_size,
                                    precision, lengths)
    if group_size > 1 and prompts_shared_within_groups(input_ids, attention_mask, P, group_size):
        return _shared_prompt_logits(model, input_ids, attention_mask, T, P, precision, group_size)
    dev = device_of(model)
    ids = input_ids[:, :P + T - 1].to(dev)                               # [B, P+T-1]
    am = attention_mask[:, :P + T - 1].to(dev)                           # [B, P+T-1]
    pos = position_ids_from_mask(am)                                     # [B, P+T-1]
    keep = accepts_logits_to_keep(type(hf_model(model)))
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
    logit scaling: Cohere's ``logit_scale``, Granite's ``logits_scaling``) or models without the standard accessors."""
    hf = hf_model(model)
    for cfg in {id(c): c for c in (hf.config, _text_config(hf.config))}.values():
        if getattr(cfg, "final_logit_softcapping", None) or any(
                getattr(cfg, k, None) not in (None, 1, 1.0)
                for k in ("logit_scale", "logits_scaling")):
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
    """:func:`completion_logits` with one prompt pass per group of ``n`` rows (used where the
    padding-free packed pass does not apply: one-token completions, completion masks with holes,
    groups longer than PACKED_MAX_LEN, short sliding windows, heads that are not a plain linear
    map).

    Pass 1 runs the G = B/n distinct prompts [G, P] with a KV cache and keeps the last position's
    logits (they predict completion token 0). The cache is repeated n times along the batch
    (``repeat_interleave``, differentiable) and pass 2 runs completion tokens 0..T-2 [B, T-1]
    on top of it, with the full ``[prompt | completion]`` mask and the same position ids as the
    unshared pass (``cumsum(mask) - 1``). Gradients reach the prompt's keys and values through
    the cache, exactly as in one long pass.
    """
    dev = device_of(model)
    keep = accepts_logits_to_keep(type(hf_model(model)))
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


def packed_group_lengths(attention_mask: torch.Tensor, P: int, T: int, n: int):
    """Real lengths of a group-shared batch: ``(prompt [G], completion [B])`` long tensors on
    the CPU, or None if a completion's mask is not one run of ones from column ``P`` (then the
    padding-free layout does not apply). ``attention_mask`` [B, >= P + T]."""
    am = attention_mask[:, :P + T].to("cpu") > 0
    comp = am[:, P:P + T]                                                # [B, T]
    if T > 1 and bool((comp[:, 1:] & ~comp[:, :-1]).any()):              # a 0 before a 1
        return None
    return am[::n, :P].sum(-1), comp.sum(-1)                             # [G], [B]


def packed_width(real: int, padded: int) -> int:
    """How many positions a packed pass computes for ``real`` real ones: ``real`` rounded up to
    a multiple of SHAPE_BUCKET, but never more than ``padded``, the padded layout's count
    (``P + n(T-1)`` per group, ``B x T`` LM-head rows), which it then equals: never more work
    than the padded layout, and its shapes where rounding would not save any."""
    return min(-(-real // SHAPE_BUCKET) * SHAPE_BUCKET, max(real, padded))


def packed_group_len(prompt_lens: torch.Tensor, comp_lens: torch.Tensor, n: int) -> torch.Tensor:
    """[G] length of each group's packed sequence ``p_g + sum_i max(l_i - 1, 0)``."""
    return prompt_lens + (comp_lens - 1).clamp(min=0).reshape(-1, n).sum(-1)


def _packed_group_hidden(model, input_ids, attention_mask, T: int, P: int, n: int,
                         precision: str = "fp32", lengths=None, rows=None):
    """The final hidden state before each completion token, one padding-free packed sequence
    per group (plain LM head; fp32 or bf16 autocast; SDPA's mask in the dtype attention computes
    in, agro's CPU kernel's in fp32, the dtype of its scores). Returns ``hs`` [B, T, H]: ``hs[b, t]`` predicts completion token t of row b (rows'
    padding positions hold the group's last prompt state; their log-probs are masked later);
    with ``rows`` (a [K] long index into the flattened B x T positions) only those: [K, H].

    Group g of rows ``g*n .. g*n+n-1`` (sharing their prompt, checked by the caller) becomes
    ``[prompt | c_1[:l_1-1] | ... | c_n[:l_n-1]]`` with only real tokens: the prompt's ``p_g``
    tokens without its left padding and each completion's ``l_i`` tokens but its last (which is
    predicted, never an input), so its length is ``L_g = p_g + sum_i (l_i - 1)``; the groups of a
    pass are right-padded to its longest ``L_g``. Under the block attention mask prompt
    tokens attend causally to the prompt, completion i's tokens to the whole prompt and causally
    to completion i only, and no real query attends to padding (a pad query sees itself, so no
    row is empty). Positions: ``0 .. p_g-1`` in the prompt, ``p_g + t`` at token t of every
    completion, as in the ``[prompt | completion]`` layout (``cumsum(mask) - 1``). Token 0 of
    every completion is predicted from the last prompt position.

    Same numbers as one ``[prompt | completion]`` pass per row (up to float rounding, gradients
    included), with each prompt run once and no padded completion position computed. It pays
    where lengths vary within a micro-batch: one 32-token sample among ~9-token ones made every
    block 32 long (1.6x on such a micro-batch, forward and backward); with uniform lengths it
    is about even with the padded layout (``bench/packed_ab.py``, docs/RESULTS.md).

    Attention runs over a dense [L, L] block mask, or by blocks (:func:`packed_block_attention`)
    for each group whose own ``L_g`` is at least :func:`block_min_len`: a group's path depends
    on its lengths alone, never on the groups it shares a micro-batch with, so the policy and
    the reference (whose micro-batches may be cut differently: async actors, replay, offline
    files) score it with the same kernels. A micro-batch holding both kinds runs two passes.
    """
    dec = _decoder_parts(model)[0]
    B = input_ids.shape[0]
    plen, clen = lengths if lengths is not None else packed_group_lengths(attention_mask, P, T, n)
    glen = packed_group_len(plen, clen, n)                               # [G]
    blocks = glen >= block_min_len(device_of(model))                     # [G] bool
    if not _block_attention_usable(dec):
        blocks[:] = False
    if bool(blocks.all()) or not bool(blocks.any()):
        return _packed_path_hidden(model, input_ids, attention_mask, T, P, n, precision,
                                   (plen, clen), rows, bool(blocks.all()))
    parts, order = [], []
    for use in (False, True):
        gsel = blocks.nonzero().squeeze(-1) if use else (~blocks).nonzero().squeeze(-1)
        rsel = (gsel[:, None] * n + torch.arange(n)).reshape(-1)         # [Bs] rows
        ids_s = input_ids[rsel.to(input_ids.device)]
        am_s = attention_mask[rsel.to(attention_mask.device)]
        parts.append(_packed_path_hidden(model, ids_s, am_s, T, P, n, precision,
                                         (plen[gsel], clen[rsel]), None, use))    # [Bs, T, H]
        order.append(rsel)
    hs = torch.cat(parts)                                                # [B, T, H], rows permuted
    where = torch.empty(B, dtype=torch.long)
    where[torch.cat(order)] = torch.arange(B)                            # row b is hs[where[b]]
    idx = (where[:, None] * T + torch.arange(T)).reshape(-1)             # [B*T]
    if rows is not None:
        return _gather_rows(hs.reshape(B * T, -1), idx[rows].to(hs.device))  # [K, H]
    return _gather_rows(hs.reshape(B * T, -1), idx.to(hs.device)).reshape(B, T, -1)


def _packed_path_hidden(model, input_ids, attention_mask, T: int, P: int, n: int,
                        precision: str, lengths, rows, blocks: bool):
    """:func:`_packed_group_hidden` for groups that all take one path: attention by blocks
    (``blocks``; if the model turns out not to run them, the dense mask after all) or over the
    dense block mask."""
    dec, emb, head = _decoder_parts(model)
    dev = device_of(model)
    B = input_ids.shape[0]
    G = B // n
    plen, clen = lengths
    glen = packed_group_len(plen, clen, n)                               # [G]
    L = packed_width(int(glen.max()), P + n * (T - 1))                   # few distinct shapes
    ids_cpu, am_cpu = input_ids.to("cpu"), attention_mask.to("cpu") > 0
    ids = torch.zeros(G, L, dtype=torch.long)                            # pad id 0 (masked)
    pos = torch.zeros(G, L, dtype=torch.long)
    blk = torch.full((G, L), -2, dtype=torch.long)                       # -2 pad, -1 prompt
    src = torch.empty(B, T, dtype=torch.long)                            # index into [G*L]
    off = torch.empty(B, dtype=torch.long)                               # completion i's start
    for g in range(G):
        r0, pg = g * n, int(plen[g])
        ids[g, :pg] = ids_cpu[r0, :P][am_cpu[r0, :P]]
        pos[g, :pg] = torch.arange(pg)
        blk[g, :pg] = -1
        src[r0:r0 + n] = g * L + pg - 1
        o = pg
        for i in range(n):
            k = max(int(clen[r0 + i]) - 1, 0)                            # inputs of completion i
            ids[g, o:o + k] = ids_cpu[r0 + i, P:P + k]
            pos[g, o:o + k] = pg + torch.arange(k)
            blk[g, o:o + k] = i
            src[r0 + i, 1:1 + k] = g * L + o + torch.arange(k)
            off[r0 + i] = o
            o += k
    h = None
    if blocks and _block_attention_usable(dec):      # a dense pass just before may have fallen back
        layout = BlockLayout.build(plen, (clen - 1).clamp(min=0), off, n, L, dev)
        try:
            with autocast_ctx(precision, dev), attention_backend(dev, precision), \
                    _attention_implementation(dec, BLOCK_ATTENTION):
                h = dec(inputs_embeds=emb(ids.to(dev)), position_ids=pos.to(dev),
                        use_cache=False, agro_block_layout=layout).last_hidden_state  # [G, L, H]
        except BlocksUnsupported as e:
            _no_block_attention(dec, str(e))
        else:
            if not _block_attention_ran_everywhere(dec, layout):
                h = None                                                 # dense mask below
    if h is None:
        h = _dense_packed_hidden(dec, emb, ids, pos, blk, L, precision, dev)
    src = src.reshape(-1)                                                # [B*T]
    flat = h.reshape(G * L, -1)                                          # [G*L, H]
    if rows is not None:
        return _gather_rows(flat, src[rows].to(dev))                     # [K, H]
    return _gather_rows(flat, src.to(dev)).reshape(B, T, -1)             # [B, T, H]


def _dense_packed_hidden(dec, emb, ids, pos, blk, L: int, precision: str, dev) -> torch.Tensor:
    """The decoder's last hidden state [G, L, H] of the packed groups under the dense block
    mask [G, 1, L, L] built from ``blk`` [G, L] (-2 pad, -1 prompt, i completion i).

    On a CPU, where the model routes its attention through transformers' registry
    (:func:`_block_attention_usable`), every layer's attention is agro's kernel
    (:func:`packed_dense_attention`, :mod:`agro.cpu_attention`); elsewhere, or if the model
    turns out not to run it, SDPA under the kernel :func:`attention_backend` picks."""
    ids, pos, blk = ids.to(dev), pos.to(dev), blk.to(dev)
    if _cpu_kernel_applies(dec, dev):
        layout = DenseLayout(dense_block_mask(blk, torch.float32))       # scores are fp32
        try:
            with autocast_ctx(precision, dev), _attention_implementation(dec, DENSE_ATTENTION):
                h = dec(inputs_embeds=emb(ids), position_ids=pos, use_cache=False,
                        agro_dense_layout=layout).last_hidden_state     # [G, L, H]
        except BlocksUnsupported as e:
            _no_block_attention(dec, str(e))
        else:
            if _block_attention_ran_everywhere(dec, layout):
                return h
    # the additive mask in the dtype attention computes in (bf16 under bf16 autocast)
    dtype = torch.bfloat16 if precision == "bf16" else next(dec.parameters()).dtype
    mask = dense_block_mask(blk, dtype)                                  # [G, 1, L, L]
    with autocast_ctx(precision, dev), attention_backend(dev, precision):
        return dec(inputs_embeds=emb(ids), attention_mask=mask, position_ids=pos,
                   use_cache=False).last_hidden_state                    # [G, L, H]


def dense_block_mask(blk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The packed groups' additive attention mask [G, 1, L, L] in ``dtype`` (0 where allowed,
    its min elsewhere) from ``blk`` [G, L] (-2 pad, -1 prompt, i completion i): prompt tokens
    attend causally to the prompt, completion i's tokens to the whole prompt and causally to
    completion i; a pad query sees itself only, so no row is empty."""
    G, L = blk.shape
    q = torch.arange(L, device=blk.device)
    causal = (q[None, :] <= q[:, None])[None]                            # [1, Lq, Lk]
    bq, bk = blk[:, :, None], blk[:, None, :]                            # [G, L, 1], [G, 1, L]
    to_prompt = (bk == -1) & ((bq >= 0) | causal)
    same_blk = (bq == bk) & (bk >= 0) & causal
    allowed = to_prompt | same_blk | torch.eye(L, dtype=torch.bool, device=blk.device)[None]
    mask = torch.zeros(G, 1, L, L, dtype=dtype, device=blk.device)
    return mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)


# ------------------------------------------------------------ packed attention by blocks
BLOCK_ATTENTION = "agro_packed_blocks"
"""The name :func:`packed_block_attention` is registered under in transformers'
``AttentionInterface``; a packed pass sets it as the decoder's attention implementation for
the length of its forward (:func:`_attention_implementation`)."""


@dataclasses.dataclass
class BlockLayout:
    """Where the attention of a micro-batch of packed groups (:func:`_packed_group_hidden`)
    reads and writes, for :func:`packed_block_attention`. G groups of n rows, packed length L;
    group g's prompt at positions ``0 .. p_g-1``, completion i's k_i inputs at
    ``off_i .. off_i+k_i-1``. Pp = max p_g and Tm = max k_i, each rounded up to SHAPE_BUCKET.

    * prompt block: queries ``[G, Pp]`` (positions 0 .. Pp-1), causal over themselves;
    * completion blocks: queries ``q_idx`` [B*Tm] (row b's positions ``off_b + t``), keys and
      values ``kv_idx`` [B*(Pp+Tm)] (the prompt's Pp positions, then its own Tm), under
      ``allowed`` [B, 1, Tm, Pp+Tm]: prompt key j if j < p_g, own key t' if t' <= t and t' < k_b.
      Query rows t >= k_b are padding (they see the prompt, so no row is empty);
    * ``inv`` [G*L]: where each packed position's output is, in ``[prompt block outputs (G*Pp)
      | completion block outputs (B*Tm) | a zero row]``; padding positions read the zero row.

    Indices are flat positions ``g*L + j`` of the [G*L] packed tokens (long, on the model's
    device); ``seen`` collects the attention modules that ran, so the pass can tell whether the
    model routed every layer through it."""

    G: int
    L: int
    Pp: int
    Tm: int
    q_idx: torch.Tensor
    kv_idx: torch.Tensor
    allowed: torch.Tensor
    inv: torch.Tensor
    seen: set = dataclasses.field(default_factory=set)
    _masks: dict = dataclasses.field(default_factory=dict)

    @staticmethod
    def build(plen: torch.Tensor, k: torch.Tensor, off: torch.Tensor, n: int, L: int,
              dev) -> "BlockLayout":
        """plen [G] prompt lengths, k [B] completion inputs (l_i - 1, >= 0), off [B] their start
        in the packed sequence (CPU long tensors); L the packed length."""
        G, B = plen.numel(), k.numel()
        Pp, Tm = block_dims(plen, k, L)
        g = torch.arange(B) // n                                         # [B] group of row b
        t = torch.arange(Tm)
        qpos = (off[:, None] + t[None]).clamp(max=L - 1)                 # [B, Tm]
        q_idx = g[:, None] * L + qpos                                    # [B, Tm]
        kv_idx = torch.cat([g[:, None] * L + torch.arange(Pp)[None], q_idx], 1)  # [B, Pp+Tm]
        to_prompt = torch.arange(Pp)[None, None, :] < plen[g][:, None, None]     # [B, 1, Pp]
        own = (t[None, None, :] <= t[None, :, None]) & (t[None, None, :] < k[:, None, None])
        allowed = torch.cat([to_prompt.expand(B, Tm, Pp), own], -1)[:, None]     # [B,1,Tm,Pp+Tm]
        inv = torch.full((G, L), G * Pp + B * Tm, dtype=torch.long)      # padding: zero row
        for gg in range(G):
            p = int(plen[gg])
            inv[gg, :p] = gg * Pp + torch.arange(p)
        for b in range(B):
            kb, o = int(k[b]), int(off[b])
            inv[int(g[b]), o:o + kb] = G * Pp + b * Tm + torch.arange(kb)
        return BlockLayout(G, L, Pp, Tm, q_idx.reshape(-1).to(dev), kv_idx.reshape(-1).to(dev),
                           allowed.to(dev), inv.reshape(-1).to(dev))

    def prompt_mask(self) -> torch.Tensor:
        """The prompt block's causal additive mask [1, 1, Pp, Pp] in fp32, for agro's CPU kernel
        (made once per pass, not once per layer)."""
        if "prompt" not in self._masks:
            from .cpu_attention import causal_mask

            self._masks["prompt"] = causal_mask(self.Pp, torch.float32, self.allowed.device)
        return self._masks["prompt"]

    def mask(self, dtype: torch.dtype) -> torch.Tensor:
        """The completion blocks' additive mask [B, 1, Tm, Pp+Tm] in ``dtype`` (0 or its min)."""
        if dtype not in self._masks:
            m = torch.zeros(self.allowed.shape, dtype=dtype, device=self.allowed.device)
            self._masks[dtype] = m.masked_fill_(~self.allowed, torch.finfo(dtype).min)
        return self._masks[dtype]


def block_dims(plen: torch.Tensor, k: torch.Tensor, L: int) -> tuple[int, int]:
    """``(Pp, Tm)`` of a :class:`BlockLayout`: the longest prompt (at most L) and the most
    completion inputs (at least 1), each rounded up to SHAPE_BUCKET. Attention by blocks then
    scores ``G Pp^2 + B Tm (Pp + Tm)`` query-key pairs, against ``G L^2`` over the dense mask."""
    Pp = min(-(-int(plen.max()) // SHAPE_BUCKET) * SHAPE_BUCKET, L)
    Tm = max(-(-int(k.max()) // SHAPE_BUCKET) * SHAPE_BUCKET, SHAPE_BUCKET)
    return Pp, Tm


@dataclasses.dataclass
class DenseLayout:
    """What :func:`packed_dense_attention` reads in a packed pass over the dense block mask:
    ``mask`` [G, 1, L, L] additive (:func:`dense_block_mask`, fp32), and ``seen``, the attention
    modules that ran (as :class:`BlockLayout`'s)."""

    mask: torch.Tensor
    seen: set = dataclasses.field(default_factory=set)


def _cpu_kernel_applies(dec, dev) -> bool:
    """Whether a packed pass of ``dec`` on ``dev`` runs its attention on agro's CPU kernel
    (:mod:`agro.cpu_attention`): on a CPU, for a model whose attention goes through
    transformers' registry (the conditions of :func:`_block_attention_usable`)."""
    return _on_cpu_kernel(dev) and _block_attention_usable(dec)


CPU_ATTENTION = True
"""Packed passes on a CPU compute attention with :func:`agro.cpu_attention.masked_attention`
(over the dense block mask and in both blocks of attention by blocks) instead of SDPA. A switch
for benches (``bench/cpu_attention_ab.py``) and tests; runs never change it."""


def _plain_attention_call(module, L: int, attention_mask, kwargs: dict) -> None:
    """Raise :class:`BlocksUnsupported` if an attention call asks for what agro's packed
    attention functions do not apply: attention sinks, soft-capping, a position bias, a sliding
    window shorter than the pass (L), or a mask of the model's own. (Dropout, which only a model
    in training mode asks for, is applied by SDPA for that call: scoring passes run in eval
    mode, and a fallback here would be permanent for the model.)"""
    extra = [k for k in ("s_aux", "sinks", "softcap", "position_bias")
             if kwargs.get(k) is not None]
    window = kwargs.get("sliding_window")
    if window is not None and not (isinstance(window, int) and window >= L):
        extra.append(f"sliding_window={window}")
    if extra or attention_mask is not None:
        raise BlocksUnsupported(f"{type(module).__name__} asks for what agro's packed attention "
                                f"does not apply: {', '.join(extra) or 'an attention mask'}")


def packed_dense_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, dropout: float = 0.0, scaling: float | None = None,
                           agro_dense_layout: DenseLayout | None = None, **kwargs):
    """Attention of packed groups over their dense block mask on agro's CPU kernel
    (transformers' attention-function signature; :func:`agro.cpu_attention.masked_attention`).

    query [G, Hq, L, d], key and value [G, Hkv, L, d]; the mask is the layout's (the decoder is
    given none); returns [G, L, Hq, dv] as ``sdpa_attention_forward`` does. Anything else a
    model asks of attention raises :class:`BlocksUnsupported` (the pass then takes SDPA)."""
    from .cpu_attention import masked_attention

    lay = agro_dense_layout
    if lay is None:
        raise BlocksUnsupported(f"attention implementation {DENSE_ATTENTION!r} was called "
                                "without agro_dense_layout (a layer that does not hand its "
                                "keyword arguments down?): only agro.logprobs' packed pass may "
                                "set it")
    _plain_attention_call(module, query.shape[2], attention_mask, kwargs)
    lay.seen.add(id(module))
    if dropout:                                                          # training mode only
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        dt = query.dtype                         # the fp32 minimum would be -inf in bf16
        mask = lay.mask.clamp(min=torch.finfo(dt).min).to(dt)
        with attention_backend(query.device, "bf16" if dt == torch.bfloat16 else "fp32"):
            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout,
                                          scaling=scaling)
    return masked_attention(query, key, value, lay.mask, scaling), None


def packed_block_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask, dropout: float = 0.0, scaling: float | None = None,
                           agro_block_layout: BlockLayout | None = None, **kwargs):
    """Attention of packed groups by blocks (transformers' attention-function signature).

    query [G, Hq, L, d], key [G, Hkv, L, d], value [G, Hkv, L, dv] of the packed sequences;
    returns [G, L, Hq, dv] as transformers' ``sdpa_attention_forward`` does. Each block runs on
    agro's kernel on a CPU (:func:`agro.cpu_attention.masked_attention`, the prompt block under
    a causal mask), elsewhere (and for a call with dropout) on ``sdpa_attention_forward`` (so
    grouped heads, the SDPA kernel in force and ``scaling`` are handled as in every other SDPA
    pass); anything else a model asks of attention raises :class:`BlocksUnsupported`:

        prompt block      softmax(q_p k_p^T / sqrt(d) + causal) v_p        [G, Pp, Hq, dv]
        completion blocks softmax(q_c [k_p; k_c]^T / sqrt(d) + mask) [v_p; v_c]  [B, Tm, Hq, dv]

    Every real query attends to exactly the keys the dense block mask of
    :func:`_dense_packed_hidden` allows, so the outputs are the same up to float rounding;
    padding positions get 0 (their outputs are never read). Gathers and the final scatter are
    index_select on a CPU (a deterministic backward: :func:`_gather_rows`)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lay = agro_block_layout
    if lay is None:
        raise BlocksUnsupported(f"attention implementation {BLOCK_ATTENTION!r} was called without "
                                "agro_block_layout (a layer that does not hand its keyword "
                                "arguments down?): only agro.logprobs' packed pass may set it")
    G, Hq, L, _ = query.shape
    _plain_attention_call(module, L, attention_mask, kwargs)
    lay.seen.add(id(module))
    B = lay.q_idx.numel() // lay.Tm
    dv = value.shape[-1]
    if _on_cpu_kernel(query.device) and not dropout:
        from .cpu_attention import masked_attention

        def attend(q, k, v, mask, is_causal):                            # -> [*, Lq, Hq, dv]
            return masked_attention(q, k, v, lay.prompt_mask() if is_causal else mask, scaling)
    else:
        def attend(q, k, v, mask, is_causal):
            return sdpa_attention_forward(module, q, k, v, mask, is_causal=is_causal,
                                          dropout=dropout, scaling=scaling)[0]
    po = attend(query[:, :, :lay.Pp], key[:, :, :lay.Pp], value[:, :, :lay.Pp], None,
                True)                                                    # [G, Pp, Hq, dv]

    def rows(x, idx, m):                                                 # [G,h,L,d] -> [B,h,m,d]
        h, d = x.shape[1], x.shape[-1]
        flat = x.transpose(1, 2).reshape(G * L, h * d)
        return _gather_rows(flat, idx).view(B, m, h, d).transpose(1, 2)

    M = lay.Pp + lay.Tm
    co = attend(rows(query, lay.q_idx, lay.Tm), rows(key, lay.kv_idx, M),
                rows(value, lay.kv_idx, M), lay.mask(query.dtype), False)  # [B, Tm, Hq, dv]
    out = torch.cat([po.reshape(G * lay.Pp, Hq * dv), co.reshape(B * lay.Tm, Hq * dv),
                     query.new_zeros(1, Hq * dv)])                       # [G*Pp + B*Tm + 1, Hq*dv]
    return _gather_rows(out, lay.inv).view(G, L, Hq, dv), None


class BlocksUnsupported(RuntimeError):
    """Raised inside a pass by :func:`packed_block_attention` or :func:`packed_dense_attention`
    when the model asks for what they do not apply (attention sinks, logit soft-capping, a
    position bias, a sliding window shorter than the pass, a mask: a deny-list of what
    transformers 5.23's models pass; :func:`_plain_attention_call`) or calls them without their
    layout; the pass catches it and takes the dense mask on SDPA, for good
    (:func:`_no_block_attention`)."""


DENSE_ATTENTION = "agro_packed_dense"
"""The name :func:`packed_dense_attention` is registered under (set by a packed pass over the
dense block mask on a CPU, as BLOCK_ATTENTION)."""


def _register_block_attention() -> bool:
    try:
        from transformers import AttentionInterface
    except ImportError:                                                  # older transformers
        return False
    AttentionInterface.register(BLOCK_ATTENTION, packed_block_attention)
    AttentionInterface.register(DENSE_ATTENTION, packed_dense_attention)
    return True


_BLOCKS_REGISTERED = _register_block_attention()


def _block_attention_usable(dec) -> bool:
    """Whether a packed pass of ``dec`` may try agro's registered attention functions (by
    blocks anywhere, and agro's CPU kernel over the dense mask on a CPU): transformers has the
    attention registry; the model runs SDPA attention (eager and flash-attention models keep the
    dense mask, in the kernels they chose), every layer is full attention with no sliding window
    shorter than PACKED_MAX_LEN, its config has no sub-configs (composite models), gradient
    checkpointing is off (its recomputation would run after the pass restored the attention
    implementation), its forward takes ``**kwargs`` (the layout travels in them), and no earlier
    pass found that it does not route every layer through the registry."""
    cfg = getattr(dec, "config", None)
    if not _BLOCKS_REGISTERED or cfg is None or getattr(dec, "_agro_no_block_attention", False):
        return False
    return (getattr(cfg, "_attn_implementation", None) == "sdpa"
            and hasattr(cfg, "_attn_implementation_internal")
            and not getattr(cfg, "sub_configs", None)
            and all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or []))
            and not _short_sliding_window(cfg)
            and not getattr(dec, "gradient_checkpointing", False)
            and _passes_keywords_on(type(dec)))


def _text_config(cfg):
    """The decoder's own config: a composite config's text config (where its window and
    soft-capping live), else ``cfg``."""
    get = getattr(cfg, "get_text_config", None)
    try:
        return get(decoder=True) if get is not None else cfg
    except (TypeError, ValueError):
        return cfg


def _short_window(window) -> bool:
    """A window setting that may cut attention within PACKED_MAX_LEN tokens: a positive int
    below it, or anything else set that is not an int (unknown: assume it may)."""
    if window is None or window is False or (isinstance(window, int) and window <= 0):
        return False
    return not isinstance(window, int) or window < PACKED_MAX_LEN


def _short_sliding_window(cfg) -> bool:
    """Whether ``cfg`` (or its text config) turns on a local attention window shorter than
    PACKED_MAX_LEN: ``sliding_window`` (e.g. Phi-3-mini's 2047, Qwen2 with
    ``use_sliding_window``, Gemma3's text config; Mistral-7B-v0.1's 4096 is not) or
    ``window_size`` (GPT-Neo's local layers). No packed layout applies a window, so such models
    take the two-pass path, whose masks are transformers' own."""
    if cfg is None:
        return False
    cfgs = {id(c): c for c in (cfg, _text_config(cfg))}.values()
    return any((_short_window(getattr(c, "sliding_window", None))
                and bool(getattr(c, "use_sliding_window", True)))
               or _short_window(getattr(c, "window_size", None)) for c in cfgs)


@functools.lru_cache(maxsize=None)
def _passes_keywords_on(cls: type) -> bool:
    """Whether ``cls.forward`` takes ``**kwargs`` (transformers hands them down to the attention
    functions; a decoder without them would refuse the layout)."""
    try:
        params = inspect.signature(cls.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params)


@contextlib.contextmanager
def _attention_implementation(dec, name: str):
    """Set ``dec``'s attention implementation to ``name`` for the duration, then restore it
    (the config's own field, not its setter, which would also rewrite sub-configs). With a name
    transformers has no mask function for, the decoder builds no mask. The config is the
    model's: no other pass may run on the same model meanwhile (agro scores in one thread;
    async actors hold their own copies)."""
    cfg = dec.config
    old = cfg._attn_implementation_internal
    cfg._attn_implementation_internal = name
    try:
        yield
    finally:
        cfg._attn_implementation_internal = old


def _block_attention_ran_everywhere(dec, layout: "BlockLayout | DenseLayout") -> bool:
    """True if every decoder layer's attention ran agro's registered function for ``layout``
    (:func:`packed_block_attention`, :func:`packed_dense_attention`) in the pass
    just made. A model whose attention ignores the registry ran plain causal attention over the
    packed sequence, which is wrong: the caller recomputes this pass with the dense mask, and
    the model's later passes take it directly (:func:`_no_block_attention`)."""
    want = int(getattr(dec.config, "num_hidden_layers", 0) or 0)
    if want and len(layout.seen) == want:
        return True
    _no_block_attention(dec, f"{len(layout.seen)} of {want} attention layers ran agro's packed "
                             f"attention")
    return False


def _no_block_attention(dec, why: str) -> None:
    """Mark ``dec`` so its packed passes take the dense block mask on SDPA from now on, and warn
    once."""
    import warnings

    dec._agro_no_block_attention = True
    warnings.warn(f"{type(dec).__name__}: {why}; packed passes of this model use the dense "
                  f"block mask on SDPA instead", RuntimeWarning, stacklevel=4)


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[idx]`` ([N, H], [K] long -> [K, H]) with a backward that adds repeated indices in a
    fixed order. Rows of a group share their last prompt state (token 0 of every completion)
    and padding repeats a source. On CPU the backward of advanced indexing (``index_put_`` with
    accumulate) adds repeats with parallel atomics, in an order that changes from run to run,
    and ``index_select``'s (``index_add_``) in index order; on CUDA it is the other way round
    (``index_add_`` uses atomics, accumulating ``index_put_`` sorts), so each device takes its
    deterministic one (tests/test_models.py::test_packed_path_backward_runs_no_nondeterministic_cpu_op;
    the CUDA branch has never run here: no GPU)."""
    return x[idx] if x.is_cuda else x.index_select(0, idx)


def _packed_group_logits(model, input_ids, attention_mask, T: int, P: int, n: int,
                         precision: str = "fp32", lengths=None) -> torch.Tensor:
    """:func:`completion_logits` through :func:`_packed_group_hidden`: the LM head on [B, T, H]
    (padding positions included; :func:`completion_logprobs` runs it on real positions only)."""
    hs = _packed_group_hidden(model, input_ids, attention_mask, T, P, n, precision, lengths)
    with autocast_ctx(precision, device_of(model)):
        return _decoder_parts(model)[2](hs)                              # [B, T, V]


def _packed_lengths_if_usable(model, input_ids, attention_mask, T: int, P: int, n: int):
    """The real lengths when the padding-free packed path applies to this batch, else None:
    rows grouped by n sharing a non-empty prompt, a plain LM head, T > 1 completion columns all
    present in the mask (``P + T`` columns), each completion one run of ones from column P,
    and no group longer than PACKED_MAX_LEN."""
    if n <= 1 or T <= 1 or P < 1 or attention_mask.shape[1] < P + T:
        return None
    if not prompts_shared_within_groups(input_ids, attention_mask, P, n):
        return None
    parts = _decoder_parts(model)
    if parts is None or _short_sliding_window(getattr(parts[0], "config", None)):
        return None
    lengths = packed_group_lengths(attention_mask, P, T, n)
    if lengths is None or int(lengths[0].min()) < 1 \
            or int(packed_group_len(*lengths, n).max()) > PACKED_MAX_LEN:
        return None
    return lengths


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
    real = attention_mask[:, prompt_len:prompt_len + T] > 0               # [B, T]
    lengths = None
    if not with_logits and prompt_len >= 1:
        lengths = _packed_lengths_if_usable(model, input_ids, attention_mask, T, prompt_len,
                                            group_size)
    if lengths is not None:     # padding-free: the LM head and log-softmax on real tokens only
        real = real.to("cpu")
        idx = real.reshape(-1).nonzero().squeeze(-1)                      # [N] real positions
        N = idx.numel()
        pad = packed_width(N, B * T) - N                                  # few distinct shapes
        idx = torch.cat([idx, idx[:1].expand(pad)]) if N and pad else idx
        hs = _packed_group_hidden(model, input_ids, attention_mask, T, prompt_len, group_size,
                                  precision, lengths, rows=idx)           # [N + pad, H]
        dev = hs.device
        tgt = completion_ids.reshape(-1)[idx.to(completion_ids.device)].to(dev)  # [N + pad]
        lp_real = head_chosen_logprobs(_decoder_parts(model)[2], hs, tgt, precision)[:N]  # [N]
        return torch.zeros(B, T, dtype=lp_real.dtype, device=dev).masked_scatter(
            real.to(dev), lp_real)                                        # [B, T]
    logits = completion_logits(model, input_ids, attention_mask, T, prompt_len, precision,
                               group_size)                                # [B, T, V]
    if with_logits:
        logits = logits.float()                                          # [B, T, V] fp32
    tgt = completion_ids.to(logits.device)
    lp = chosen_logprobs(logits, tgt)                                    # [B, T] fp32
    real = real.to(logits.device)
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


@contextlib.contextmanager
def scoring_mode(model):
    """Run ``model`` in eval mode inside the block and restore its mode after.

    Every pass that produces log-probabilities (the learner's, the reference's, the sampler's)
    uses it: with dropout active (a model's own dropout, LoRA dropout) the log-probs in the loss
    would not be pi's, ``log pi/pi_ref`` would be nonzero at step 0 and on-policy terms biased.
    Gradients are unaffected by the mode.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def batch_logprobs(model, batch, precision: str, with_logits: bool = False):
    """The learner's per-token log-probs of a collated :class:`agro.rollouts.Batch` (differentiable),
    in eval mode (:func:`scoring_mode`); each group's prompt runs once (``batch.group_size``).

    Returns [B, T] fp32 on the model's device, or ``(logprobs, [B, T, V] fp32 logits)``.
    """
    with scoring_mode(model):
        return completion_logprobs(model, batch.input_ids, batch.attention_mask,
                                   batch.completion_ids, batch.prompt_len, precision,
                                   with_logits=with_logits, group_size=batch.group_size)


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
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
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

    def store_bf16(self, keep_digest: bool = True) -> None:
        """Keep a frozen reference's weights in bf16 (runs in bf16: half its memory, no cast at
        every matmul, and the same weights as the learner's bf16 working copy). With
        ``keep_digest`` its identity digest (agro.provenance.weights_sha256) is taken first, from
        the weights as loaded (a file's identity then does not depend on how the reference is
        stored; the identity's ``weights_dtype`` says how); without it, the digest cannot be
        asked for later (the trainer skips it when no offline file needs checking: a pass over
        every weight). A LoRA reference shares the policy's base and stays as it is."""
        if self.precision != "bf16":
            raise ValueError(f"store_bf16 on a reference used in {self.precision}")
        if self.disable_adapter:
            return
        if keep_digest:
            from .provenance import weights_sha256

            self.weights_digest = weights_sha256(self)
        else:
            self.cast_without_digest = True
        with torch.no_grad():
            for p in self.model.parameters():
                p.data = p.data.to(torch.bfloat16)

    @property
    def device(self) -> torch.device:
        """Where the reference's weights live (batches for it are moved there)."""
        return device_of(self.model)

    @property
    def kind(self) -> str:
        return "adapters_disabled" if self.disable_adapter else "frozen"

    @contextlib.contextmanager
    def _active(self):
        with scoring_mode(self.model), torch.no_grad():
            if self.disable_adapter:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model

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

