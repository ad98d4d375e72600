"""fp32 linear layers on oneDNN's GEMM on a CPU, for the layer shapes where it is measured faster
than PyTorch's own fp32 GEMM (MKL on x86).

PyTorch runs an fp32 ``F.linear`` on a CPU through MKL's SGEMM (bf16 already goes to oneDNN).
MKL does not use its AVX-512 kernels on AMD CPUs; oneDNN's GEMM (``torch.ops.mkldnn.
_linear_pointwise``, what inductor emits for CPU linear layers) does. Whether it pays is a
property of the machine, so ``linear_backend=auto`` measures it on the model's own layer shapes
(:func:`calibrate`, cached per machine in ``~/.cache/agro/machine.json``) and makes one choice
for the whole model, which other processes, rollout actors and a resumed run follow through the
config (:func:`resolve`, :func:`use`).

:class:`OneDnnLinear` is ``nn.Linear`` with another ``forward`` (its class is swapped in place,
as :mod:`agro.lean` does: parameters, state dict and ``save_pretrained`` unchanged). For an fp32
input on a CPU with fp32 weights and no autocast it runs

    y  = x W^T + b         on oneDNN   (x [..., K], W [N, K], b [N] -> y [..., N])
    dx = dy W              on oneDNN   (the input gradient, [..., K])
    dW = dy^T x            on oneDNN (``linear_backend=onednn``: ``(dy^T) (x^T)^T`` through
                           transposed views) or on torch.mm (``onednn_fwd``: on Zen 4 oneDNN's
                           weight gradient was no faster than MKL's, on Zen 5 ~2x); db = sum dy

(for a layer with N >= BACKWARD_SLICE_MIN_N output features -- an LM head, or a wide MLP layer of
a larger model -- dx and dW on oneDNN are taken over slices of BACKWARD_SLICE_COLUMNS output
features: smaller transposed copies, see there)

and anything else (bf16 weights, autocast, a GPU tensor, fp64) is plain ``F.linear``, so the same
module is device-correct wherever it runs. Same products up to fp32 rounding (tests/
test_onednn_linear.py). An N-D input is folded to [M, K] outside the autograd function and the
output unfolded with ``_unsafe_view``, as ``F.linear`` does, so the output is never a view (the LM
head's logits then take :func:`agro.logprobs.chosen_logprobs`'s in-place gradient, as
``F.linear``'s do). Not twice-differentiable (``once_differentiable``), unlike ``nn.Linear``.
``torch.backends.mkldnn.matmul.fp32_precision`` (set by ``torch.set_float32_matmul_precision(
'high'/'medium')``) makes oneDNN's fp32 products tf32 or bf16, so ``auto`` keeps aten unless it
is full fp32.

Departure from the paper: none (an implementation of the same functions).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .models import device_of, hf_model

BACKENDS = ("auto", "aten", "onednn", "onednn_fwd")
CACHE_PREFIX = "linear/3:"       # 2: the weight gradient timed on both libraries too; 3: wide
                                 # layers' backward in slices (BACKWARD_SLICE_MIN_N)
CALIBRATION_ROWS = 512
"""Rows (tokens) of the products :func:`calibrate` times: the fp32 learner's micro-batch
(MICRO_BATCH_TOKENS['fp32'])."""
MIN_SPEEDUP = 1.05
"""The model moves to oneDNN only if a learner pass's linear GEMMs (:func:`calibrate`) take at
most 1/this of aten's: a tie stays on PyTorch's own path."""


def available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _lp(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's ``x @ w.T + b`` for x [M, K], w [N, K] (any strides) -> [M, N]."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


BACKWARD_SLICE_MIN_N = 8192
"""Layers with at least this many output features run their oneDNN backward in slices of
BACKWARD_SLICE_COLUMNS output features (:func:`_dx`, :func:`_dw`). On SmolLM2-135M that is the
LM head alone (N = the 49,152-token vocabulary); on larger models wide MLP layers too (e.g.
N = 8,192 or 8,960), where the slicing was never measured: :func:`calibrate` times each shape's
products as the layer runs them, so the choice of library stays measured."""
BACKWARD_SLICE_COLUMNS = 1024
"""Output features per slice. Why slices: oneDNN copies a transposed operand into its own
layout on every call -- ``W^T`` [K, N] for the input gradient, ``dy^T`` [N, M] for the weight
gradient -- and for an LM head those copies are the size of the head (SmolLM2-135M: 113 MB and
~70 MB at ~370 rows, fp32), allocated while the backward pass's activations are alive. Sliced,
each copy is a slice's (2.4 MB and 1.5 MB; the input gradient then also copies each [M, 1024]
slice of ``dy``, which the whole product read in place), and the products ran faster: on Zen 5
at 256-512 rows, dx 0.91-0.96x and dW 0.85-0.88x of the whole head's time. Wider slices hit a
slower oneDNN path for dW at some row counts (2,048 columns at 512 rows, 3,072 at 256 and 512:
~1.3x the whole head's), so 1,024 (``bench/head_slice_ab.py --products``; docs/RESULTS.md,
"AMD EPYC (Zen 5), 2026-12-05 (second)")."""


def _dx(dy: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The input gradient ``dy W`` on oneDNN: dy [M, N], w [N, K] -> [M, K]; summed over slices
    of BACKWARD_SLICE_COLUMNS output features when N >= BACKWARD_SLICE_MIN_N (in a fixed order:
    deterministic)."""
    n, c = w.shape[0], BACKWARD_SLICE_COLUMNS
    if n < BACKWARD_SLICE_MIN_N:
        return _lp(dy, w.t(), None)
    dx = None
    for s in range(0, n, c):
        part = _lp(dy[:, s:s + c], w[s:s + c].t(), None)                 # [M, K], a fresh tensor
        dx = part if dx is None else dx.add_(part)
    return dx


