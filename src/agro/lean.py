"""Memory-lean autograd for two blocks of Llama-family decoders: RMSNorm and the SwiGLU MLP.

Same forward numbers as transformers' modules; what changes is what the backward pass keeps.

* RMSNorm, ``w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)`` computed in fp32: autograd keeps the
  fp32 copy of x (twice x's bytes in bf16) and the normalised x. :class:`_RMSNormFn` keeps x
  and the per-row ``rstd`` [..., 1] and recomputes the normalised x in the backward.
* SwiGLU, ``down(silu(gate(x)) * up(x))``: autograd keeps gate(x) (for silu's backward),
  silu(gate(x)) and up(x) (for the product's). :class:`_SiluMulFn` keeps gate(x) and up(x) and
  recomputes silu in the backward.

Measured on the default job's learner step (SmolLM2-135M, 8 groups of 4 in one micro-batch,
~1,300 packed positions; saved-tensor hooks): autograd kept 1.66 GiB, of which RMSNorm's fp32
copies were 174 MiB and silu's outputs 114 MiB in bf16 (228 MiB for the same batch in fp32) --
the two removed here. Their backward recomputes one elementwise pass each; no matmul is added.

:func:`install` swaps the class of every module whose class is in :data:`LEAN` for a subclass
with the lean forward (state dict, parameters, ``isinstance`` and ``save_pretrained`` unchanged),
so every pass (learner, reference, sampler) and every copy (``deepcopy``, the bf16 working copy)
runs it. ``AGRO_LEAN_MODULES=0`` in the environment turns it off (for A/B measurements).
The MLP's gradients are autograd's bit for bit (the same kernels, g and u of one dtype);
RMSNorm's equal autograd's up to float rounding (in bf16 each is rounded once from fp32 where
autograd rounds intermediate products): tests/test_lean.py. Not twice-differentiable.

Departure from the paper: none (an implementation of the same functions).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ENV = "AGRO_LEAN_MODULES"


def _acc(t: torch.Tensor) -> torch.dtype:
    """The dtype the arithmetic runs in: fp32 for fp32/bf16/fp16 (as transformers' RMSNorm),
    float64 for float64 (gradcheck)."""
    return torch.promote_types(t.dtype, torch.float32)


class _RMSNormFn(torch.autograd.Function):
    """``w * (x.float() * rstd).to(x.dtype)``, ``rstd = rsqrt(mean(x.float()^2, -1) + eps)``
    (transformers' LlamaRMSNorm, op for op; float64 stays float64). Shapes: x [..., H], w [H] -> [..., H] in the
    promoted dtype of w and x. Saves x, w and rstd [..., 1] fp32."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_acc(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)       # [..., 1] fp32
        y = w * (xf * rstd).to(x.dtype)
        if ctx is not None:
            ctx.save_for_backward(x, w, rstd)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, w, rstd = ctx.saved_tensors
        xhat = x.to(_acc(x)) * rstd                                      # [..., H] fp32
        gw = None
        if ctx.needs_input_grad[1]:   # d/dw of w * xhat.to(x.dtype), summed over the rows
            gw = (dy * xhat.to(x.dtype)).reshape(-1, w.shape[-1]).sum(0).to(w.dtype)
        gx = None
        if ctx.needs_input_grad[0]:   # d/dx = rstd * (g - xhat * mean(g * xhat)), g = d/dxhat
            g = (dy * w).to(x.dtype).to(_acc(x))
            gx = (rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return gx, gw, None


class _SiluMulFn(torch.autograd.Function):
    """``silu(g) * u`` (SwiGLU's gate). Shapes: g, u [..., I] -> [..., I]. Saves g and u; the
    backward recomputes ``silu(g)``: d/du = dp * silu(g), d/dg = silu_backward(dp * u, g) =
    dp * u * sigmoid(g) * (1 + g * (1 - sigmoid(g))). These are the kernels, in the input's dtype,
    that autograd runs for ``F.silu(g) * u`` (MulBackward, then SiluBackward), so for g and u of
    one dtype (gate and up projections always are) the gradients are bit for bit autograd's
    (tests/test_lean.py). An earlier version computed them in fp32 op by op (14 elementwise
    kernels over [N, I], 5 of them casts): the bf16 learner step took 1.24x as long with it
    (jemalloc preloaded; bench/backward_ab.py, docs/bench/backward/)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    @once_differentiable
    def backward(ctx, dp: torch.Tensor):
        g, u = ctx.saved_tensors
        du = dp * F.silu(g) if ctx.needs_input_grad[1] else None
        dg = torch.ops.aten.silu_backward(dp * u, g) if ctx.needs_input_grad[0] else None
        return dg, du


def _lean_rmsnorm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():   # nothing kept anyway (sampling, reference): no Function
        return _RMSNormFn.forward(None, hidden_states, self.weight, self.variance_epsilon)
    return _RMSNormFn.apply(hidden_states, self.weight, self.variance_epsilon)


def _lean_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    g, u = self.gate_proj(x), self.up_proj(x)
    p = F.silu(g) * u if not torch.is_grad_enabled() else _SiluMulFn.apply(g, u)
    return self.down_proj(p)


def _lean_classes() -> dict[type, type]:
    """transformers' classes with exactly LlamaRMSNorm's / LlamaMLP's code -> lean subclasses."""
    out: dict[type, type] = {}
    try:
        from transformers.models.llama import modeling_llama as llama
        from transformers.models.mistral import modeling_mistral as mistral
        from transformers.models.qwen2 import modeling_qwen2 as qwen2
    except ImportError:   # pragma: no cover - transformers always ships these three
        return out
    for mod in (llama, mistral, qwen2):
        for name, fwd in (("RMSNorm", _lean_rmsnorm_forward), ("MLP", _lean_mlp_forward)):
            cls = getattr(mod, mod.__name__.rsplit("_", 1)[-1].capitalize() + name, None)
            if cls is not None:
                name_ = "Lean" + cls.__name__
                lean = globals().get(name_)            # built before: keep it (pickle identity)
                if not (isinstance(lean, type) and issubclass(lean, cls)):
                    lean = type(name_, (cls,), {"forward": fwd, "__module__": __name__})
                    globals()[name_] = lean            # found by name: pickle, torch.save
                out[cls] = lean
    return out


def _is_silu(act) -> bool:
    try:
        from transformers.activations import SiLUActivation
    except ImportError:   # pragma: no cover - older transformers map 'silu' to nn.SiLU
        SiLUActivation = torch.nn.SiLU
    return type(act) in (torch.nn.SiLU, SiLUActivation)


LEAN: dict[type, type] = {}


def __getattr__(name: str):
    """``agro.lean.LeanLlamaRMSNorm`` and the others, built on first use: pickle and
    ``torch.load`` find a swapped module's class by name, also in a process that has not called
    :func:`install` (and whatever ``AGRO_LEAN_MODULES`` says: a pickled lean model unpickles
    as lean). Looking one up imports transformers."""
    if name.startswith("Lean"):
        if not LEAN:
            LEAN.update(_lean_classes())
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def install(model) -> int:
    """Swap every RMSNorm / SwiGLU MLP module of a Llama, Mistral or Qwen2 model for its lean
    subclass; returns how many were swapped (0 when disabled by ``AGRO_LEAN_MODULES=0``). An MLP
    is swapped only if its activation is SiLU (``hidden_act='silu'``) and it has the three
    projections; other modules and models are left as they are."""
    if not enabled():
        return 0
    if not LEAN:
        LEAN.update(_lean_classes())
    n = 0
    for m in model.modules():
        lean = LEAN.get(type(m))
        if lean is None:
            continue
        if lean.forward is _lean_mlp_forward and not (
                _is_silu(getattr(m, "act_fn", None))
                and all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj"))):
            continue
        m.__class__ = lean
        n += 1
    return n
