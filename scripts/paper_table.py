#!/usr/bin/env python3
"""Rewrite the results table of docs/PAPER.md (between its RESULTS markers) from the committed
sweep outputs docs/paper/cN/verdict.json and arms.yaml: each claim's verdict, how many runs have
finished, and their summed wall time. Standard library + PyYAML only (no torch).

    python scripts/paper_table.py            # rewrite docs/PAPER.md in place
    python scripts/paper_table.py --check    # exit 1 if the table is out of date
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "docs" / "PAPER.md"
BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"
TITLES = {
    "c1": "C1 agro = kl_pg on-policy (Fig. 2)",
    "c2": "C2 agro_on best (Figs. 2–3); §4.6 pitfall",
    "c3": "C3 offline: agro > kl_pg_token; β = 0 degrades (Fig. 5)",
    "c4": "C4 replay as KL-efficient as on-policy (Fig. 4)",
    "c5": "C5 β: slower but more KL-efficient (Fig. 6)",
    "c6": "C6 stale data, no importance weights (ours)",
    "c7": "C7 async actors, max_staleness k, no importance weights (ours)",
}


def table(root: Path = ROOT) -> str:
    rows = ["| claim | verdict | runs finished | wall time of those runs | details |",
            "|---|---|---|---|---|"]
    for c, title in TITLES.items():
        p = root / "docs" / "paper" / c / "verdict.json"
        if not p.is_file():
            rows.append(f"| {title} | not run yet | 0 | | |")
            continue
        v = json.loads(p.read_text())
        s = v.get("sweep", {})
        verdict = v["verdict"]
        if v.get("missing"):
            verdict = f"pending ({verdict} so far)"
        if "pitfall_verdict" in v:
            verdict += f"; §4.6 prediction: {v['pitfall_verdict']}"
        wall = s.get("wall_seconds_sum", 0.0)
        rows.append(f"| {title} | {verdict} | {s.get('runs_finished', 0)} of "
                    f"{s.get('runs_total', '?')} | {wall / 3600:.2f} h | "
                    f"[verdict.md](paper/{c}/verdict.md) |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    text = PAPER.read_text()
    if BEGIN not in text or END not in text:
        print(f"{PAPER}: no {BEGIN} ... {END} markers", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    if "--check" in argv:
        return 0 if new == text else 1
    PAPER.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
