"""The sampler's inverse-CDF draw with its float64 block sums a few rows at a time against one
[b, V] float64 copy, side by side on the default job's sampling call
(agro.generation._CDF_SUM_ELEMS).

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/sampler_draw_ab.py --precision bf16 --reps 7 \\
        --json docs/bench/zen5/sampler-draw-bf16-r2.json

(``agro train`` runs on jemalloc, agro.allocator; this bench runs in-process, so preload it as
the command line does: ``.venv/bin/python -c "from agro.allocator import find_jemalloc;
print(find_jemalloc())"``.)

Builds the default job's trainer (SmolLM2-135M, 8 prompts x 4 samples, at most 32 new tokens),
draws one batch of prompts and times ``CachedGenerator.generate`` on it in ``--reps`` rounds,
once per arm per round (the order reversed every round; one warm-up call per arm first), both
arms from the same seed. Before that it times ``sample_from_logprobs`` alone on [32, 49152]
log-probs (4 rounds of 50 calls per arm, the order reversed every round), in a fresh process
(``--draws-only``) and in this one after ``agro.allocator.in_use()`` has read /proc/self/maps as
the trainer's log does. Prints medians and the allocator in use. Run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from abrounds import bench_trainer, medians, order, write_json  # bench/abrounds.py

import agro.generation as G
from agro.allocator import in_use
from agro.perf import machine_key

ARMS = {"rows": G._CDF_SUM_ELEMS, "one_copy": 1 << 62}


def draws(rounds: int = 4, calls: int = 50) -> dict[str, list]:
    """Median seconds of ``sample_from_logprobs`` on [32, 49152] log-probs per arm, in
    ``rounds`` rounds of ``calls`` calls (the arms' order reversed every round)."""
    logp = torch.log_softmax(torch.randn(32, 49152, generator=torch.Generator().manual_seed(0)) * 3, -1)
    out: dict[str, list] = {}
    try:
        for r in range(rounds):
            for arm in order(r, *ARMS):
                G._CDF_SUM_ELEMS = ARMS[arm]
                G.sample_from_logprobs(logp)
                ts = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    G.sample_from_logprobs(logp)
                    ts.append(time.perf_counter() - t0)
                out.setdefault(f"draw_{arm}", []).append(statistics.median(ts))
    finally:
        G._CDF_SUM_ELEMS = ARMS["rows"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    ap.add_argument("--draws-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.draws_only:            # a fresh process: nothing has run before the draws
        print(json.dumps(draws()))
        return
    p = subprocess.run([sys.executable, __file__, "--draws-only"], capture_output=True, text=True,
                       check=True, env=dict(os.environ))
    rows: dict[str, list] = {f"fresh_{k}": v for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}
    print(f"allocator: {in_use()}")          # reads /proc/self/maps, as the trainer's log does
    rows.update(draws())
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
    for where, k in (("a fresh process", "fresh_draw"), ("this process", "draw")):
        print(f"  sample_from_logprobs [32, 49152] in {where}: rows {med[k + '_rows'] * 1e3:.2f} ms, "
              f"one copy {med[k + '_one_copy'] * 1e3:.2f} ms")
    print(f"  sampling call ({cfg.prompts_per_step} x {cfg.group_size}): rows {med['sample_rows']:.3f} s, "
          f"one copy {med['sample_one_copy']:.3f} s ({med['sample_rows'] / med['sample_one_copy']:.3f}x)")
    write_json(a.json, machine_key(), a.precision, torch.__version__, rows, med, allocator=in_use())


if __name__ == "__main__":
    main()
