"""fp32 linear layers on oneDNN's GEMM against PyTorch's own (MKL on x86), side by side
(agro.onednn_linear; ModelFields.linear_backend chooses between them per machine).

    .venv/bin/python bench/linear_backend_ab.py --reps 6 --json docs/bench/packed_decode/linear-backend-fp32.json

PyTorch runs an fp32 ``F.linear`` on a CPU through MKL's SGEMM; oneDNN's GEMM
(``torch.ops.mkldnn._linear_pointwise``, what inductor emits for CPU linear layers) is another
implementation of the same product. This bench installs each ``linear_backend`` on the policy
and the reference (``aten``: plain ``nn.Linear``; ``onednn_fwd``: forward ``x W^T`` and input
gradient ``dy W`` on oneDNN, weight gradient ``dy^T x`` on ``torch.mm``; ``onednn``: all three on
oneDNN), then times, on the default job's trainer (SmolLM2-135M,
fp32, one step's 8 groups of 4 sampled once), the reference pass and the learner step (forward,
backward, optimizer) on each, in ``--reps`` rounds (the arms' order reversed every round; the
first round dropped as warm-up). ``--shapes`` also times the three GEMMs of one linear layer alone at the
decoder's shapes (medians of 7 after two warm-up calls). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from abrounds import bench_trainer, medians, one_step_groups, timed, write_json  # bench/abrounds.py

from agro import onednn_linear
from agro.onednn_linear import _dw, _dx, _lp
from agro.perf import machine_key


def shapes(reps: int) -> None:
    for M in (512, 1500):
        for N, K in ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)):
            x, w, dy = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
            fl = 2 * M * N * K / 1e9
            r = {"fwd mkl": timed(lambda: F.linear(x, w), reps),
                 "fwd onednn": timed(lambda: _lp(x, w, None), reps),
                 "dx mkl": timed(lambda: dy.mm(w), reps),
                 "dx onednn": timed(lambda: _dx(dy, w), reps),
                 "dW mkl": timed(lambda: dy.t().mm(x), reps),
                 "dW onednn": timed(lambda: _dw(dy, x), reps)}
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
    arms = ("aten", "onednn_fwd", "onednn")
    rows: dict[str, list] = {f"{p}_{b}": [] for p in ("ref", "learn") for b in arms}
    models = (tr.policy, tr.reference.model)
    try:
        for r in range(a.reps):
            for arm in (arms if r % 2 == 0 else arms[::-1]):
                onednn_linear.use(arm, *models)
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
        onednn_linear.use(tr.cfg.linear_backend, *models)
    med = medians(rows)
    print(f"\n{machine_key()}; torch {torch.__version__}; fp32; medians of {a.reps - 1} rounds")
    for k in ("ref", "learn"):
        base = med[f"{k}_aten"]
        print(f"  {k}: " + ", ".join(f"{b} {med[f'{k}_{b}']:.3f} s ({base / med[f'{k}_{b}']:.3f}x)"
                                     for b in arms))
    write_json(a.json, machine_key(), "fp32", torch.__version__, rows, med)


if __name__ == "__main__":
    main()
