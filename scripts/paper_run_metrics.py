"""Keep per-step training metrics that a claim's runs.csv does not carry (importance-weight
masking, staleness, grading timeouts, actor/learner idle fractions) in a committed file, before the
uncommitted run store is lost.

    .venv/bin/python scripts/paper_run_metrics.py docs/paper/c7 [--store runs/repro]

For every arm and seed of the claim's ``arms.yaml`` whose run in the store has finished
(``STORE/<arm>-<digest>/seed<S>/done.json``) with the code revision ``arms.yaml`` records for it,
the chosen keys of each step of its ``metrics.jsonl`` go into ``DIR/run_metrics.csv`` (one row per
arm, seed and step; empty where a step lacks a key). Runs already in that file and absent from the
store keep their rows, so the file grows across sessions whose stores are gone. Reads files only:
safe to run beside a sweep.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import yaml

COLUMNS = ["staleness_mean", "stale_fraction", "on_policy_fraction",
           "is_weight_mean", "is_weight_above_cap_fraction",
           "grade_timeouts", "grade_errors",
           "async_actor_idle_fraction", "async_learner_idle_fraction",
           "async_actor_tokens_per_second", "async_learner_tokens_per_second",
           "async_actor_restarts", "async_requests_resent", "step_seconds"]
KEY = ["arm", "seed", "step"]


def finished_runs(claim_dir: Path, store: Path):
    """(arm, seed, run directory) of every finished store run of the claim's arms made by the code
    arms.yaml records for that arm and seed."""
    arms = yaml.safe_load((claim_dir / "arms.yaml").read_text())["arms"]
    for arm, spec in arms.items():
        codes = spec.get("code_by_seed") or {}
        for done in sorted(store.glob(f"{arm}-*/seed*/done.json")):
            d = done.parent
            if d.parent.name[len(arm) + 1:].count("-"):      # another arm whose name starts so
                continue
            seed = int(d.name[len("seed"):])
            code = json.loads(done.read_text()).get("code")
            if seed not in codes or str(codes[seed]) != str(code):
                continue                                      # not the run the claim records
            yield arm, seed, d


def rows_of(arm: str, seed: int, run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step" not in rec or not any(k in rec for k in COLUMNS):
            continue
        out.append({"arm": arm, "seed": seed, "step": int(rec["step"]),
                    **{k: rec.get(k, "") for k in COLUMNS}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("claim_dir", type=Path)
    ap.add_argument("--store", type=Path, default=Path("runs/repro"))
    a = ap.parse_args()
    path = a.claim_dir / "run_metrics.csv"
    kept: list[dict] = []
    if path.is_file():
        with path.open(newline="") as f:
            kept = list(csv.DictReader(f))
    new: list[dict] = []
    for arm, seed, run in finished_runs(a.claim_dir, a.store):
        new += rows_of(arm, seed, run)
    fresh = {(r["arm"], str(r["seed"])) for r in new}
    rows = [r for r in kept if (r["arm"], str(r["seed"])) not in fresh] + new
    rows.sort(key=lambda r: (r["arm"], int(r["seed"]), int(r["step"])))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=KEY + COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    print(f"{path}: {len(rows)} rows, {len({(r['arm'], str(r['seed'])) for r in rows})} runs "
          f"({len(fresh)} read from {a.store} now)")


if __name__ == "__main__":
    main()
