"""The padding-free packed log-prob pass against the padded one it replaced, side by side.

    .venv/bin/python bench/packed_ab.py --precision bf16 --reps 5 --json docs/bench/packed-ab.json
    .venv/bin/python bench/packed_ab.py --model runs/main/final ...   # a trained policy's samples

Builds the default job's trainer (SmolLM2-135M, 8 prompts x 4, <= 32 new tokens; ``--model``
replaces the policy, e.g. the default job's trained ``final/`` whose samples are short, as in its
late steps), samples one step's groups, prints their completion lengths, and then, in ``--reps``
interleaved rounds, times on those same groups:

* the reference pass (``attach_ref_logprobs``) and the learner step (forward, backward,
  optimizer) with agro's log-prob pass (``agro.logprobs.completion_logprobs``: each group packed
  without padding, the LM head on real tokens only) against the one of commit ``--old``
  (default 1ea7a81: each completion padded to the longest of the micro-batch, prompts
  left-padded, the head on every position), loaded from git.

The learner's optimizer steps change the weights between rounds (both arms alike). Medians over
the rounds; the CPU and its flags are printed. Run it alone on the machine.

``--micro '[[9,9,9,32],[10,8,10,10]]'`` instead times the forward and the forward + backward of
one micro-batch of random tokens with those completion lengths per group (prompts of
``--prompt-len`` tokens, 38 as in the default job's template), ``--reps`` interleaved rounds.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from abrounds import bench_trainer, medians, one_step_groups, order, write_json  # bench/ on sys.path

import agro.logprobs as lp
from agro.perf import machine_key as cpu_description


def old_module(rev: str):
    """``agro/logprobs.py`` as it was at ``rev``, imported as ``agro._logprobs_<rev>``."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(["git", "-C", str(root), "show", f"{rev}:src/agro/logprobs.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"_logprobs_{rev}.py"
    path.write_text(src)
    name = f"agro._logprobs_{rev}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default="default")
    ap.add_argument("--old", default="1ea7a81", help="the commit whose log-prob pass is 'old'")
    ap.add_argument("--json", default=None, help="write every timing here")
    ap.add_argument("--micro", default=None, help="JSON completion lengths per group")
    ap.add_argument("--prompt-len", type=int, default=38)
    a = ap.parse_args()

    old = old_module(a.old)
    if a.micro:
        return micro(a, old)
    tr = bench_trainer("packed", f"precision={a.precision}", f"model={a.model}")
    col = tr.collector
    groups = one_step_groups(tr, seed=1234)
    lens = [[len(c) for c in g.completion_ids] for g in groups]
    print(f"completion lengths per group: {lens}")
    real_fn = lp.completion_logprobs

    def timed(new: bool, fn) -> float:
        lp.completion_logprobs = real_fn if new else old.completion_logprobs
        try:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        finally:
            lp.completion_logprobs = real_fn

    def ref(new: bool) -> float:
        return timed(new, lambda: col.attach_ref_logprobs(groups))

    def learn(new: bool) -> float:
        return timed(new, lambda: tr.learn(groups))

    # the two passes agree on these groups (same weights, no optimizer step in between)
    col.attach_ref_logprobs(groups)
    new_ref = [list(x) for g in groups for x in g.ref_logprobs]
    lp.completion_logprobs = old.completion_logprobs
    col.attach_ref_logprobs(groups)
    lp.completion_logprobs = real_fn
    old_ref = [list(x) for g in groups for x in g.ref_logprobs]
    diff = max(abs(u - v) for r1, r2 in zip(new_ref, old_ref) for u, v in zip(r1, r2))
    print(f"reference log-probs, new vs old pass: max |diff| {diff:.2e} per token")

    rows: dict[str, list] = {k: [] for k in ("ref_old", "ref_new", "learn_old", "learn_new")}
    ref(True), ref(False), learn(True), learn(False)   # warm-ups
    for r in range(a.reps):
        for new in order(r, False, True):
            rows["ref_new" if new else "ref_old"].append(ref(new))
        for new in order(r, False, True):
            rows["learn_new" if new else "learn_old"].append(learn(new))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()))
    med = medians(rows)
    print(f"\nmedians over {a.reps} rounds ({a.precision}, {a.model}; mean completion "
          f"{sum(map(sum, lens)) / sum(map(len, lens)):.1f} tokens):")
    print(f"  reference pass: padded {med['ref_old']:.2f} s, padding-free {med['ref_new']:.2f} s: "
          f"{med['ref_old'] / med['ref_new']:.2f}x")
    print(f"  learner step: padded {med['learn_old']:.2f} s, padding-free {med['learn_new']:.2f} s: "
          f"{med['learn_old'] / med['learn_new']:.2f}x")
    rows["completion_lengths"] = lens
    write_json(a.json, cpu_description(), a.precision, torch.__version__, rows, med)
    tr.close_generator()


def micro(a, old) -> None:
    """One synthetic micro-batch, forward and forward + backward, old pass against new."""
    import json

    from agro.models import load_model
    from agro.rollouts import Group, collate

    lens = json.loads(a.micro)
    model = load_model(a.model)
    torch.manual_seed(0)
    groups = [Group(prompt_id=str(i), rewards=[0.0] * len(ls),
                    prompt_ids=torch.randint(100, 40000, (a.prompt_len,)).tolist(),
                    completion_ids=[torch.randint(100, 40000, (n,)).tolist() for n in ls])
              for i, ls in enumerate(lens)]
    b = collate(groups, 0, current_version=0, require_ref=False)
    args = (b.input_ids, b.attention_mask, b.completion_ids, b.prompt_len)
    arms = {"old": old.completion_logprobs, "new": lp.completion_logprobs}
    print(f"CPU: {cpu_description()}; torch {torch.__version__}; precision {a.precision}; "
          f"lengths {lens}, prompts {a.prompt_len} tokens")

    def run(fn, backward: bool) -> float:
        t0 = time.perf_counter()
        with lp.scoring_mode(model):
            out = fn(model, *args, precision=a.precision, group_size=b.group_size)
        if backward:
            out.sum().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    rows: dict[str, list] = {}
    for backward in (False, True):
        what = "fwd_bwd" if backward else "fwd"
        for k in arms:
            run(arms[k], backward)                      # warm-up
            rows[f"{what}_{k}"] = []
        for r in range(a.reps):
            for k in order(r, "old", "new"):
                rows[f"{what}_{k}"].append(run(arms[k], backward))
    med = medians(rows)
    for what in ("fwd", "fwd_bwd"):
        print(f"  {what}: padded {med[what + '_old'] * 1e3:.0f} ms, padding-free "
              f"{med[what + '_new'] * 1e3:.0f} ms: {med[what + '_old'] / med[what + '_new']:.2f}x")
    write_json(a.json, cpu_description(), a.precision, torch.__version__, rows, med)


if __name__ == "__main__":
    main()
