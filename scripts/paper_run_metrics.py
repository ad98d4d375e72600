"""Keep per-step training metrics that a claim's runs.csv does not carry (importance-weight
masking, staleness, grading timeouts, actor/learner idle fractions) in a committed file, before the
uncommitted run store is lost.

    .venv/bin/python scripts/paper_run_metrics.py docs/paper/c7 [--store runs/repro]
    .venv/bin/python scripts/paper_run_metrics.py docs/paper/c7 --summary   # read the file only

For every arm and seed of the claim's ``arms.yaml`` whose run in the store has finished
(``STORE/<arm>-<digest>/seed<S>/done.json``) and is the run ``arms.yaml`` records (the same code
revision and wall time), the chosen keys of each step of its ``metrics.jsonl`` go into
``DIR/run_metrics.csv`` (one row per arm, seed and step, with the run's code; empty where a step
lacks a key). Runs already in that file and absent from the store keep their rows while arms.yaml
still records that run's code, so the file grows across sessions whose stores are gone. Two store
runs matching one recorded run is an error. Reads the store only: safe to run beside a sweep.

Columns are metrics.jsonl's keys: ``staleness_mean`` is the mean lag in policy versions of the
step's groups (an async run's lag); ``stale_fraction`` is the share of groups drawn from
``source=stale`` (0 in async runs); ``is_weight_above_cap_fraction`` is grpo's share of
completion tokens whose importance ratio is above the cap (token-weighted within each
micro-batch, micro-batches weighted by their samples).
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
KEY = ["arm", "seed", "step", "code"]


def recorded(claim_dir: Path) -> dict:
    """{(arm, seed): (code, wall seconds)} of the runs the claim's arms.yaml records."""
    arms = yaml.safe_load((claim_dir / "arms.yaml").read_text())["arms"]
    return {(arm, int(seed)): (str(code), float((spec.get("wall_seconds_by_seed") or {}).get(seed, -1)))
            for arm, spec in arms.items() for seed, code in (spec.get("code_by_seed") or {}).items()}


def finished_runs(claim_dir: Path, store: Path) -> dict:
    """{(arm, seed): run directory} of the store's finished runs that are the runs arms.yaml
    records (same code, wall time equal at its 0.1 s rounding)."""
    found: dict = {}
    for (arm, seed), (code, wall) in recorded(claim_dir).items():
        for done in sorted(store.glob(f"{arm}-*/seed{seed}/done.json")):
            d = done.parent
            if d.parent.name[len(arm) + 1:].count("-"):      # another arm whose name starts so
                continue
            doc = json.loads(done.read_text())
            if str(doc.get("code")) != code or abs(round(float(doc.get("wall_seconds", 0)), 1) - wall) > 1e-6:
                continue                                      # not the run the claim records
            if (arm, seed) in found:
                raise SystemExit(f"paper_run_metrics: {found[arm, seed]} and {d} both match "
                                 f"{claim_dir}'s record of {arm} seed {seed}")
            found[arm, seed] = d
    return found


def rows_of(arm: str, seed: int, code: str, run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "step" not in rec or not any(k in rec for k in COLUMNS):
            continue
        out.append({"arm": arm, "seed": seed, "step": int(rec["step"]), "code": code,
                    **{k: rec.get(k, "") for k in COLUMNS}})
    return out


def summary(path: Path) -> list[str]:
    """Per arm of the file: runs, steps, and for each seed the steps where grpo masked (or, where the
    arm's recorded ``is_mode`` truncates, truncated) any token (``is_weight_above_cap_fraction`` > 0), the largest and
    the mean share, the mean importance weight (and its lowest step), and the grading timeouts
    summed; what PAPER.md quotes."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    arms_yaml = path.parent / "arms.yaml"        # each arm's recorded settings, when there
    settings = ({a: d.get("settings") or {} for a, d in
                 (yaml.safe_load(arms_yaml.read_text()) or {}).get("arms", {}).items()}
                if arms_yaml.is_file() else {})
    def num(r, k):
        return float(r[k]) if r.get(k, "") != "" else None
    out = []
    for arm in sorted({r["arm"] for r in rows}):
        mine = [r for r in rows if r["arm"] == arm]
        seeds = sorted({int(r["seed"]) for r in mine})
        parts = []
        for s in seeds:
            steps = [r for r in mine if int(r["seed"]) == s]
            masked = [x for x in (num(r, "is_weight_above_cap_fraction") for r in steps) if x is not None]
            lags = sorted({x for x in (num(r, "staleness_mean") for r in steps) if x is not None})
            t = sum(x or 0 for x in (num(r, "grade_timeouts") for r in steps))
            w = [x for x in (num(r, "is_weight_mean") for r in steps) if x is not None]
            # the share above the cap: masked (is_mode *_mask) or truncated (*_truncate)
            mode = (settings.get(arm, {}).get("loss_options") or {}).get("is_mode", "")
            how = "truncated" if str(mode).endswith("truncate") else "masked"
            m = (f"{how} in {sum(x > 0 for x in masked)} of {len(masked)} steps, max "
                 f"{max(masked):.3f}, mean {sum(masked) / len(masked):.4f}" if masked else "no IS")
            if w:
                m += f", IS weight mean {sum(w) / len(w):.3f} (lowest step {min(w):.3f})"
            parts.append(f"seed {s}: {len(steps)} steps, lag {lags}, {m}, grade timeouts {t:g}")
        out.append(f"{arm}: " + "; ".join(parts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("claim_dir", type=Path)
    ap.add_argument("--store", type=Path, default=Path("runs/repro"))
    ap.add_argument("--summary", action="store_true",
                    help="print the per-arm summary of DIR/run_metrics.csv and change nothing")
    a = ap.parse_args()
    path = a.claim_dir / "run_metrics.csv"
    if a.summary:
        print("\n".join(summary(path)))
        return
    kept: list[dict] = []
    if path.is_file():
        with path.open(newline="") as f:
            kept = list(csv.DictReader(f))
    rec = recorded(a.claim_dir)
    new: list[dict] = []
    runs = finished_runs(a.claim_dir, a.store)
    for (arm, seed), run in runs.items():
        new += rows_of(arm, seed, rec[arm, seed][0], run)
    # kept: rows of runs not read now that arms.yaml still records with the same code
    rows = [r for r in kept if (r["arm"], int(r["seed"])) not in runs
            and rec.get((r["arm"], int(r["seed"])), ("",))[0] == r.get("code")] + new
    rows.sort(key=lambda r: (r["arm"], int(r["seed"]), int(r["step"])))
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=KEY + COLUMNS, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    print(f"{path}: {len(rows)} rows, {len({(r['arm'], str(r['seed'])) for r in rows})} runs "
          f"({len(runs)} read from {a.store} now)")


if __name__ == "__main__":
    main()
