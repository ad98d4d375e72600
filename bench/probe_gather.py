"""One-off probe (docs/RESULTS.md, "The packed pass's gather, 2026-12-03"): the gather at the end
of the packed log-prob pass (``agro.logprobs._gather_rows``), forward + backward, at the default
job's shapes, advanced indexing ``x[idx]`` (before 3aa6520; its CPU backward adds repeated
indices with parallel atomics, nondeterministic) against ``index_select`` (now), side by side,
in fp32 and bf16, interleaved rounds.

    .venv/bin/python bench/probe_gather.py

Shapes: 8 groups x 170 packed positions x 576 hidden (SmolLM2-135M), gathered to 32 completions
x 32 positions, each group's 4 completions sharing their last prompt state (as in the packed pass).
Run it alone on the machine."""
import statistics
import time

import torch

from agro.perf import machine_key


def rows(G=8, L=170, n=4, T=32, P=40):
    idx = torch.empty(G * n, T, dtype=torch.long)
    for g in range(G):
        for i in range(n):
            idx[g * n + i, 0] = g * L + P - 1                       # shared last prompt state
            idx[g * n + i, 1:] = g * L + P + i * (T - 1) + torch.arange(T - 1)
    return idx.reshape(-1)


def time_one(fn, x, idx, g, reps=200):
    for _ in range(10):
        fn(x, idx).backward(g)
    t = time.perf_counter()
    for _ in range(reps):
        fn(x, idx).backward(g)
    return (time.perf_counter() - t) / reps * 1e6


def main():
    torch.manual_seed(0)
    idx = rows()
    print(f"CPU: {machine_key()}  threads: {torch.get_num_threads()}")
    ways = {"advanced indexing x[idx]": lambda x, i: x[i],
            "index_select (agro now)": lambda x, i: x.index_select(0, i)}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8 * 170, 576, dtype=dtype, requires_grad=True)
        g = torch.randn(idx.numel(), 576, dtype=dtype)
        times = {k: [] for k in ways}
        for _ in range(5):                                          # interleaved rounds
            for k, fn in ways.items():
                times[k].append(time_one(fn, x, idx, g))
        a, b = (statistics.median(times[k]) for k in ways)
        print(f"{str(dtype):15s} forward+backward, median of 5 rounds x 200: "
              f"x[idx] {a:8.1f} us   index_select {b:8.1f} us   ratio {a / b:.2f}x")


if __name__ == "__main__":
    main()
