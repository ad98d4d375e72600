#!/usr/bin/env python3
"""Compare two sweeps of the same claims: the first runs (e.g. docs/paper) against a re-run
(e.g. docs/paper/rerun), claim by claim. Standard library + PyYAML only (no torch); reads
runs.csv, verdict.json and arms.yaml, writes Markdown to stdout.

    python scripts/paper_compare.py docs/paper/first docs/paper c1 c4 c5   # C1, C4, C5: re-run moved in
    python scripts/paper_compare.py docs/paper docs/paper/rerun            # claims still being re-run

For each claim: the two verdicts (and the §4.6 prediction's, where the claim has one), the code
revisions, pending and aborted runs; the arms whose recorded settings differ; per arm, the base
(first evaluation), final held-out accuracy and final KL(pi||pi_ref) (each seed's first and last
evaluated rows in runs.csv, in file order, as agro.repro.verdicts reads them; mean ± standard
error over seeds) in both sweeps and their difference; per verdict part (and §4.6 and
information parts), both estimates and verdicts.

The two sweeps are not paired: other code draws other samples from the same seed, so a
difference is of two independent means, with standard error sqrt(se_a^2 + se_b^2). A difference
beyond 2 such errors is marked "differs" (a non-zero difference with no spread at all, too). With
3 seeds a side that fires by chance for about one arm in seven: a flag to read, not a test. A side
with fewer than 2 seeds has no standard error and gets no flag.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import yaml

NEEDED = ("arm", "seed", "eval_accuracy")
RUN_FIELDS = ("wall_seconds_by_seed", "code_by_seed", "status_by_seed", "adopted_from_by_seed")


def evals(path: Path) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """arm -> seed -> [(accuracy, KL)] of the rows of runs.csv that carry an evaluation, in file
    order (KL nan where the row has none)."""
    out: dict[str, dict[int, list[tuple[float, float]]]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [k for k in NEEDED if k not in (reader.fieldnames or [])]
        if missing:
            raise SystemExit(f"{path}, line 1: no column {', '.join(missing)}")
        for row in reader:
            if row["eval_accuracy"] in (None, ""):
                continue
            try:
                seed = int(row["seed"])
                acc = float(row["eval_accuracy"])
                kl = float(row["eval_kl"]) if row.get("eval_kl") else math.nan
                if not math.isfinite(acc):
                    raise ValueError(f"eval_accuracy {row['eval_accuracy']!r} is not finite")
            except (TypeError, ValueError) as e:
                raise SystemExit(f"{path}, line {reader.line_num}: bad field ({e})")
            out.setdefault(row["arm"], {}).setdefault(seed, []).append((acc, kl))
    return out


def mean_se(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def cell(xs: list[float]) -> str:
    if not xs:
        return "—"
    m, se = mean_se(xs)
    return f"{m:.3f}" if math.isnan(se) else f"{m:.3f} ± {se:.3f}"


def diff(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return ""
    (ma, sa), (mb, sb) = mean_se(a), mean_se(b)
    se = math.sqrt(sa * sa + sb * sb)
    if math.isnan(se):
        return f"{mb - ma:+.3f}"
    flag = abs(mb - ma) > 2 * se if se > 0 else mb != ma
    return f"{mb - ma:+.3f} ± {se:.3f}" + (" (differs)" if flag else "")


def load(d: Path, claim: str) -> tuple[dict, dict, dict]:
    p = d / claim / "verdict.json"
    try:
        v = json.loads(p.read_text())
        for k in ("verdict", "parts"):
            if k not in v:
                raise ValueError(f"no field '{k}'")
        for i, part in enumerate(v["parts"] + v.get("pitfall_parts", []) + v.get("info_parts", [])):
            if "part" not in part:
                raise ValueError(f"a part (number {i + 1}) has no field 'part'")
    except (OSError, ValueError) as e:
        raise SystemExit(f"{p}: {e}")
    a = d / claim / "arms.yaml"
    arms = (yaml.safe_load(a.read_text()) or {}).get("arms", {}) if a.is_file() else {}
    return v, evals(d / claim / "runs.csv"), arms


def compare(first: Path, rerun: Path, claim: str) -> str:
    va, ea, aa = load(first, claim)
    vb, eb, ab = load(rerun, claim)

    def sweep(v: dict) -> str:
        s = v.get("sweep", {})
        revs = ", ".join(f"{r} ({n})" for r, n in sorted(s.get("code_revisions", {}).items()))
        text = v["verdict"] + (" so far, runs pending" if v.get("missing") else "")
        if "pitfall_verdict" in v:
            text += f"; §4.6 prediction: {v['pitfall_verdict']}"
        text += f"; {s.get('runs_finished', 0)} of {s.get('runs_total', '?')} runs"
        text += f", code {revs or '?'}" + (" (quick mode)" if s.get("quick") else "")
        if v.get("aborted"):
            text += f"; aborted: {', '.join(map(str, v['aborted']))}"
        return text

    out = [f"## {claim}", "", f"- first runs ({first}): {sweep(va)}",
           f"- re-run ({rerun}): {sweep(vb)}"]
    arms = list(ea) + [a for a in eb if a not in ea]
    for arm in sorted(set(aa) | set(ab)):
        x = {k: v for k, v in aa.get(arm, {}).items() if k not in RUN_FIELDS}
        y = {k: v for k, v in ab.get(arm, {}).items() if k not in RUN_FIELDS}
        if x != y:
            keys = sorted(k for k in set(x.get("settings", {})) | set(y.get("settings", {}))
                          if x.get("settings", {}).get(k) != y.get("settings", {}).get(k))
            out.append(f"- **{arm}: recorded settings differ** "
                       f"({', '.join(keys) if keys else 'label or other fields'})")
    out += ["", "Per arm, mean ± se over seeds (seeds: first / re-run):", "",
            "| arm | seeds | base, first | re-run | final accuracy, first | re-run "
            "| re-run − first | final KL, first | re-run | re-run − first |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        a, b = ea.get(arm, {}), eb.get(arm, {})
        col = lambda runs, i, j: [r[i][j] for r in runs.values() if not math.isnan(r[i][j])]  # noqa: E731
        fa, fb, ka, kb = col(a, -1, 0), col(b, -1, 0), col(a, -1, 1), col(b, -1, 1)
        seeds = f"{len(a)} / {len(b)}"
        if (len(ka), len(kb)) != (len(a), len(b)):
            seeds += f" (KL: {len(ka)} / {len(kb)})"
        out.append(f"| {arm} | {seeds} | {cell(col(a, 0, 0))} | {cell(col(b, 0, 0))} | "
                   f"{cell(fa)} | {cell(fb)} | {diff(fa, fb)} | {cell(ka)} | {cell(kb)} | "
                   f"{diff(ka, kb)} |")
    for key, title in (("parts", "verdict parts"), ("pitfall_parts", "§4.6 prediction's parts"),
                       ("info_parts", "parts shown for information")):
        pa = {p["part"]: p for p in va.get(key, [])}
        pb = {p["part"]: p for p in vb.get(key, [])}
        if not pa and not pb:
            continue
        out += ["", f"{title[0].upper()}{title[1:]}:", "",
                "| part | first: estimate | verdict | re-run: estimate | verdict |",
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
            for f in ("verdict.json", "runs.csv"):
                if not (d / c / f).is_file():
                    print(f"{d / c}: no {f}", file=sys.stderr)
                    return 1
    print("\n\n".join(compare(first, rerun, c) for c in claims))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
