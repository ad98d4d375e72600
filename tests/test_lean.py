"""agro.lean: the RMSNorm and SwiGLU modules that keep less for the backward pass give the same
forward numbers as transformers' modules, the same gradients up to rounding, and keep exactly the
tensors they say they drop."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from agro import lean
from agro.models import bf16_copy


def plain_llama(layers: int = 2, act: str = "silu", **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, hidden_act=act,
                      tie_word_embeddings=True, **kw)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():    # norms away from 1, so their weight gradient is not trivial
        for n, p in m.named_parameters():
            if "norm" in n:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return m


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of one forward."""
    seen, total = set(), [0]

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total[0] += s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return total[0]


def test_install_swaps_norms_and_silu_mlps_only_and_can_be_turned_off(monkeypatch):
    m = plain_llama(layers=3)
    assert lean.install(m) == 3 * 2 + 1 + 3          # 2 norms a layer + the final one; 3 MLPs
    assert all(type(x).__name__.startswith("Lean") for x in m.modules()
               if type(x).__name__.endswith(("RMSNorm", "MLP")))
    assert lean.install(m) == 0                      # already lean
    gelu = plain_llama(act="gelu")
    assert lean.install(gelu) == 2 * 2 + 1           # the norms only: not a SwiGLU with SiLU
    monkeypatch.setenv(lean.ENV, "0")
    assert lean.install(plain_llama()) == 0
    # a lean model survives deepcopy, the bf16 working copy and pickling with its classes
    for c in (copy.deepcopy(m), bf16_copy(m), pickle.loads(pickle.dumps(m))):
        assert type(c.model.norm).__name__ == "LeanLlamaRMSNorm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_forward_and_gradients_and_less_kept_for_backward(dtype):
    ref = plain_llama()
    ids = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(1))
    fast = copy.deepcopy(ref)
    assert lean.install(fast) == 7
    if dtype == torch.bfloat16:   # the trainer's bf16 path: bf16 working weights (MasterWeights)
        ref, fast = bf16_copy(ref), bf16_copy(fast)
        ref.requires_grad_(True), fast.requires_grad_(True)
    w = torch.randn(3, 17, 300, generator=torch.Generator().manual_seed(2))
    out = {}
    for name, m in (("ref", ref), ("fast", fast)):
        logits = m(input_ids=ids).logits
        (F.log_softmax(logits.float(), -1) * w).sum().backward()
        out[name] = (logits.detach(), {n: p.grad.float() for n, p in m.named_parameters()})
    assert torch.equal(out["ref"][0], out["fast"][0])          # op for op the same forward
    with torch.no_grad():                                       # the no-Function path too
        assert torch.equal(ref(input_ids=ids).logits, fast(input_ids=ids).logits)
    for n, g in out["ref"][1].items():
        gf = out["fast"][1][n]
        # fp32: rounding only (measured 1e-7 relative); bf16: each rounded once from fp32 here,
        # after bf16 intermediates in autograd's. A wrong formula is off by O(1).
        tol = 1e-5 if dtype == torch.float32 else 0.01   # measured 0.2-0.6 % in bf16
        assert (gf - g).norm() <= tol * g.norm(), n
    # what the backward keeps: per norm, autograd's fp32 x-hat (fp32) or fp32 copy of x (bf16;
    # lean keeps x itself, autograd x-hat in bf16: both 2 bytes); per MLP, silu(gate(x)).
    # B*L rows, width H = 64, I = 96.
    rows, e = 3 * 17, torch.finfo(dtype).bits // 8
    norms, mlps = 2 * 2 + 1, 2
    dropped = norms * rows * 64 * 4 + mlps * rows * 96 * e
    assert saved_bytes(ref, ids) - saved_bytes(fast, ids) == dropped


def test_rmsnorm_and_silu_mul_float64_gradcheck():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: lean._RMSNormFn.apply(a, b, 1e-6), (x, w))
    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lean._SiluMulFn.apply, (g, u))
