"""The markdown tables of one ``bench/cpu_report.sh`` directory: issue 11's figures for one CPU.

    python3 bench/cpu_report.py docs/bench/cpu/epyc-zen4-dec03

Reads only the files the shell script wrote (no torch; safe to run beside a benchmark) and
prints: the CPU; the GEMM rates; per precision, each phase's median seconds over steps 2..N of
the 8-step on-policy runs with its FLOP, achieved rate and fraction of the GEMM peak the trainer
measured at the run's start; the offline step against the on-policy step; agro vs TRL; the
default job's wall time, peak RSS and held-out accuracy. A missing piece prints as missing.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

PHASES = [  # (label, seconds key, FLOP key, rate key, peak-fraction key)
    ("sampling (32 x <= 32 tokens)", "gen_seconds", None, None, None),
    ("reference pass", "ref_seconds", "ref_tflop", "ref_tflops", "ref_peak_frac"),
    ("learner (fwd + bwd + AdamW)", "learn_seconds", "learn_tflop", "learn_tflops", "learn_peak_frac"),
    ("step", "step_seconds", None, None, None),
]


def rows(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()]


def med(rs: list[dict], key: str, skip: int = 1) -> float | None:
    vals = [r[key] for r in rs[skip:] if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def time_v(log: Path) -> dict:
    """Wall seconds and peak RSS (GiB) from a ``/usr/bin/time -v`` log."""
    if not log.exists():
        return {}
    t = log.read_text(errors="replace")
    out = {}
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", t)
    if m:
        parts = [float(p) for p in m.group(1).split(":")]
        out["wall"] = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)
    if m:
        out["rss_gib"] = int(m.group(1)) / 2 ** 20
    m = re.search(r"measured GEMM peak (\d+) GFLOP/s", t)
    if m:
        out["peak"] = int(m.group(1))
    m = re.search(r"precision: auto -> (\w+) \(.*?estimated step fp32 ([\d.]+) s vs bf16 ([\d.]+) s", t)
    if m:
        out["auto"] = f"auto -> {m.group(1)} (estimated step fp32 {m.group(2)} s vs bf16 {m.group(3)} s)"
    m = re.search(r"Exit status: (\d+)", t)
    out["exit"] = int(m.group(1)) if m else None
    if "Command terminated by signal" in t:      # GNU time then still says "Exit status: 0"
        out["exit"] = "signal"
    return out


def held_out(run: Path) -> str:
    """'before -> after' held-out sampled accuracy from the run's events.jsonl."""
    f = run / "events.jsonl"
    if not f.exists():
        return "?"
    accs = []
    for line in f.read_text().splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("kind") == "eval":
            a = e.get("sampled_accuracy")
            if a is not None:
                accs.append(a)
    return " -> ".join(f"{a:.3f}" for a in accs) if accs else "?"


def fmt(x, spec=".2f", missing="-"):
    return missing if x is None else format(x, spec)


def mins(s):
    if s is None:
        return "missing"
    s = round(s)
    return f"{s // 60} min {s % 60} s"


