"""The sampler's inverse-CDF draw with its float64 block sums a few rows at a time against one
[b, V] float64 copy, side by side on the default job's sampling call
(agro.generation._CDF_SUM_ELEMS).

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/sampler_draw_ab.py --precision bf16 --reps 7 \\
        --json docs/bench/zen5/sampler-draw-bf16.json

(``agro train`` runs on jemalloc, agro.allocator; this bench runs in-process, so preload it as
the command line does: ``.venv/bin/python -c "from agro.allocator import find_jemalloc;
print(find_jemalloc())"``.)

Builds the default job's trainer (SmolLM2-135M, 8 prompts x 4 samples, at most 32 new tokens),
draws one batch of prompts and times ``CachedGenerator.generate`` on it in ``--reps`` rounds,
once per arm per round (the order reversed every round; one warm-up call per arm first), both
arms from the same seed. Also times ``sample_from_logprobs`` alone on [32, 49152] log-probs
(median of 50 calls per arm), in this process: after ``in_use()`` has read /proc/self/maps,
jemalloc faulted the rows arm's 4 MiB blocks in again too (a fresh process that never called it
did not). Prints medians and the allocator in use. Run it alone.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from abrounds import bench_trainer, medians, order, write_json  # bench/abrounds.py

import agro.generation as G
from agro.allocator import in_use
from agro.perf import machine_key

ARMS = {"rows": G._CDF_SUM_ELEMS, "one_copy": 1 << 62}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    print(f"allocator: {in_use()}")
    rows: dict[str, list] = {}
    logp = torch.log_softmax(torch.randn(32, 49152, generator=torch.Generator().manual_seed(0)) * 3, -1)
    for arm, elems in ARMS.items():
        G._CDF_SUM_ELEMS = elems
        G.sample_from_logprobs(logp)
        ts = []
        for _ in range(50):
            t0 = time.perf_counter()
            G.sample_from_logprobs(logp)
            ts.append(time.perf_counter() - t0)
        rows[f"draw_{arm}"] = [statistics.median(ts)]
    tr = bench_trainer("sampler-draw", f"precision={a.precision}")
    cfg, col = tr.cfg, tr.collector
    _, prompt_ids = col.prompts(cfg.prompts_per_step)

    def sample(arm: str) -> tuple[float, int]:
        G._CDF_SUM_ELEMS = ARMS[arm]
        torch.manual_seed(1234)
        t0 = time.perf_counter()
        gens = tr.generator.generate(prompt_ids, cfg.group_size, col.params)
        return time.perf_counter() - t0, sum(len(c) for g in gens for c in g.completion_ids)

    try:
        for arm in ARMS:
            sample(arm)
        for r in range(a.reps):
            for arm in order(r, *ARMS):
                dt, n = sample(arm)
                rows.setdefault(f"sample_{arm}", []).append(dt)
                rows.setdefault(f"tokens_{arm}", []).append(n)
            print(f"round {r + 1}: rows {rows['sample_rows'][-1]:.3f} s ({rows['tokens_rows'][-1]} "
                  f"tokens), one copy {rows['sample_one_copy'][-1]:.3f} s "
                  f"({rows['tokens_one_copy'][-1]} tokens)", flush=True)
    finally:
        G._CDF_SUM_ELEMS = ARMS["rows"]
        tr.close_generator()
    med = medians(rows)
    print(f"\n{machine_key()}; {a.precision}; medians of {a.reps} rounds")
    print(f"  sample_from_logprobs [32, 49152]: rows {med['draw_rows'] * 1e3:.2f} ms, one copy "
          f"{med['draw_one_copy'] * 1e3:.2f} ms")
    print(f"  sampling call ({cfg.prompts_per_step} x {cfg.group_size}): rows {med['sample_rows']:.3f} s, "
          f"one copy {med['sample_one_copy']:.3f} s ({med['sample_rows'] / med['sample_one_copy']:.3f}x)")
    write_json(a.json, machine_key(), a.precision, torch.__version__, rows, med, allocator=in_use())


if __name__ == "__main__":
    main()
