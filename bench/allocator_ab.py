"""The default job (`make train`'s `agro train`) on two or more C allocators, side by side: wall time,
peak resident memory, the per-phase seconds of its steps and the held-out gain.

    .venv/bin/python bench/allocator_ab.py --precision fp32 --json docs/bench/zen5/allocator-fp32.json
    .venv/bin/python bench/allocator_ab.py --precision bf16 --rounds 2
    .venv/bin/python bench/allocator_ab.py --precision auto --arms jemalloc,retain,keep

Each round runs ``python -m agro.cli train precision=<p> output_dir=<tmp> progress=false`` once
per arm (``AGRO_ALLOCATOR`` values: by default jemalloc, agro's default where ray's copy is
installed, and ``retain``, glibc's malloc keeping what is freed; ``keep`` is jemalloc keeping
freed pages; agro.allocator), in the given order and reversed every other round (with three
arms the middle one stays in the middle), each
with an empty agro cache (as on a fresh machine: every calibration the job's settings need runs in
it; ``--precision auto`` is `make train`'s own job, with precision=auto's calibration). Peak
resident memory is the job's (``os.wait4``'s ``ru_maxrss``, as ``/usr/bin/time -v`` reports it:
the largest of the process, across its re-exec, and the children it reaped such as the grader);
minor page faults and CPU seconds add the reaped children's. The allocator changes no arithmetic, so all arms run the same
60 steps and their per-phase seconds (metrics.jsonl) compare step by step. Run it alone: ~5 min an
arm and round in fp32, ~4 in bf16 on a 2-core Zen 5.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from abrounds import code_version  # bench/abrounds.py (bench/ is on sys.path)

PHASES = ("step_seconds", "gen_seconds", "ref_seconds", "learn_seconds")


def run_job(precision: str, allocator: str, work: Path, extra: list[str]) -> dict:
    """One default job under ``AGRO_ALLOCATOR=allocator``; its wall seconds, peak RSS, faults,
    held-out accuracies and the sums of its per-step phase seconds."""
    out_dir, cache = work / f"run-{allocator}", work / f"cache-{allocator}"
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES")
           and not k.startswith(("MALLOC_", "AGRO_ALLOCATOR"))}
    env.update(AGRO_ALLOCATOR=allocator, AGRO_CACHE_DIR=str(cache))
    cmd = [sys.executable, "-m", "agro.cli", "train", f"precision={precision}",
           f"output_dir={out_dir}", "progress=false", *extra]
    log = work / f"{allocator}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if p.returncode != 0:
        raise SystemExit(f"{allocator}: the job failed (exit {p.returncode}); its log: {log}\n"
                         + text[-3000:])
    m = re.search(r"held-out sampled accuracy: before ([\d.]+) -> after ([\d.]+)", text)
    alloc = re.search(r"^\[agro\] precision .*; allocator (.+)$", text, re.M)
    used = re.search(r"^\[agro\] precision (\S+) on ", text, re.M)
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    res = {"wall_s": wall, "peak_rss_gib": ru.ru_maxrss / 2 ** 20, "minor_faults": ru.ru_minflt,
           "sys_s": ru.ru_stime, "user_s": ru.ru_utime, "steps": len(rows),
           "held_out": [float(m.group(1)), float(m.group(2))] if m else None,
           "allocator_logged": alloc.group(1).strip() if alloc else None,
           "precision_used": used.group(1) if used else None,
           **{f"sum_{k}": sum(r.get(k, 0.0) for r in rows) for k in PHASES},
           "per_step_learn_s": [r.get("learn_seconds") for r in rows]}
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--arms", default="jemalloc,retain",
                    help="AGRO_ALLOCATOR values, comma-separated; ratios are against the first")
    ap.add_argument("--json", default=None)
    ap.add_argument("extra", nargs="*", help="more key=value overrides for all arms")
    a = ap.parse_args()
    arms = a.arms.split(",")
    from agro.allocator import CHOICES
    if len(arms) < 2 or len(set(arms)) != len(arms) or not set(arms) <= set(CHOICES):
        raise SystemExit(f"--arms {a.arms}: two or more different AGRO_ALLOCATOR values "
                         f"among {', '.join(CHOICES)}")
    from agro.perf import machine_key
    import torch

    cpu = machine_key()
    print(f"CPU: {cpu}; torch {torch.__version__}; agro {code_version()}; precision {a.precision}")
    work = Path(tempfile.mkdtemp(prefix="allocator-ab-", dir="runs" if Path("runs").is_dir() else None))
    rounds: list[dict] = []
    for r in range(a.rounds):
        row = {}
        for arm in (arms if r % 2 == 0 else arms[::-1]):     # no arm always first
            res = run_job(a.precision, arm, work, a.extra)
            row[arm] = res
            print(f"round {r + 1} {arm:9s} wall {res['wall_s']:7.1f} s  peak {res['peak_rss_gib']:.2f} GiB"
                  f"  faults {res['minor_faults']:>9,d}  sys {res['sys_s']:6.1f} s  learn "
                  f"{res['sum_learn_seconds']:6.1f} s  sampling {res['sum_gen_seconds']:6.1f} s  ref "
                  f"{res['sum_ref_seconds']:5.1f} s  held-out {res['held_out']}  {res['precision_used']}  "
                  f"[{res['allocator_logged']}]",
                  flush=True)
        rounds.append(row)
    shutil.rmtree(work, ignore_errors=True)

    def ratio(arm, key):
        return statistics.median(x[arm][key] / x[arms[0]][key] for x in rounds)
    summary = {}
    for arm in arms[1:]:
        summary.update({f"{arm}/{arms[0]} {k}": ratio(arm, k) for k in
                        ("wall_s", *(f"sum_{p}" for p in PHASES))})
        summary[f"{arm}-{arms[0]} peak_rss_gib"] = statistics.median(
            x[arm]["peak_rss_gib"] - x[arms[0]]["peak_rss_gib"] for x in rounds)
    for k, v in summary.items():
        print(f"{k:34s} {v:+.3f}" if "peak" in k else f"{k:34s} {v:.3f}x")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"cpu": cpu, "precision": a.precision,
                                            "torch": torch.__version__, "commit": code_version(),
                                            "arms": arms, "extra": a.extra,
                                            "rounds": rounds, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
