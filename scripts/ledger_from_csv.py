#!/usr/bin/env python3
"""One-time migration: write the ledger (OUT/runs/<arm>-seed<S>.json, agro.repro.ledger) of a
claim whose outputs were made before the ledger existed and whose run store is gone.

Each run's rows come from OUT/runs.csv (6 significant digits, as committed), its status, wall
time and code revision from OUT/arms.yaml, and its config from the code that ran it: the
TrainConfig the sweep of that revision resolved for the arm and seed (computed by importing that
revision's agro in a subprocess, so the defaults are the ones it ran with). Each entry says so in
done["migrated"].

    git worktree add --detach /tmp/agro-82ca786 82ca786
    .venv/bin/python scripts/ledger_from_csv.py --code-src /tmp/agro-82ca786/src docs/paper/c1 ...
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from agro.repro import ledger  # noqa: E402

INTS = {"seed", "step", "samples"}
STRS = {"arm"}

# Run inside the old revision: the config its sweep resolved for each (arm, seed), and the
# store directory it used (its digest is the old revision's).
RESOLVE = """
import json, sys
from agro.config import TrainConfig, to_dict
from agro.repro.runner import Sweep
claim, out, seeds, arms = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
sw = Sweep(claim, out, seeds=seeds, arms=arms)
res = {}
for arm in sw.arms:
    for s in seeds:
        full = {**to_dict(TrainConfig()), **sw.arm_settings(arm, s)}   # what its trainer got
        full["output_dir"] = str(sw.run_dir(arm, s))
        res[f"{arm.name}/{s}"] = full
print(json.dumps(res, default=str))
"""


def _value(col: str, v: str):
    if v == "":
        return None
    if col in STRS:
        return v
    if col in INTS:
        return int(v)
    return float(v)


def migrate(out: Path, code_src: Path) -> list[Path]:
    arms_doc = yaml.safe_load((out / "arms.yaml").read_text())
    if arms_doc.get("quick"):
        raise SystemExit(f"{out}: a quick sweep; its tiny model is gone with its store")
    seeds = list(arms_doc["seeds"])
    arm_names = list(arms_doc["arms"])
    with open(out / "runs.csv", newline="") as f:
        rows = [{k: _value(k, v) for k, v in r.items()} for r in csv.DictReader(f)]
    r = subprocess.run([sys.executable, "-c", RESOLVE, arms_doc["claim"], str(out),
                        json.dumps(seeds), json.dumps(arm_names)],
                       env={"PYTHONPATH": str(code_src), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, check=True)
    resolved = json.loads(r.stdout.strip().splitlines()[-1])
    src_rev = subprocess.run(["git", "-C", str(code_src), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
    covered = set()
    written = []
    for name, a in arms_doc["arms"].items():
        if "status_by_seed" not in a or "code_by_seed" not in a:
            raise SystemExit(f"{out}/arms.yaml: arm {name} lacks status_by_seed / code_by_seed")
        for seed, status in a["status_by_seed"].items():
            seed = int(seed)
            mine = [x for x in rows if x["arm"] == name and x["seed"] == seed]
            if not mine or mine[0]["step"] != 0:
                raise SystemExit(f"{out}/runs.csv: arm {name} seed {seed} has no step-0 row")
            code = a["code_by_seed"][seed]
            if not src_rev.startswith(code) and not code.startswith(src_rev):
                raise SystemExit(f"{out}/arms.yaml: arm {name} seed {seed} ran code {code}, but "
                                 f"--code-src is at {src_rev}")
            covered.add((name, seed))
            done = {"arm": name, "seed": seed, "status": status,
                    "wall_seconds": a["wall_seconds_by_seed"][seed], "code": code,
                    "migrated": (f"rebuilt from {out}/runs.csv (6 significant digits) and "
                                 f"arms.yaml; config resolved by code {code}'s sweep; its run "
                                 "store (metrics.jsonl, events.jsonl, done.json) was lost")}
            written.append(ledger.write_run(out, {
                "arm": name, "seed": seed, "config": resolved[f"{name}/{seed}"], "done": done,
                "base_eval": {"sampled_accuracy": mine[0]["eval_accuracy"], "kl_pi_ref": 0.0},
                "offline_key": None, "rows": mine}))
    missing = {(x["arm"], x["seed"]) for x in rows} - covered
    if missing:
        raise SystemExit(f"{out}/runs.csv: rows of runs arms.yaml does not list: {sorted(missing)}")
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--code-src", required=True, type=Path,
                    help="src/ of a checkout of the revision that ran the sweep")
    ap.add_argument("outs", nargs="+", type=Path)
    args = ap.parse_args()
    for out in args.outs:
        for p in migrate(out, args.code_src):
            print(p)


if __name__ == "__main__":
    main()