def _dw(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight gradient ``dy^T x`` on oneDNN: dy [M, N], x [M, K] -> [N, K], a slice of
    BACKWARD_SLICE_COLUMNS rows at a time when N >= BACKWARD_SLICE_MIN_N (each row of the result
    is the same dot products either way; equal up to fp32 rounding to the unsliced product)."""
    n, c, xt = dy.shape[1], BACKWARD_SLICE_COLUMNS, x.t()
    if n < BACKWARD_SLICE_MIN_N:
        return _lp(dy.t(), xt, None)
    dw = torch.empty(n, x.shape[1], dtype=dy.dtype, device=dy.device)                # [N, K]
    for s in range(0, n, c):
        dw[s:s + c] = _lp(dy[:, s:s + c].t(), xt, None)
    return dw


class _OneDnnLinearFn(torch.autograd.Function):
    """y = x W^T + b, dx = dy W on oneDNN; dW = dy^T x on oneDNN if ``dw_onednn`` else on
    torch.mm; db = sum(dy). Shapes: x [M, K], W [N, K], b [N] or None -> y [M, N]. Saves x only
    if W needs a gradient and W only if x does (as autograd's linear does: a frozen layer keeps
    no input)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                dw_onednn: bool) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None,
                              w if ctx.needs_input_grad[0] else None)
        ctx.has_b, ctx.dw_onednn = b is not None, dw_onednn
        return _lp(x, w, b)                                                 # [M, N]

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _dx(dy, w)                                                 # [M, K]
        if ctx.needs_input_grad[1]:
            dw = _dw(dy, x) if ctx.dw_onednn else dy.t().mm(x)              # [N, K]
        if ctx.has_b and ctx.needs_input_grad[2]:
            db = dy.sum(0)                                                  # [N]
        return dx, dw, db, None


