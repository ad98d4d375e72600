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

import sys
import time

import rss_phases as rss  # bench/rss_phases.py (bench/ is on sys.path)


def main() -> None:
    rss.start(0.05)
    import agro.collect as C
    import agro.perf as perf
    import agro.trainer as T
    from agro.config import TrainConfig, load_config

    rss.label(perf, "calibrate_precision", "calibrate", after="other")
    T.calibrate_precision = perf.calibrate_precision
    for name, what in (("run_eval", "eval"), ("learn", "learn"), ("save", "save"),
                       ("export_final", "export")):
        rss.label(T.Trainer, name, what, after="other")
    rss.label(C.Collector, "collect", "collect", after="other")
    rss.label(T, "build_models", "build_models", after="other")
    cfg = load_config(TrainConfig, None, sys.argv[1:] + [
        "output_dir=runs/bench-memory", "overwrite=true", "progress=false", "plot=false",
        "save_async=false"])   # a background save would land in the next phase's peak
    t0 = time.time()
    rss.phase.append("init")
    tr = T.Trainer(cfg)
    rss.phase.append("other")
    tr.train()
    rss.report(f"wall {time.time() - t0:.0f} s; peak RSS by phase:", "GB", 14)


if __name__ == "__main__":
    main()
