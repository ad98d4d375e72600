"""Packed attention by blocks against the dense block mask, side by side in whole passes: the
learner step and the reference pass of one step's real groups, with agro.logprobs'
PACKED_BLOCK_MIN_LEN forced to 0 (``block``: every packed pass by blocks) and to infinity
(``dense``: every packed pass over the [L, L] mask; on a CPU, since 2026-12-05, both on agro's
own attention kernel, ``agro.cpu_attention``; before it both on SDPA).

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/block_attention_ab.py --precision bf16 --reps 5 \\
        task=gsm8k data_path=../shared/data/gsm8k_train.jsonl max_new_tokens=256

Builds the default job's trainer with the given ``key=value`` overrides (as bench/lean_ab.py;
``agro train`` preloads jemalloc, so measure with it), samples one step's groups, prints the
packed length L of each learner micro-batch (the code as it is takes blocks for each group
whose own packed length is at least ``block_min_len``: PACKED_BLOCK_MIN_LEN on a CPU), then in ``--reps`` rounds (arm order alternating) times
``Trainer.learn`` and the reference pass on those same groups in each arm, and reports how far
apart the two arms' reference log-probs are. The optimizer steps change the weights between
rounds; the groups are fixed. Medians over the rounds; run it alone on the machine.
"""
from __future__ import annotations

import argparse
import time

import torch
from abrounds import bench_trainer, medians, order, write_json  # bench/abrounds.py (bench/ is on sys.path)

import agro.logprobs as lp
from agro.perf import machine_key as cpu_description
from agro.rollouts import split_groups

THRESHOLD = {"block": 0, "dense": 10 ** 9}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None, help="write every timing here")
    ap.add_argument("overrides", nargs="*", help="key=value settings of the trainer")
    a = ap.parse_args()

    tr = bench_trainer("block-attention-ab", f"precision={a.precision}", *a.overrides)
    cfg, col = tr.cfg, tr.collector
    examples, prompt_ids = col.prompts(cfg.prompts_per_step)
    t0 = time.perf_counter()
    groups = col.collect(examples, prompt_ids, tr.version)
    lens = [len(c) for g in groups for c in g.completion_ids]
    print(f"sampled {len(lens)} completions in {time.perf_counter() - t0:.0f} s: "
          f"{sum(lens)} tokens, lengths {min(lens)}-{max(lens)}, mean {sum(lens) / len(lens):.0f}")
    packed = []
    for mb in split_groups(groups, cfg.micro_batch_groups, cfg.micro_batch_tokens):
        n = len(mb[0].completion_ids)
        glen = [len(g.prompt_ids) + sum(max(len(c) - 1, 0) for c in g.completion_ids) for g in mb]
        packed.append(f"{len(mb)}x{n} L={lp.packed_width(max(glen), 10 ** 9)}")
    print(f"learner micro-batches (groups x n, packed length): {', '.join(packed)}; "
          f"block_min_len = {lp.block_min_len('cpu')}")

    def timed(arm: str, fn) -> float:
        keep = lp.PACKED_BLOCK_MIN_LEN
        lp.PACKED_BLOCK_MIN_LEN = THRESHOLD[arm]
        try:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        finally:
            lp.PACKED_BLOCK_MIN_LEN = keep

    def ref_logprobs(arm: str) -> list:
        timed(arm, lambda: col.attach_ref_logprobs(groups))
        return [torch.tensor(x) for g in groups for x in g.ref_logprobs]

    arms = ("block", "dense")
    seq = [(a_.sum() - b_.sum()).abs().item() for a_, b_ in zip(ref_logprobs("block"),
                                                                 ref_logprobs("dense"))]
    print(f"reference log-probs, block vs dense, same weights: max |difference| of a sequence's "
          f"sum {max(seq):.2e} nats, mean {sum(seq) / len(seq):.2e}")
    rows: dict[str, list] = {f"{p}_{x}": [] for p in ("learn", "ref") for x in arms}
    for x in arms:                                                 # warm-ups
        timed(x, lambda: tr.learn(groups))
    for r in range(a.reps):
        for x in order(r, *arms):
            rows[f"learn_{x}"].append(timed(x, lambda: tr.learn(groups)))
        for x in order(r, *arms):
            rows[f"ref_{x}"].append(timed(x, lambda: col.attach_ref_logprobs(groups)))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in rows.items()), flush=True)

    med = medians(rows)
    print(f"\n{cpu_description()}\nmedians over {a.reps} rounds ({a.precision}, "
          f"micro_batch_tokens={cfg.micro_batch_tokens}, {sum(lens)} completion tokens):")
    for p, what in (("learn", "learner step"), ("ref", "reference pass")):
        print(f"  {what}: block {med[f'{p}_block']:.2f} s, dense {med[f'{p}_dense']:.2f} s: "
              f"block/dense = {med[f'{p}_block'] / med[f'{p}_dense']:.3f}")
    write_json(a.json, cpu_description(), a.precision, torch.__version__, rows, med)
    tr.close_generator()


if __name__ == "__main__":
    main()