class OneDnnLinear(torch.nn.Linear):
    """``nn.Linear`` whose fp32 CPU products run on oneDNN, the weight gradient included
    (``linear_backend=onednn``; module docstring); installed by :func:`install` by swapping the
    class of a plain ``nn.Linear``."""

    weight_grad_onednn = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if not (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
                and w.device.type == "cpu" and (b is None or b.dtype == torch.float32)
                and not torch.is_autocast_enabled("cpu") and x.dim() >= 1 and x.numel() > 0):
            return F.linear(x, w, b)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])              # [M, K]
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                        or (b is not None and b.requires_grad)):
            y = _OneDnnLinearFn.apply(x2, w, b, self.weight_grad_onednn)    # [M, N]
        else:
            y = _lp(x2, w, b)
        if x.dim() == 2:
            return y
        # not a view (as F.linear's folded output): the caller may write it in place, and the
        # LM head's logits keep chosen_logprobs' in-place gradient
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], w.shape[0]))


class OneDnnFwdLinear(OneDnnLinear):
    """:class:`OneDnnLinear` with the weight gradient on torch.mm (``linear_backend=onednn_fwd``)."""

    weight_grad_onednn = False


CLASSES = {"onednn": OneDnnLinear, "onednn_fwd": OneDnnFwdLinear}
"""The concrete backends other than aten -> the class their linear layers get."""
SWAPPABLE = (torch.nn.Linear, OneDnnLinear, OneDnnFwdLinear)


def linear_shapes(model) -> dict[tuple[int, int], int]:
    """Weight shapes (N, K) of the plain fp32 ``nn.Linear`` layers of ``model`` (the LM head
    included) -> how many layers have each."""
    out: dict[tuple[int, int], int] = {}
    for m in hf_model(model).modules():
        if type(m) in SWAPPABLE and m.weight.dim() == 2 \
                and m.weight.dtype == torch.float32:
            s = (int(m.weight.shape[0]), int(m.weight.shape[1]))
            out[s] = out.get(s, 0) + 1
    return out


def install(model, shapes, cls: type = OneDnnLinear) -> int:
    """Swap every plain ``nn.Linear`` (or agro's oneDNN linear) of ``model`` whose weight shape
    (N, K) is in ``shapes`` for ``cls``, and every other one back to ``nn.Linear``. Returns how
    many layers run on oneDNN afterwards."""
    want = {tuple(s) for s in shapes}
    n = 0
    for m in hf_model(model).modules():
        if type(m) not in SWAPPABLE or m.weight.dim() != 2:
            continue
        on = tuple(m.weight.shape) in want
        m.__class__ = cls if on else torch.nn.Linear
        n += on
    return n


def _time(fn, seconds: float) -> float:
    """Seconds per call of ``fn``: calls repeated for at least ``seconds`` (at least one)."""
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds:
            return dt / n


PRODUCTS = ("aten", "onednn", "aten_dw", "onednn_dw")
"""What :func:`time_shape` times per shape: forward + input gradient on each library, and the
weight gradient on each."""


def time_shape(n: int, k: int, rows: int = CALIBRATION_ROWS, reps: int = 3,
               seconds: float = 0.02) -> dict[str, float]:
    """Seconds of one layer's GEMMs at ``rows`` rows, fp32: forward + input gradient on aten
    (``F.linear``, ``dy @ W``: key "aten") and on oneDNN ("onednn"), and the weight gradient
    ``dy^T x`` on each ("aten_dw": ``torch.mm``; "onednn_dw"). After a warm-up call of each
    (oneDNN creates its primitive there), ``reps`` rounds in which the arms alternate (their
    order reverses every round), each timed over at least ``seconds``; each keeps its best round.
    Random data from a local generator (the run's RNG streams untouched)."""
    g = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=g) for s in ((rows, k), (n, k), (rows, n)))
    dyt = dy.t()
    arms = {"aten": lambda: (F.linear(x, w), dy.mm(w)),
            "onednn": lambda: (_lp(x, w, None), _dx(dy, w)),
            "aten_dw": lambda: dyt.mm(x),
            "onednn_dw": lambda: _dw(dy, x)}
    best = {a: float("inf") for a in arms}
    with torch.no_grad():
        for a in arms:
            arms[a]()
        for r in range(reps):
            for a in (PRODUCTS if r % 2 == 0 else PRODUCTS[::-1]):
                best[a] = min(best[a], _time(arms[a], seconds))
    return best


