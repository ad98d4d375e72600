"""fp32 linear layers on oneDNN's GEMM against PyTorch's own (MKL on x86), side by side: an option
measured and not adopted (docs/RESULTS.md).

    .venv/bin/python bench/linear_backend_ab.py --reps 6 --json docs/bench/packed_decode/linear-backend-fp32.json

PyTorch runs an fp32 ``F.linear`` on a CPU through MKL's SGEMM; oneDNN's GEMM
(``torch.ops.mkldnn._linear_pointwise``, what inductor emits for CPU linear layers) is another
implementation of the same product. This bench swaps ``nn.Linear.forward`` for an autograd
function whose forward (``x W^T``) and input gradient (``dy W``) run on oneDNN and whose weight
gradient (``dy^T x``) stays on ``torch.mm``, then times, on the default job's trainer (SmolLM2-135M,
fp32, one step's 8 groups of 4 sampled once), the reference pass and the learner step (forward,
backward, optimizer) with the swap and without it, in ``--reps`` interleaved rounds (the first
dropped as warm-up). ``--shapes`` also times the three GEMMs of one linear layer alone at the
decoder's shapes (medians of 7 after two warm-up calls). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from abrounds import bench_trainer, medians, one_step_groups, order, timed, write_json  # bench/abrounds.py

from agro.perf import machine_key

_lp = torch.ops.mkldnn._linear_pointwise


class _OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b on oneDNN; dx = dy W on oneDNN, dW = dy^T x on torch.mm. x [..., K], W [N, K]."""

    @staticmethod
    def forward(ctx, x, w, b):
        y = _lp(x.reshape(-1, x.shape[-1]), w, b, "none", [], "")
        ctx.save_for_backward(x, w)
        ctx.has_b = b is not None
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _lp(dy2, w.t(), None, "none", [], "").view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = dy2.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_b and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db


_plain_forward = torch.nn.Linear.forward


def _onednn_forward(self, x):
    if x.dtype == torch.float32 and self.weight.dtype == torch.float32 \
            and not torch.is_autocast_enabled("cpu"):
        return _OneDnnLinear.apply(x, self.weight, self.bias)
    return _plain_forward(self, x)


def shapes(reps: int) -> None:
    for M in (512, 1500):
        for N, K in ((576, 576), (192, 576), (1536, 576), (576, 1536)):
            x, w, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
            fl = 2 * M * N * K / 1e9
            r = {"fwd mkl": timed(lambda: F.linear(x, w), reps),
                 "fwd onednn": timed(lambda: _lp(x, w, None, "none", [], ""), reps),
                 "dx mkl": timed(lambda: dy.mm(w), reps),
                 "dx onednn": timed(lambda: _lp(dy, w.t(), None, "none", [], ""), reps),
                 "dW mkl": timed(lambda: dy.t().mm(x), reps)}
            print(f"  M {M} N {N} K {K}: " + ", ".join(f"{k} {fl / v:.0f}" for k, v in r.items())
                  + " GFLOP/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--shapes", action="store_true", help="also time one layer's GEMMs alone")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.shapes:      # before the trainer exists (its start-up work would share the cores)
        print(f"{machine_key()}; one linear layer's GEMMs alone, medians of 7")
        shapes(7)
    tr = bench_trainer("linear-backend", "precision=fp32")
    groups = one_step_groups(tr, seed=0)
    col = tr.collector
    rows: dict[str, list] = {k: [] for k in ("ref_mkl", "ref_onednn", "learn_mkl", "learn_onednn")}
    try:
        for r in range(a.reps):
            for arm in order(r, "mkl", "onednn"):
                torch.nn.Linear.forward = _onednn_forward if arm == "onednn" else _plain_forward
                t0 = time.perf_counter()
                col.attach_ref_logprobs(groups)
                t1 = time.perf_counter()
                tr.learn(groups)
                t2 = time.perf_counter()
                if r:
                    rows[f"ref_{arm}"].append(t1 - t0)
                    rows[f"learn_{arm}"].append(t2 - t1)
            if r:
                print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)
    finally:
        torch.nn.Linear.forward = _plain_forward
    med = medians(rows)
    print(f"\n{machine_key()}; torch {torch.__version__}; fp32; medians of {a.reps - 1} rounds")
    for k in ("ref", "learn"):
        print(f"  {k}: MKL {med[f'{k}_mkl']:.3f} s, oneDNN {med[f'{k}_onednn']:.3f} s "
              f"({med[f'{k}_mkl'] / med[f'{k}_onednn']:.3f}x)")
    write_json(a.json, machine_key(), "fp32", torch.__version__, rows, med)


if __name__ == "__main__":
    main()
