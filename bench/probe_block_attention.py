"""Attention of packed groups, one layer, forward + backward: agro.logprobs' attention by
blocks (``packed_block_attention`` on a ``BlockLayout``) against attention over the dense [L, L]
block mask, each on SDPA (the kernel ``attention_backend`` picks on a CPU, ``CPU_ATTENTION``
off) and on agro's CPU kernel (``agro.cpu_attention``; dense: ``packed_dense_attention``), on the shapes of SmolLM2-135M (9 query heads, 3 key/value heads, head dim 64), for
group sizes, prompt and completion lengths from the default job's (L ~ 160) to long math
completions (L ~ 1000). Random lengths in the ranges shown, seeded; each arm timed twice per
case in alternation, best of the two means of --reps runs.

    .venv/bin/python bench/probe_block_attention.py --reps 10

Its table is what ``agro.logprobs.PACKED_BLOCK_MIN_LEN`` was chosen from (the columns
"agro dense" and "agro block" since 2026-12-05, when the packed passes' attention moved to
agro's kernel on a CPU). Run it alone."""
from __future__ import annotations

import argparse
import time
import types

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import agro.logprobs as lp
from agro.perf import machine_key

HQ, HKV, D = 9, 3, 64
CASES = (  # groups per micro-batch, n, prompt length range, completion length range
    (8, 4, (40, 64), (15, 32)), (4, 4, (40, 64), (30, 64)), (2, 4, (40, 64), (60, 128)),
    (4, 8, (40, 64), (15, 32)), (2, 8, (40, 64), (30, 64)), (1, 8, (80, 150), (60, 128)),
    (2, 4, (80, 150), (100, 256)), (1, 4, (80, 150), (200, 500)))
KERNELS = (("bf16", torch.bfloat16, SDPBackend.FLASH_ATTENTION),
           ("fp32", torch.float32, SDPBackend.MATH))       # what attention_backend picks on a CPU


def case(G, n, prange, crange, dtype, reps):
    gen = torch.Generator().manual_seed(0)
    plen = torch.randint(prange[0], prange[1] + 1, (G,), generator=gen)
    k = torch.randint(crange[0], crange[1] + 1, (G * n,), generator=gen) - 1   # inputs l_i - 1
    glen = plen + k.reshape(G, n).sum(-1)
    L = lp.packed_width(int(glen.max()), 10 ** 9)
    blk = torch.full((G, L), -2)
    off = torch.zeros(G * n, dtype=torch.long)
    for g in range(G):
        blk[g, :int(plen[g])] = -1
        o = int(plen[g])
        for i in range(n):
            blk[g, o:o + int(k[g * n + i])] = i
            off[g * n + i] = o
            o += int(k[g * n + i])
    dense_mask = lp.dense_block_mask(blk, dtype)                         # what agro's dense pass uses
    layout = lp.BlockLayout.build(plen, k, off, n, L, "cpu")
    module = types.SimpleNamespace(num_key_value_groups=HQ // HKV, is_causal=True)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def dense(q, kk, v):
        return sdpa_attention_forward(module, q, kk, v, dense_mask, scaling=D ** -0.5)[0]

    def block(q, kk, v):
        lp.CPU_ATTENTION = False
        try:
            return lp.packed_block_attention(module, q, kk, v, None, scaling=D ** -0.5,
                                             agro_block_layout=layout)[0]
        finally:
            lp.CPU_ATTENTION = True

    def agro_dense(q, kk, v):
        return lp.packed_dense_attention(module, q, kk, v, None, scaling=D ** -0.5,
                                         agro_dense_layout=lp.DenseLayout(dense_mask))[0]

    def agro_block(q, kk, v):
        return lp.packed_block_attention(module, q, kk, v, None, scaling=D ** -0.5,
                                         agro_block_layout=layout)[0]

    q = torch.randn(G, HQ, L, D, dtype=dtype, requires_grad=True)
    kk = torch.randn(G, HKV, L, D, dtype=dtype, requires_grad=True)
    v = torch.randn(G, HKV, L, D, dtype=dtype, requires_grad=True)
    go = torch.randn(G, L, HQ, D, dtype=dtype) * (blk >= -1)[:, :, None, None]
    out = {}

    def run(f):
        q.grad = kk.grad = v.grad = None
        o = f(q, kk, v)
        (o * go).sum().backward()
        return o.detach(), q.grad, kk.grad, v.grad

    arms = (("dense", dense), ("block", block), ("agro_dense", agro_dense),
            ("agro_block", agro_block))
    a = run(dense)
    real = (blk >= -1)[:, :, None, None]
    err = {}
    for name, f in arms[1:]:
        b = run(f)
        err[name] = max(float(((x - y) * (real if i == 0 else 1)).abs().max() / x.abs().max())
                        for i, (x, y) in enumerate(zip(a, b)))
    for name, f in arms * 2:
        for _ in range(2):
            run(f)
        t0 = time.perf_counter()
        for _ in range(reps):
            run(f)
        out[name] = min(out.get(name, 1e9), (time.perf_counter() - t0) / reps * 1e3)
    return L, layout.Pp, layout.Tm, out, err


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    print(f"{machine_key()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print("precision SDPA kernel | groups n prompt completion | L Pp Tm | ms: SDPA dense, "
          "SDPA block, agro dense, agro block | each / SDPA dense | max rel. difference from "
          "SDPA dense (output, dq, dk, dv): SDPA block, agro dense, agro block")
    for G, n, pr, cr in CASES:
        for name, dtype, backend in KERNELS:
            with sdpa_kernel(backend):
                L, Pp, Tm, t, err = case(G, n, pr, cr, dtype, a.reps)
            ms = [t[k] for k in ("dense", "block", "agro_dense", "agro_block")]
            print(f"{name} {backend.name.lower()} | {G} {n} {pr} {cr} | {L} {Pp} {Tm} | "
                  + " ".join(f"{x:.2f}" for x in ms) + " | "
                  + " ".join(f"{x / ms[0]:.2f}" for x in ms[1:]) + " | "
                  + " ".join(f"{e:.1e}" for e in err.values()), flush=True)


if __name__ == "__main__":
    main()
