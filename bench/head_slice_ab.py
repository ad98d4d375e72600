"""The oneDNN LM head's backward in vocabulary slices against in one piece, side by side
(agro.onednn_linear.BACKWARD_SLICE_MIN_N / BACKWARD_SLICE_COLUMNS; fp32, linear_backend=onednn).

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/head_slice_ab.py --reps 9 --rss-rounds 2 --products \\
        --json docs/bench/zen5/head-slice-fp32.json

(``agro train`` preloads jemalloc and caps oneDNN's caches itself; this bench caps the caches the
same way and, run in-process, needs jemalloc preloaded as the command line does: its path is
``.venv/bin/python -c "from agro.allocator import find_jemalloc; print(find_jemalloc())"``.)

Time: the default job's trainer (SmolLM2-135M, fp32, one step's 8 groups of 4 sampled once, the
reference log-probs attached) runs its learner step (forward, backward, optimizer) on those
groups in ``--reps`` rounds, the LM head's backward sliced in one arm and in one piece in the
other (the arms' order reversed every round; the first round dropped as warm-up).
``--products`` also times the head's two backward products alone at ``--rows`` rows, whole and
in slices of several widths (:func:`products`).

Memory: ``--rss-rounds`` pairs of fresh processes (this script with ``--one-arm``; the arms'
order alternating), each running 4 learner steps on its own sampled groups (seed 0), print their
peak resident memory (``ru_maxrss``). Run it alone on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from agro.allocator import cap_onednn_caches

cap_onednn_caches()   # as the agro command does, before torch makes its first oneDNN primitive

import torch  # noqa: E402
from abrounds import bench_trainer, medians, one_step_groups, order, timed, write_json  # noqa: E402

from agro import onednn_linear as ol  # noqa: E402
from agro.allocator import in_use  # noqa: E402
from agro.perf import machine_key  # noqa: E402

SLICED = ol.BACKWARD_SLICE_MIN_N
WHOLE = 10 ** 9


def set_arm(arm: str) -> None:
    ol.BACKWARD_SLICE_MIN_N = SLICED if arm == "sliced" else WHOLE


def trainer():
    tr = bench_trainer("head-slice", "precision=fp32", "linear_backend=onednn")
    groups = one_step_groups(tr, seed=0)
    tr.collector.attach_ref_logprobs(groups)
    return tr, groups


def one_arm(arm: str) -> None:
    import resource

    set_arm(arm)
    tr, groups = trainer()
    for _ in range(4):
        tr.learn(groups)
    print(json.dumps({"arm": arm, "maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                      / 2 ** 20}))
    tr.close_generator()


COLUMNS = (0, 512, 1024, 2048, 3072)
"""Slice widths --products times (0: the whole head in one product)."""


def products(rows: list[int], reps: int) -> dict[str, list]:
    """The head's input gradient ``dy W`` and weight gradient ``dy^T x`` alone (SmolLM2-135M's
    head, V = 49,152, H = 576, fp32) at each row count, whole and in slices of each width of
    COLUMNS: ``reps`` rounds, the widths' order reversed every round, each product timed by
    :func:`abrounds.timed` (median of 3 back-to-back calls after 2 warm-ups)."""
    g = torch.Generator().manual_seed(0)
    V, H = 49152, 576
    w = torch.randn(V, H, generator=g)
    out: dict[str, list] = {}
    saved = ol.BACKWARD_SLICE_MIN_N, ol.BACKWARD_SLICE_COLUMNS
    try:
        for m in rows:
            x, dy = torch.randn(m, H, generator=g), torch.randn(m, V, generator=g)
            for r in range(reps):
                for c in (COLUMNS if r % 2 == 0 else COLUMNS[::-1]):
                    ol.BACKWARD_SLICE_MIN_N, ol.BACKWARD_SLICE_COLUMNS = (WHOLE, 1) if c == 0 else (SLICED, c)
                    out.setdefault(f"dx_{m}_{c}", []).append(timed(lambda: ol._dx(dy, w), 3))
                    out.setdefault(f"dw_{m}_{c}", []).append(timed(lambda: ol._dw(dy, x), 3))
    finally:
        ol.BACKWARD_SLICE_MIN_N, ol.BACKWARD_SLICE_COLUMNS = saved
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rss-rounds", type=int, default=2)
    ap.add_argument("--products", action="store_true",
                    help="also time the head's dx and dW alone, whole and in slices of each width")
    ap.add_argument("--rows", default="256,368,512", help="--products' row counts")
    ap.add_argument("--json", default=None)
    ap.add_argument("--one-arm", choices=["sliced", "whole"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one_arm:
        return one_arm(a.one_arm)
    print(f"{machine_key()}; torch {torch.__version__}; allocator {in_use()}; "
          f"slices of {ol.BACKWARD_SLICE_COLUMNS} columns from N >= {SLICED}")
    rows: dict[str, list] = {}
    if a.products:
        rows.update(products([int(m) for m in a.rows.split(",")], 5))
    rss: dict[str, list] = {"sliced": [], "whole": []}
    for r in range(a.rss_rounds):
        for arm in order(r, "sliced", "whole"):
            p = subprocess.run([sys.executable, __file__, "--one-arm", arm], capture_output=True,
                               text=True, env=dict(os.environ), check=True)
            rec = json.loads(p.stdout.strip().splitlines()[-1])
            rss[arm].append(rec["maxrss_gib"])
            print(f"rss round {r + 1}: {arm} peak {rec['maxrss_gib']:.3f} GiB", flush=True)
    rows.update({f"rss_{k}": v for k, v in rss.items()})
    tr, groups = trainer()
    for r in range(a.reps):
        for arm in order(r, "sliced", "whole"):
            set_arm(arm)
            t0 = time.perf_counter()
            tr.learn(groups)
            if r:
                rows.setdefault(f"learn_{arm}", []).append(time.perf_counter() - t0)
        if r:
            print(f"round {r}: sliced {rows['learn_sliced'][-1]:.2f} s, whole "
                  f"{rows['learn_whole'][-1]:.2f} s", flush=True)
    set_arm("sliced")
    tr.close_generator()
    med = medians(rows)
    print(f"\nmedians ({a.reps - 1} learner rounds, {a.rss_rounds} processes per arm):")
    print(f"  learner step: sliced {med['learn_sliced']:.3f} s, whole {med['learn_whole']:.3f} s "
          f"({med['learn_sliced'] / med['learn_whole']:.3f}x)")
    if rss["sliced"]:
        print(f"  peak RSS: sliced {med['rss_sliced']:.3f} GiB, whole {med['rss_whole']:.3f} GiB "
              f"({med['rss_sliced'] - med['rss_whole']:+.3f} GiB)")
    if a.products:
        for m in a.rows.split(","):
            for p in ("dx", "dw"):
                base = med[f"{p}_{m}_0"]
                print(f"  head {p} at {m} rows: whole {base * 1e3:.1f} ms; slices of " + ", ".join(
                    f"{c}: {med[f'{p}_{m}_{c}'] / base:.3f}x" for c in COLUMNS if c))
    write_json(a.json, machine_key(), "fp32", torch.__version__, rows, med)


if __name__ == "__main__":
    main()
