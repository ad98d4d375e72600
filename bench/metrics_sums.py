"""Sum each run's per-step timings (every ``*_seconds`` key of its metrics.jsonl) over its steps
but the first logged (the first step carries one-off costs: oneDNN primitives, first-touch
memory; in a resumed run the first logged is the first after the resume). Null values (a
non-finite figure) count as 0 and are reported.

    .venv/bin/python bench/metrics_sums.py runs/<run> [runs/<run> ...]

Prints, per run directory, its step count and the sums in seconds.
"""
import json
import sys


def sums(run_dir: str) -> tuple[int, dict[str, float]]:
    with open(f"{run_dir}/metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if "step" in r]
    rows.sort(key=lambda r: r["step"])
    keys = [k for k in rows[-1] if k.endswith("_seconds")] if rows else []
    nulls = sum(r.get(k) is None for r in rows[1:] for k in keys)
    out = {k: round(sum(r.get(k) or 0.0 for r in rows[1:]), 1) for k in keys}
    if nulls:
        out["null_values"] = nulls
    return len(rows), out


if __name__ == "__main__":
    for d in sys.argv[1:]:
        n, s = sums(d)
        print(d, n, s)
