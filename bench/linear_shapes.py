"""The decode loop's matmuls alone: ``F.linear`` on SmolLM2-135M's layer shapes at 1, 4 and 32
rows (live samples), fp32 and bf16, and the bf16 weight bytes read per second.

    .venv/bin/python bench/linear_shapes.py

A decode step runs each of these once per layer (30 layers) plus the LM head once. Run it alone.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from agro.perf import machine_key


def per_call_us(fn, reps: int = 200) -> float:
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e6


def main() -> None:
    torch.manual_seed(0)
    print(f"CPU: {machine_key()}; threads {torch.get_num_threads()}")
    shapes = {"q / o (576x576)": (576, 576), "gate / up (1536x576)": (1536, 576),
              "down (576x1536)": (576, 1536), "LM head (49152x576)": (49152, 576)}
    for name, (n, k) in shapes.items():
        for m in (1, 4, 32):
            x, w = torch.randn(m, k), torch.randn(n, k) * 0.02
            x16, w16 = x.bfloat16(), w.bfloat16()
            t32 = per_call_us(lambda: F.linear(x, w))
            t16 = per_call_us(lambda: F.linear(x16, w16))
            print(f"{name:22s} rows {m:2d}: fp32 {t32:8.0f} us, bf16 {t16:8.0f} us "
                  f"({w16.numel() * 2 / t16 / 1e3:5.1f} GB/s of bf16 weights)")


if __name__ == "__main__":
    main()
