"""generator=vllm against agro's own sampler, side by side in one process: sampling time and the
vLLM/learner log-prob mismatch, in fp32 and bf16, on the embedded default model.

    make vllm-setup && .venv-vllm/bin/python bench/vllm_sampling.py [--reps 3] [--json out.json]

Per precision: one vLLM engine (in-process, as the trainer runs it) and agro's CachedGenerator on
the same weights (bf16: the bf16 working copy the trainer samples from), the same 8 chat prompts
x 4 samples x ``--max-new-tokens``, alternating vLLM / cached for ``--reps`` rounds after one
warm-up call each. Then :func:`agro.vllm_generator.measure_mismatch` on the same prompts, and the
time of one weight push. Printed: medians and the ratio cached / vLLM. Run it alone (two torch
processes on 2 cores slow each other 10-20x).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

QUESTIONS = ["What is 7 + 5?", "What is 12 * 3?", "Name a prime number.", "What is 20 - 9?",
             "What is 3 + 3?", "What is 9 * 9?", "What is 1 + 17?", "What is 4 * 5?"]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    from agro.generation import CachedGenerator, SamplingParams, make_generator
    from agro.models import DEFAULT_MODEL, bf16_copy, load_model, load_tokenizer
    from agro.vllm_generator import measure_mismatch

    model, tok = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in QUESTIONS]
    params = SamplingParams(a.max_new_tokens)
    out = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "args": vars(a), "results": {}}
    print(f"CPU {out['cpu']}, {out['threads']} threads, torch {out['torch']}; "
          f"{len(prompts)} prompts x {a.samples} samples x <= {a.max_new_tokens} tokens")
    for prec in [p.strip() for p in a.precisions.split(",") if p.strip()]:
        policy = bf16_copy(model) if prec == "bf16" else model
        vllm = make_generator("vllm", policy, tok, precision=prec, max_model_len=512)
        cached = CachedGenerator(policy, tok, precision=prec)
        times = {"vllm": [], "cached": []}
        tokens = {"vllm": [], "cached": []}
        for name, g in (("vllm", vllm), ("cached", cached)):   # warm-up, not timed
            g.generate(prompts, a.samples, params)
        for r in range(a.reps):
            for name, g in (("vllm", vllm), ("cached", cached)):
                torch.manual_seed(r)
                t = time.perf_counter()
                gens = g.generate(prompts, a.samples, params)
                times[name].append(time.perf_counter() - t)
                tokens[name].append(sum(len(c) for x in gens for c in x.completion_ids))
        torch.manual_seed(0)
        m = measure_mismatch(vllm, policy, tok, prompts, a.samples, params, prec)
        t = time.perf_counter()
        vllm.force_sync(policy)
        push = time.perf_counter() - t
        vllm.close()
        med = {k: statistics.median(v) for k, v in times.items()}
        tps = {k: sum(tokens[k]) / sum(times[k]) for k in times}
        res = {"seconds": times, "tokens": tokens, "median_seconds": med, "tokens_per_second": tps,
               "engine_start_seconds": vllm.start_seconds, "push_seconds": push,
               "mismatch": vars(m)}
        out["results"][prec] = res
        print(f"{prec}: vLLM median {med['vllm']:.2f} s ({tps['vllm']:.0f} tok/s), cached "
              f"{med['cached']:.2f} s ({tps['cached']:.0f} tok/s): cached / vLLM "
              f"{med['cached'] / med['vllm']:.2f}x; engine start {vllm.start_seconds:.1f} s, "
              f"weight push {push:.2f} s")
        print(f"  {m.line()}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
