"""Groups per micro-batch, side by side: the learner step and the reference pass on the same groups.

    .venv/bin/python bench/micro_batch_ab.py --precision bf16 --reps 5 --sizes 2,4,8 --cut 0,9

Builds the default job's trainer (SmolLM2-135M, 8 prompts x 4, <= 32 new tokens), samples one
step's groups, and then, in ``--reps`` rounds (the arms' order rotates every round), times on those
groups the learner step (``Trainer.learn``: forward, backward, optimizer) with
``micro_batch_groups`` = each of ``--sizes``, and the reference pass with as many groups per pass.
Bigger micro-batches give the matmuls more rows (a default micro-batch of 2 groups with ~9-token
completions is ~150 tokens) at the price of more activation memory.

``--cut 0,9`` runs the whole thing twice: on the groups as sampled (0: no cut) and with every
completion cut to its first 9 tokens, the mean length of the default job's late steps (what the
policy samples once it has learnt the answer format). Medians over the rounds; the CPU and its
flags are printed. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from abrounds import bench_trainer, medians, one_step_groups, write_json  # bench/ is on sys.path

from agro.collect import attach_ref_logprobs
from agro.perf import machine_key as cpu_description


def cut(groups, k: int):
    """Copies of ``groups`` with every completion cut to its first ``k`` tokens (0: unchanged)."""
    if k <= 0:
        return groups
    out = []
    for g in groups:
        h = copy.copy(g)
        h.completion_ids = [c[:k] for c in g.completion_ids]
        h.behavior_logprobs = [x[:k] for x in g.behavior_logprobs] if g.behavior_logprobs else None
        h.ref_logprobs = [x[:k] for x in g.ref_logprobs] if g.ref_logprobs else None
        out.append(h)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", default="2,4,8", help="groups per micro-batch, comma-separated")
    ap.add_argument("--cut", default="0,9", help="completion cuts to run (0: as sampled)")
    ap.add_argument("--json", default=None, help="write every timing here")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    tr = bench_trainer("microbatch", f"precision={a.precision}",
                       "micro_batch_tokens=0")   # groups only, as the reference arm
    col = tr.collector
    print(f"groups per micro-batch {sizes}")
    sampled = one_step_groups(tr, seed=1234)
    col.attach_ref_logprobs(sampled)
    rows: dict[str, list] = {}
    for k in (int(x) for x in a.cut.split(",")):
        groups = cut(sampled, k)
        lens = [[len(c) for c in g.completion_ids] for g in groups]
        print(f"\ncut {k}: completion lengths per group {lens}")

        def ref(s: int) -> float:
            t0 = time.perf_counter()
            attach_ref_logprobs(cut(groups, 0), col.reference, tr.tok.pad_token_id, s)
            return time.perf_counter() - t0

        def learn(s: int) -> float:
            tr.cfg.micro_batch_groups = s
            t0 = time.perf_counter()
            tr.learn(groups)
            return time.perf_counter() - t0

        for s in sizes:               # warm-ups (each shape's kernels)
            ref(s), learn(s)
        for r in range(a.reps):
            turn = sizes[r % len(sizes):] + sizes[:r % len(sizes)]
            for s in turn:
                rows.setdefault(f"cut{k}_ref_mb{s}", []).append(ref(s))
            for s in turn:
                rows.setdefault(f"cut{k}_learn_mb{s}", []).append(learn(s))
            print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.2f}" for n, v in rows.items()
                                                 if n.startswith(f"cut{k}_")))
        rows[f"cut{k}_completion_lengths"] = lens
    med = medians({n: v for n, v in rows.items() if not n.endswith("lengths")})
    print(f"\nmedians over {a.reps} rounds ({a.precision}); ratio = {sizes[0]} groups' time / this size's:")
    for n in med:
        base = n.rsplit("_mb", 1)[0] + f"_mb{sizes[0]}"
        print(f"  {n}: {med[n]:.2f} s  ({med[base] / med[n]:.2f}x)")
    write_json(a.json, cpu_description(), a.precision, torch.__version__, rows, med)
    tr.close_generator()


if __name__ == "__main__":
    main()
