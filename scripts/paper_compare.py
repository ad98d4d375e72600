#!/usr/bin/env python3
"""Compare two sweeps of the same claims: the first runs (e.g. docs/paper) against a re-run
(e.g. docs/paper/rerun), claim by claim. Standard library only (no torch); reads runs.csv and
verdict.json, writes Markdown to stdout.

    python scripts/paper_compare.py docs/paper docs/paper/rerun            # every claim in both
    python scripts/paper_compare.py docs/paper docs/paper/rerun c1 c4      # these claims

For each claim: the two verdicts and the code revisions behind them; per arm, the final held-out
accuracy and KL(pi||pi_ref) (each seed's last evaluation; mean ± standard error over seeds) in
both sweeps and their difference; per verdict part, both estimates and verdicts.

The two sweeps are not paired: other code draws other samples from the same seed, so a
difference is of two independent means, with standard error sqrt(se_a^2 + se_b^2). A difference
beyond 2 such errors is marked "differs"; with 3 seeds per arm that is a flag to read, not a test.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path


def finals(path: Path) -> dict[str, dict[int, tuple[float, float]]]:
    """arm -> seed -> (accuracy, KL) of the last evaluated row of that run in runs.csv."""
    out: dict[str, dict[int, tuple[float, float]]] = {}
    with path.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            if not row.get("eval_accuracy"):
                continue
            try:
                seed, step = int(row["seed"]), int(row["step"])
                acc = float(row["eval_accuracy"])
                kl = float(row["eval_kl"]) if row.get("eval_kl") else math.nan
            except (KeyError, ValueError) as e:
                raise SystemExit(f"{path}, line {line}: bad field ({e})")
            prev = out.setdefault(row["arm"], {}).get(seed)
            if prev is None or step >= prev[0]:
                out[row["arm"]][seed] = (step, acc, kl)
    return {a: {s: (v[1], v[2]) for s, v in by.items()} for a, by in out.items()}


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def fmt(m: float, se: float) -> str:
    return f"{m:.3f}" if math.isnan(se) else f"{m:.3f} ± {se:.3f}"


def diff(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return ""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    se = math.sqrt(sa * sa + sb * sb)
    s = f"{mb - ma:+.3f}" if math.isnan(se) else f"{mb - ma:+.3f} ± {se:.3f}"
    if not math.isnan(se) and se > 0 and abs(mb - ma) > 2 * se:
        s += " (differs)"
    return s


def compare(first: Path, rerun: Path, claim: str) -> str:
    va = json.loads((first / claim / "verdict.json").read_text())
    vb = json.loads((rerun / claim / "verdict.json").read_text())
    fa, fb = finals(first / claim / "runs.csv"), finals(rerun / claim / "runs.csv")

    def sweep(v: dict) -> str:
        s = v.get("sweep", {})
        revs = ", ".join(f"{r} ({n})" for r, n in sorted(s.get("code_revisions", {}).items()))
        pending = " (pending)" if v.get("missing") else ""
        return (f"{v['verdict']}{pending}; {s.get('runs_finished', 0)} of "
                f"{s.get('runs_total', '?')} runs, code {revs or '?'}")

    out = [f"## {claim}", "", f"- first runs ({first}): {sweep(va)}",
           f"- re-run ({rerun}): {sweep(vb)}", "",
           "| arm | seeds | final accuracy, first | re-run | re-run − first "
           "| final KL, first | re-run | re-run − first |",
           "|---|---|---|---|---|---|---|---|"]
    for arm in list(fa) + [a for a in fb if a not in fa]:
        a, b = fa.get(arm, {}), fb.get(arm, {})
        acc_a, acc_b = [v[0] for v in a.values()], [v[0] for v in b.values()]
        kl_a = [v[1] for v in a.values() if not math.isnan(v[1])]
        kl_b = [v[1] for v in b.values() if not math.isnan(v[1])]
        cell = lambda xs: fmt(*mean_se(xs)) if xs else "—"   # noqa: E731
        out.append(f"| {arm} | {len(a)} / {len(b)} | {cell(acc_a)} | {cell(acc_b)} | "
                   f"{diff(acc_a, acc_b)} | {cell(kl_a)} | {cell(kl_b)} | {diff(kl_a, kl_b)} |")
    pa = {p["part"]: p for p in va.get("parts", [])}
    pb = {p["part"]: p for p in vb.get("parts", [])}
    if pa or pb:
        out += ["", "| part | first: estimate | verdict | re-run: estimate | verdict |",
                "|---|---|---|---|---|"]
        for name in list(pa) + [n for n in pb if n not in pa]:
            x, y = pa.get(name, {}), pb.get(name, {})
            out.append(f"| {name} | {x.get('estimate', '—')} | {x.get('verdict', '—')} | "
                       f"{y.get('estimate', '—')} | {y.get('verdict', '—')} |")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    first, rerun = Path(argv[0]), Path(argv[1])
    claims = argv[2:] or sorted(p.parent.name for p in rerun.glob("*/verdict.json")
                                if (first / p.parent.name / "verdict.json").is_file())
    if not claims:
        print(f"no claim has a verdict.json in both {first} and {rerun}", file=sys.stderr)
        return 1
    for c in claims:
        for d in (first, rerun):
            if not (d / c / "verdict.json").is_file() or not (d / c / "runs.csv").is_file():
                print(f"{d / c}: no verdict.json and runs.csv", file=sys.stderr)
                return 1
    print("\n\n".join(compare(first, rerun, c) for c in claims))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
