"""The memory-lean kernels' cost in time, side by side: the learner step and the reference pass
with and without agro.lean's RMSNorm/SwiGLU modules, and with each way of running the LM head
before agro.logprobs' log-prob kernel.

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/lean_ab.py --precision bf16 --reps 7 --json docs/bench/lean/lean-ab-bf16.json

(``agro train`` preloads jemalloc itself, so measure with it: this bench's verdict on the fused
head turned between a run with the system allocator on older code and runs with jemalloc on
later code.) Builds the default job's trainer (SmolLM2-135M from the
embedded GGUF, 8 prompts x 4 samples; the token budget of the precision), samples one step's
groups, then in ``--reps`` rounds (arm order rotated every round) times on those same groups:

* ``learn_*``: ``Trainer.learn`` (forward, backward, optimizer step) with ``all`` (the code as
  it is: the lean modules, and on a CPU the head as a module whose logits' gradient is written
  over the logits), ``no_lean`` (transformers' own RMSNorm and MLP modules back),
  ``no_fused_head`` (the head as a module, then the log-prob kernel with its own gradient
  buffer: the code of 2026-12-03) and ``fused_head`` (the head fused with the log-prob kernel,
  ``_HeadChosenLogProb``, in the head's GEMM dtype, called directly (no check that the head is
  plain: the default model's is): what bf16 ran on a CPU from d7277b5 to d626d16, and what it
  runs off the CPU. In fp32 this arm is a fused fp32 head, which no code has run since 7fa54da);
* ``ref_*``: the reference pass, ``all`` against ``fused_head`` (lean modules change nothing
  without gradients).

Files written on d626d16 (2026-12-04) or earlier had other arms: their ``all`` was the fused head in
bf16 (and their ``inplace_head``, in one file from an uncommitted version, what ``all`` is now).

The memory side is bench/learner_memory.py's (one process per setting: RSS peaks do not
separate within one process). The optimizer steps change the weights between rounds; the groups
are fixed. Medians over the rounds; run it alone on the machine.
"""
from __future__ import annotations

import argparse
import time

import torch
from abrounds import bench_trainer, medians, order, write_json  # bench/abrounds.py (bench/ is on sys.path)

import agro.lean as lean
import agro.logprobs as lp
from agro.perf import machine_key as cpu_description


def unfused_head(head, h, ids, precision):
    with lp.autocast_ctx(precision, h.device):
        logits = head(h)
    return lp.chosen_logprobs(logits, ids)


def fused_head(head, h, ids, precision):
    """The head fused with the log-prob kernel, in the dtype its GEMM runs in."""
    dtype = torch.bfloat16 if precision == "bf16" else head.weight.dtype
    return lp._HeadChosenLogProb.apply(h, head.weight, ids.long(), dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None, help="write every timing here")
    a = ap.parse_args()

    tr = bench_trainer("lean-ab", f"precision={a.precision}")
    cfg, col = tr.cfg, tr.collector
    examples, prompt_ids = col.prompts(cfg.prompts_per_step)
    groups = col.collect(examples, prompt_ids, tr.version)
    base = {v: k for k, v in lean.LEAN.items()}                   # lean class -> transformers'
    swapped = [(m, base[type(m)], type(m)) for m in tr.learner.modules() if type(m) in base]
    assert swapped, "no lean module in the learner (AGRO_LEAN_MODULES=0?)"
    current = lp.head_chosen_logprobs

    def setting(arm: str) -> None:
        for m, plain, lean_cls in swapped:
            m.__class__ = plain if arm == "no_lean" else lean_cls
        lp.head_chosen_logprobs = {"no_fused_head": unfused_head,
                                   "fused_head": fused_head}.get(arm, current)

    def timed(arm: str, fn) -> float:
        setting(arm)
        try:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        finally:
            setting("all")

    arms = ("all", "no_lean", "no_fused_head", "fused_head")
    rows: dict[str, list] = {f"learn_{x}": [] for x in arms}
    rows.update({"ref_all": [], "ref_fused_head": []})
    for x in arms:                                                 # warm-ups
        timed(x, lambda: tr.learn(groups))
    for x in ("all", "fused_head"):
        timed(x, lambda: col.attach_ref_logprobs(groups))
    for r in range(a.reps):
        k = r % len(arms)
        for x in arms[k:] + arms[:k]:
            rows[f"learn_{x}"].append(timed(x, lambda: tr.learn(groups)))
        for x in order(r, "all", "fused_head"):
            rows[f"ref_{x}"].append(timed(x, lambda: col.attach_ref_logprobs(groups)))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)

    med = medians(rows)
    print(f"\n{cpu_description()}\nmedians over {a.reps} rounds ({a.precision}, "
          f"micro_batch_tokens={cfg.micro_batch_tokens}, "
          f"{sum(len(c) for g in groups for c in g.completion_ids)} completion tokens):")
    for x in arms[1:]:
        print(f"  learner step: all {med['learn_all']:.2f} s, {x} {med[f'learn_{x}']:.2f} s: "
              f"all/{x} = {med['learn_all'] / med[f'learn_{x}']:.3f}")
    print(f"  reference pass: all {med['ref_all']:.2f} s, fused_head {med['ref_fused_head']:.2f} s: "
          f"all/fused_head = {med['ref_all'] / med['ref_fused_head']:.3f}")
    write_json(a.json, cpu_description(), a.precision, torch.__version__, rows, med)
    tr.close_generator()


if __name__ == "__main__":
    main()
