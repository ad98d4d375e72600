"""agro.lean's SwiGLU backward before and after 2026-12-04's rewrite, side by side: the learner
step (forward, backward, AdamW) on one fixed step's groups.

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/backward_ab.py --precision bf16 --reps 7 \
        --json docs/bench/backward/backward-ab-bf16.json

(``agro train`` preloads jemalloc itself; ``.venv/bin/python -c "from agro.allocator import
find_jemalloc; print(find_jemalloc())"`` prints the library.) Arms, rotated every round:

* ``before``: agro.lean's SwiGLU backward computing its two gradients in fp32 op by op (14
  elementwise kernels over [N, I], 5 of them dtype casts, which in fp32 are no-ops): the code of
  71e28a2, kept here as the reference;
* ``after``: the SwiGLU backward as autograd runs it (``dp * silu(g)``, ``silu_backward(dp * u,
  g)`` in the input's dtype): the code as it is.

A rewrite of the head's slice loop (the log-sum-exp subtracted with type promotion from the
bf16 logits, the product with the output gradient written to bf16 with ``out=``) was measured
in a three-arm version of this bench the same day and made the step slower (5.10 s against
4.60 s, median of 7; docs/bench/backward/backward-ab-bf16-with-head-arm.txt):
a microbenchmark of the single kernels (not kept) pointed at the mixed-dtype subtraction and
product, but that cause was not isolated inside the step. It was not kept, and its arm is not here.

The optimizer steps change the weights between rounds; the groups are fixed. Medians over the
rounds; the CPU is printed. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.autograd.function import once_differentiable
from abrounds import bench_trainer, medians, order, write_json  # bench/abrounds.py (bench/ is on sys.path)

import agro.lean as lean
from agro.perf import machine_key as cpu_description


@once_differentiable
def silu_backward_before(ctx, dp):
    g, u = ctx.saved_tensors
    acc = lean._acc(g)
    gf, dpf = g.to(acc), dp.to(acc)
    s = torch.sigmoid(gf)
    du = (dpf * gf * s).to(u.dtype) if ctx.needs_input_grad[1] else None
    dg = None
    if ctx.needs_input_grad[0]:
        dg = (dpf * u.to(acc) * s * (1 + gf * (1 - s))).to(g.dtype)
    return dg, du


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None, help="write every timing here")
    ap.add_argument("--profile", action="store_true",
                    help="also print the torch profiler's top operators (by input shape) of one "
                         "learner step in each arm")
    a = ap.parse_args()

    tr = bench_trainer("backward-ab", f"precision={a.precision}")
    cfg, col = tr.cfg, tr.collector
    examples, prompt_ids = col.prompts(cfg.prompts_per_step)
    groups = col.collect(examples, prompt_ids, tr.version)
    # the Functions' backward as the autograd nodes call it (once_differentiable's wrapper)
    silu_after = lean._SiluMulFn.backward

    def setting(arm: str) -> None:
        lean._SiluMulFn.backward = staticmethod(
            silu_backward_before if arm == "before" else silu_after)

    def timed(arm: str) -> float:
        setting(arm)
        try:
            t0 = time.perf_counter()
            tr.learn(groups)
            return time.perf_counter() - t0
        finally:
            setting("after")

    arms = ("before", "after")
    rows: dict[str, list] = {f"learn_{x}": [] for x in arms}
    for x in arms:                                                 # warm-ups
        timed(x)
    for r in range(a.reps):
        for x in order(r, *arms):
            rows[f"learn_{x}"].append(timed(x))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)

    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for x in arms:
            setting(x)
            try:
                with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                    tr.learn(groups)
            finally:
                setting("after")
            print(f"\n== learner step, {x}: top operators by self time")
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=40,
                max_shapes_column_width=60))

    med = medians(rows)
    print(f"\n{cpu_description()}\nmedians over {a.reps} rounds ({a.precision}, "
          f"micro_batch_tokens={cfg.micro_batch_tokens}, "
          f"{sum(len(c) for g in groups for c in g.completion_ids)} completion tokens):")
    print(f"  learner step: after {med['learn_after']:.2f} s, before {med['learn_before']:.2f} s: "
          f"after/before = {med['learn_after'] / med['learn_before']:.3f}")
    write_json(a.json, cpu_description(), a.precision, torch.__version__, rows, med)
    tr.close_generator()


if __name__ == "__main__":
    main()
