#!/usr/bin/env bash
# The full `agro repro` sweeps behind docs/PAPER.md, one run at a time, resumable, committing each
# claim's outputs (docs/paper/cN: runs.csv, arms.yaml, plots, verdict.md) after every finished run.
#
#   scripts/paper_sweep.sh [CLAIM ...]          (default: c1 c4 c5 c2 c6 c3, shared arms first)
#
# Run it alone on the machine (a second torch process slows both 10-20x), in the background:
#   nohup scripts/paper_sweep.sh > runs/repro/sweep.log 2>&1 &
# Killed at any point, it continues where it stopped when started again (finished runs are
# skipped, an interrupted run resumes from its last checkpoint if the same code revision started
# it, else starts again: started.json). The run store is runs/repro.
#
# AGRO_SRC pins the code the sweep runs (default: this checkout's src). To keep editing the
# checkout while a sweep runs, point it at a worktree of a fixed commit:
#   git worktree add /tmp/agro-sweep HEAD && AGRO_SRC=/tmp/agro-sweep/src scripts/paper_sweep.sh
#
# PAPER_OUT puts the claims' outputs elsewhere (default docs/paper): a re-run of committed claims
# on new code goes to its own directory (a claim always re-renders its own recorded runs, so
# re-running into docs/paper/cN would re-render the old ones), e.g.
#   PAPER_OUT=docs/paper/rerun AGRO_SRC=... scripts/paper_sweep.sh c1 c4 c5
# Only a sweep into docs/paper regenerates PAPER.md's results table. After every run,
# scripts/paper_run_metrics.py adds the finished runs' extra per-step metrics to OUT/cN/run_metrics.csv.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
SRC=${AGRO_SRC:-$ROOT/src}
PY=${PY:-$ROOT/.venv/bin/python}
# the code = the last commit that changed src/ (this script's own commits of docs/ and of the
# claims' outputs do not change it, so a killed run resumes on restart)
REV=$(git -C "$SRC/.." log -1 --format=%h -- src)
if [ -z "$REV" ]; then
  echo "paper_sweep: cannot tell which commit $SRC is (git log -- src printed nothing)" >&2
  exit 2
fi
if [ -n "$(git -C "$SRC/.." status --porcelain -- src 2>/dev/null)" ]; then
  echo "paper_sweep: $SRC has uncommitted changes; commit them, or pin a commit with AGRO_SRC" >&2
  exit 2
fi
export AGRO_CODE_REV=$REV      # recorded in every run's done.json and in arms.yaml
CLAIMS=${*:-c1 c4 c5 c2 c6 c3}
OUT=${PAPER_OUT:-docs/paper}
OUT=${OUT%/}
mkdir -p runs/repro "$OUT"
for c in $CLAIMS; do
  while true; do
    out=$(PYTHONPATH="$SRC" "$PY" -m agro.cli repro "$c" --out "$OUT/$c" max_runs=1 2>>runs/repro/sweep.err)
    rc=$?
    echo "$out"
    if [ $rc -ne 0 ]; then
      echo "paper_sweep: agro repro $c failed (exit $rc); see runs/repro/sweep.err" >&2
      exit $rc
    fi
    left=$(echo "$out" | sed -n 's/.*runs still pending: \([0-9]*\).*/\1/p')
    verdict=$(echo "$out" | sed -n "s/^agro repro $c: //p")
    # the per-step metrics runs.csv lacks (IS masking, staleness, grading timeouts, idle
    # fractions), kept before the uncommitted store is lost; never fails the sweep
    "$PY" scripts/paper_run_metrics.py "$OUT/$c" >/dev/null 2>>runs/repro/sweep.err \
      || echo "paper_sweep: scripts/paper_run_metrics.py failed for $c (the sweep goes on)" >&2
    git add "$OUT/$c" >/dev/null 2>&1
    git commit -q -m "paper sweep $OUT/$c: one more run finished, $left pending; verdict so far: $verdict (code $REV)" \
      -- "$OUT/$c" >/dev/null 2>&1 || echo "paper_sweep: nothing committed for $c"
    # PAPER.md's results table, when nobody is editing PAPER.md (else whoever commits it next
    # regenerates it: python scripts/paper_table.py)
    if [ "$(realpath -m "$OUT")" = "$ROOT/docs/paper" ] && git diff --quiet -- docs/PAPER.md && "$PY" scripts/paper_table.py >/dev/null 2>&1; then
      git commit -q -m "PAPER: results table after $c's run" -- docs/PAPER.md >/dev/null 2>&1
    fi
    [ "$left" = "0" ] && break
  done
done
echo "paper_sweep: done ($CLAIMS)"