def _sig(v: float) -> float:
    return float(f"{v:.4g}")


CLOSE = 1.15
"""Totals within this factor of each other are timed again (``reps`` more rounds per shape)."""


def _totals(times: dict, shapes: dict[tuple[int, int], int]) -> dict[str, float]:
    """A learner pass's linear GEMMs per concrete backend: each shape's forward, input and weight
    gradient, times its number of layers."""
    def tot(key: str) -> float:
        return sum(c * times[f"{n}x{k}"][key] for (n, k), c in shapes.items())
    return {"aten": tot("aten") + tot("aten_dw"), "onednn": tot("onednn") + tot("onednn_dw"),
            "onednn_fwd": tot("onednn") + tot("aten_dw")}


def calibrate(model, *, use_cache: bool = True, rows: int = CALIBRATION_ROWS, reps: int = 3) -> dict:
    """Time each fp32 linear shape of ``model`` (:func:`time_shape`), add up a learner pass's
    linear GEMMs per backend (each shape weighted by its number of layers: aten; onednn, the
    three products on oneDNN; onednn_fwd, the weight gradient on aten), and choose the fastest
    for the whole model -- one of the oneDNN ones only if at least MIN_SPEEDUP x faster than aten
    (one choice per model: other processes, rollout actors and a resumed run follow it through
    the config). A close call (the fastest and aten within CLOSE) is timed again and each product
    keeps its best. Cached per machine and shape set.

    Returns {"choice": "aten"|"onednn"|"onednn_fwd", "totals": {backend: s}, "shapes": {"NxK":
    {product: s, "layers": c}}, "cached": bool}."""
    from .perf import _load_cache, _store_cache, machine_key

    shapes = linear_shapes(model)
    key = machine_key("cpu")
    sub = f"{CACHE_PREFIX}rows={rows} " + " ".join(f"{n}x{k}" for n, k in sorted(shapes))

    def valid(t) -> bool:
        return isinstance(t, dict) and all(
            isinstance(t.get(f"{n}x{k}"), dict)
            and all(isinstance(t[f"{n}x{k}"].get(a), (int, float)) for a in PRODUCTS)
            for n, k in shapes)

    times = _load_cache().get(key, {}).get(sub) if use_cache else None
    cached = valid(times)
    if not cached:
        times = {f"{n}x{k}": time_shape(n, k, rows, reps) for n, k in sorted(shapes)}
        tot = _totals(times, shapes)
        if tot["aten"] < CLOSE * min(tot.values()):
            for n, k in sorted(shapes):
                again = time_shape(n, k, rows, reps)
                times[f"{n}x{k}"] = {a: min(v, again[a]) for a, v in times[f"{n}x{k}"].items()}
        times = {s_: {a: _sig(v) for a, v in t.items()} for s_, t in times.items()}
        if use_cache:
            _store_cache(key, sub, times)
    per = {f"{n}x{k}": dict(times[f"{n}x{k}"], layers=c) for (n, k), c in sorted(shapes.items())}
    tot = _totals(times, shapes)
    best = min(("onednn", "onednn_fwd"), key=tot.get)
    choice = best if tot[best] * MIN_SPEEDUP <= tot["aten"] else "aten"
    return {"choice": choice, "totals": tot, "shapes": per, "cached": cached}


