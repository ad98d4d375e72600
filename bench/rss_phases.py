"""Peak resident memory by phase, in this process: the sampler bench/memory_phases.py and
bench/learner_memory.py share.

:func:`start` runs a daemon thread that reads VmRSS from /proc/self/status every ``period``
seconds and attributes it to the phase running, ``phase[-1]``. :func:`label` wraps a callable
so that its calls are a phase. :func:`report` prints each phase's peak, highest first. Linux only.
"""
from __future__ import annotations

import functools
import threading
import time

phase = ["import"]
peak: dict[str, int] = {}          # phase -> peak VmRSS in kB


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def start(period: float) -> None:
    def sample_forever() -> None:
        while True:
            p = phase[-1]
            peak[p] = max(peak.get(p, 0), rss_kb())
            time.sleep(period)
    threading.Thread(target=sample_forever, daemon=True).start()


def label(obj, name: str, what: str, after: str | None = None) -> None:
    """Replace ``obj.name`` by a wrapper under which the phase is ``what``; on return the phase
    becomes ``after``, or the one that was running (``None``: nested phases)."""
    f = getattr(obj, name)

    @functools.wraps(f)
    def g(*a, **k):
        prev = phase[-1]
        phase.append(what)
        try:
            return f(*a, **k)
        finally:
            phase.append(prev if after is None else after)
    setattr(obj, name, g)


def report(title: str, unit: str = "GiB", width: int = 12) -> None:
    """Each phase's peak, highest first, in GiB (2^30 bytes) or GB (10^9 bytes)."""
    div = {"GiB": 2**20, "GB": 1e9 / 1024}[unit]
    print(title)
    for k, v in sorted(peak.items(), key=lambda x: -x[1]):
        print(f"  {k:{width}s} {v / div:.2f} {unit}")
