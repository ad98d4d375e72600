"""How far agro's own sampler's log-probs are from the learner's, per precision.

    .venv/bin/python bench/sampler_mismatch.py --precision bf16 fp32 --prompts 16 --n 4 [--before-dec04-cache]

Builds the default job's trainer at each precision and measures, with the same function the
run's check uses (``agro.sampler_check.measure_mismatch``), ``log pi_sampler(y) - log
pi_learner(y)`` on completions the run's generator samples from pi (temperature 1, no
truncation) for held-out prompts: the behaviour log-probs the sampler recorded against the
learner's scoring of the same tokens at the run's precision (the numbers the loss uses). §4.2's
on-policy-only terms (agro_on's likelihood-ratio term, the local estimators) assume the samples
are pi's own; `sampler_mismatch_tol` (1e-2 nats per completion) is the bar a sampler must pass.
Prints per token and per completion; the CPU and its flags are printed. Run it alone.
"""
from __future__ import annotations

import argparse
import json

import torch

from agro.config import TrainConfig, load_config
from agro.generation import SamplingParams
from agro.perf import machine_key as cpu_description
from agro.trainer import Trainer
from agro.sampler_check import measure_mismatch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--before-dec04-cache", action="store_true",
                    help="decode on an fp32 cache over all its columns, as agro.fast_decode did "
                         "before 2026-12-04 (BF16_CACHE off, no slice)")
    a = ap.parse_args()
    if a.before_dec04_cache:
        from abrounds import decoder_before_dec04  # bench/abrounds.py (bench/ is on sys.path)
        decoder_before_dec04().__enter__()     # for the whole process
    out = {"cpu": cpu_description(), "torch": torch.__version__, "runs": [],
           "before_dec04_cache": a.before_dec04_cache}
    print(f"CPU: {out['cpu']}; torch {torch.__version__}")
    for prec in a.precision:
        cfg = load_config(TrainConfig, None, [
            f"precision={prec}", "eval_prompts=0", "output_dir=runs/bench-mismatch",
            "overwrite=true", "progress=false", "plot=false", "tensorboard=false",
            "save_every=0", "save_final=false"])
        tr = Trainer(cfg)
        prompts = [p for p in (tr.collector.encode(ex) for ex in tr.task.eval_examples(a.prompts))
                   if len(p) <= cfg.max_prompt_tokens]
        torch.manual_seed(0)
        m = measure_mismatch(tr.generator, tr.learner, tr.tok, prompts, a.n,
                             SamplingParams(cfg.max_new_tokens), prec)
        line = m.line().replace("sampler vs learner", f"{type(tr.generator).__name__} vs learner")
        print(f"{prec}: {line}")
        out["runs"].append({"precision": prec, "generator": type(tr.generator).__name__,
                            **vars(m)})
        tr.close_generator()
        del tr
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
