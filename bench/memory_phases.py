"""Peak resident memory of an `agro train` run, by phase of the trainer.

    AGRO_CACHE_DIR=/tmp/fresh .venv/bin/python bench/memory_phases.py steps=4
    .venv/bin/python bench/memory_phases.py --retain --fine precision=fp32 steps=20

Runs the trainer in this process with any ``key=value`` overrides (output in runs/bench-memory),
samples the process's VmRSS every 50 ms in a thread and attributes each sample to the phase
running at that moment (precision calibration, model building, sampling + grading + reference
pass = ``collect``, ``learn``, held-out ``eval``, checkpoint ``save``, ``export``; ``other`` is
whatever runs between them). Prints the wall time, each phase's peak, highest first, the sum of
VmRSS's rises while each phase ran, and each new high of VmRSS with the phase (and step) it came
in. oneDNN's caches are capped as the command line caps them (agro.allocator.cap_onednn_caches).
Point ``AGRO_CACHE_DIR`` at an empty directory to include the precision calibration a fresh
machine runs. ``--fine`` splits the reference pass out of ``collect`` (``reference``) and
``learn`` into ``forward``, ``backward`` and ``optimizer`` (what is left of each stays under its
name), and prints after each learner step what glibc's malloc holds (mallinfo2: its heaps, the
bytes in use, the free bytes and chunks inside them). ``--retain`` first tells glibc's malloc to
keep freed memory (what ``AGRO_ALLOCATOR=retain`` does; run it without LD_PRELOAD); without it
the process runs on whatever allocator it was started with (``agro train`` preloads jemalloc:
preload it to measure that). Linux only (/proc/self/status). Run it alone on the machine.
"""
from __future__ import annotations

import sys
import time

import rss_phases as rss  # bench/rss_phases.py (bench/ is on sys.path)


def main() -> None:
    args = sys.argv[1:]
    fine, retain = "--fine" in args, "--retain" in args
    args = [a for a in args if a not in ("--fine", "--retain")]
    from agro.allocator import cap_onednn_caches
    cap_onednn_caches()     # as the command line does, before the first oneDNN primitive
    if retain:
        from agro.allocator import retain_freed_memory
        print(retain_freed_memory())
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
    learn = T.Trainer.learn

    def counted_learn(self, *a, **k):
        rss.tag[0] = f" (step {self.step + 1})"
        try:
            out = learn(self, *a, **k)
        finally:    # what runs next (the next step's sampling, an evaluation) is not this step
            rss.tag[0] = ""
        if fine:
            print(f"after learning step {self.step + 1}: VmRSS {rss.rss_kb() / 1e6:.2f} GB; "
                  f"{rss.malloc_summary()}", flush=True)
        return out
    T.Trainer.learn = counted_learn
    if fine:
        import torch
        rss.label(C.Collector, "attach_ref_logprobs", "reference")
        rss.label(T.Trainer, "micro_batch_loss", "forward")
        rss.label(torch.Tensor, "backward", "backward")
        rss.label(torch.optim.AdamW, "step", "optimizer")
    cfg = load_config(TrainConfig, None, args + [
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
