"""Page faults and kernel time of the learner step: what the C allocator costs.

    LD_PRELOAD=<jemalloc> .venv/bin/python bench/learner_faults.py bf16 [--steps 8]
    MALLOC_CONF=dirty_decay_ms:-1 LD_PRELOAD=<jemalloc> .venv/bin/python bench/learner_faults.py bf16

(``agro train`` runs on jemalloc, agro.allocator; run in-process, preload it as the command line
does: ``.venv/bin/python -c "from agro.allocator import find_jemalloc; print(find_jemalloc())"``.
``MALLOC_CONF`` passes jemalloc options.)

Builds the default job's trainer in the given precision, samples one step's groups (seed 1),
attaches their reference log-probs, runs two warm-up learner steps and then ``--steps`` more on
the same groups, printing for each its wall seconds, minor page faults, and system and user CPU
seconds (``getrusage``), then the process's peak resident memory. Run it alone.
"""
from __future__ import annotations

import argparse
import resource
import time

from abrounds import bench_trainer, one_step_groups  # bench/abrounds.py (bench/ is on sys.path)

from agro.allocator import in_use


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("precision", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    tr = bench_trainer("learner-faults", f"precision={a.precision}")
    groups = one_step_groups(tr, seed=1)
    tr.collector.attach_ref_logprobs(groups)
    for _ in range(2):
        tr.learn(groups)
    print(f"allocator: {in_use()}")
    print("step  wall s  minor faults  sys s  user s")
    for i in range(a.steps):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        tr.learn(groups)
        dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        print(f"{i + 1:4d}  {dt:6.2f}  {r1.ru_minflt - r0.ru_minflt:12d}  "
              f"{r1.ru_stime - r0.ru_stime:5.2f}  {r1.ru_utime - r0.ru_utime:6.2f}", flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB")
    tr.close_generator()


if __name__ == "__main__":
    main()
