"""Resident memory that oneDNN's caches keep per distinct GEMM shape, against PyTorch's own GEMM.

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/onednn_cache_probe.py --lib onednn
    LD_PRELOAD=<jemalloc> .venv/bin/python bench/onednn_cache_probe.py --lib aten
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=64 LRU_CACHE_CAPACITY=64 LD_PRELOAD=<jemalloc> \\
        .venv/bin/python bench/onednn_cache_probe.py --lib onednn

Runs a linear layer's three fp32 products (forward, input gradient, weight gradient) for each of
SmolLM2-135M's five linear shapes at every row count from 64 to 1584 in steps of 16 (96 row counts,
1,440 distinct products), on slices of buffers allocated (and warmed) at the largest size first,
so the allocator's own growth is out of the figure; prints the growth of VmRSS over the loop (MiB;
the committed output, written before, says MB for the same MiB figures).
oneDNN (``agro.onednn_linear._lp``) makes and caches a primitive per shape (oneDNN's primitive
cache and ideep's LRU cache, 1024 entries each by default); aten (``F.linear``, ``torch.mm``) keeps
none. The ``agro`` command caps both caches (``agro.allocator.cap_onednn_caches``). Run it alone.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from agro.onednn_linear import _dw, _dx, _lp
from agro.perf import machine_key

SHAPES = [(192, 576), (576, 576), (576, 1536), (1536, 576), (49152, 576)]


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", choices=("onednn", "aten"), default="onednn")
    a = ap.parse_args()
    if a.lib == "onednn":
        def products(x, w, dy):
            _lp(x, w, None), _dx(dy, w), _dw(dy, x)
    else:
        def products(x, w, dy):
            F.linear(x, w), dy.mm(w), dy.t().mm(x)
    top = 1600
    ws = {s: torch.randn(*s) for s in SHAPES}
    xs = {k: torch.randn(top, k) for k in {k for _, k in SHAPES}}
    dys = {n: torch.randn(top, n) for n in {n for n, _ in SHAPES}}
    for (n, k), w in ws.items():            # the allocator warmed at the largest sizes
        products(xs[k], w, dys[n])
    r0, t0 = rss_mb(), time.perf_counter()
    rows = range(64, top, 16)
    for m in rows:
        for (n, k), w in ws.items():
            products(xs[k][:m], w, dys[n][:m])
    caps = {k: os.environ.get(k, "default") for k in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                                                      "LRU_CACHE_CAPACITY")}
    print(f"{machine_key()}; {a.lib}; caps {caps}; {len(rows)} row counts x {3 * len(SHAPES)} "
          f"products: VmRSS +{rss_mb() - r0:.0f} MiB in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
