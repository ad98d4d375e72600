"""agro.cpu_attention: the packed passes' CPU attention kernel against an exact (fp64)
computation, in values and gradients. (Its use in every layer of the packed passes, policy and
reference alike, is tested in tests/test_models.py: the ``attention`` fixture and
test_every_scoring_path_runs_its_precisions_attention_kernel.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agro import cpu_attention
from agro import logprobs
from agro.cpu_attention import causal_mask, groups_per_chunk, masked_attention


def _case(G=3, Hq=6, Hkv=2, Lq=40, Lk=40, d=16, dtype=torch.float32, mask_groups=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(G, Hq, Lq, d, generator=g, dtype=torch.float64) * 2
    k = torch.randn(G, Hkv, Lk, d, generator=g, dtype=torch.float64) * 2
    v = torch.randn(G, Hkv, Lk, d, generator=g, dtype=torch.float64)
    allowed = torch.rand(mask_groups or G, 1, Lq, Lk, generator=g) < 0.6
    allowed |= torch.eye(Lq, Lk, dtype=torch.bool)                       # no empty row
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    go = torch.randn(G, Lq, Hq, d, generator=g, dtype=torch.float64)
    return q, k, v, allowed, mask, go


def _exact(q, k, v, allowed, go, scaling=None):
    """fp64 softmax attention with repeat_kv's head mapping; output [G, Lq, Hq, d] and grads."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    r = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)        # head h -> kv h // r
    s = q @ kk.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scaling is None else scaling)
    o = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vv
    o = o.transpose(1, 2)
    o.backward(go)
    return o.detach(), q.grad, k.grad, v.grad


def _ours(q, k, v, mask, go, dtype, scaling=None):
    q, k, v = (x.to(dtype).requires_grad_() for x in (q, k, v))
    o = masked_attention(q, k, v, mask, scaling)
    o.backward(go.to(dtype))
    return o.detach(), q.grad, k.grad, v.grad


def _rel(a, b) -> float:
    return float((a.double() - b).abs().mean() / b.abs().mean())


@pytest.mark.parametrize("mask_groups", [None, 1])
def test_fp32_values_and_gradients_equal_exact_attention(mask_groups):
    """Grouped heads (6 query heads on 2 key-value heads), a random mask per group or one for
    all, a non-default scaling: output, dQ, dK, dV equal fp64 attention to fp32 rounding."""
    q, k, v, allowed, mask, go = _case(mask_groups=mask_groups)
    want = _exact(q, k, v, allowed, go, scaling=0.2)
    got = _ours(q, k, v, mask, go, torch.float32, scaling=0.2)
    assert got[0].shape == (3, 40, 6, 16) and got[0].dtype == torch.float32
    for a, b in zip(got, want):
        assert _rel(a, b) < 2e-6


def _rounded(q, k, v, mask, go, scores_bf16: bool, dp_bf16: bool):
    """The kernel's computation with the scores and/or dP = dO V^T rounded to bf16 (what the
    matmuls' own output dtype gives): the mistakes the kernel's fp32 casts avoid."""
    bf = torch.bfloat16
    r = q.shape[1] // k.shape[1]
    q, k, v = (x.to(bf).requires_grad_() for x in (q, k, v))
    kk, vv = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)

    class Att(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, kk, vv):
            s = q @ kk.transpose(-1, -2) if scores_bf16 else q.float() @ kk.float().transpose(-1, -2)
            p = torch.softmax(s.float() * q.shape[-1] ** -0.5 + mask.float(), -1).to(bf)
            o = p @ vv
            ctx.save_for_backward(q, kk, vv, p, o)
            return o

        @staticmethod
        def backward(ctx, g):
            q, kk, vv, p, o = ctx.saved_tensors
            dp = (g @ vv.transpose(-1, -2)) if dp_bf16 else g.float() @ vv.float().transpose(-1, -2)
            ds = (p.float() * (dp.float() - (g.float() * o.float()).sum(-1, keepdim=True))
                  * q.shape[-1] ** -0.5).to(bf)
            return ds @ kk, ds.transpose(-1, -2) @ q, p.transpose(-1, -2) @ g

    o = Att.apply(q, kk, vv).transpose(1, 2)
    o.backward(go.to(bf))
    return o.detach(), q.grad, k.grad, v.grad


