"""Sum each run's per-step timings (every ``*_seconds`` key of its metrics.jsonl) over the steps
after the first (the first carries one-off costs: oneDNN primitives, first-touch memory).

    .venv/bin/python bench/metrics_sums.py runs/<run> [runs/<run> ...]

Prints, per run directory, its step count and the sums in seconds.
"""
import json
import sys


def sums(run_dir: str) -> tuple[int, dict[str, float]]:
    with open(f"{run_dir}/metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "step" in r]
    keys = [k for k in rows[-1] if k.endswith("_seconds")] if rows else []
    return len(rows), {k: round(sum(r.get(k, 0.0) for r in rows[1:]), 1) for k in keys}


if __name__ == "__main__":
    for d in sys.argv[1:]:
        n, s = sums(d)
        print(d, n, s)
