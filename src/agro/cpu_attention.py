"""Masked attention for the packed scoring passes on a CPU: batched matmuls and an fp32 softmax,
a few groups at a time, with a hand-written backward.

Where it runs: the padding-free packed passes of :mod:`agro.logprobs` (policy and reference
alike, fp32 and bf16) on a CPU, over the dense block mask and in both blocks of attention by
blocks. Elsewhere (other devices, the two-pass and plain paths, sampling) attention is PyTorch's
SDPA as before.

Why: at the packed passes' shapes (a few groups of ~100-500 positions, 64-dim heads) PyTorch's
CPU kernels leave most of the time outside the matmuls. Per attention layer, forward + backward,
8 groups of SmolLM2-135M's 9 query / 3 key-value heads, 2 cores of an AMD EPYC Zen 4
(``bench/cpu_attention_ab.py --layer``, docs/bench/cpu_attention/layer.json, docs/RESULTS.md
"AMD EPYC (Zen 4), 2026-12-05 (second)"): at L = 176 in bf16, SDPA's flash kernel 5.9 + 21.6
ms, its math kernel 8.6 + 10.3 ms, this (2 groups per chunk, what ``groups_per_chunk`` gives
there) 4.2 + 6.7 ms; in fp32, flash 5.3 + 11.4 ms, math 8.4 + 12.2 ms, this 5.5 + 8.9 ms. The
flash kernel's backward is the slow part in bf16. In fp32 at L >= 368 flash is faster
(this takes 1.03-1.18x flash's time); the packed passes take blocks there, whose shapes are
small again.

What it computes, per group g, query head h (key-value head ``h // r``, r = Hq / Hkv):

    S = (Q K^T) * scaling + M           in fp32 (Q, K cast up: the scores are not rounded to
                                         bf16, as in the flash kernel)
    P = softmax(S, -1)                   in fp32, kept in the inputs' dtype
    O = P V                              in the inputs' dtype (fp32 accumulation in the GEMM)

and the backward (``D = rowsum(dO * O)``, the standard softmax-attention gradient):

    dV = P^T dO,  dP = dO V^T (fp32),  dS = P * (dP - D) * scaling,  dQ = dS K,  dK = dS^T Q

The r query heads that share a key-value head are stacked along the rows of one matmul
([r*L, d] x [d, L]), so grouped-query attention needs no repeated K, V; their dK, dV sum over
the r heads inside the matmul. ``M`` is additive (0 where allowed, a large negative number
elsewhere; a row with no allowed key gets a uniform P, never NaN: agro's masks give every row
at least itself). P is saved for the backward ([G, Hq, Lq, Lk] in the inputs' dtype: e.g.
4.5 MB per layer for the default job's 8 groups of 176 in bf16, ~134 MB over its 30 layers)
instead of recomputed: memory for time, on the CPU only.

Groups run in chunks (``groups_per_chunk``): enough (group, key-value head) pairs per matmul to
occupy the threads, few enough that the chunk's fp32 scores stay in the cache between the
softmax's passes (at most ``CHUNK_BYTES``).

Log-probs stored before 2026-12-05 (the reference log-probs of offline files and replay
buffers, scored on SDPA) are not bit-equal to today's at equal weights. Measured on one default
job step (``bench/cpu_attention_ab.py --shift``, docs/bench/cpu_attention/shift-*.json): in fp32
per token at most 2.4e-5 apart (per sequence 5.7e-5); in bf16 by bf16's own noise, per token
0.042 on average (at most 0.44), per sequence 0.25 (at most 0.75). Each kernel is about as far
from the same weights scored in fp32: per token 0.033 on average for this one, 0.032 for flash
(at most 0.34 against 0.20), per sequence 0.20 against 0.24 (at most 0.59 against 0.85). Both
shifts are inside the provenance check's tolerances (``agro.provenance.TOKEN_TOL`` 1.0 per
token in bf16, ``SEQ_TOL`` 0.5 sqrt(T) per sequence), by less margin than the noise its
docstring records (0.24 / 0.60).

Departure from the paper: none (a kernel; the numbers are attention's up to float rounding:
tests/test_cpu_attention.py checks values and gradients against an fp64 computation).
"""
from __future__ import annotations

import torch

CHUNK_BYTES = 16 << 20
"""Most fp32 scores of one chunk of groups (16 MiB; the softmax's output in fp32 and P in the
inputs' dtype come on top). Measured per layer, forward + backward, on [8, 9, L, 64] with 3
key-value heads, 2 cores, Zen 4 (``bench/cpu_attention_ab.py --layer``,
docs/bench/cpu_attention/layer.json): 2 groups per chunk was within 1.1 % of the fastest of 1,
2, 3, 4 and 8 at L = 176, 272, 368 and 464, in fp32 and bf16; 1 group took up to 1.23x as long,
8 up to 1.99x. The thread target (:func:`groups_per_chunk`) gives 2 there and this budget never
binds (2 groups hold 2.2-15.5 MB of scores); it only keeps a larger model's or a longer
group's chunk from holding hundreds of MB (unmeasured: set from the largest chunk measured
fast, 15.5 MB)."""


