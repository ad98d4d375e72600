"""Peak resident memory of an `agro train` run, by phase of the trainer.

    AGRO_CACHE_DIR=/tmp/fresh .venv/bin/python bench/memory_phases.py steps=4

Runs the trainer in this process with any ``key=value`` overrides (output in runs/bench-memory),
samples the process's VmRSS every 50 ms in a thread and attributes each sample to the phase
running at that moment (precision calibration, model building, sampling + grading + reference
pass = ``collect``, ``learn``, held-out ``eval``, checkpoint ``save``, ``export``; ``other`` is
whatever runs between them). Prints the wall time and each phase's peak, highest first. Point
``AGRO_CACHE_DIR`` at an empty directory to include the precision calibration a fresh machine runs.
Linux only (/proc/self/status). Run it alone on the machine.
"""
from __future__ import annotations

import functools
import sys
import threading
import time

phase = ["import"]
peak: dict[str, float] = {}


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1e6
    return 0.0


def sample_forever() -> None:
    while True:
        p = phase[-1]
        peak[p] = max(peak.get(p, 0.0), rss_gb())
        time.sleep(0.05)


def label(obj, name: str, what: str) -> None:
    f = getattr(obj, name)

    @functools.wraps(f)
    def g(*a, **k):
        phase.append(what)
        try:
            return f(*a, **k)
        finally:
            phase.append("other")
    setattr(obj, name, g)


def main() -> None:
    threading.Thread(target=sample_forever, daemon=True).start()
    import agro.collect as C
    import agro.perf as perf
    import agro.trainer as T
    from agro.config import TrainConfig, load_config

    label(perf, "calibrate_precision", "calibrate")
    T.calibrate_precision = perf.calibrate_precision
    for name, what in (("run_eval", "eval"), ("learn", "learn"), ("save", "save"),
                       ("export_final", "export")):
        label(T.Trainer, name, what)
    label(C.Collector, "collect", "collect")
    label(T, "build_models", "build_models")
    cfg = load_config(TrainConfig, None, sys.argv[1:] + [
        "output_dir=runs/bench-memory", "overwrite=true", "progress=false", "plot=false",
        "save_async=false"])   # a background save would land in the next phase's peak
    t0 = time.time()
    phase.append("init")
    tr = T.Trainer(cfg)
    phase.append("other")
    tr.train()
    print(f"wall {time.time() - t0:.0f} s; peak RSS by phase:")
    for k, v in sorted(peak.items(), key=lambda x: -x[1]):
        print(f"  {k:14s} {v:.2f} GB")


if __name__ == "__main__":
    main()
