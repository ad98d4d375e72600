"""Matmul throughput of this CPU in fp32 (PyTorch's own GEMM, MKL on x86, and oneDNN's, which agro's
linear_backend can choose), bf16 and bf16 autocast, and what agro's precision=auto picks here. Run alone (another torch process on the same cores halves or worse the figures):

    .venv/bin/python bench/matmul.py
"""
from __future__ import annotations

import time

import torch

from agro.models import cpu_flags, resolve_precision
from agro.onednn_linear import _lp, available

SHAPES = [(552, 576, 1536), (2048, 2048, 2048)]   # a SmolLM2 MLP micro-batch GEMM; a square one


def gflops(m: int, k: int, n: int, dtype: torch.dtype, autocast: bool = False, reps: int = 10,
           onednn: bool = False) -> float:
    a = torch.randn(m, k, dtype=torch.float32 if autocast else dtype)
    b = torch.randn(k, n, dtype=torch.float32 if autocast else dtype)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.no_grad()
    bt = b.t().contiguous()                                  # [n, k]: a linear layer's weight
    prod = (lambda: _lp(a, bt, None)) if onednn else (lambda: a @ b)
    with ctx:
        for _ in range(3):
            prod()
        t = time.perf_counter()
        for _ in range(reps):
            prod()
        dt = (time.perf_counter() - t) / reps
    return 2 * m * k * n / dt / 1e9


def main() -> None:
    flags = cpu_flags()
    print(f"threads {torch.get_num_threads()}; bf16 CPU flags: "
          f"{sorted(f for f in flags if 'bf16' in f or f.startswith('amx')) or 'none'}; "
          f"oneDNN says bf16 supported: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}; "
          f"agro precision=auto -> {resolve_precision('auto', 'cpu')}")
    for m, k, n in SHAPES:
        f32 = gflops(m, k, n, torch.float32)
        b16 = gflops(m, k, n, torch.bfloat16)
        auto = gflops(m, k, n, torch.bfloat16, autocast=True)
        dnn = f" | fp32 oneDNN {gflops(m, k, n, torch.float32, onednn=True):6.1f}" if available() else ""
        print(f"{m}x{k}x{n}: fp32 {f32:6.1f} GFLOP/s | bf16 {b16:6.1f} | bf16 autocast {auto:6.1f} "
              f"| fp32/bf16 {f32 / b16:4.1f}x{dnn}")


if __name__ == "__main__":
    main()
