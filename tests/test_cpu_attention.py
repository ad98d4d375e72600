"""agro.cpu_attention: the packed passes' CPU attention kernel against an exact (fp64)
computation, in values and gradients. (Its use in every layer of the packed passes, policy and
reference alike, is tested in tests/test_models.py: the ``attention`` fixture and
test_every_scoring_path_runs_its_precisions_attention_kernel.)"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from agro import cpu_attention
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


def test_bf16_keeps_scores_in_fp32():
    """In bf16 the error against exact attention (from the same bf16-rounded inputs) is what
    rounding P, O and the gradients to bf16 gives: mean relative error 1.9e-3 in the output,
    4.3e-3 / 4.0e-3 / 2.1e-3 in dQ / dK / dV (measured; SDPA's flash kernel: 1.5e-3 and
    4.0e-3 / 5.0e-3 / 4.1e-3 at the default job's shapes). Rounding the scores to bf16 (the
    matmul's own output dtype) roughly triples the output's; rounding dP = dO V^T to bf16
    raises dQ and dK's to 5.3e-3 / 5.0e-3. The bounds catch both."""
    q, k, v, allowed, mask, go = _case(Lq=96, Lk=96, d=64, dtype=torch.bfloat16, seed=1)
    q, k, v = (x.to(torch.bfloat16).double() for x in (q, k, v))          # same rounded inputs
    go = go.to(torch.bfloat16).double()
    want = _exact(q, k, v, allowed, go)
    got = _ours(q, k, v, mask, go, torch.bfloat16)
    assert got[0].dtype == torch.bfloat16
    errs = [_rel(a, b) for a, b in zip(got, want)]
    assert errs[0] < 3e-3 and max(errs[1:3]) < 4.7e-3 and errs[3] < 3e-3, errs


def test_chunks_change_nothing(monkeypatch):
    """Groups run a few at a time (CHUNK_BYTES); one group per chunk gives the same numbers as
    all groups in one chunk."""
    q, k, v, allowed, mask, go = _case(G=5)
    monkeypatch.setattr(cpu_attention, "CHUNK_BYTES", 10 ** 12)
    whole = _ours(q, k, v, mask, go, torch.float32)
    monkeypatch.setattr(cpu_attention, "groups_per_chunk", lambda *a: 1)
    per_group = _ours(q, k, v, mask, go, torch.float32)
    for a, b in zip(whole, per_group):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_groups_per_chunk_budget_and_thread_floor(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_attention, "CHUNK_BYTES", 4 << 20)
    assert groups_per_chunk(8, 9, 3, 176, 176) == 3        # 1.1 MB of fp32 scores per group
    assert groups_per_chunk(8, 9, 3, 464, 464) == 2        # over budget: the thread floor
    assert groups_per_chunk(1, 9, 3, 464, 464) == 1        # never more than G
    assert groups_per_chunk(100, 1, 1, 4, 4) == 100        # tiny groups: all at once


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
    assert torch.equal(o.detach(), masked_attention(q.to(bf), k.to(bf), v.to(bf), mask))


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
