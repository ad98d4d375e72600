"""Measured step times of asynchronous generation against agro.throughput's pipeline model.

    .venv/bin/python bench/async_points.py --steps 14 --out runs/bench-async

Runs, one after another and alone on the machine, the default job's settings (no evaluation) for
``--steps`` steps: the synchronous loop (source=fresh, all cores) and async_generation with one
Ray actor at max_staleness k = 0, 1, 2 (the actor and the learner get one core each on a 2-core
machine). For each run it prints the median step time over the steady-state steps (after the
pipeline fills) and the median phase times, then checks the measured async step time against
the model's closed form ``max(L, G + P, (G + P + L) / (k + 1))`` evaluated at that run's own
measured learner time L, actor time G (sampling + grading + reference pass) and push time P.
The CPU is named in the output; ratios, not seconds, carry to another machine.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from agro.throughput import steady_state_step


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(name: str, extra: list[str], a) -> Path:
    out = Path(a.out) / name
    cmd = [sys.executable, "-m", "agro.cli", "train", f"steps={a.steps}", "eval_prompts=0",
           f"precision={a.precision}", "save_every=0", "save_final=false", "plot=false",
           "tensorboard=false", "progress=false", f"output_dir={out}", "overwrite=true", *extra]
    print("$", " ".join(cmd[2:]), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return out


def medians(out: Path, skip: int) -> dict:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] > skip]
    med = lambda k: statistics.median(r.get(k, 0.0) for r in rows)  # noqa: E731
    return {"step": med("step_seconds"), "learn": med("learn_seconds"),
            "collect": med("collect_seconds"),
            "actor": med("gen_seconds") + med("grade_seconds") + med("ref_seconds"),
            "push": med("async_push_seconds"), "steps": len(rows),
            "learner_idle": med("async_learner_idle_fraction"),
            "actor_idle": med("async_actor_idle_fraction")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--ks", default="0,1,2")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", default="runs/bench-async")
    a = ap.parse_args()
    ks = [int(k) for k in a.ks.split(",")]
    print(f"CPU: {cpu_name()}; {a.steps} steps per run, precision {a.precision}; medians over "
          "the steps after the pipeline fills\n")
    sync = medians(run("sync", [], a), skip=2)
    results = {}
    for k in ks:
        out = run(f"async-k{k}", ["async_generation=true", f"max_staleness={k}"], a)
        results[k] = medians(out, skip=k + 2)
    print(f"\n{'run':<10} {'step s':>7} {'learn s':>8} {'gen+grade+ref s':>16} {'push s':>7} "
          f"{'model s':>8} {'learner idle':>13} {'actor idle':>11} {'vs sync':>8}")
    print(f"{'sync':<10} {sync['step']:7.2f} {sync['learn']:8.2f} {sync['collect']:16.2f} "
          f"{'-':>7} {sync['collect'] + sync['learn']:8.2f} {'-':>13} {'-':>11} {1.0:8.2f}")
    for k, m in results.items():
        model = steady_state_step(m["actor"], m["learn"], 1, k, m["push"])
        print(f"{'async k=' + str(k):<10} {m['step']:7.2f} {m['learn']:8.2f} {m['actor']:16.2f} "
              f"{m['push']:7.2f} {model:8.2f} {m['learner_idle']:13.2f} {m['actor_idle']:11.2f} "
              f"{sync['step'] / m['step']:8.2f}")
    print("\nmodel s: sync = its collect + learn; async = max(L, G + P, (G + P + L)/(k + 1)) at "
          "the run's own medians (L learn, G actor gen+grade+ref, P push).\n"
          "vs sync: sync step time / this run's (above 1 = faster than the synchronous loop).")


if __name__ == "__main__":
    main()
