"""Where the repro sweep's held-out evaluation spends its time: sampling, grading, the KL pass.

    PYTHONPATH=<src of the code to time> .venv/bin/python bench/eval_phases.py [PROMPTS]

Builds the trainer of `agro repro`'s full settings (SmolLM2-135M, fp32, two-operand arithmetic,
24 new tokens, PROMPTS held-out prompts, default 275), moves one weight matrix a little (so the
policy is not bit-identical to the reference and the KL estimate's passes run) and times one
evaluation, split by phase. Run it alone, once per code revision, side by side.
"""
import sys
import time

import torch

import agro.evaluation as ev
from agro.config import TrainConfig, config_from_dict
from agro.repro.claims import FULL_BASE
from agro.trainer import Trainer

settings = dict(FULL_BASE, output_dir="runs/bench-eval-phases", overwrite=True,
                eval_prompts=int(sys.argv[1]) if len(sys.argv) > 1 else 275)
settings.pop("model", None)
tr = Trainer(config_from_dict(TrainConfig, settings))
with torch.no_grad():
    p = next(tr.policy.parameters())
    p.add_(1e-3 * torch.randn_like(p))
T = {"gen": 0.0, "grade": 0.0, "kl": 0.0}


def timed(obj, name, key):
    real = getattr(obj, name)

    def f(*a, **k):
        t = time.perf_counter()
        r = real(*a, **k)
        T[key] += time.perf_counter() - t
        return r
    setattr(obj, name, f)


timed(tr.generator, "generate", "gen")
timed(tr.grader, "grade", "grade")
timed(ev, "_kl_k1", "kl")
t0 = time.perf_counter()
res = tr.run_eval("bench")
print({k: round(v, 1) for k, v in T.items()}, "total", round(time.perf_counter() - t0, 1),
      "kl", res.get("kl_pi_ref"), "len", res.get("sampled_len_mean"))