def groups_per_chunk(G: int, Hq: int, Hkv: int, Lq: int, Lk: int) -> int:
    """Groups per chunk: enough that a chunk's matmuls have two (group, key-value head) pairs
    per thread to share out, but no more than keep ``Hq * Lq * Lk`` fp32 scores per group under
    CHUNK_BYTES, and between 1 and G. (2 on 2 threads at the shapes measured.)"""
    per_group = Hq * Lq * Lk * 4
    by_budget = CHUNK_BYTES // max(per_group, 1)
    by_threads = -(-2 * torch.get_num_threads() // max(Hkv, 1))
    return max(1, min(G, by_threads, by_budget))


class _MaskedAttention(torch.autograd.Function):
    """q [G, Hkv, r*Lq, d] (the r query heads of each key-value head stacked along the rows),
    k [G, Hkv, Lk, d], v [G, Hkv, Lk, dv], mask [G or 1, 1, Lq, Lk] additive (any float dtype),
    -> o [G, Hkv, r*Lq, dv] in q's dtype."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scaling: float, r: int):
        with torch.autocast(q.device.type, enabled=False):   # fp32 scores stay fp32
            return _MaskedAttention._forward(ctx, q, k, v, mask, scaling, r)

    @staticmethod
    def _forward(ctx, q, k, v, mask, scaling: float, r: int):
        G, Hkv, rL, _ = q.shape
        Lq, Lk, dv = rL // r, k.shape[2], v.shape[-1]
        c = groups_per_chunk(G, Hkv * r, Hkv, Lq, Lk)
        save = any(ctx.needs_input_grad[:3])
        o = q.new_empty(G, Hkv, rL, dv)
        p_all = q.new_empty(G, Hkv, rL, Lk) if save else None
        for a in range(0, G, c):
            b = min(a + c, G)
            s = torch.matmul(q[a:b].float(), k[a:b].float().transpose(-1, -2))  # [c,Hkv,rL,Lk]
            s5 = s.view(b - a, Hkv, r, Lq, Lk).mul_(scaling)
            s5.add_((mask[a:b] if mask.shape[0] > 1 else mask).unsqueeze(2))   # [c|1,1,1,Lq,Lk]
            p = torch.softmax(s, -1)                                     # fp32
            p = p.to(q.dtype) if p_all is None else p_all[a:b].copy_(p)
            torch.matmul(p, v[a:b], out=o[a:b])
        if save:
            ctx.save_for_backward(q, k, v, p_all, o)
            ctx.scaling, ctx.chunk = scaling, c
        return o

    @staticmethod
    def backward(ctx, go):
        with torch.autocast(go.device.type, enabled=False):  # fp32 dP stays fp32
            return _MaskedAttention._backward(ctx, go)

    @staticmethod
    def _backward(ctx, go):
        q, k, v, p_all, o = ctx.saved_tensors
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        G = q.shape[0]
        c, scaling = ctx.chunk, ctx.scaling
        go = go.contiguous()
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if need_q else None
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if need_k else None
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if need_v else None
        for a in range(0, G, c):
            b = min(a + c, G)
            p = p_all[a:b]
            if need_v:
                torch.matmul(p.transpose(-1, -2), go[a:b], out=dv[a:b])
            if not (need_q or need_k):
                continue
            gof = go[a:b].float()
            dp = torch.matmul(gof, v[a:b].float().transpose(-1, -2))    # fp32 [c,Hkv,rL,Lk]
            delta = (gof * o[a:b].float()).sum(-1, keepdim=True)         # D = rowsum(dO * O)
            ds = dp.sub_(delta).mul_(p).mul_(scaling).to(q.dtype)
            if need_q:
                torch.matmul(ds, k[a:b], out=dq[a:b])
            if need_k:
                torch.matmul(ds.transpose(-1, -2), q[a:b], out=dk[a:b])
        return dq, dk, dv, None, None, None


def masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor, scaling: float | None = None) -> torch.Tensor:
    """``softmax(query key^T * scaling + mask) value`` with grouped heads, in the layout
    transformers' attention functions use.

    query [G, Hq, Lq, d], key [G, Hkv, Lk, d], value [G, Hkv, Lk, dv] (Hq a multiple of Hkv;
    query head h reads key-value head ``h // (Hq / Hkv)``, as ``repeat_kv``), mask [G or 1, 1, Lq,
    Lk] additive; ``scaling`` defaults to ``d ** -0.5``. Returns [G, Lq, Hq, dv] (what
    ``sdpa_attention_forward`` returns), differentiable in query, key and value (not in the
    mask). Dropout is not applied: the packed passes score in eval mode."""
    G, Hq, Lq, d = query.shape
    Hkv = key.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} key-value heads")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, G) \
            or tuple(mask.shape[2:]) != (Lq, key.shape[2]):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit queries [{G}, {Hq}, "
                         f"{Lq}, {d}] and keys [{G}, {Hkv}, {key.shape[2]}, {d}]")
    r = Hq // Hkv
    dev = query.device.type
    # under autocast, the dtype SDPA would compute in (it casts its inputs; rotary embeddings
    # may have left the queries in fp32); the kernel's forward and backward run with autocast
    # off, so its fp32 scores and dP stay fp32
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else query.dtype
    qg = query.to(dt).reshape(G, Hkv, r * Lq, d)                         # heads h = kv*r + j
    o = _MaskedAttention.apply(qg, key.to(dt).contiguous(), value.to(dt).contiguous(),
                               mask.detach(), d ** -0.5 if scaling is None else float(scaling), r)
    return o.view(G, Hq, Lq, -1).transpose(1, 2)                         # [G, Lq, Hq, dv]


def causal_mask(L: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The additive causal mask [1, 1, L, L] in ``dtype`` (0 on and below the diagonal, its
    min above)."""
    m = torch.ones(L, L, dtype=torch.bool, device=device).triu_(1)
    return torch.zeros(1, 1, L, L, dtype=dtype, device=device).masked_fill_(m, torch.finfo(dtype).min)