def test_bf16_keeps_scores_and_dp_in_fp32():
    """In bf16 the kernel's error against exact attention (from the same bf16-rounded inputs)
    is what rounding P, O and the gradients to bf16 gives (measured on this case, 96 x 96, d 64:
    mean relative error 1.9e-3 in the output, 4.3e-3 / 4.0e-3 / 2.1e-3 in dQ / dK / dV; at the
    default job's shapes, layer.json, 1.9e-3 and 4.1-4.6e-3 / 3.7-4.0e-3 / 2.1e-3, SDPA's flash
    kernel 1.5-1.6e-3 and 3.6-4.0e-3 / 4.7-5.1e-3 / 3.7-4.4e-3). Scores rounded to bf16 roughly
    triple the output's; dP rounded to bf16 raises dQ's by ~25 %: the kernel must stay below
    both, computed here on the same inputs."""
    q, k, v, allowed, mask, go = _case(Lq=96, Lk=96, d=64, dtype=torch.bfloat16, seed=1)
    q, k, v = (x.to(torch.bfloat16).double() for x in (q, k, v))          # same rounded inputs
    go = go.to(torch.bfloat16).double()
    want = _exact(q, k, v, allowed, go)
    got = _ours(q, k, v, mask, go, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16
    errs = [_rel(a, b) for a, b in zip(got, want)]
    bf_scores = [_rel(a, b) for a, b in zip(_rounded(q, k, v, mask, go, True, False), want)]
    bf_dp = [_rel(a, b) for a, b in zip(_rounded(q, k, v, mask, go, False, True), want)]
    assert errs[0] < 0.7 * bf_scores[0], (errs, bf_scores)
    assert errs[1] < 0.95 * bf_dp[1], (errs, bf_dp)     # dQ (dK's mutant sums rounded heads)
    assert errs[0] < 3e-3 and errs[3] < 3e-3 and max(errs) < 6e-3, errs


@pytest.mark.parametrize("mask_groups", [None, 1])
def test_chunks_change_nothing(monkeypatch, mask_groups):
    """Groups run a few at a time: 2 per chunk over 5 groups (a partial last chunk), with a mask
    per group or one shared by all, gives the numbers of one chunk holding every group (to fp32
    rounding: the matmuls' batch differs)."""
    q, k, v, allowed, mask, go = _case(G=5, mask_groups=mask_groups)
    monkeypatch.setattr(cpu_attention, "groups_per_chunk", lambda *a: 5)
    whole = _ours(q, k, v, mask, go, torch.float32)
    monkeypatch.setattr(cpu_attention, "groups_per_chunk", lambda *a: 2)
    chunked = _ours(q, k, v, mask, go, torch.float32)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(chunked, _exact(q, k, v, allowed, go)):
        assert _rel(a, b) < 2e-6


def test_one_head_per_key_value_head_and_strided_queries():
    """r = 1 (multi-head attention) and queries in transformers' layout (a transposed view of
    [G, L, H, d], not contiguous): values and gradients as exact attention."""
    q, k, v, allowed, mask, go = _case(Hq=4, Hkv=4)
    qt = q.transpose(1, 2).contiguous().float().requires_grad_()          # [G, L, H, d]
    kf, vf = k.float().requires_grad_(), v.float().requires_grad_()
    o = masked_attention(qt.transpose(1, 2), kf, vf, mask)
    o.backward(go.float())
    want = _exact(q, k, v, allowed, go)
    for a, b in zip((o.detach(), qt.grad.transpose(1, 2), kf.grad, vf.grad), want):
        assert _rel(a, b) < 2e-6


@pytest.mark.parametrize("want", ["q", "k", "v", "kv", "qkv"])
def test_only_the_gradients_asked_for(want):
    """Inputs that do not require gradients get none; the others get exact attention's."""
    q, k, v, allowed, mask, go = _case()
    xs = [x.float().requires_grad_(name in want) for name, x in zip("qkv", (q, k, v))]
    o = masked_attention(*xs, mask)
    o.backward(go.float())
    exact = _exact(q, k, v, allowed, go)[1:]
    for name, x, e in zip("qkv", xs, exact):
        assert (x.grad is None) == (name not in want)
        if name in want:
            assert _rel(x.grad, e) < 2e-6


def test_backward_under_autocast_keeps_dp_in_fp32():
    """A backward called inside bf16 autocast gives the gradients of one outside it (autocast
    would round dP = dO V^T to bf16)."""
    q, k, v, allowed, mask, go = _case(Lq=64, Lk=64, d=32)
    bf = torch.bfloat16
    grads = []
    for inside in (False, True):
        xs = [x.to(bf).requires_grad_() for x in (q, k, v)]
        o = masked_attention(*xs, mask)
        with torch.autocast("cpu", dtype=bf, enabled=inside):
            o.backward(go.to(bf))
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_groups_per_chunk_thread_target_and_budget(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_attention, "CHUNK_BYTES", 16 << 20)
    assert groups_per_chunk(8, 9, 3, 176, 176) == 2        # 2 threads x 2 pairs / 3 kv heads
    assert groups_per_chunk(8, 9, 3, 464, 464) == 2        # 7.75 MB of fp32 scores per group
    assert groups_per_chunk(8, 9, 3, 1024, 1024) == 1      # 38 MB per group: over budget
    assert groups_per_chunk(1, 9, 3, 176, 176) == 1        # never more than G
    monkeypatch.setattr(torch, "get_num_threads", lambda: 32)
    assert groups_per_chunk(64, 32, 8, 96, 96) == 8        # 8 groups x 8 kv heads = 2 x 32
    assert groups_per_chunk(64, 32, 8, 176, 176) == 4      # 4 MB per group: the budget
    assert groups_per_chunk(64, 32, 8, 512, 512) == 1      # 32 MB per group


def test_under_autocast_inputs_take_the_autocast_dtype():
    """Rotary embeddings can leave queries in fp32 under bf16 autocast: the kernel computes in
    the autocast dtype, as SDPA would, and returns it."""
    q, k, v, allowed, mask, go = _case()
    bf = torch.bfloat16
    with torch.autocast("cpu", dtype=bf):
        o = masked_attention(q.float().requires_grad_(), k.to(bf), v.to(bf), mask)
    assert o.dtype == bf
    # the same numbers as bf16 inputs outside autocast: autocast does not reach into the
    # kernel (it would round the fp32 scores to bf16)
    assert torch.equal(o.detach(), masked_attention(q.float().to(bf), k.to(bf), v.to(bf), mask))


def test_without_gradients_the_values_are_the_same():
    q, k, v, allowed, mask, go = _case()
    with torch.no_grad():
        o = masked_attention(q.float(), k.float(), v.float(), mask)
    assert _rel(o, _exact(q, k, v, allowed, go)[0]) < 2e-6


def test_causal_mask_equals_sdpa_is_causal():
    q = torch.randn(2, 4, 12, 8)
    kv = torch.randn(2, 2, 12, 8)
    want = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    got = masked_attention(q, kv, kv, causal_mask(12, torch.float32, "cpu"))
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    q, k, v = torch.zeros(2, 5, 4, 8), torch.zeros(2, 2, 4, 8), torch.zeros(2, 2, 4, 8)
    with pytest.raises(ValueError, match="not a multiple"):
        masked_attention(q, k, v, torch.zeros(2, 1, 4, 4))
    q = torch.zeros(2, 4, 4, 8)
    with pytest.raises(ValueError, match="does not fit"):
        masked_attention(q, k, v, torch.zeros(3, 1, 4, 4))
    with pytest.raises(ValueError, match="does not fit"):
        masked_attention(q, k, v, torch.zeros(2, 1, 4, 5))


def test_the_blocks_threshold_is_the_kernels_where_it_runs(monkeypatch):
    """Attention by blocks from PACKED_BLOCK_MIN_LEN (measured on agro's CPU kernel) on a CPU,
    from SDPA_BLOCK_MIN_LEN where the passes run SDPA (other devices, CPU_ATTENTION off), and
    the FLOP model counts each device's."""
    assert logprobs.PACKED_BLOCK_MIN_LEN != logprobs.SDPA_BLOCK_MIN_LEN
    assert logprobs.block_min_len("cpu") == logprobs.PACKED_BLOCK_MIN_LEN
    assert logprobs.block_min_len("cuda") == logprobs.SDPA_BLOCK_MIN_LEN
    assert logprobs.block_min_len(torch.device("meta")) == logprobs.SDPA_BLOCK_MIN_LEN
    monkeypatch.setattr(logprobs, "CPU_ATTENTION", False)
    assert logprobs.block_min_len("cpu") == logprobs.SDPA_BLOCK_MIN_LEN
