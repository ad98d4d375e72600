"""One decode step's attention over the static cache, the four ways agro.fast_decode could run it,
side by side: 30 layers x 32 rows x 3 key-value heads x 3 query heads each x head_dim 64
(SmolLM2-135M's shapes; random values), the code of :meth:`agro.fast_decode.StaticDecoder.step`'s
attention with the cache in fp32 or bf16, over all the cache's columns or over the first
``filled`` as the decoder slices them (:func:`agro.fast_decode.columns_read`; the rest masked
either way).

    .venv/bin/python bench/probe_cache_attention.py

Prints milliseconds per step for each (columns, filled) pair and each arm (the median over 5
rounds, the arms' order rotated each round, of each round's median of 3 calls after 2
warm-ups), and each arm's largest error against a float64 attention over the same bf16-valued
keys and values at one layer. Run it alone on the machine."""
from __future__ import annotations

import statistics

import torch
from abrounds import timed  # bench/abrounds.py (bench/ is on sys.path)

from agro.fast_decode import columns_read
from agro.perf import machine_key

B, KVH, G, HD, LAYERS = 32, 3, 3, 64, 30


def attention(q, kt, v, mask, n: int, dt):
    """The step's attention at one layer: q [B, kvh, g, hd], kt [B, kvh, hd, cap], v [B, kvh,
    cap, hd] in ``dt``, mask [B, 1, 1, cap] fp32, over the first n columns."""
    w = torch.matmul(q.to(dt), kt[..., :n]).float() * HD ** -0.5
    w = torch.softmax(w + mask[..., :n], dim=-1).to(dt)
    return torch.matmul(w, v[:, :, :n])


def main() -> None:
    torch.manual_seed(0)
    print(f"{machine_key()}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    for cap, filled in ((100, 75), (400, 200), (400, 300), (800, 400)):
        kt = torch.randn(LAYERS, B, KVH, HD, cap).bfloat16()        # bf16 values, as bf16 weights make
        v = torch.randn(LAYERS, B, KVH, cap, HD).bfloat16()
        q = torch.randn(B, KVH, G, HD).bfloat16()
        mask = torch.zeros(B, 1, 1, cap)
        mask[..., filled:] = torch.finfo(torch.float32).min
        caches = {"fp32": (kt.float(), v.float(), torch.float32), "bf16": (kt, v, torch.bfloat16)}
        sliced = columns_read(filled, cap)
        arms = {f"{name} {cols}": (k_, v_, dt, n) for name, (k_, v_, dt) in caches.items()
                for cols, n in (("all", cap), ("slice", sliced))}
        exact = torch.softmax(q.double() @ kt[0].double() * HD ** -0.5 + mask.double(), -1) @ v[0].double()
        err = {a: float((attention(q, k_[0], v_[0], mask, n, dt).double() - exact).abs().max())
               for a, (k_, v_, dt, n) in arms.items()}
        rounds: dict[str, list] = {a: [] for a in arms}
        names = list(arms)
        for r in range(5):
            for a in names[r % 4:] + names[:r % 4]:
                k_, v_, dt, n = arms[a]
                rounds[a].append(1e3 * timed(lambda: [attention(q, k_[i], v_[i], mask, n, dt)
                                                       for i in range(LAYERS)], 3))
        ms = {a: statistics.median(t) for a, t in rounds.items()}
        base = ms["fp32 all"]
        print(f"{cap} columns, {filled} written (slice {sliced}): " + "; ".join(
            f"{k} {t:.1f} ms ({t / base:.2f}x, err {err[k]:.1e})" for k, t in ms.items()))


if __name__ == "__main__":
    main()