def full_fp32() -> bool:
    """True if oneDNN's fp32 products are full fp32 (not tf32 or bf16 through
    ``torch.backends.mkldnn.matmul.fp32_precision`` / ``set_float32_matmul_precision``)."""
    try:
        return torch.backends.mkldnn.matmul.fp32_precision in ("none", "ieee")
    except AttributeError:    # pragma: no cover - older torch: no such setting, always fp32
        return True


def applies(model) -> str | None:
    """Why oneDNN linear layers cannot apply to ``model`` (its parameters not on a CPU, oneDNN
    missing, no fp32 linear layers), or None if they can."""
    if device_of(model).type != "cpu":
        return f"the model is on {device_of(model).type}, not a CPU"
    if not available():
        return "this torch has no oneDNN (mkldnn)"
    if not linear_shapes(model):
        return "the model has no fp32 nn.Linear layers"
    return None


def resolve(model, backend: str, precision: str, follow: bool = False) -> tuple[str, str]:
    """ModelFields.linear_backend for ``model`` -> (concrete backend, one line for the run's
    log saying what was chosen and why). 'auto' is 'aten' where oneDNN cannot apply, and in
    bf16 (whose products already run on oneDNN; no fp32 linear layer computes); otherwise what
    :func:`calibrate` measured faster here. 'onednn' where it cannot apply is an error, unless
    ``follow`` (the choice came from another process or an earlier start: a rollout actor, a
    rank, a resumed run): then 'aten', said so. Installs nothing (:func:`use`)."""
    if backend not in BACKENDS:
        raise ValueError(f"linear_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    why_not = applies(model)
    if backend in CLASSES and why_not is not None:
        if follow:
            return "aten", f"linear_backend: {backend} -> aten in this process ({why_not})"
        raise ValueError(f"linear_backend={backend}: {why_not}")
    if backend != "auto":
        return backend, f"linear_backend: {backend} (set explicitly)"
    if why_not is not None:
        return "aten", f"linear_backend: auto -> aten ({why_not})"
    if precision == "bf16":
        return "aten", "linear_backend: auto -> aten (precision bf16: no fp32 products to move)"
    if not full_fp32():
        return "aten", ("linear_backend: auto -> aten (torch.backends.mkldnn.matmul.fp32_precision "
                        f"is {torch.backends.mkldnn.matmul.fp32_precision!r}: oneDNN's fp32 "
                        "products would not be fp32)")
    cal = calibrate(model)
    tot = cal["totals"]
    per = ", ".join(f"{s} x{t['layers']} {t['aten'] * 1e3:.2f}/{t['onednn'] * 1e3:.2f} + "
                    f"{t['aten_dw'] * 1e3:.2f}/{t['onednn_dw'] * 1e3:.2f} ms"
                    for s, t in cal["shapes"].items())
    return cal["choice"], (
        f"linear_backend: auto -> {cal['choice']} (measured on this machine"
        f"{', cached' if cal['cached'] else ''}: a learner pass's fp32 linear GEMMs at "
        f"{CALIBRATION_ROWS} rows: aten {tot['aten'] * 1e3:.1f} ms, onednn "
        f"{tot['onednn'] * 1e3:.1f} ms, onednn_fwd {tot['onednn_fwd'] * 1e3:.1f} ms; per shape "
        f"forward + input gradient aten/oneDNN + weight gradient aten/oneDNN: {per})")


def use(backend: str, *models) -> int:
    """Install a concrete backend ('aten', 'onednn' or 'onednn_fwd') on each of ``models`` (None
    skipped): every fp32-capable linear layer gets the backend's class (:data:`CLASSES`), or
    goes back to ``nn.Linear`` for 'aten'. Returns the number of layers on oneDNN."""
    if backend != "aten" and backend not in CLASSES:
        raise ValueError(f"use() needs a concrete backend, got {backend!r}")
    n = 0
    for m in models:
        if m is not None:
            n += install(m, linear_shapes(m) if backend != "aten" else (),
                         CLASSES.get(backend, OneDnnLinear))
    return n
