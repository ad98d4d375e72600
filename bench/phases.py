"""A default-job step's phases, each timed with and without one kernel choice, side by side.

    .venv/bin/python bench/phases.py --precision bf16 --reps 5 --json docs/bench/phases-bf16.json

Builds the default job's trainer (SmolLM2-135M from the embedded GGUF, 8 prompts x 4 samples,
at most 32 new tokens; ``--precision`` fp32 or bf16), draws one batch of prompts, and then, in
``--reps`` interleaved rounds, times on that same work:

* sampling (``CachedGenerator``): transformers' forward on its ``DynamicCache`` for every decode
  step (``static_cache=False``) against agro's static-cache decode (``agro.fast_decode``); both
  from the same seed, so both sample the same prompts' groups;
* the reference pass and the learner step (forward, backward, optimizer) on one fixed set of
  groups, on SDPA (``agro.logprobs.CPU_ATTENTION`` off: since 2026-12-05 the packed passes on a
  CPU run agro's own kernel, compared with SDPA by ``bench/cpu_attention_ab.py``): SDPA's fused
  flash kernel (PyTorch's choice) against its math backend, both forced
  (``agro.logprobs.attention_backend`` picks math on a CPU for fp32 passes on SDPA and flash
  for bf16 ones, reference included).

The learner's optimizer steps change the weights between rounds; the sampling rounds draw from
the weights of that moment, so their completion lengths move a little: tokens per second is
printed next to the seconds. Medians over the rounds; the CPU and its flags are printed. Run it
alone on the machine: a second torch process on the same cores slows both 10-20x.
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from abrounds import bench_trainer, medians, order, write_json  # bench/abrounds.py (bench/ is on sys.path)

import agro.logprobs as lp
from agro.perf import machine_key as cpu_description


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None, help="write every timing here")
    ap.add_argument("--profile", action="store_true",
                    help="also print the torch profiler's top operators of each arm, one call each")
    a = ap.parse_args()

    tr = bench_trainer("phases", f"precision={a.precision}")
    cfg, col = tr.cfg, tr.collector
    examples, prompt_ids = col.prompts(cfg.prompts_per_step)
    groups = col.collect(examples, prompt_ids, tr.version)   # warm-up; fixed groups for learner/ref
    real_backend = lp.attention_backend

    def forced(math_backend: bool):
        """attention_backend replaced: SDPA's math backend, or PyTorch's own (flash) choice."""
        if not math_backend:
            return lambda dev, precision: contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return lambda dev, precision: sdpa_kernel(SDPBackend.MATH)

    def sample(static: bool) -> tuple[float, int]:
        tr.generator.static_cache = static
        torch.manual_seed(1234)
        t0 = time.perf_counter()
        gens = tr.generator.generate(prompt_ids, cfg.group_size, col.params)
        dt = time.perf_counter() - t0
        return dt, sum(len(c) for g in gens for c in g.completion_ids)

    def timed_with_kernel(math_backend: bool, fn) -> float:
        """Seconds of ``fn()`` on SDPA (agro's CPU kernel off) with agro's attention_backend
        forced to one kernel."""
        lp.attention_backend = forced(math_backend)
        lp.CPU_ATTENTION = False
        try:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        finally:
            lp.attention_backend = real_backend
            lp.CPU_ATTENTION = True

    def ref(math_backend: bool) -> float:
        return timed_with_kernel(math_backend, lambda: col.attach_ref_logprobs(groups))

    def learn(math_backend: bool) -> float:
        return timed_with_kernel(math_backend, lambda: tr.learn(groups))

    rows: dict[str, list] = {k: [] for k in ("sample_hf_cache", "sample_static", "tokens_hf_cache",
                                             "tokens_static", "ref_flash", "ref_math",
                                             "learn_flash", "learn_math")}
    sample(True), sample(False), ref(True), ref(False), learn(True), learn(False)  # warm-ups
    for r in range(a.reps):
        for static in order(r, False, True):
            dt, n = sample(static)
            rows["sample_static" if static else "sample_hf_cache"].append(dt)
            rows["tokens_static" if static else "tokens_hf_cache"].append(n)
        for m in order(r, False, True):
            rows["ref_math" if m else "ref_flash"].append(ref(m))
        for m in order(r, False, True):
            rows["learn_math" if m else "learn_flash"].append(learn(m))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()))

    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        for what, fn in (("sampling, transformers cache", lambda: sample(False)),
                         ("sampling, static cache", lambda: sample(True)),
                         ("learner step, flash attention", lambda: learn(False)),
                         ("learner step, math attention", lambda: learn(True))):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"\n== {what}: top operators by self time")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))

    med = medians(rows)
    tok_hf = med["tokens_hf_cache"] / med["sample_hf_cache"]
    tok_st = med["tokens_static"] / med["sample_static"]
    print(f"\nmedians over {a.reps} rounds ({a.precision}):")
    print(f"  sampling {cfg.prompts_per_step} x {cfg.group_size}: transformers cache "
          f"{med['sample_hf_cache']:.2f} s ({tok_hf:.0f} tok/s), static cache "
          f"{med['sample_static']:.2f} s ({tok_st:.0f} tok/s): {tok_st / tok_hf:.2f}x per token")
    print(f"  reference pass: flash {med['ref_flash']:.2f} s, math {med['ref_math']:.2f} s: "
          f"{med['ref_flash'] / med['ref_math']:.2f}x")
    print(f"  learner step: flash {med['learn_flash']:.2f} s, math {med['learn_math']:.2f} s: "
          f"{med['learn_flash'] / med['learn_math']:.2f}x")
    write_json(a.json, cpu_description(), a.precision, torch.__version__, rows, med)
    tr.close_generator()


if __name__ == "__main__":
    main()
