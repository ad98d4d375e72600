"""The held-out evaluation's sampling (45 prompts x 4 samples, agro's own sampler) with up to
``--small`` rows per generate() call (64: since the calls are of equal size, three of 60; before
eval_batch_size existed the evaluation ran 64 + 64 + 52, which "2026-12-04 (sixth)" measured)
and with ``--large`` (one call; what ``eval_batch_size=0`` picks for this evaluation in bf16),
interleaved rounds, the default job's trainer in bf16 on MODEL
(``default``: the untrained model, ~29-token completions; a run's ``final/`` directory: ~9).

    .venv/bin/python bench/eval_batch.py [--model DIR] --rounds 3 [--json FILE]

Both arms are seeded alike; they draw different samples (the rows are laid out differently), so
their accuracies differ by sampling noise. Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abrounds import bench_trainer, medians, order, write_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small", type=int, default=64)
    ap.add_argument("--large", type=int, default=192)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import torch

    from agro.evaluation import evaluate
    from agro.perf import machine_key

    tr = bench_trainer("eval-batch", "precision=bf16", f"model={a.model}")
    examples = tr.task.eval_examples(45)

    def run(rows: int) -> tuple[float, dict]:
        torch.manual_seed(0)
        t = time.perf_counter()
        res = evaluate(tokenizer=tr.tok, generator=tr.generator, grader=tr.grader,
                       examples=examples, template=tr.cfg.prompt_template, samples=4,
                       greedy=False, max_new_tokens=tr.cfg.max_new_tokens, reference=None,
                       batch_size=rows)
        return time.perf_counter() - t, res

    run(a.small)                                   # warm-up
    rows: dict[str, list] = {str(a.small): [], str(a.large): []}
    for r in range(a.rounds):
        for n in order(r, a.small, a.large):
            s, res = run(n)
            rows[str(n)].append(s)
            print(f"round {r} rows per call {n:3d}: {s:6.2f} s  (accuracy "
                  f"{res['sampled_accuracy']:.3f}, mean length {res['sampled_len_mean']:.1f})",
                  flush=True)
    med = medians(rows)
    print(f"medians: {a.small} rows {med[str(a.small)]:.2f} s, {a.large} rows "
          f"{med[str(a.large)]:.2f} s, ratio {med[str(a.large)] / med[str(a.small)]:.3f}")
    write_json(a.json, machine_key(), "bf16", torch.__version__, rows, med)


if __name__ == "__main__":
    main()