def main(d: Path) -> None:
    print(f"### {d.name}\n")
    cpu = d / "cpu.txt"
    print("```\n" + (cpu.read_text().strip() if cpu.exists() else "cpu.txt missing") + "\n```\n")
    mm = d / "matmul.txt"
    print("GEMM rates (`bench/matmul.py`):\n\n```\n" + (mm.read_text().strip() if mm.exists() else "missing")
          + "\n```\n")

    print("Per step, 8-step runs, medians of steps 2-8 (`metrics.jsonl`), two rounds (r1, r2):\n")
    print("| precision | phase | seconds r1 / r2 | TFLOP | TFLOP/s | fraction of GEMM peak | other |")
    print("|---|---|---|---|---|---|---|")
    on = {}
    for p in ("fp32", "bf16"):
        runs = [rows(d / f"on-{p}-r{r}") for r in (1, 2)]
        on[p] = runs
        tv = [time_v(d / f"on-{p}-r{r}" / "log.txt") for r in (1, 2)]
        for label, sk, fk, rk, pk in PHASES:
            secs = " / ".join(fmt(med(rs, sk)) for rs in runs)
            flop = fmt(med(runs[0], fk), ".3f") if fk else ""
            rate = " / ".join(fmt(med(rs, rk), ".3f") for rs in runs) if rk else ""
            frac = " / ".join(fmt(med(rs, pk)) for rs in runs) if pk else ""
            other = ""
            if sk == "gen_seconds":
                other = (" / ".join(fmt(med(rs, "gen_tokens_per_second"), ".0f") for rs in runs) + " tok/s, "
                         + " / ".join(fmt(med(rs, "gen_weight_gbps"), ".1f") for rs in runs)
                         + " GB/s of weights read")
            if sk == "step_seconds":
                other = ("completion " + " / ".join(fmt(med(rs, "completion_len_mean"), ".1f") for rs in runs)
                         + " tokens; GEMM peak " + " / ".join(fmt(t.get("peak"), "d") for t in tv)
                         + " GFLOP/s; peak RSS " + " / ".join(fmt(t.get("rss_gib"), ".2f") for t in tv) + " GiB")
            print(f"| {p} | {label} | {secs} | {flop} | {rate} | {frac} | {other} |")
    print()

    print("Offline step (`source=offline`, no sampling, reference log-probs from the file) "
          "against the on-policy step, same precision and round, medians of steps 2-8:\n")
    print("| precision | round | on-policy s/step | offline s/step | offline learner s | ratio (target <= 0.4) |")
    print("|---|---|---|---|---|---|")
    for p in ("fp32", "bf16"):
        for r in (1, 2):
            a, b = on[p][r - 1], rows(d / f"off-{p}-r{r}")
            sa, sb = med(a, "step_seconds"), med(b, "step_seconds")
            ratio = fmt(sb / sa if sa and sb else None)
            print(f"| {p} | r{r} | {fmt(sa)} | {fmt(sb)} | {fmt(med(b, 'learn_seconds'))} | {ratio} |")
    print()

    print("Against TRL 1.16.0's GRPOTrainer (`bench/vs_trl.py --steps 6 --micro-batch 32`), "
          "medians of steps 2-6:\n")
    print("| precision | agro s/step | TRL s/step | speed-up per step | mean completion agro / TRL | per generated token |")
    print("|---|---|---|---|---|---|")
    for p in ("fp32", "bf16"):
        f = d / f"vs_trl-{p}.json"
        if not f.exists():
            print(f"| {p} | missing | | | | |")
            continue
        j = json.loads(f.read_text())
        w = j["args"]["warmup"]
        m = j["median"]
        lens = {arm: statistics.mean([v for x in j["runs"] if x["arm"] == arm
                                      for v in x["completion_len"][w:] if v is not None])
                for arm in ("agro", "trl")}
        per_tok = (lens["agro"] / m["agro"]) / (lens["trl"] / m["trl"])
        print(f"| {p} | {m['agro']:.2f} | {m['trl']:.2f} | **{m['trl'] / m['agro']:.2f}x** | "
              f"{lens['agro']:.1f} / {lens['trl']:.1f} | {per_tok:.2f}x |")
    print()

    print("The default job (`make train`: `agro train`, 60 steps, evaluations, checkpoints, export), "
          "under `/usr/bin/time -v`:\n")
    print("| job | precision | wall | 60 steps (sum of step_seconds) | peak RSS | held-out sampled accuracy |")
    print("|---|---|---|---|---|---|")
    for name in ("main-job", "main-job-fp32", "main-job-bf16"):
        log = d / f"{name}.log"
        if not log.exists():
            continue
        t = time_v(log)
        rs = rows(d / name)
        steps = sum(r.get("step_seconds", 0.0) for r in rs)
        cfg = d / name / "config.yaml"
        prec = "?"
        if cfg.exists():
            m = re.search(r"^precision: *(\w+)", cfg.read_text(), re.M)
            prec = m.group(1) if m else "?"
        if t.get("auto"):
            prec += f" ({t['auto']})"
        status = "" if t.get("exit") == 0 else f" (exit {t.get('exit')})"
        print(f"| {name}{status} | {prec} | {mins(t.get('wall'))} | {steps:.0f} s over {len(rs)} steps | "
              f"{fmt(t.get('rss_gib'))} GiB | {held_out(d / name)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
